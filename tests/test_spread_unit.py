"""Pure logic of a spread batch (flows/spread.py, flows/scheduler.py): claims, leases, and
the scheduler dropping runs another flow run holds. No Prefect server here: the owners'
liveness is a plain function of the test (the real one asks the server and the leases,
tests/test_hosts.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flows.plan import mark_done, plan_runs
from flows.scheduler import Scheduler
from flows.spread import Claims, Lease, Liveness, lost_after
from tests.helpers import wait_until


class Owners:
    """Which owners are live: what ``Liveness.is_live`` answers in production."""

    def __init__(self, *live: str) -> None:
        self.live = set(live)

    def is_live(self, owner: str) -> bool:
        return owner in self.live


@pytest.fixture
def run(tmp_path: Path):
    return plan_runs(tmp_path, ["echo one"])[0]


def test_a_run_is_claimed_by_one_owner_only(tmp_path, run):
    owners = Owners("child-1", "child-2")
    first, second = Claims(tmp_path, "child-1", owners), Claims(tmp_path, "child-2", owners)
    assert first.claim(run)
    assert not second.claim(run)
    assert first.claim(run)  # its own claim: a retry of the run goes on
    assert first.holder(run) == (0, "child-1")


def test_a_claim_of_a_lost_owner_is_taken_over_once(tmp_path, run):
    owners = Owners("child-1", "child-2", "child-3")
    assert Claims(tmp_path, "child-1", owners).claim(run)
    owners.live.discard("child-1")  # its host is lost
    second, third = Claims(tmp_path, "child-2", owners), Claims(tmp_path, "child-3", owners)
    assert second.claim(run)
    assert not third.claim(run)  # the new generation is child-2's
    assert second.holder(run) == (1, "child-2")


def test_claims_race_one_winner(tmp_path, run):
    owners = Owners(*(f"child-{i}" for i in range(8)))
    won: list[str] = []
    barrier = threading.Barrier(8)

    def race(owner: str) -> None:
        barrier.wait()
        if Claims(tmp_path, owner, owners).claim(run):
            won.append(owner)

    threads = [threading.Thread(target=race, args=(f"child-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1, won


def test_a_done_run_is_never_claimed(tmp_path, run):
    mark_done(tmp_path, run, {"exit_code": 0})
    assert not Claims(tmp_path, "child-1", Owners("child-1")).claim(run)


def test_without_resume_only_this_batchs_markers_count(tmp_path, run):
    mark_done(tmp_path, run, {"exit_code": 0, "batch": "earlier-batch"})
    owners = Owners("child-1")
    assert not Claims(tmp_path, "child-1", owners).claim(run)  # resume: done is done
    assert Claims(tmp_path, "child-1", owners, batch="this-batch").claim(run)
    mark_done(tmp_path, run, {"exit_code": 0, "batch": "this-batch"})
    other = plan_runs(tmp_path, ["echo one"])[0]
    assert not Claims(tmp_path, "child-2", Owners("child-2"), batch="this-batch").claim(other)


def test_a_lease_goes_stale_only_when_it_stops_changing(tmp_path):
    liveness = Liveness(tmp_path, client=None, lost_after=0.3)
    lease = Lease(tmp_path, "child-1")
    lease._renew()
    assert not liveness.lease_stale("child-1")  # first seen: the clock starts
    wait_until(lambda: liveness.lease_stale("child-1"), 10, "the lease seen stale")
    lease._renew()  # it moved: alive again
    assert not liveness.lease_stale("child-1")
    assert not liveness.lease_stale("no-such-owner")  # no lease: the server decides


def test_lost_after_is_validated(monkeypatch):
    monkeypatch.delenv("SIERRA_PREFECT_HOST_LOST_AFTER", raising=False)
    assert lost_after() == 30.0
    monkeypatch.setenv("SIERRA_PREFECT_HOST_LOST_AFTER", "12")
    assert lost_after() == 12.0
    for bad, words in (("soon", "not a number"), ("1", "below")):
        monkeypatch.setenv("SIERRA_PREFECT_HOST_LOST_AFTER", bad)
        with pytest.raises(ValueError, match=words):
            lost_after()


def test_scheduler_runs_only_what_it_claims_and_reports_the_rest():
    ran, skipped = [], []
    Scheduler(cap=2).run(
        list(range(10)),
        execute=lambda r, placement: ran.append(r) or r,
        on_done=lambda r, result: None,
        on_error=lambda r, exc: None,
        claim=lambda r: r % 3 != 0,
        on_skip=skipped.append,
    )
    assert sorted(ran) == [1, 2, 4, 5, 7, 8]
    assert skipped == [0, 3, 6, 9]
