"""Resources of runs without Prefect: sizes, slots, CPU sets shared through locks, and the
scheduler's retries and admission. Real threads, real files, real processes."""

from __future__ import annotations

import threading
import time

import pytest

from flows.resources import (
    CpuSets,
    check_resources,
    cpu_list,
    format_size,
    parse_size,
    private_dir,
    runs_at_once,
)
from flows.scheduler import Placement, Scheduler


@pytest.mark.parametrize(("text", "size"), [
    ("2G", 2 * 1024**3), ("512M", 512 * 1024**2), ("1.5g", 1536 * 1024**2), ("2GiB", 2 * 1024**3),
    ("2048K", 2 * 1024**2), ("1T", 1024**4), (" 3 GB ", 3 * 1024**3),
])
def test_parse_size_reads_what_people_write(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["2Q", "", "G", "-1G", "two gigs", "0", "1.5.2G", "100", "2B",
                                  "2iB", "64K", "\uff12G", "0.0001G"])
def test_parse_size_refuses_anything_else_with_one_line(text):
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    message = str(caught.value)
    assert "\n" not in message and f"'{text}'" in message and "e.g." in message


def test_format_size_and_cpu_list():
    assert format_size(2 * 1024**3) == "2.0G" and format_size(1536 * 1024) == "1.5M"
    assert cpu_list([3, 0, 1, 2, 6]) == "0-3,6" and cpu_list([1]) == "1"


@pytest.mark.parametrize(("max_parallel", "cores", "cpus", "slots"), [
    (None, 1, 8, 8), (None, 2, 8, 4), (None, 3, 8, 2), (4, 1, 8, 4), (16, 1, 8, 8),
    (None, 16, 8, 1), (2, 3, 2, 1), (1, 1, 2, 1),
])
def test_runs_at_once_is_the_cap_or_the_cores_whichever_is_less(max_parallel, cores, cpus, slots):
    assert runs_at_once(max_parallel, cores, cpus) == slots


def test_cpu_sets_of_two_flow_runs_never_overlap(tmp_path):
    """Two CpuSets on one directory stand for two flow runs of one stack on one host."""
    first, second = CpuSets([0, 1, 2, 3], 2, tmp_path), CpuSets([0, 1, 2, 3], 2, tmp_path)
    try:
        a = first.take()
        b = second.take()
        assert a and b and not set(a) & set(b) and len(a) == len(b) == 2
        assert first.take() is None and second.take() is None  # all four are owned
        first.give(a)
        c = second.take()
        assert c == a  # what one gives back, the other can take
        second.close()  # a flow run that ends (or dies) frees its CPUs with its descriptors
        assert sorted(first.take() + first.take()) == [0, 1, 2, 3]
    finally:
        first.close()
        second.close()


def test_more_cores_than_the_host_has_means_one_run_on_all_cpus(tmp_path):
    cpus = CpuSets([0, 1], 5, tmp_path)
    try:
        assert cpus.take() == (0, 1) and cpus.take() is None
    finally:
        cpus.close()


def test_scheduler_retries_a_failed_run_and_holds_no_slot_while_it_waits():
    """Cap 1: run 0 fails once and waits 0.6 s to retry; run 1 uses the slot meanwhile."""
    log: list[tuple[int, int, float, float]] = []  # (run, attempt, start, end)
    lock = threading.Lock()

    def execute(run: int, placement: Placement) -> bool:
        started = time.monotonic()
        time.sleep(0.05)
        with lock:
            log.append((run, placement.attempt, started, time.monotonic()))
        return not (run == 0 and placement.attempt == 1)

    done, retried = {}, []
    scheduler = Scheduler(1, retries=2, retry_delay=0.6)
    scheduler.run([0, 1], execute=execute, on_done=done.__setitem__, on_error=lambda r, e: False,
                  failed=lambda ok: not ok,
                  on_retry=lambda run, ok, placement: retried.append((run, placement.attempt)))
    assert done == {0: True, 1: True} and retried == [(0, 1)]
    attempts = {(run, attempt): (start, end) for run, attempt, start, end in log}
    assert sorted(attempts) == [(0, 1), (0, 2), (1, 1)]
    # Run 1 ran while run 0 waited for its retry, and the retry waited its delay.
    assert attempts[(1, 1)][1] < attempts[(0, 2)][0]
    assert attempts[(0, 2)][0] - attempts[(0, 1)][1] >= 0.6
    assert scheduler.running == 0


