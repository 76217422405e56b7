"""Cold start of the CLI against its floor, measured in the same run.

    python bench/startup.py [--runs 15] [--files 500]

What it measures: each command as a fresh process, from exec to exit, as a user runs it:
`flowrunner --help` and `flowrunner validate flows/` (the example flows: import, build the schema,
parse and check every file) against `python -c "import yaml, jsonschema, click"`, the libraries
validate cannot do without (goal: ratio <= 1.3). Medians of wall time, and of CPU time (user +
system), which a busy shared machine disturbs less. flowrunner's bytecode is compiled first, as
an install leaves it: with PYTHONDONTWRITEBYTECODE set, a source file edited since would be
compiled again at every start and measured as start-up. Then the time per file to validate a
folder of 500 flow files."""

from __future__ import annotations

import argparse
import compileall
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("flowrunner")


def _children_cpu() -> float:
    """CPU seconds used by ended child processes, to the microsecond (os.times counts 10 ms ticks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of `cmd`."""
    cpu = _children_cpu()
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start, _children_cpu() - cpu


def median_times(commands: dict[str, list[str]], runs: int) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for cmd in commands.values():
        run_once(cmd)  # warm the page cache
    for _ in range(runs):  # interleaved, so load on a shared machine hits every command alike
        for name, cmd in commands.items():
            samples[name].append(run_once(cmd))
    return {name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
            for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--files", type=int, default=500)
    args = parser.parse_args()
    if not EXE.exists():
        sys.exit(f"{EXE} not found: run `make install` (or pip install -e .) first")
    compileall.compile_dir(ROOT / "flowrunner", quiet=1)
    baseline = "baseline: import yaml, jsonschema, click"
    commands = {
        baseline: [sys.executable, "-c", "import yaml, jsonschema, click"],
        "flowrunner --help": [str(EXE), "--help"],
        "flowrunner validate flows/": [str(EXE), "validate", "flows"],
    }
    medians = median_times(commands, args.runs)
    base_wall, base_cpu = medians[baseline]
    print(f"{'command':<45} {'wall ms':>8} {'ratio':>6} {'cpu ms':>8} {'ratio':>6}  (goal: ratio <= 1.3)")
    for name, (wall, cpu) in medians.items():
        print(f"{name:<45} {wall * 1000:>8.1f} {wall / base_wall:>6.2f} {cpu * 1000:>8.1f} {cpu / base_cpu:>6.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        sources = sorted((ROOT / "flows").glob("*.yaml"))
        for i in range(args.files):
            shutil.copy(sources[i % len(sources)], Path(tmp) / f"flow_{i:04d}.yaml")
        one = median_times({"one": [str(EXE), "validate", str(sources[0])]}, 5)["one"][0]
        many = median_times({"many": [str(EXE), "validate", tmp]}, 3)["many"][0]
        print(f"validate {args.files} files: {many * 1000:.0f} ms in all, "
              f"{(many - one) / max(args.files - 1, 1) * 1000:.2f} ms per file after start-up")


if __name__ == "__main__":
    main()
