"""Worker hosts on a network, and a host lost mid-batch (issue 12, parts 1 and 2).

Real hosts are network namespaces on a private network (tests/netns_support.py): a server
host with PostgreSQL and ``sierra-prefect up --host <address> --no-worker`` (exposed with
the stack's own credential), and two worker hosts each running ``prefect worker start
--pool sierra-pool`` with the credential read from a 0600 file, as the README says
(host A), or ``sierra-prefect worker --api-url URL --auth-string-file FILE`` (host B)
(tests/hosts_support.py). Batches are triggered on the server host with
``sierra-prefect run``: the command SIERRA's plugin runs, whose exit code SIERRA sees.

- a 40-run batch with ``--spread 2`` runs on both hosts, each run exactly once (one line
  per run in its output file, one success marker each), and the summary and the ledger
  say which worker ran which run;
- the server on the network takes no call without the credential;
- mid-batch, the worker host that does not run the parent flow run loses its link and
  every process; the same ``run`` still ends 0 with every run done exactly once, within
  the bound the README states (SIERRA_PREFECT_HOST_LOST_AFTER, here 10 s, plus a worker
  poll and the runs themselves).

Needs root, iproute2 and PostgreSQL; under CI=true a missing one fails the tests
(tests/ci_support.py).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import make_batch, until_two_workers, wait_until
from tests.netns_support import unavailable
from tests.postgres_support import _skip_reason as postgres_missing

RUNS = 40
LOSS_RUNS = 24  # the host-loss batches (time: every run of them on one CPU after the loss)
LOST_AFTER = 10.0  # SIERRA_PREFECT_HOST_LOST_AFTER on the worker hosts
POLL = "2"  # PREFECT_WORKER_QUERY_SECONDS on the worker hosts (the README's advice)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Iterator:
    reason = unavailable() or postgres_missing()
    if reason:
        pytest.skip(f"hosts on a network need it: {reason}")
    from tests.hosts_support import HostsLab

    lab = HostsLab.start(tmp_path_factory.mktemp("hosts"), ["a", "b"])
    try:
        # Host A the stock way, host B with `sierra-prefect worker`: the README's two ways.
        for host, cpu, via in (("a", "0", "prefect"), ("b", "1", "sierra-prefect")):
            lab.start_worker(host, cpus=cpu, via=via, PREFECT_WORKER_QUERY_SECONDS=POLL,
                             SIERRA_PREFECT_HOST_LOST_AFTER=str(LOST_AFTER))
        yield lab
    finally:
        lab.close()


def recording_batch(tmp: Path, seconds: float, n: int = RUNS) -> tuple[Path, Path, Path]:
    """``n`` runs that each wait for runs on both hosts (``until_two_workers``), sleep,
    then append the worker that ran them to ``who/rN``; a run killed before its end
    appends nothing."""
    who = tmp / "who"
    who.mkdir()
    start = until_two_workers(tmp / "workers-seen")  # every use spreads over both hosts
    commands = [f"{start}; sleep {seconds}; echo $PREFECT__WORKER_NAME >> {who}/r{i}"
                for i in range(n)]
    batch, scratch = make_batch(tmp, commands)
    return batch, scratch, who


def ran_once(who: Path, n: int = RUNS) -> Counter:
    """Per worker, the runs it completed; asserts every run completed exactly once."""
    executions = {f.name: f.read_text().split() for f in who.iterdir()}
    assert sorted(executions) == sorted(f"r{i}" for i in range(n)), "every run completed"
    twice = {name: ran for name, ran in executions.items() if len(ran) != 1}
    assert not twice, f"runs completed more than once: {twice}"
    return Counter(ran[0] for ran in executions.values())


def ledger(scratch: Path, n: int = RUNS) -> Counter:
    markers = list((scratch / "sierra-prefect" / "runs").glob("*/done.json"))
    assert len(markers) == n, f"{len(markers)} success markers for {n} runs"
    return Counter(json.loads(m.read_text())["worker"] for m in markers)


def test_server_on_the_network_needs_the_stacks_credential(hosts):
    """Exposed on the server host's address, with no SIERRA_PREFECT_AUTH_STRING given: the
    stack's generated credential guards it, seen from a worker host."""
    url = hosts.api_url
    assert url.startswith(f"http://{hosts.lab.addresses['server']}:"), url
    probe = ("import httpx, sys; r = httpx.get(sys.argv[1] + '/flows/filter', timeout=10); "
             "print(r.status_code)")
    plain = hosts.lab.run("a", [sys.executable, "-c",
                                probe.replace("get(", "post("), url], timeout=60)
    assert plain.stdout.strip() == "401", plain.stdout + plain.stderr
    health = hosts.lab.run("a", [sys.executable, "-c",
                                 "import httpx, sys; print(httpx.get(sys.argv[1] + '/health', "
                                 "timeout=10).status_code)", url], timeout=60)
    assert health.stdout.strip() == "200", health.stdout + health.stderr
    # The credential file the worker hosts read is the user's alone.
    assert hosts.auth_file.stat().st_mode & 0o077 == 0