def test_scheduler_gives_up_after_the_retries():
    attempts = []
    done = {}
    Scheduler(2, retries=2).run(
        ["bad"], execute=lambda run, placement: attempts.append(placement.attempt) or "failed",
        on_done=done.__setitem__, on_error=lambda r, e: "error", failed=lambda result: True)
    assert attempts == [1, 2, 3] and done == {"bad": "failed"}


def test_scheduler_pins_concurrent_runs_to_disjoint_cpus(tmp_path):
    """Runs at once hold disjoint CPU sets, and another flow run's CPUs are waited for:
    40 runs of 0.05 s on the 2 free CPUs take 1 s, so the other batch ends (at 0.5 s) midway."""
    held: dict[int, tuple[int, ...]] = {}
    overlaps, placed, freed = [], [], []
    lock = threading.Lock()

    def execute(run: int, placement: Placement) -> int:
        with lock:
            placed.append((time.monotonic(), placement.cpus))
            for other in held.values():
                if set(other) & set(placement.cpus):
                    overlaps.append((run, placement.cpus, other))
            held[run] = placement.cpus
        time.sleep(0.05)
        with lock:
            del held[run]
        return run

    other_flow_run = CpuSets([0, 1, 2, 3], 2, tmp_path)
    blocked = other_flow_run.take()  # two of the four CPUs are another batch's
    def other_ends():
        freed.append(time.monotonic())
        other_flow_run.close()

    threading.Timer(0.5, other_ends).start()  # ... until it ends
    cpus = CpuSets([0, 1, 2, 3], 1, tmp_path)
    scheduler = Scheduler(4, cpus=cpus)
    done = {}
    started = time.monotonic()
    scheduler.run(range(40), execute=execute, on_done=done.__setitem__, on_error=lambda r, e: e)
    cpus.close()
    assert sorted(done) == list(range(40)) and not overlaps
    assert blocked and scheduler.most_at_once <= 4
    before = [cpus for at, cpus in placed if at < freed[0]]
    assert before and all(set(c).isdisjoint(blocked) for c in before)
    assert any(set(c) & set(blocked) for at, c in placed if at > freed[0])
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("values", "says"), [
    (dict(cores_per_run=0), "--cores-per-run 0 is below 1"),
    (dict(retries=-1), "--retries -1 is below 0"),
    (dict(retry_delay=float("inf")), "--retry-delay inf is not a number of seconds"),
    (dict(retry_delay=float("nan")), "--retry-delay nan is not a number of seconds"),
    (dict(retry_delay=-1.0), "--retry-delay -1.0 is not a number of seconds"),
    (dict(memory_per_run="2Q"), "--memory-per-run '2Q' is not a memory size"),
])
def test_check_resources_says_which_value_and_how_to_fix_it(values, says):
    with pytest.raises(ValueError) as caught:
        check_resources(**values, spell=lambda name: "--" + name.replace("_", "-"))
    assert str(caught.value).startswith(says) and ": pass" in str(caught.value) or "e.g." in str(
        caught.value)
    assert check_resources(2, "1G", 0, 0.0) == 1024**3


