"""The benchmark harness in smoke mode (tiny sizes), so it cannot rot.

Runs ``python -m benchmarks.run --smoke`` into a temp directory, as a person would,
and checks that it produced the report: every row of the table, the plot, the raw
results. No timing is asserted: smoke figures are meaningless by design.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel not installed"),
]

SMOKE_DEADLINE = 600  # seconds; about 3 min on an idle 2-core machine, 5-6 under load


def test_smoke_run_writes_every_row_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sierra")
    from benchmarks.report import ROW_KEYS, build_rows

    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=PROJECT, capture_output=True, text=True, timeout=SMOKE_DEADLINE,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"harness failed:\n{result.stderr[-4000:]}"

    raw = sorted((tmp_path / "benchmarks" / "results").glob("results-*-smoke.json"))
    assert len(raw) == 1
    results = json.loads(raw[0].read_text())
    assert results["errors"] == []
    for item in ("bringup", "concurrency", "trigger", "overhead", "sierra", "scale", "cores"):
        assert item in results, f"{item} was not measured"

    text = out.read_text()
    lines = text.splitlines()
    header = lines.index("| # | metric | ours | baseline(s) | ratio | target | met? |")
    table = []
    for line in lines[header + 2:]:
        if not line.startswith("| "):
            break
        table.append(line)
    rows = build_rows(results)
    assert [r.key for r in rows] == list(ROW_KEYS)
    assert len(table) == len(ROW_KEYS), "\n".join(table)
    for row, line in zip(rows, table, strict=True):
        assert f"| {row.item} | {row.metric} |" in line
        # Every row was measured (a skipped baseline may say so, ours may not be n/a).
        assert not line.split(" | ")[2].startswith("n/a"), line
    assert {r.item for r in rows} == {"1", "2", "3", "4", "5", "6", "7", "8"}
    # Item 7's small batch completed and its server-log and API-read figures were taken.
    scale = results["scale"]["big"]
    assert scale["ok"] and scale["runs_done"] == results["config"]["scale_n"]
    assert scale["reads"]["count"] > 0 and "locked" in scale["log"]

    plot = tmp_path / "benchmarks" / "plot.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![benchmark plot](benchmarks/plot.png)" in text
    # The hand-written analysis is linked, not copied into the generated report.
    assert "benchmarks/NOTES.md" in text
    # The smoke run must not leave its work directory behind.
    assert not any((tmp_path / "work").iterdir())
