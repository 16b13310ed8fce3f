"""The results table: medians with their spread, the issue's targets, and every ratio to audsync."""

from __future__ import annotations

from typing import Any

SMALL, BIG = 1_000_000, 10_000_000


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "rows/s":
        return f"{value:,.0f}"
    if unit == "MB":
        return f"{value:,.0f}"
    if unit == "x":
        return f"{value:.1f}x"
    return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def _n(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


ROWS = [
    # (metric, label, unit)
    ("generate_s", "generate the audience and its 3% change in SQL", "s"),
    ("dbt_initial_model_s", "diff build, initial: model execution (run_results.json)", "s"),
    ("dbt_initial_wall_s", "diff build, initial: `dbt run --select S` wall", "s"),
    ("dbt_change_model_s", "diff build after the 3% change: model execution", "s"),
    ("dbt_change_wall_s", "diff build after the 3% change: `dbt run --select S` wall", "s"),
    ("dbt_rss_mb", "dbt process peak RSS", "MB"),
    ("sync_initial_wall_s", "initial sync of N: `audsync run S` wall", "s"),
    ("sync_initial_rows_per_s", "initial sync: delivery rows/s", "rows/s"),
    ("sync_initial_rss_mb", "initial sync (N changes): runner peak RSS", "MB"),
    ("sync_incr_wall_s", "incremental sync after the 3% change: `audsync run S` wall", "s"),
    ("sync_incr_rows_per_s", "incremental sync: delivery rows/s", "rows/s"),
    ("sync_incr_rss_mb", "incremental sync: runner peak RSS", "MB"),
    ("incr_total_s", "incremental end to end: `dbt run` + `audsync run` wall", "s"),
    ("sync_nochange_wall_s", "`audsync run S` with no changes: wall, start-up included", "s"),
    ("sync_nochange_rss_mb", "`audsync run S` with no changes: peak RSS", "MB"),
    ("snap_change_node_s", "peer dbt snapshot (check) after the change: node execution", "s"),
    ("snap_change_wall_s", "peer dbt snapshot after the change: `dbt snapshot` wall", "s"),
    ("snap_derive_s", "peer dbt snapshot: the adds/removes/updates query", "s"),
    ("pydiff_wall_s", "peer plain Python diff (load both sides into dicts): wall", "s"),
    ("pydiff_rss_mb", "peer plain Python diff: peak RSS", "MB"),
    ("drt_wall_s", "peer drt run (re-sends all N rows): wall", "s"),
    ("drt_rows_per_s", "peer drt run: rows/s", "rows/s"),
    ("drt_rss_mb", "peer drt run: peak RSS", "MB"),
]


def _median(s: dict[str, Any], metric: str) -> float | None:
    m = s["metrics"].get(metric)
    return m.get("median") if m else None


def _find(data: dict[str, Any], warehouse: str, n: int) -> dict[str, Any] | None:
    for s in data["scenarios"]:
        if s["warehouse"] == warehouse and s["n"] == n:
            return s
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(data: dict[str, Any]) -> list[tuple[str, str, str, float | None, str]]:
    """(warehouse, N, comparison, peer / audsync, how) for every scenario."""
    out = []
    for s in data["scenarios"]:
        w, n = s["warehouse"], _n(s["n"])
        m = lambda k: _median(s, k)  # noqa: E731
        out += [
            (w, n, "dbt snapshot + change query vs audsync diff build (execution)",
             _ratio(m("snap_node_total_s"), m("dbt_change_model_s")), "(snapshot node + query) / audsync model"),
            (w, n, "dbt snapshot + change query vs audsync diff build (wall)",
             _ratio(m("snap_total_s"), m("dbt_change_wall_s")), "(`dbt snapshot` wall + query) / `dbt run` wall"),
            (w, n, "plain Python diff vs audsync diff build (time)",
             _ratio(m("pydiff_wall_s"), m("dbt_change_model_s")), "Python diff wall / audsync model"),
            (w, n, "plain Python diff vs audsync diff build (wall)",
             _ratio(m("pydiff_wall_s"), m("dbt_change_wall_s")), "Python diff wall / `dbt run` wall"),
            (w, n, "plain Python diff vs audsync runner (peak memory)",
             _ratio(m("pydiff_rss_mb"), m("sync_incr_rss_mb")), "Python diff RSS / runner RSS"),
            (w, n, "drt vs audsync, initial sync of N",
             _ratio(m("drt_wall_s"), m("sync_initial_wall_s")), "`drt run` wall / `audsync run` wall"),
            (w, n, "drt vs audsync, delivery rate",
             _ratio(m("sync_initial_rows_per_s"), m("drt_rows_per_s")), "audsync rows/s / drt rows/s"),
            (w, n, "drt vs audsync, after the 3% change (drt re-sends every row)",
             _ratio(m("drt_wall_s"), m("incr_total_s")), "`drt run` / (`dbt run` + `audsync run`)"),
        ]
    return [r for r in out if r[3] is not None]


def targets(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's targets, at the sizes measured."""
    sizes = sorted({s["n"] for s in data["scenarios"]})
    small = SMALL if SMALL in sizes else (sizes[0] if sizes else SMALL)
    rows = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("holds" if ok else "**missed**")

    def at(w: str, n: int, metric: str) -> float | None:
        s = _find(data, w, n)
        return _median(s, metric) if s else None

    v = at("duckdb", BIG, "dbt_change_model_s")
    rows.append(("DuckDB 10M diff build, model execution <= 5 s", _fmt(v, "s") + " s", verdict(None if v is None else v <= 5)))
    v = at("postgres", BIG, "dbt_change_model_s")
    rows.append(("PostgreSQL 10M diff build, model execution <= 45 s", _fmt(v, "s") + " s", verdict(None if v is None else v <= 45)))
    for w in ("duckdb", "postgres"):
        v = at(w, small, "sync_initial_rows_per_s")
        rows.append((f"initial sync of {_n(small)} ({w}) >= 250,000 rows/s", _fmt(v, "rows/s"), verdict(None if v is None else v >= 250_000)))
    v = _ratio(at("duckdb", small, "drt_wall_s"), at("duckdb", small, "sync_initial_wall_s"))
    rows.append((f"initial sync of {_n(small)} >= 3x faster than drt", _fmt(v, "x"), verdict(None if v is None else v >= 3)))
    v = _ratio(at("duckdb", small, "drt_wall_s"), at("duckdb", small, "incr_total_s"))
    rows.append((f"incremental (dbt run + audsync run) faster than drt at {_n(small)}", _fmt(v, "x"), verdict(None if v is None else v > 1)))
    v = _ratio(at("duckdb", BIG, "drt_wall_s"), at("duckdb", BIG, "incr_total_s"))
    rows.append(("incremental >= 5x faster than drt at 10M", _fmt(v, "x"), verdict(None if v is None else v >= 5)))
    rss = [x for s in data["scenarios"] for k in ("sync_initial_rss_mb", "sync_incr_rss_mb", "sync_nochange_rss_mb")
           for x in s["metrics"].get(k, {}).get("values", [])]
    v = max(rss) if rss else None
    rows.append(("runner peak RSS <= 200 MB (every audsync run)", _fmt(v, "MB") + " MB max", verdict(None if v is None else v <= 200)))
    flat = {w: (at(w, small, "sync_initial_rss_mb"), at(w, BIG, "sync_initial_rss_mb")) for w in ("duckdb", "postgres")}
    for w, (a, b) in flat.items():
        ok = None if a is None or b is None else b <= a * 1.2 + 10
        rows.append((f"runner RSS flat ({w}): {_n(small)} vs 10M changes", f"{_fmt(a, 'MB')} / {_fmt(b, 'MB')} MB", verdict(ok)))
    nochange = [x for s in data["scenarios"] for x in s["metrics"].get("sync_nochange_wall_s", {}).get("values", [])]
    v = max(nochange) if nochange else None
    rows.append(("`audsync run` with no changes < 5 s (slowest run)", _fmt(v, "s") + " s", verdict(None if v is None else v < 5)))
    return rows


def render(data: dict[str, Any]) -> str:
    info = data["machine"]
    lines = [
        "# audsync benchmark: latest results",
        "",
        f"`{data['command']}` on {info.get('cores')} cores, {info.get('memory_gib')} GiB; started {data['started']},"
        f" took {data['duration_s'] / 60:.1f} min. Python {info.get('python')}, dbt-core {info.get('dbt-core')},"
        f" DuckDB {info.get('duckdb')}, PostgreSQL {info.get('postgres', '-')}, drt-core {info.get('drt-core')}"
        + (f", pyspark {info['pyspark']}, dbt-spark {info.get('dbt-spark')}." if info.get("pyspark") else "."),
        "",
        "Medians of the runs, with min-max; n is the number of runs. Webhook receiver: a separate process on"
        " loopback that parses every body and counts rows. audsync webhook destination: batch_size 10,000,"
        " max_concurrency 4, HMAC signing on. drt: REST destination, body_mode batch, batch_size and"
        " max_records_per_request 10,000, rate limit off (requests_per_second 0), mode full:"
        " **drt re-sends every row on every run**.",
        "",
    ]
    if data.get("failures"):
        lines += ["**Failures:** " + "; ".join(data["failures"]), ""]
    scenarios = data["scenarios"]
    if scenarios:
        head = "| measurement | unit | " + " | ".join(f"{s['warehouse']} {_n(s['n'])}" for s in scenarios) + " |"
        lines += ["## Figures", "", head, "|---|---|" + "---|" * len(scenarios)]
        for metric, label, unit in ROWS:
            cells = []
            for s in scenarios:
                m = s["metrics"].get(metric)
                if not m:
                    cells.append("-")
                    continue
                cell = _fmt(m["median"], unit)
                if m["n"] > 1:
                    cell += f" ({_fmt(m['min'], unit)}-{_fmt(m['max'], unit)}, n={m['n']})"
                else:
                    cell += " (n=1)"
                cells.append(cell)
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Targets (issue 5)", "", "| target | measured (median) | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(data)]
    lines += ["", "## Ratios to audsync (peer / audsync; above 1: audsync is faster or smaller)", "",
              "| warehouse | N | comparison | ratio | computed as |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {n} | {c} | {_fmt(r, 'x')} | {how} |" for w, n, c, r, how in ratios(data)]
    loads = [f"{s['warehouse']} {_n(s['n'])}: {s['loadavg_1min'][0]:.1f} -> {s['loadavg_1min'][1]:.1f}"
             for s in scenarios if s.get("loadavg_1min") and None not in s["loadavg_1min"]]
    if loads:
        lines += ["", f"Load average (1 min) at the start and end of each size, on {info.get('cores')} cores"
                  " (above the core count, other processes shared the machine and the figures are slower"
                  " than on an idle one): " + "; ".join(loads) + "."]
    checks = [f"{s['warehouse']} {_n(s['n'])}: {c}" for s in scenarios for c in s.get("checks", [])]
    if checks:
        lines += ["", "## Correctness checks that failed", ""] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"