def test_a_run_needing_every_cpu_gets_its_turn_against_a_batch_of_one_core_runs(tmp_path):
    """Without the turn lock the 1-core batch, taking CPUs as they free up, would win every
    race and the 2-core run would wait for the whole batch."""
    small, big = CpuSets([0, 1], 1, tmp_path), CpuSets([0, 1], 2, tmp_path)
    try:
        first, second = small.take(), small.take()
        assert first and second
        assert big.take() is None  # all busy; big now holds the turn...
        small.give(first)
        assert big.take() is None  # ...and keeps the CPU that freed up
        assert small.take() is None  # which the small batch cannot take back meanwhile
        small.give(second)
        assert big.take() == (0, 1)
        assert small.take() is None
    finally:
        small.close()
        big.close()


def test_lock_directory_of_someone_else_or_writable_by_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="is not a private directory"):
        CpuSets([0], 1, shared)
    link = tmp_path / "link"
    link.symlink_to(private_dir(tmp_path / "mine"))
    with pytest.raises(ValueError, match="a symlink"):
        private_dir(link)
    assert oct((tmp_path / "mine").stat().st_mode & 0o777) == "0o700"


def test_a_hook_that_raises_neither_hangs_nor_leaks_the_slot():
    def on_error(run, exc):
        raise RuntimeError("the report itself failed")

    scheduler = Scheduler(1, retries=1)
    done = []
    finished = threading.Event()

    def go():
        scheduler.run([0, 1], execute=lambda run, placement: 1 / 0,
                      on_done=lambda run, result: done.append(run), on_error=on_error,
                      failed=lambda result: True)
        finished.set()

    threading.Thread(target=go, daemon=True).start()
    assert finished.wait(10), "the scheduler hung"
    assert scheduler.running == 0 and done == []


def test_stop_admits_nothing_more_and_retries_nothing():
    scheduler = Scheduler(1, retries=5, retry_delay=0.05)
    attempts = []

    def execute(run, placement):
        attempts.append((run, placement.attempt))
        scheduler.stop()  # e.g. SIGTERM while the first attempt runs
        return "failed"

    scheduler.run([0, 1, 2], execute=execute, on_done=lambda run, result: None,
                  on_error=lambda run, exc: exc, failed=lambda result: True)
    assert attempts == [(0, 1)]


def test_a_vfork_child_is_not_counted_twice(tmp_path):
    """glibc's posix_spawn (like Python's subprocess) runs the child in the parent's
    address space until exec; a file action that opens a FIFO holds it there, so the
    tree's memory must count that child as nothing, not as a second copy of the parent."""
    import os
    import subprocess
    import sys

    import psutil

    from flows.resources import borrows_parent_memory, process_tree, rss, tree_sum
    from tests.helpers import wait_until

    fifo = tmp_path / "hold"
    os.mkfifo(fifo)
    # Another process spawns: posix_spawn keeps the GIL, and the child waits for us.
    spawner = subprocess.Popen([sys.executable, "-c", (
        "import os, sys; pid = os.posix_spawn('/bin/true', ['true'], {}, file_actions=["
        "(os.POSIX_SPAWN_OPEN, 3, sys.argv[1], os.O_RDONLY, 0)]); os.waitpid(pid, 0)"),
        str(fifo)])
    parent = psutil.Process(spawner.pid)
    try:
        child = wait_until(lambda: parent.children(), 20, "the spawned child")[0]
        assert borrows_parent_memory(child)
        assert not borrows_parent_memory(parent)
        assert tree_sum([parent, child], rss) < 1.5 * rss(parent)  # not twice the parent
        assert tree_sum(process_tree(spawner.pid), rss) < 1.5 * rss(parent)
    finally:
        def release() -> bool:  # the child's open returns: it execs and exits
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: not waiting on it yet
                return spawner.poll() is not None
            return True

        wait_until(release, 20, "the spawned child to open the FIFO", interval=0.05)
        try:
            spawner.wait(20)
        finally:
            if spawner.poll() is None:
                spawner.kill()
                spawner.wait()
    sleeper = psutil.Popen(["sleep", "5"])
    try:
        assert not borrows_parent_memory(sleeper)  # after exec: its own memory, counted
    finally:
        sleeper.kill()
        sleeper.wait()
