"""Cold start of the CLI against its floor, measured in the same run.

    python bench/startup.py [--runs 15] [--files 500]

Prints the median wall time of `flowrunner --help` and `flowrunner validate flows/` against
`python -c "import yaml, jsonschema, click"` (goal: ratio <= 1.3), and the time per file to
validate a folder of 500 flow files."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("flowrunner")


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def median_times(commands: dict[str, list[str]], runs: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for name, cmd in commands.items():
        wall(cmd)  # warm the page cache and .pyc files
    for _ in range(runs):  # interleaved, so load on a shared machine hits every command alike
        for name, cmd in commands.items():
            samples[name].append(wall(cmd))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--files", type=int, default=500)
    args = parser.parse_args()
    if not EXE.exists():
        sys.exit(f"{EXE} not found: run `make install` (or pip install -e .) first")
    commands = {
        "baseline: import yaml, jsonschema, click": [sys.executable, "-c", "import yaml, jsonschema, click"],
        "flowrunner --help": [str(EXE), "--help"],
        "flowrunner validate flows/": [str(EXE), "validate", "flows"],
    }
    medians = median_times(commands, args.runs)
    base = medians["baseline: import yaml, jsonschema, click"]
    print(f"{'command':<45} {'median ms':>10} {'ratio':>7}  (goal: ratio <= 1.3)")
    for name, value in medians.items():
        print(f"{name:<45} {value * 1000:>10.1f} {value / base:>7.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        sources = sorted((ROOT / "flows").glob("*.yaml"))
        for i in range(args.files):
            shutil.copy(sources[i % len(sources)], Path(tmp) / f"flow_{i:04d}.yaml")
        one = median_times({"one": [str(EXE), "validate", str(sources[0])]}, 5)["one"]
        many = median_times({"many": [str(EXE), "validate", tmp]}, 3)["many"]
        print(f"validate {args.files} files: {many * 1000:.0f} ms in all, "
              f"{(many - one) / max(args.files - 1, 1) * 1000:.2f} ms per file after start-up")


if __name__ == "__main__":
    main()
