"""What a run may use on its worker host: CPUs (pinned), memory, and how sizes are written.

- ``parse_size("2G")`` is the one reader of memory sizes (flow, shim and plugins' checks):
  a number with an optional K, M, G or T (powers of 1024, like SLURM's ``--mem``).
- ``CpuSets`` hands out disjoint CPU sets of ``cores_per_run`` CPUs from the host's usable
  ones (``os.sched_getaffinity``, so a worker confined by SLURM, Docker or taskset pins runs
  inside its own share). A CPU is owned through an ``flock`` on its file in a directory
  every flow run of one stack shares (its Prefect home), so two batches at once share the
  host's CPUs instead of doubling them, and the CPUs of a flow run that dies are freed by
  the kernel with its file descriptors.
- ``MemoryGate`` answers "may a run needing SIZE start now?": the host's available memory,
  less what the runs already admitted may still grow into (each reserves SIZE, like a
  SLURM allocation), must cover SIZE.
- ``tree_rss`` is the watchdog's measure of a run: the resident memory of its process tree.

No Prefect here.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

# Thread-count variables of the usual runtimes (OpenMP, OpenBLAS, MKL, numexpr, Apple's
# Accelerate, BLIS): set to the run's cores so a library does not start one thread per
# CPU of the host. A command that sets one itself (``OMP_NUM_THREADS=8 sim``) still wins.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size like ``2G``, ``512M``, ``1.5G``, ``2GiB`` or a plain byte count.

    Raises ValueError with a one-line message naming the value and the fix.
    """
    found = _SIZE.match(str(text))
    if not found:
        raise ValueError(f"'{text}' is not a memory size: write a number with K, M, G or T, e.g. 2G")
    number, unit = found.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    if size < 1:
        raise ValueError(f"'{text}' is no memory at all: give a size above 0, e.g. 512M")
    return size


def format_size(size: float) -> str:
    """``2.0G``-style, the way people write sizes."""
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit]:
            return f"{size / _UNITS[unit]:.1f}{unit}"
    return f"{int(size)}B"


def cpu_list(cpus: Iterable[int]) -> str:
    """``0-3,6``: the CPU-list format of taskset and /proc/*/status."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def runs_at_once(max_parallel: int | None, cores_per_run: int, cpus: int) -> int:
    """min(max_parallel, cpus // cores_per_run), at least 1: the slots of a flow run."""
    by_cores = max(1, cpus // cores_per_run)
    return by_cores if max_parallel is None else max(1, min(max_parallel, by_cores))


class CpuSets:
    """Disjoint sets of ``per_run`` CPUs out of ``cpus``, shared with the other flow runs
    that use the same ``directory``. Not thread-safe: the scheduler calls it under its lock.
    """

    def __init__(self, cpus: list[int], per_run: int, directory: Path) -> None:
        if per_run < 1:
            raise ValueError(f"cores per run must be at least 1, not {per_run}")
        self.cpus = sorted(cpus)
        # More cores than the host has: one run at a time, on all of them.
        self.per_run = min(per_run, len(self.cpus))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._files = {cpu: os.open(directory / f"cpu{cpu}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                       for cpu in self.cpus}
        self._mine: set[int] = set()

    def take(self) -> tuple[int, ...] | None:
        """``per_run`` free CPUs, now owned; None (and nothing taken) if there are not enough."""
        taken: list[int] = []
        for cpu in self.cpus:
            if cpu in self._mine:
                continue
            try:
                fcntl.flock(self._files[cpu], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another flow run's
                continue
            taken.append(cpu)
            self._mine.add(cpu)
            if len(taken) == self.per_run:
                return tuple(taken)
        self.give(taken)
        return None

    def give(self, cpus: Iterable[int]) -> None:
        for cpu in cpus:
            fcntl.flock(self._files[cpu], fcntl.LOCK_UN)
            self._mine.discard(cpu)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)  # also releases its lock
        self._files.clear()
        self._mine.clear()


class MemoryGate:
    """Admission by memory: each admitted run reserves ``per_run`` bytes until it ends."""

    def __init__(self, per_run: int) -> None:
        self.per_run = per_run
        self._lock = threading.Lock()
        self._usage: dict[object, int] = {}  # admitted run -> its tree's RSS, last seen

    def fits(self) -> tuple[bool, int]:
        """(whether a run may start now, the bytes it could have)."""
        import psutil

        available = psutil.virtual_memory().available
        with self._lock:
            still_to_grow = sum(max(0, self.per_run - rss) for rss in self._usage.values())
        free = available - still_to_grow
        return free >= self.per_run, free

    def admit(self, key: object) -> None:
        with self._lock:
            self._usage[key] = 0

    def seen(self, key: object, rss: int) -> None:
        with self._lock:
            if key in self._usage:
                self._usage[key] = rss

    def release(self, key: object) -> None:
        with self._lock:
            self._usage.pop(key, None)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total
