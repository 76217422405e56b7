"""`serve --workers N`: N processes answering on one port.

The parent binds the port, loads the flow, then forks the workers; each inherits the listening
socket (the kernel hands each new connection to whichever worker accepts first, so an idle worker
takes it before a busy one) and opens its own connections after the fork: no database connection, HTTP
pool or event loop is ever shared between processes. The parent serves nothing itself: it waits.
One shared socket rather than an SO_REUSEPORT socket per worker: a replacement worker accepts from
the very socket its predecessor did, so no connection queued in a dead worker's own backlog is lost,
and no other process can bind the port beside serve's.

- Start-up: the first worker starts alone, so a wrong setting (a missing key, an unreachable
  database) is reported once, by it, and serve exits with its code; then the others. The `serving
  flow ...` line comes once every worker is ready.
- SIGTERM / SIGINT to the parent go to every worker (each drains as a single serve does: drain.py),
  the parent closes its copy of the listening socket (once the workers have closed theirs, a new
  connection is refused at once rather than left waiting), and waits for them all; then it exits as
  a single serve does (0 after SIGTERM, 130 after Ctrl-C). A second signal is passed on too (the
  drain ends at once). Workers run in their own process group, so a Ctrl-C on a terminal reaches
  them once, through the parent; they get SIGTERM if the parent itself is killed.
- A worker that ends while serve is not stopping is replaced: one that died (killed, out of memory)
  is reported as an error, its streams in flight lost; one sent SIGTERM on its own drains first (a
  way to recycle workers one at a time). One that dies before it is ready, or more than MAX_DEATHS
  ends within DEATH_WINDOW seconds, stops serve (exit 1): something is wrong that a restart will
  not mend.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

log = structlog.get_logger("flowrunner.serve")

MAX_DEATHS = 5
PER_CPU = 4  # --workers at most this many per CPU
DEATH_WINDOW = 60.0
_STOPS = (signal.SIGTERM, signal.SIGINT)


def worker_count(text: str) -> int:
    """`--workers`: a positive integer up to PER_CPU per CPU, or `auto` (the CPUs this process may run on)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if text.strip().lower() == "auto":
        return cpus
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a number of workers: use a whole number >= 1, or auto (one per CPU)")
    if int(text) > PER_CPU * cpus:  # a typo's 100000 would fork until memory runs out
        raise ValueError(f"{text!r} workers is more than {PER_CPU} per CPU ({cpus} here): a worker holds many streams, "
                         "and more processes than cores add only memory; use auto (one per CPU)")
    return int(text)


@dataclass
class Worker:
    """What a worker process knows of itself: its number, and how to tell the parent it is ready."""

    index: int
    ready_fd: int

    def ready(self) -> None:
        os.write(self.ready_fd, b"1")
        os.close(self.ready_fd)


@dataclass
class _Child:
    index: int
    pid: int
    ready_fd: int | None  # the read end, until the worker says it is ready
    started: float = field(default_factory=time.monotonic)


class StopServing(BaseException):
    """Raised in a worker by SIGTERM: it ends the worker's server the way Ctrl-C does."""


def _raise_stop(_signum: int, _frame: Any) -> None:
    raise StopServing


