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
- ``process_tree``/``tree_sum`` are how the watchdog (and the benchmarks) measure a run:
  the resident memory of its process tree.

No Prefect here.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
import re
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

# Thread-count variables of the usual runtimes (OpenMP, OpenBLAS, MKL, numexpr, Apple's
# Accelerate, BLIS): set to the run's cores so a library does not start one thread per
# CPU of the host. A command that sets one itself (``OMP_NUM_THREADS=8 sim``) still wins.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")

_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# A number and a unit (K, M, G or T, optionally followed by B or iB): "2G", "1.5g", "2GiB".
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT])(?:i?B)?\s*$", re.IGNORECASE)
# Below this a size is surely a slip (e.g. "2K" for "2G"): no run fits in it.
_LEAST_SIZE = 1024**2


def parse_size(text: str) -> int:
    """Bytes in a size like ``2G``, ``512M``, ``1.5G`` or ``2GiB`` (powers of 1024).

    A unit is required: a bare number means bytes to some tools and megabytes to SLURM.
    Raises ValueError with a one-line message naming the value and the fix.
    """
    found = _SIZE.match(str(text))
    if not found:
        raise ValueError(f"'{text}' is not a memory size: write a number with K, M, G or T, e.g. 2G")
    number, unit = found.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    if size < _LEAST_SIZE:
        raise ValueError(f"'{text}' is less than 1M, too little for any run: did you mean "
                         f"{number}G? (e.g. 2G)")
    return size


def check_resources(cores_per_run: int | None = None, memory_per_run: str | None = None,
                    retries: int | None = None, retry_delay: float | None = None,
                    spell=lambda name: name) -> int | None:
    """Refuse per-run resources no flow can use, with one line (ValueError) naming the value
    as ``spell(name)`` writes it (the shim: ``--cores-per-run``; the flow: ``cores_per_run``);
    the memory in bytes, or None. The one check the shim and the flow share."""
    if cores_per_run is not None and cores_per_run < 1:
        raise ValueError(f"{spell('cores_per_run')} {cores_per_run} is below 1: "
                         "pass the CPUs one run needs")
    if retries is not None and retries < 0:
        raise ValueError(f"{spell('retries')} {retries} is below 0: pass how many times "
                         "to re-run a failed run")
    if retry_delay is not None and not 0 <= retry_delay < math.inf:
        raise ValueError(f"{spell('retry_delay')} {retry_delay} is not a number of seconds "
                         ">= 0: pass e.g. 10")
    if memory_per_run in (None, ""):
        return None
    try:
        return parse_size(memory_per_run)
    except ValueError as exc:
        raise ValueError(f"{spell('memory_per_run')} {exc}") from None


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

    Whoever collects a set holds the directory's turn lock until the set is complete and
    keeps the CPUs it found meanwhile: a batch needing 4 CPUs gets them as they free up,
    instead of losing every race to a batch that needs 1.
    """

    def __init__(self, cpus: list[int], per_run: int, directory: Path) -> None:
        if per_run < 1:
            raise ValueError(f"cores per run must be at least 1, not {per_run}")
        self.cpus = sorted(cpus)
        # More cores than the host has: one run at a time, on all of them.
        self.per_run = min(per_run, len(self.cpus))
        private_dir(directory)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        self._turn = os.open(directory / "turn.lock", flags, 0o600)
        self._files = {cpu: os.open(directory / f"cpu{cpu}.lock", flags, 0o600)
                       for cpu in self.cpus}
        self._mine: set[int] = set()  # CPUs this instance holds (runs' and the partial set)
        self._partial: list[int] = []  # collected for the next set, while holding the turn

    def take(self) -> tuple[int, ...] | None:
        """``per_run`` CPUs, now owned; None if they are not all free yet."""
        if not self._partial and not _try_flock(self._turn):
            return None  # another flow run is collecting its set
        for cpu in self.cpus:
            if len(self._partial) == self.per_run:
                break
            if cpu not in self._mine and _try_flock(self._files[cpu]):
                self._partial.append(cpu)
                self._mine.add(cpu)
        if len(self._partial) < self.per_run:
            if not self._partial:  # nothing kept: let the others collect meanwhile
                fcntl.flock(self._turn, fcntl.LOCK_UN)
            return None
        taken, self._partial = tuple(self._partial), []
        fcntl.flock(self._turn, fcntl.LOCK_UN)
        return taken

    def give(self, cpus: Iterable[int]) -> None:
        for cpu in cpus:
            fcntl.flock(self._files[cpu], fcntl.LOCK_UN)
            self._mine.discard(cpu)

    def close(self) -> None:
        """Release everything (closing a descriptor drops its lock); safe to call twice."""
        fds = [*self._files.values(), *([self._turn] if self._turn >= 0 else [])]
        self._files.clear()
        self._turn = -1
        for fd in fds:
            os.close(fd)
        self._mine.clear()
        self._partial = []


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def private_dir(directory: Path) -> Path:
    """``directory``, created 0700 if missing, refused (one line) unless it is a real
    directory of ours that nobody else can write: in a shared /tmp another user could
    otherwise hold our CPU locks or point them elsewhere."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ValueError(f"{directory} is not a private directory of uid {os.getuid()} "
                         "(another user's, a symlink or writable by others): remove it")
    return directory


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


def process_tree(pid: int) -> list:
    """``pid`` and all its descendants (psutil processes; [] once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_sum(procs: Iterable, measure) -> int:
    """``measure(proc)`` summed over processes; those that ended meanwhile count 0, and so
    does a child that still shares its parent's memory (see ``borrows_parent_memory``)."""
    import psutil

    total = 0
    for proc in procs:
        try:
            if not borrows_parent_memory(proc):
                total += measure(proc)
        except psutil.Error:
            pass
    return total


# kcmp(2) by architecture: the one way to ask the kernel whether two processes share an mm.
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}
_KCMP_VM = 1


@functools.cache
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def same_memory(pid: int, other: int) -> bool:
    """Whether two processes share one address space (kcmp); False if the kernel cannot tell."""
    number = _SYS_KCMP.get(os.uname().machine)
    return number is not None and _libc().syscall(number, pid, other, _KCMP_VM, 0, 0) == 0


def borrows_parent_memory(proc) -> bool:
    """Whether ``proc`` runs in its parent's address space: a ``vfork`` child between fork
    and exec (how Python's subprocess starts commands). Its ``/proc`` memory figures are
    its parent's, so summing both counts the parent twice (measured: the worker side's
    tree read 85 MiB high at such moments; a run's memory watchdog would be misled the
    same way)."""
    import psutil

    try:
        parent = proc.ppid()
    except psutil.Error:
        return False
    return parent > 1 and same_memory(proc.pid, parent)


def rss(proc) -> int:
    return proc.memory_info().rss
