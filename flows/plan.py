"""Planning a batch: which experimental runs there are, which are done, where logs go.

Pure logic with no Prefect imports, shared by the flow (which runs the plan) and the
shim (which validates a trigger before sending it). A run's identity is its position in
``commands.txt`` plus a hash of its command line, so it is stable across re-triggers:
resume markers and log names survive a crash, and a changed command is a new run.

Layout under ``scratch_root``::

    sierra-prefect/runs/<run_id>/attempt-001.stdout   # one pair per attempt, never reused
    sierra-prefect/runs/<run_id>/attempt-001.stderr
    sierra-prefect/runs/<run_id>/done.json            # written atomically on success
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

COMMANDS_FILE = "commands.txt"
# Set on a worker (or in a pool's job variables) to confine what a trigger may name.
ALLOWED_ROOTS_ENV = "SIERRA_PREFECT_ALLOWED_ROOTS"
STATE_DIR = "sierra-prefect"
MARKER_NAME = "done.json"

# SIERRA names experiment directories c<dim>-exp<N> (e.g. c1-exp0, c2-exp3x4).
_SIERRA_EXP = re.compile(r"\bc\d+-exp[\dx]+\b")


class BatchInputError(ValueError):
    """A trigger's inputs cannot be run; the message names the thing and the fix."""


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One experimental run: one line of commands.txt.

    A slotted dataclass, not a pydantic model: a batch holds one per run for its whole
    life (20,000 of them took 12 MiB as models, 4 as this).
    """

    index: int
    command: str
    run_id: str
    name: str

    @property
    def experiment(self) -> str:
        """The experiment the run belongs to (``c1-exp3`` of ``c1-exp3-run2``)."""
        return self.name.rsplit("-run", 1)[0]


def run_id_for(index: int, command: str) -> str:
    digest = hashlib.sha256(command.encode()).hexdigest()[:12]
    return f"{index:05d}-{digest}"


def check_roots(input_root: str, scratch_root: str) -> tuple[Path, Path]:
    """Validate the two roots and return them as paths; raise BatchInputError otherwise."""
    for label, value in (("input_root", input_root), ("scratch_root", scratch_root)):
        if not value:
            raise BatchInputError(f"{label} is empty: pass an absolute directory path")
        if not os.path.isabs(value):
            raise BatchInputError(
                f"{label} '{value}' is relative: pass an absolute path "
                f"(e.g. '{os.path.abspath(value)}')"
            )
    inp, scratch = Path(input_root), Path(scratch_root)
    if not inp.is_dir():
        raise BatchInputError(
            f"input_root '{inp}' is not a directory: run SIERRA stage 1 first or fix the path"
        )
    if scratch.exists() and not scratch.is_dir():
        raise BatchInputError(
            f"scratch_root '{scratch}' is a file, not a directory: choose another path"
        )
    return inp, scratch


def check_allowed(paths: dict[str, str], allowed: str | None) -> None:
    """Refuse paths outside the allowed roots (``os.pathsep``-separated; empty: no limit).

    Both sides are resolved first, so ``..`` and symlinks cannot lead out.
    """
    if not allowed:
        return
    roots = [Path(os.path.realpath(r)) for r in allowed.split(os.pathsep) if r]
    for label, value in paths.items():
        real = Path(os.path.realpath(value))
        if not any(real == root or real.is_relative_to(root) for root in roots):
            raise BatchInputError(
                f"{label} '{value}' (resolved: {real}) is outside the allowed roots "
                f"{', '.join(map(str, roots))}: put the batch under one of them"
            )


def prepare_scratch(scratch_root: Path) -> None:
    """Create the scratch root if needed and make sure this process can write there."""
    try:
        (scratch_root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=scratch_root / STATE_DIR, prefix=".write-check.")
        try:
            os.write(fd, b"x")  # an empty file still fits on a full file system
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise BatchInputError(
            f"scratch_root '{scratch_root}' is not writable by uid {os.getuid()} "
            f"({exc.strerror}): fix its permissions or free space (Docker: run with --host-user)"
        ) from None


def read_commands(input_root: Path) -> list[str]:
    """The runs of a batch or experiment: one per non-empty line of commands.txt."""
    path = input_root / COMMANDS_FILE
    if not path.is_file():
        raise BatchInputError(
            f"'{path}' does not exist: run SIERRA stage 1 for this batch first"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # SIERRA writes UTF-8; anything else is a damaged or hand-edited file. Name the
        # line (1-based, as an editor shows it) so it can be found and fixed.
        line = data.count(b"\n", 0, exc.start) + 1
        raise BatchInputError(
            f"'{path}' line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}): save it as "
            "UTF-8 or regenerate it with SIERRA stage 1"
        ) from None
    commands = [line.strip() for line in text.splitlines()]
    commands = [c for c in commands if c]
    if not commands:
        raise BatchInputError(f"'{path}' has no commands: regenerate it with SIERRA stage 1")
    return commands


def plan_runs(input_root: Path, commands: list[str]) -> list[RunSpec]:
    """Name each run after its experiment and its index within that experiment."""
    return list(iter_runs(input_root, commands))


def iter_runs(input_root: Path, commands: Iterable[str]) -> Iterator[RunSpec]:
    """``plan_runs`` one run at a time, for callers that only count (the shim)."""
    per_experiment: dict[str, int] = {}
    for index, command in enumerate(commands):
        found = _SIERRA_EXP.search(command)
        experiment = found.group(0) if found else input_root.name
        k = per_experiment.get(experiment, 0)
        per_experiment[experiment] = k + 1
        yield RunSpec(index=index, command=command, run_id=run_id_for(index, command),
                      name=f"{experiment}-run{k}")


def batch_tag(input_root: str) -> str:
    """The flow-run tag naming the batch ``input_root`` belongs to.

    In SIERRA's per-experiment paradigm every experiment (``<batch>/exp-inputs/c1-exp3``)
    is a flow run of its own; they and a per-batch trigger of ``<batch>`` all get the same
    tag, ``sierra-batch:<batch dir name>-<hash of its path>``, so the UI's tag filter
    shows one batch's flow runs.
    """
    path = Path(os.path.abspath(input_root))
    if _SIERRA_EXP.fullmatch(path.name):
        path = path.parent
    if path.name in ("exp-inputs", "exp_inputs"):
        path = path.parent
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    label = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.name)[:40] or "root"
    return f"sierra-batch:{label}-{digest}"


def run_dir(scratch_root: Path, run: RunSpec) -> Path:
    return scratch_root / STATE_DIR / "runs" / run.run_id


def read_marker(scratch_root: Path, run: RunSpec) -> dict | None:
    """The run's success marker, if it exists and records this exact command."""
    marker = run_dir(scratch_root, run) / MARKER_NAME
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("command") == run.command else None