class Supervisor:
    def __init__(self, count: int, sock: socket.socket, on_ready: Callable[[list[int]], None]) -> None:
        self.count = count
        self.sock = sock  # the listening socket the workers inherit: closed here once serve stops
        self.on_ready = on_ready  # called in the parent once every worker is ready, with their pids
        self.parent = os.getpid()
        self.children: dict[int, _Child] = {}
        self.stopping: int | None = None  # the signal that stops serve
        self.deaths: list[float] = []
        self.failed: int | None = None  # the exit code serve ends with, when it gives up
        self._wake_r, self._wake_w = os.pipe()

    def run(self) -> Worker | int:
        """In the parent: supervise until stopped, then the exit code (or re-raise the signal, as a
        single serve ends). In each worker (the fork returns there): its Worker, to serve with."""
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, self._on_stop) for sig in _STOPS}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            worker = self._supervise()
        finally:
            if os.getpid() == self.parent:  # a worker set its own handlers
                signal.set_wakeup_fd(old_wakeup)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                os.close(self._wake_r)
                os.close(self._wake_w)
        if worker is not None:
            return worker
        if self.failed is not None:
            return self.failed
        if self.stopping == signal.SIGINT:
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt: "Interrupted.", 130, as a single serve
        return 0

    # --- the parent -------------------------------------------------------------------------------

    def _supervise(self) -> Worker | None:
        # The first worker alone: a set-up error is reported once, by it.
        all_ready = lambda: not any(c.ready_fd is not None for c in self.children.values())  # noqa: E731
        worker = self._start(0) or self._wait(all_ready)
        if worker is not None:
            return worker
        for index in range(1, self.count):
            if self.stopping is not None or self.failed is not None:
                break
            worker = self._start(index)
            if worker is not None:
                return worker
        worker = self._wait(all_ready)
        if worker is not None:
            return worker
        if self.stopping is None and self.failed is None:
            self.on_ready(sorted(c.pid for c in self.children.values()))
        while self.children:
            worker = self._wait(lambda: False)
            if worker is not None:
                return worker
        return None

    def _start(self, index: int) -> Worker | None:
        """Fork worker `index`; in the child, return its Worker."""
        ready_r, ready_w = os.pipe()
        # What the parent holds (the flow, the modules) stays out of the workers' garbage collections:
        # they would write to every such object's header and so copy the pages the fork shares.
        gc.freeze()
        # No stop signal until the worker is in `children` (else it would not be passed on) and, in the
        # worker, until its own handlers are set (else the parent's would run there).
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
        try:
            if self.stopping is not None or self.failed is not None:
                os.close(ready_r)
                os.close(ready_w)
                return None
            pid = os.fork()
            if pid == 0:  # the worker
                os.close(ready_r)
                self._become_worker()
                return Worker(index, ready_w)
            os.close(ready_w)
            os.set_blocking(ready_r, False)
            self.children[pid] = _Child(index, pid, ready_r)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
        return None

    def _become_worker(self) -> None:
        for child in self.children.values():  # the parent's ends of its siblings' pipes
            if child.ready_fd is not None:
                os.close(child.ready_fd)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.children = {}
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_stop)
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent only, which passes it on once
        _die_with_parent(self.parent)
        structlog.contextvars.bind_contextvars(worker=os.getpid())

    def _wait(self, done: Any) -> Worker | None:
        """Handle signals, readiness and deaths until `done()`, or a replacement worker is forked
        (in which case, in that child, its Worker)."""
        while not done():
            fds = [self._wake_r, *(c.ready_fd for c in self.children.values() if c.ready_fd is not None)]
            if not self.children:
                return None
            try:
                readable, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                readable = []
            if self._wake_r in readable:
                _drain(self._wake_r)
            for child in list(self.children.values()):
                if child.ready_fd is not None and child.ready_fd in readable:
                    if os.read(child.ready_fd, 1):
                        os.close(child.ready_fd)
                        child.ready_fd = None
            worker = self._reap()
            if worker is not None:
                return worker
        return None

    def _reap(self) -> Worker | None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return None
            if pid == 0:
                return None
            child = self.children.pop(pid, None)
            if child is None:
                continue
            was_ready = child.ready_fd is None
            if child.ready_fd is not None:
                os.close(child.ready_fd)
            if self.stopping is not None or self.failed is not None:
                continue  # stopping: every exit is expected
            code = os.waitstatus_to_exitcode(status)
            how = f"killed by signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            if not was_ready:
                # Its own error is on stderr already (a set-up error): stop the others and end with it.
                if child.index or self.children:
                    log.error("a worker failed to start; stopping", worker=pid, how=how)
                self._give_up(code if code > 0 else 1)
                continue
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW] + [now]
            if len(self.deaths) > MAX_DEATHS:
                log.error("workers keep ending; stopping", worker=pid, how=how,
                          ends=len(self.deaths), seconds=DEATH_WINDOW)
                self._give_up(1)
                continue
            worker = self._start(child.index)
            if worker is not None:
                return worker
            if self.children and self.stopping is None:
                new = max(self.children, key=lambda p: self.children[p].started)
                if code == 0:  # it was told to stop (SIGTERM to it alone) and drained
                    log.warning("a worker stopped; starting another", worker=pid, replacement=new)
                else:
                    log.error("a worker died; starting another (its streams in flight were lost)", worker=pid,
                              how=how, replacement=new)
        return None

    def _give_up(self, code: int) -> None:
        if self.failed is None:
            self.failed = code
            self._signal_all(signal.SIGTERM)

    def _on_stop(self, signum: int, _frame: Any) -> None:
        if self.stopping is None:
            self.stopping = signum
            self.sock.close()
        self._signal_all(signum)  # a second one too: the drain ends at once

    def _signal_all(self, signum: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this worker when the parent dies (Linux), so no worker serves on without it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)
