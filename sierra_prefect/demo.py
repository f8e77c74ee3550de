"""The demo: a small sample batch through ``sierra/local`` on the embedded stack.

It writes a batch like SIERRA's stage 1 would (``commands.txt`` at the batch root, one
experimental run per line: a tiny random-walk simulator that writes a CSV file), brings
the stack up, and runs the batch with ``sierra-prefect run``'s own code path.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from rich.console import Console

from sierra_prefect.settings import Settings
from sierra_prefect.trigger import Outcome, Trigger, trigger

EXPERIMENTS = 3
RUNS_PER_EXPERIMENT = 4

SIMULATOR = '''\
"""A toy simulator: a random walk of N steps, written as CSV."""
import csv, random, sys, time
out, seed, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
position = 0.0
with open(out, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["step", "position"])
    for step in range(steps):
        position += rng.gauss(0, 1)
        writer.writerow([step, round(position, 4)])
time.sleep(0.2)  # pretend to be a simulator that takes a moment
print(f"wrote {steps} steps to {out}")
'''


def write_batch(root: Path) -> tuple[Path, Path]:
    """A SIERRA-like batch under ``root``; returns (batch root, scratch root)."""
    batch, scratch = root / "batch", root / "scratch"
    simulator = root / "randomwalk.py"
    batch.mkdir(parents=True)
    simulator.write_text(SIMULATOR)
    lines = []
    for exp in range(EXPERIMENTS):
        outputs = batch / "exp-outputs" / f"c1-exp{exp}"
        outputs.mkdir(parents=True)
        for run in range(RUNS_PER_EXPERIMENT):
            csv = outputs / f"run{run}.csv"
            steps = 100 * (exp + 1)
            lines.append(shlex.join([sys.executable, str(simulator), str(csv), str(run), str(steps)]))
    (batch / "commands.txt").write_text("\n".join(lines) + "\n")
    return batch, scratch


def run_demo(settings: Settings, stack, console: Console) -> Outcome:
    connection = stack.up()
    root = settings.home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    batch, scratch = write_batch(root)
    console.print(f"sample batch: {EXPERIMENTS} experiments x {RUNS_PER_EXPERIMENT} runs in {batch}")
    outcome = trigger(connection, Trigger("sierra/local", str(batch), str(scratch)), console)
    console.print(f"outputs: {batch / 'exp-outputs'}  logs: {scratch / 'sierra-prefect'}")
    login = " (log in with what `sierra-prefect auth-string` prints)" if connection.auth_string else ""
    console.print(f"Prefect UI: {connection.ui_url}{login}", highlight=False)
    return outcome