def done_in(scratch_root: Path, run: RunSpec, batch: str | None) -> bool:
    """Done: by any batch (``batch`` None: resume), else by that batch (``--no-resume``:
    earlier batches' markers do not count)."""
    record = read_marker(scratch_root, run)
    return record is not None and (batch is None or record.get("batch") == batch)


def is_done(scratch_root: Path, run: RunSpec) -> bool:
    """A run is done when its marker exists and records this exact command."""
    return read_marker(scratch_root, run) is not None


def attempt_number(log: Path) -> int:
    """The attempt a log belongs to (``attempt-003.stdout`` -> 3)."""
    return int(log.name.split(".")[0].removeprefix("attempt-"))


def tail(path: Path, lines: int = 10, limit: int = 2000) -> str:
    """The last ``lines`` lines of a log (at most ``limit`` characters), "" if unreadable."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * limit))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])[-limit:]


def new_attempt_logs(directory: Path) -> tuple[Path, Path]:
    """Claim the next attempt number by creating its stdout file exclusively.

    Exclusive creation means two attempts (a retry, a re-trigger, a second flow run)
    never share or overwrite a log.
    """
    directory.mkdir(parents=True, exist_ok=True)
    attempt = 1
    while True:
        stdout = directory / f"attempt-{attempt:03d}.stdout"
        try:
            fd = os.open(stdout, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            attempt += 1
            continue
        os.close(fd)
        stderr = directory / f"attempt-{attempt:03d}.stderr"
        stderr.touch()
        return stdout, stderr


def write_atomically(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mark_done(scratch_root: Path, run: RunSpec, record: dict) -> None:
    write_atomically(
        run_dir(scratch_root, run) / MARKER_NAME,
        json.dumps({"command": run.command, **record}, indent=2),
    )