def test_spread_runs_on_both_hosts_each_run_once(hosts, tmp_path):
    batch, scratch, who = recording_batch(tmp_path, 0.5)
    result = hosts.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                       str(scratch), "--spread", "2", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (RUNS, RUNS, 0)
    per_worker = ran_once(who)
    assert per_worker == Counter(summary["workers"]) == ledger(scratch)
    assert set(per_worker) == {"worker-a", "worker-b"}, f"not both hosts: {per_worker}"
    print(f"\nruns per worker host: {dict(per_worker)}")

    # Again without resume: every run once more (the earlier markers do not count).
    again = hosts.cli("run", "sierra/local", "--input-root", str(batch), "--scratch-root",
                      str(scratch), "--spread", "2", "--no-resume", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    summary = json.loads(again.stdout)
    assert (summary["total"], summary["succeeded"], summary["skipped"]) == (RUNS, RUNS, 0)
    lines = {f.name: len(f.read_text().split()) for f in who.iterdir()}
    assert set(lines.values()) == {2}, f"runs not run exactly once more: {lines}"


def roles(hosts) -> dict[str, tuple[set[str], set[str]]]:
    """Per worker host: (flow runs with a process there, flow runs with a run there)."""
    found = {}
    for host in ("a", "b"):
        flow_runs, with_runs = set(), set()
        for pid in hosts.lab.pids(host):
            try:
                environ = psutil.Process(pid).environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if environ.get("PREFECT__FLOW_RUN_ID"):
                flow_runs.add(environ["PREFECT__FLOW_RUN_ID"])
            if environ.get("SIERRA_PREFECT_FLOW_RUN"):  # an experimental run's process
                with_runs.add(environ["SIERRA_PREFECT_FLOW_RUN"])
        found[host] = (flow_runs, with_runs)
    return found


def spread_parents(root: Path) -> set[str]:
    """The parent flow runs of spread batches under ``root``: their children's per-worker
    slots live in ``<scratch>/sierra-prefect/spread/<parent id>/`` (flows/spread.py)."""
    return {d.name for d in root.rglob("sierra-prefect/spread/*")
            if d.is_dir() and d.name != "leases"}


def child_host_without_the_parent(hosts, root: Path) -> str | None:
    """Once both hosts run runs: the host where the parent flow run does not run."""
    parents = spread_parents(root)
    found = roles(hosts)
    if not parents or not all(with_runs for _, with_runs in found.values()):
        return None
    return next((h for h, (flow_runs, _) in found.items() if not flow_runs & parents), None)


def test_sierra_spreads_over_hosts_and_outlives_a_lost_one(hosts, tmp_path):
    """SIERRA (test engine, prefectdeploy.local, --exec-spread 2) on the server host; a
    worker host running only children is lost mid-stage-2: SIERRA exits 0 with every
    run's output, all from one `sierra-prefect run`."""
    from tests import sierra_support as ss

    experiments, runs = 2, 8
    python = tmp_path / "python-on-server-host"  # SIERRA itself runs on the server host
    python.write_text(f"#!/bin/sh\nexec {' '.join(hosts.lab.argv('server', [sys.executable]))} \"$@\"\n")
    python.chmod(0o755)
    env = {k: v for k, v in hosts.env.items() if k != "SIERRA_PREFECT_DATABASE_URL"}
    root = tmp_path / "sierra-root"
    done = []

    def lose_a_host() -> None:
        lost = wait_until(lambda: child_host_without_the_parent(hosts, root), 240,
                          "runs on both hosts", interval=0.5)
        hosts.lose(lost)
        done.append(lost)

    loser = threading.Thread(target=lose_a_host, daemon=True)
    loser.start()
    try:
        result = ss.run_sierra(
            root, execenv="prefectdeploy.local", n_runs=runs, n_experiments=experiments,
            python=str(python), env=ss.sierra_env(base=env),
            extra_args=["--exec-strict", "--exec-spread", "2", "--toysim-duration", "1.5"],
            timeout=400)
        loser.join(timeout=5)
    finally:
        for host in ("a", "b"):
            if host not in hosts.workers:
                hosts.revive(host)
    assert done, "no host was lost: the batch ended first"
    assert result.returncode == 0, result.stdout[-4000:]
    batch = ss.expected_batch_root(root, experiments)
    assert len(ss.expected_outputs(batch)) == experiments * runs
    assert ss.missing_outputs(batch) == []
    markers = list(root.rglob("sierra-prefect/runs/*/done.json"))
    assert len(markers) == experiments * runs
    by = Counter(json.loads(m.read_text())["worker"] for m in markers)
    assert by[f"worker-{'b' if done[0] == 'a' else 'a'}"] > 0, by
    print(f"\nSIERRA: host {done[0]} lost; every run done; runs per worker: {dict(by)}")


def test_a_host_lost_mid_batch_still_ends_with_every_run_done(hosts, tmp_path):
    batch, scratch, who = recording_batch(tmp_path, 0.5, LOSS_RUNS)
    started = tmp_path / "run.out"
    with open(started, "w") as out:
        run = hosts.cli_popen("run", "sierra/local", "--input-root", str(batch),
                              "--scratch-root", str(scratch), "--spread", "2",
                              stdout=out, stderr=out)
    try:
        # A host where only children run, once both run runs (a run is in flight there).
        lost = wait_until(lambda: child_host_without_the_parent(hosts, scratch), 120,
                          "runs on both hosts", interval=0.2)
        done_before = len(list(who.iterdir()))
        killed = hosts.lose(lost)
        lost_at = time.monotonic()
        assert killed, f"nothing ran on host {lost}"
        # The bound: the lease goes stale, a worker takes the runs left (a poll), and they
        # run; generous for a loaded 2-core machine, far below Prefect's 90 s heartbeats.
        bound = LOST_AFTER + 60 + LOSS_RUNS * 1.0
        code = run.wait(timeout=bound)
        took = time.monotonic() - lost_at
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for host in ("a", "b"):
            if host not in hosts.workers:
                hosts.revive(host)
    output = started.read_text()
    assert code == 0, output[-4000:]
    assert f"{LOSS_RUNS} runs: {LOSS_RUNS} succeeded, 0 failed" in output, output[-3000:]
    per_worker = ran_once(who, LOSS_RUNS)
    survivor = f"worker-{'b' if lost == 'a' else 'a'}"
    assert per_worker[survivor] > 0, per_worker
    assert sum(ledger(scratch, LOSS_RUNS).values()) == LOSS_RUNS
    print(f"\nhost {lost} lost after {done_before} runs; the batch ended {took:.1f} s later; "
          f"runs per worker: {dict(per_worker)}")


def test_the_parents_host_lost_the_same_run_again_finishes_the_batch(hosts, tmp_path):
    """The host running the parent flow run is lost: the documented re-trigger (the same
    `sierra-prefect run`, at once, without waiting for Prefect's 90 s heartbeat verdict on
    the first) ends 0 with every run completed exactly once: the children still running
    keep their runs, the lost parent's runs are taken over once its lease is stale."""
    batch, scratch, who = recording_batch(tmp_path, 0.5, LOSS_RUNS)
    args = ("run", "sierra/local", "--input-root", str(batch), "--scratch-root", str(scratch),
            "--spread", "2")
    with open(tmp_path / "first.out", "w") as out:
        first = hosts.cli_popen(*args, stdout=out, stderr=out)
    try:
        def parent_host() -> str | None:
            parents = spread_parents(scratch)
            found = roles(hosts)
            if not parents or not all(with_runs for _, with_runs in found.values()):
                return None
            return next((h for h, (flow_runs, _) in found.items() if flow_runs & parents), None)

        lost = wait_until(parent_host, 120, "runs on both hosts", interval=0.2)
        hosts.lose(lost)
        again = hosts.cli(*args, "--json", timeout=LOST_AFTER + 60 + LOSS_RUNS * 1.0)
        # The re-trigger saw the lost parent's lease stale and set it Crashed: the first
        # `run` (SIERRA's command) ends too, non-zero, without the 90 s heartbeat verdict.
        first_code = first.wait(timeout=60)
    finally:
        if first.poll() is None:  # it would wait for the heartbeat automation (90 s)
            first.kill()
            first.wait()
        for host in ("a", "b"):
            if host not in hosts.workers:
                hosts.revive(host)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["failed"] == 0 and summary["succeeded"] + summary["skipped"] == LOSS_RUNS, summary
    assert first_code not in (0, None), (tmp_path / "first.out").read_text()[-2000:]
    ran_once(who, LOSS_RUNS)
    assert sum(ledger(scratch, LOSS_RUNS).values()) == LOSS_RUNS
    print(f"\nparent's host {lost} lost; the re-trigger finished the batch: "
          f"{summary['succeeded']} run by it, {summary['skipped']} done before")


@pytest.mark.parametrize("case", ["open", "missing"])
def test_worker_command_refuses_a_credential_file_others_can_read(tmp_path, case):
    """`sierra-prefect worker` stops with one line, before any worker starts."""
    from tests.helpers import base_env, sierra_prefect

    path = tmp_path / "auth"
    if case == "open":
        path.write_text("sierra:secret\n")
        path.chmod(0o644)
    result = sierra_prefect("worker", "--api-url", "http://10.0.0.1:4200/api",
                            "--auth-string-file", str(path), env=base_env(tmp_path / "home"),
                            timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sierra-prefect: error: "), result.stderr
    assert ("chmod 600" if case == "open" else "does not exist") in lines[0]
    assert "secret" not in result.stdout + result.stderr
    if case == "open":
        assert path.read_text() == "sierra:secret\n"  # nothing changed or deleted
