"""BENCHMARKS.md and the plot, from the results of one harness run.

Every figure is a median over the repeats; every ratio is the median of the ratios
taken pair by pair within one repeat (ours in repeat i / the baseline in repeat i).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import median, pairwise_ratios

# Row keys, in table order: the smoke test checks that every one is present.
ROW_KEYS = (
    "concurrency_wall",
    "concurrency_span",
    "concurrency_efficiency",
    "concurrency_efficiency_e2e",
    "concurrency_max_at_once",
    "overhead_ms_per_run",
    "overhead_ms_per_run_in_flow",
    "trigger_latency",
    "bringup_cold_first",
    "bringup_cold",
    "bringup_warm",
    "sierra_stage2",
    "rss_server",
    "rss_worker",
)


@dataclass
class Row:
    key: str
    item: str
    metric: str
    ours: str = "n/a"
    baselines: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: str = "—"
    ours_samples: list = field(default_factory=list)


def _fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}"


def _values(samples: list[dict], key: str) -> list:
    """Per-repeat values (None where that repeat failed), so pairs stay aligned."""
    return [s.get(key) if s.get("ok") else None for s in samples]


def _samples_str(values: list, digits: int) -> str:
    shown = ", ".join("—" if v is None else f"{v:.{digits}f}" for v in values)
    return f" ({shown})" if len(values) > 1 else ""


def _cell(values: list, digits: int = 2) -> str:
    return _fmt(median(values), digits) + _samples_str(values, digits)


def _ratio(ours: list, base: list, digits: int = 2) -> str:
    ratios = pairwise_ratios(ours, base)
    return f"{median(ratios):.{digits}f}×" if ratios else "n/a"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**yes**" if ok else "**no**")


def build_rows(results: dict) -> list[Row]:
    rows: dict[str, Row] = {}
    cfg = results["config"]

    # 1. Concurrency
    c = results.get("concurrency") or {}
    v = c.get("variants", {})
    ours, tag, gcl = v.get("ours", []), v.get("tag", []), v.get("gcl", [])
    n, sec, cap = cfg["concurrency_n"], cfg["concurrency_seconds"], cfg["cap"]
    ideal = n * sec / cap
    what = f"{n} × `sleep {sec}` at cap {cap}"

    def three(key: str, digits: int = 2) -> tuple[str, str, list, list, list]:
        o, t, g = _values(ours, key), _values(tag, key), _values(gcl, key)
        return _cell(o, digits), f"tag limit: {_cell(t, digits)}; GCL: {_cell(g, digits)}", o, t, g

    cell, base, o, t, g = three("wall")
    rows["concurrency_wall"] = Row(
        "concurrency_wall", "1", f"Concurrency, {what}: wall time, trigger to done (s)",
        cell, base, f"vs tag: {_ratio(o, t)}; vs GCL: {_ratio(o, g)}", ours_samples=o)
    cell, base, o, t, g = three("span")
    rows["concurrency_span"] = Row(
        "concurrency_span", "1",
        f"Concurrency: span of the runs, first start to last end (s); ideal {ideal:.1f}",
        cell, base, f"vs tag: {_ratio(o, t)}; vs GCL: {_ratio(o, g)}", ours_samples=o)
    cell, base, o, t, g = three("efficiency")
    med = median(o)
    rows["concurrency_efficiency"] = Row(
        "concurrency_efficiency", "1", "Concurrency: efficiency, ideal / span", cell, base,
        target="≥ 0.90", met=_met(None if med is None else med >= 0.90), ours_samples=o)
    cell, base, o, t, g = three("efficiency_end_to_end")
    rows["concurrency_efficiency_e2e"] = Row(
        "concurrency_efficiency_e2e", "1",
        "Concurrency: efficiency end to end, ideal / wall (includes trigger latency, item 3)",
        cell, base, ours_samples=o)
    o, t, g = (_values(x, "max_at_once") for x in (ours, tag, gcl))

    def peaks(vals: list) -> str:
        got = [x for x in vals if x is not None]
        return ("n/a" if not got else f"{max(got)}") + _samples_str(vals, 0)

    all_ok = bool(o) and all(x == cap for x in o)
    rows["concurrency_max_at_once"] = Row(
        "concurrency_max_at_once", "1", "Concurrency: most runs at once (every repeat)",
        peaks(o), f"tag limit: {peaks(t)}; GCL: {peaks(g)}", target=f"= {cap} exactly",
        met=_met(None if not o or None in o else all_ok), ours_samples=o)

    # 2. Per-run overhead
    ov = results.get("overhead") or {}
    n2 = cfg["overhead_n"]
    o = _values(ov.get("ours", []), "ms_per_run")
    p = _values(ov.get("parallel", []), "ms_per_run")
    med = median(o)
    rows["overhead_ms_per_run"] = Row(
        "overhead_ms_per_run", "2",
        f"Per-run overhead, {n2:,} × `true` at cap {cap}: ms per run, end to end (CLI wall / {n2:,})",
        _cell(o), f"GNU parallel: {_cell(p)}", f"vs GNU parallel: {_ratio(o, p)}",
        "≤ 5 ms", _met(None if med is None else med <= 5.0), ours_samples=o)
    o = _values(ov.get("ours", []), "ms_per_run_in_flow")
    rows["overhead_ms_per_run_in_flow"] = Row(
        "overhead_ms_per_run_in_flow", "2",
        "Per-run overhead inside the flow run (flow start to end / runs), ms", _cell(o),
        f"GNU parallel (whole run): {_cell(p)}", f"vs GNU parallel: {_ratio(o, p)}",
        ours_samples=o)

    # 3. Trigger latency
    tr = (results.get("trigger") or {}).get("samples", [])
    o = _values(tr, "latency")
    med = median(o)
    rows["trigger_latency"] = Row(
        "trigger_latency", "3",
        "Trigger latency: `sierra-prefect run` to the first run starting, warm stack (s)",
        _cell(o), target="≤ 2 s", met=_met(None if med is None else med <= 2.0), ours_samples=o)

    # 4. Bring-up
    b = results.get("bringup") or {}
    o = list(b.get("cold_first", []))
    rows["bringup_cold_first"] = Row(
        "bringup_cold_first", "4", "Bring-up cold, the machine's first stack (empty cache: the "
        "server migrates its SQLite database) (s)", _cell(o, 1), ours_samples=o)
    o = list(b.get("cold", []))
    med = median(o)
    rows["bringup_cold"] = Row(
        "bringup_cold", "4", "Bring-up cold: `sierra-prefect up`, fresh state (migrated empty database "
        "cached), to healthy and deployed (s)",
        _cell(o, 1), target="≤ 15 s", met=_met(None if med is None else med <= 15.0), ours_samples=o)
    o = list(b.get("warm", []))
    med = median(o)
    rows["bringup_warm"] = Row(
        "bringup_warm", "4", "Bring-up warm: `sierra-prefect up` when already up (s)",
        _cell(o), target="≤ 2 s", met=_met(None if med is None else med <= 2.0), ours_samples=o)

    # 5. SIERRA
    s = results.get("sierra") or {}
    sv = s.get("variants", {})
    o = _values(sv.get("ours", []), "wall")
    h = _values(sv.get("hpc", []), "wall")
    bi = _values(sv.get("builtin", []), "wall")
    builtin_cell = _cell(bi)
    if s.get("builtin_mode") == "skipped":
        builtin_cell = f"skipped: {s.get('builtin_why')}"
    ratios = pairwise_ratios(o, h)
    rmed = median(ratios)
    rows["sierra_stage2"] = Row(
        "sierra_stage2", "5",
        f"SIERRA stage 2, toysim {cfg['sierra_experiments']} exp × {cfg['sierra_runs']} runs "
        f"({cfg['sierra_duration']} s each), cap {cap}: wall time of SIERRA (s)",
        _cell(o), f"hpc.local: {_cell(h)}; prefectserver.local: {builtin_cell}",
        f"vs hpc.local: {_ratio(o, h)}; vs prefectserver.local: {_ratio(o, bi)}",
        "≤ 1.3 × hpc.local", _met(None if rmed is None else rmed <= 1.3), ours_samples=o)

    # 6. Memory
    rss = ov.get("rss", [])
    o = [x.get("server_mib") for x in rss]
    rows["rss_server"] = Row("rss_server", "6",
                             f"Peak RSS of the server's process tree during the {n2:,}-run batch (MiB)",
                             _cell(o, 0), ours_samples=o)
    o = [x.get("worker_mib") for x in rss]
    rows["rss_worker"] = Row("rss_worker", "6",
                             "Peak RSS of the worker side (worker, warm engine, flow-run process, runs; "
                             "RSS summed, an upper bound), same batch (MiB)",
                             _cell(o, 0), ours_samples=o)
    return [rows[k] for k in ROW_KEYS]


def _item_loads(results: dict) -> str:
    """1-minute load average at the start and end of each measurement (2 cores here)."""
    loads = results.get("item_load") or {}
    if not loads:
        return ""
    parts = [f"{item} {v['before'][0]:.1f}→{v['after'][0]:.1f} ({v['seconds']} s)"
             for item, v in loads.items() if v.get("before") and v.get("after")]
    return "; per measurement (1-min load, start→end, duration): " + ", ".join(parts)


def _trigger_breakdown(results: dict) -> list[str]:
    from benchmarks.trigger_latency import PHASES

    tr = (results.get("trigger") or {}).get("samples", [])
    if not any(s.get("ok") for s in tr):
        return []
    lines = ["| phase | median (s) | samples |", "|---|---|---|"]
    for key, label in (*PHASES, ("first_to_cli_exit", "first run starts -> CLI exits (1-run batch)")):
        vals = _values(tr, key)
        lines.append(f"| {label} | {_fmt(median(vals))} | {_samples_str(vals, 2).strip(' ()')} |")
    return lines


def _sierra_details(results: dict) -> list[str]:
    s = results.get("sierra") or {}
    if not s:
        return []
    lines = ["| execution environment | stage 2 wall (s) | runs span (s) | most runs at once | all outputs |",
             "|---|---|---|---|---|"]
    names = {"ours": "prefectdeploy.local (ours)", "hpc": "hpc.local (GNU parallel)",
             "builtin": "prefectserver.local (SIERRA's built-in)"}
    for key, label in names.items():
        samples = s.get("variants", {}).get(key, [])
        if samples and all(x.get("skipped") for x in samples):
            lines.append(f"| {label} | skipped: {samples[0]['skipped']} | | | |")
            continue
        walls = [x.get("wall") for x in samples]
        spans = [x.get("runs_span") for x in samples]
        peak = [x.get("runs_max_at_once") for x in samples]
        ok = sum(1 for x in samples if x.get("ok"))
        lines.append(f"| {label} | {_cell(walls)} | {_cell(spans)} | "
                     f"{', '.join(str(x) for x in peak)} | {ok}/{len(samples)} repeats |")
    return lines


def write_markdown(results: dict, rows: list[Row], out: Path, plot: Path | None,
                   notes: str | None) -> None:
    m = results["machine"]
    cfg = results["config"]
    rel_plot = os.path.relpath(plot, out.parent) if plot else None
    lines = [
        "# Benchmarks",
        "",
        "Generated by `.venv/bin/python -m benchmarks.run"
        + (" --smoke" if cfg["smoke"] else "") + f" --repeat {cfg['repeat']}` "
        "(see [benchmarks/README.md](benchmarks/README.md)); do not edit by hand.",
        "",
        f"- run: {results['started']} → {results['finished']} "
        f"({results['elapsed_seconds'] / 60:.1f} min)"
        + (" — **smoke mode: tiny sizes, figures meaningless**" if cfg["smoke"] else ""),
        f"- machine: {m['cores']} cores ({m['cores_usable']} usable), {m['cpu_model'] or 'unknown CPU'}, "
        f"{m['memory_gib']} GiB RAM, {m['os']}, Python {m['python']}",
        f"- software: Prefect {m['prefect']}, sierra-research {m['sierra_research']}, {m['gnu_parallel']}",
        f"- load average (1/5/15 min) before: {results['load_before']}, after: {results['load_after']}"
        + _item_loads(results),
        f"- repeats: {cfg['repeat']}; every figure is the median over repeats (individual repeats in "
        "brackets); every ratio is ours / baseline, taken pair by pair within one repeat, then the median.",
        "- all on this one machine, in one run, on one warm stack (a temp `SIERRA_PREFECT_HOME`, "
        "`SIERRA_PREFECT_PORT=auto`, server on 127.0.0.1); the baselines ran on the same server or "
        "batch, interleaved with ours.",
        "",
        "| # | metric | ours | baseline(s) | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row.item} | {row.metric} | {row.ours} | {row.baselines} | {row.ratio} | "
                     f"{row.target} | {row.met} |")
    if rel_plot:
        lines += ["", f"![benchmark plot]({rel_plot})"]
    breakdown = _trigger_breakdown(results)
    if breakdown:
        lines += ["", "## Trigger latency, phase by phase", "",
                  "From the flow run's state history (server timestamps, same clock as the runs).", "",
                  *breakdown]
    details = _sierra_details(results)
    if details:
        s = results["sierra"]
        lines += ["", "## SIERRA stage 2, per execution environment", "",
                  f"Stage 1 ran once ({s['stage1_seconds']:.1f} s); stage 2 then ran on that batch "
                  "with each environment in turn. Built-in `prefectserver.local`: "
                  f"{s['builtin_why']}.", "", *details]
    lines += ["", "## How each figure is measured", "", *_method_lines(cfg)]
    errors = results.get("errors") or []
    failed = _failed_samples(results)
    if errors or failed:
        lines += ["", "## Errors and failed repeats", ""]
        lines += [f"- {e}" for e in errors]
        lines += [f"- {f}" for f in failed]
    if notes:
        lines += ["", notes.strip()]
    out.write_text("\n".join(lines) + "\n")


def _failed_samples(results: dict) -> list[str]:
    found = []
    for item in ("concurrency", "sierra"):
        for variant, samples in ((results.get(item) or {}).get("variants") or {}).items():
            for i, sample in enumerate(samples):
                if not sample.get("ok") and not sample.get("skipped"):
                    found.append(f"{item} {variant} repeat {i + 1}: "
                                 f"{(sample.get('error') or 'failed').strip().splitlines()[-1][:300]}")
    for variant in ("ours", "parallel"):
        for i, sample in enumerate((results.get("overhead") or {}).get(variant, [])):
            if not sample.get("ok"):
                found.append(f"overhead {variant} repeat {i + 1}: "
                             f"{(sample.get('error') or 'failed').strip().splitlines()[-1][:300]}")
    for i, sample in enumerate((results.get("trigger") or {}).get("samples", [])):
        if not sample.get("ok"):
            found.append(f"trigger repeat {i + 1}: "
                         f"{(sample.get('error') or 'failed').strip().splitlines()[-1][:300]}")
    return found


def _method_lines(cfg: dict) -> list[str]:
    cap = cfg["cap"]
    return [
        f"1. **Concurrency**: {cfg['concurrency_n']} runs of `date +%s.%N > start; sleep "
        f"{cfg['concurrency_seconds']}; date +%s.%N > end` at cap {cap}. Ours: `sierra-prefect run "
        f"sierra/local --max-parallel {cap}`. Baselines (`benchmarks/limit_flows.py`, deployed to "
        "the same pool and worker, triggered and followed the same way): every command a task on "
        "Prefect's default (unbounded) thread pool, capped by a tag-based task concurrency limit of "
        f"{cap} (SIERRA's approach) or by a global concurrency limit of {cap} "
        "(`concurrency(NAME, occupy=1)` around the command); both limits created with the Prefect "
        "client. Wall = CLI start to exit; span = first run start to last run end; efficiency = "
        "ideal / span; most at once from the start/end stamps.",
        f"2. **Per-run overhead**: {cfg['overhead_n']:,} runs of `true`, one batch, cap {cap}. Ours: "
        "CLI wall / runs (includes trigger and start-up), and flow run start to end / runs. GNU "
        f"parallel as SIERRA's `hpc.local` calls it: `parallel --jobs {cap} --results DIR --joblog "
        "LOG --no-notice < commands.txt` with bash.",
        "3. **Trigger latency**: a one-run batch whose command is `date +%s.%N > FILE`; the stamp "
        "minus the wall clock just before starting `sierra-prefect run`, on the warm stack.",
        "4. **Bring-up**: `sierra-prefect up` in a fresh `SIERRA_PREFECT_HOME` (new database: "
        "migrations, pools, `prefect deploy --all`, worker online), then again when already up; "
        "readiness (healthy, `sierra/local` deployed, worker online) checked after each with "
        "`sierra-prefect status --json`.",
        f"5. **SIERRA**: `python -m sierra.main ... --pipeline 2 --exec-jobs-per-node {cap}` on one "
        f"stage-1 batch of the test engine `sptest.toysim` ({cfg['sierra_experiments']} experiments × "
        f"{cfg['sierra_runs']} runs, `--toysim-duration {cfg['sierra_duration']}`), wall time of the "
        "SIERRA process; all outputs checked after each. SIERRA's built-in `prefectserver.local` "
        "runs in its own PREFECT_HOME with a `killall` on PATH that only logs, and the server and "
        "worker it leaves are stopped by pid afterwards.",
        "6. **Memory**: RSS of the server's and the worker's process trees (pids from `sierra-prefect "
        "status --json`, children included) sampled every 0.1 s during the per-run overhead batch "
        "(item 2); the peak.",
    ]


def write_plot(results: dict, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Plain text rendering whatever a library imported earlier configured.
    matplotlib.rcParams["text.usetex"] = False

    cfg = results["config"]
    cap = cfg["cap"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(
        f"sierra-prefect benchmarks ({results['machine']['cores']} cores, Prefect "
        f"{results['machine']['prefect']}; medians of {cfg['repeat']}, bars min–max)"
        + ("  [SMOKE: tiny sizes]" if cfg["smoke"] else ""), fontsize=12)

    def bars(ax, labels, series, colors, ylabel, title, target=None, target_label=None, digits=2):
        meds = [median(s) for s in series]
        heights = [m or 0 for m in meds]
        lows = [h - min((x for x in s if x is not None), default=h)
                for h, s in zip(heights, series, strict=True)]
        highs = [max((x for x in s if x is not None), default=h) - h
                 for h, s in zip(heights, series, strict=True)]
        ax.bar(labels, heights, color=colors, yerr=[lows, highs], capsize=4)
        for i, m in enumerate(meds):
            # The median's value, just right of the bar's top (clear of the range bar).
            ax.text(i + 0.08, heights[i], "n/a" if m is None else f"{m:.{digits}f}",
                    ha="left", va="bottom", fontsize=9, fontweight="bold")
        if target is not None:
            ax.axhline(target, color="red", linestyle="--", linewidth=1)
            ax.text(len(labels) - 0.5, target, target_label or f"target {target}", color="red",
                    ha="right", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)

    ours_c, base_c, base2_c = "#1f77b4", "#999999", "#cccccc"
    v = (results.get("concurrency") or {}).get("variants", {})
    bars(axes[0, 0], ["ours", "tag limit", "GCL"],
         [_values(v.get(k, []), "efficiency") for k in ("ours", "tag", "gcl")],
         [ours_c, base_c, base2_c], "ideal / span",
         f"1. Concurrency: {cfg['concurrency_n']} × sleep {cfg['concurrency_seconds']} at cap {cap}",
         0.90, "target ≥ 0.90")
    ov = results.get("overhead") or {}
    bars(axes[0, 1], ["ours (end to end)", "ours (in flow)", "GNU parallel"],
         [_values(ov.get("ours", []), "ms_per_run"), _values(ov.get("ours", []), "ms_per_run_in_flow"),
          _values(ov.get("parallel", []), "ms_per_run")],
         [ours_c, "#6baed6", base_c], "ms per run",
         f"2. Per-run overhead: {cfg['overhead_n']:,} × true", 5.0, "target ≤ 5 ms")
    tr = (results.get("trigger") or {}).get("samples", [])
    from benchmarks.trigger_latency import PHASES

    ax = axes[0, 2]
    bottom = 0.0
    colors = ["#08519c", "#3182bd", "#6baed6", "#bdd7e7"]
    for (key, label), color in zip(PHASES, colors, strict=True):  # one color per phase
        val = median(_values(tr, key)) or 0.0
        ax.bar([0], [val], bottom=[bottom], color=color, label=label, width=0.5)
        bottom += val
    lat = median(_values(tr, "latency"))
    ax.text(0, bottom, "n/a" if lat is None else f"{lat:.2f} s (median)", ha="center",
            va="bottom", fontsize=9, fontweight="bold")
    ax.axhline(2.0, color="red", linestyle="--", linewidth=1)
    ax.text(1.6, 2.0, "target ≤ 2 s", color="red", ha="right", va="bottom", fontsize=8)
    ax.set_xlim(-0.4, 1.6)
    ax.set_ylim(0, max(bottom, 2.0) * 1.15)
    ax.set_xticks([0], ["trigger → first run"])
    ax.set_ylabel("seconds")
    ax.set_title("3. Trigger latency, warm stack (medians of phases)", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    b = results.get("bringup") or {}
    ax = axes[1, 0]
    bars(ax, ["cold, 1st", "cold", "warm"],
         [b.get("cold_first", []), b.get("cold", []), b.get("warm", [])],
         [base_c, ours_c, "#6baed6"], "seconds", "4. Bring-up: sierra-prefect up", digits=1)
    ax.plot([0.6, 1.4], [15, 15], color="red", linestyle="--", linewidth=1)
    ax.plot([1.6, 2.4], [2, 2], color="red", linestyle="--", linewidth=1)
    ax.text(1, 15, "target ≤ 15 s", color="red", ha="center", va="bottom", fontsize=8)
    ax.text(2, 2, "target ≤ 2 s", color="red", ha="center", va="bottom", fontsize=8)
    s = (results.get("sierra") or {}).get("variants", {})
    hpc = _values(s.get("hpc", []), "wall")
    hmed = median(hpc)
    bars(axes[1, 1], ["ours\n(prefectdeploy)", "hpc.local", "prefectserver\n(built-in)"],
         [_values(s.get(k, []), "wall") for k in ("ours", "hpc", "builtin")],
         [ours_c, base_c, base2_c], "seconds",
         f"5. SIERRA stage 2: {cfg['sierra_experiments']} exp × {cfg['sierra_runs']} runs",
         None if hmed is None else 1.3 * hmed, "target ≤ 1.3 × hpc.local", digits=1)
    rss = ov.get("rss", [])
    bars(axes[1, 2], ["server", "worker"],
         [[x.get("server_mib") for x in rss], [x.get("worker_mib") for x in rss]],
         [ours_c, "#6baed6"], "MiB", f"6. Peak RSS during the {cfg['overhead_n']:,}-run batch", digits=0)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
