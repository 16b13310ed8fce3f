"""What the dashboard's pages show, read from the workspace's state tables.

The syncs and the single run come from the API's own data layer (:mod:`..syncs`,
:mod:`..runs`), so a page and an API answer never disagree. This module adds what only the
pages need, each in one warehouse session per page: the latest run of every sync, a page of
runs with every column (a ``match_rate`` column is shown when the runs table has one), the
runs of the charts, the audience's size, and every row error of a run for the CSV download.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Iterator

from ... import names
from ...redact import redact
from ...schedule import aware
from ...state import ERROR_COLUMNS, RUN_COLUMNS
from ..workspaces import Workspace

# Destination types whose API says how many uploaded rows it matched to its users
# (``rows_unmatched``); for others a match rate would be made up, so none is shown.
MATCH_REPORTING_TYPES = frozenset({"facebook"})
ACTIVE_STATUSES = ("queued", "running")
CHART_RUNS = 30
PAGE_SIZE = 10


def iso(moment: Any) -> str | None:
    """A timestamp of the state tables (naive UTC) as ISO 8601 with ``Z``."""
    if isinstance(moment, dt.datetime):
        return aware(moment).isoformat().replace("+00:00", "Z")
    return moment


def _run(row: tuple, columns: tuple[str, ...]) -> dict[str, Any]:
    run = dict(zip(columns, row))
    for name in list(run):
        if name.endswith("_at"):
            run[name] = iso(run[name])
    run["error_message"] = redact(run.get("error_message") or "")
    run["full_resync"] = bool(run.get("full_resync"))
    return run


def _run_columns(session, state) -> tuple[str, ...]:
    """The runs table's columns the pages read: the package's, and ``match_rate`` when the
    table has it (another branch adds it)."""
    present = {c.lower() for c in session.columns(state.relations[names.RUNS_TABLE]) or []}
    extra = tuple(c for c in ("match_rate",) if c in present and c not in RUN_COLUMNS)
    return tuple(RUN_COLUMNS) + extra


def match_rate(run: dict[str, Any], destination_type: str | None) -> float | None:
    """The share of sent members the destination matched, where it reports one."""
    if run.get("match_rate") is not None:
        value = float(run["match_rate"])
        return value / 100 if value > 1 else value
    if destination_type not in MATCH_REPORTING_TYPES or run.get("rows_unmatched") is None:
        return None
    sent = (run.get("rows_added") or 0) + (run.get("rows_updated") or 0)
    if sent <= 0:
        return None
    return max(0.0, 1 - (run["rows_unmatched"] or 0) / sent)


def latest_runs(ws: Workspace) -> dict[str, dict[str, Any]]:
    """For each sync name: ``last`` (its newest run that ended) and ``active`` (one queued or
    running, else ``None``)."""
    runner = ws.state_runner()
    out: dict[str, dict[str, Any]] = {}
    try:
        with runner.warehouse.session() as session:
            if runner.state.missing_tables(session):
                return out
            columns = _run_columns(session, runner.state)
            rows = session.fetchall(
                f"select {', '.join(columns)} from ("
                f" select {', '.join(columns)}, row_number() over ("
                "   partition by sync_name, case when status in (?, ?) then 1 else 0 end"
                "   order by started_at desc, run_id desc) as _n"
                f" from {runner.state.runs}) ranked where _n = 1",
                ACTIVE_STATUSES,
            )
    finally:
        runner.warehouse.close()
    for row in rows:
        run = _run(row, columns)
        entry = out.setdefault(run["sync_name"], {"last": None, "active": None})
        entry["active" if run["status"] in ACTIVE_STATUSES else "last"] = run
    return out


@dataclass
class Detail:
    """The runs side of a sync's page."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    chart: list[dict[str, Any]] = field(default_factory=list)
    audience_size: int | None = None
    held: int | None = None
    last: dict[str, Any] | None = None
    last_errors: list[dict[str, Any]] = field(default_factory=list)
    last_errors_total: int = 0


def detail(ws: Workspace, sync, limit: int = PAGE_SIZE, offset: int = 0) -> Detail:
    """A page of the sync's runs (newest first), the runs of its charts with the members held
    after each, its audience's size now, and its newest ended run with that run's first row
    errors."""
    out = Detail()
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            state = runner.state
            if state.missing_tables(session):
                return out
            columns = _run_columns(session, state)
            select = f"select {', '.join(columns)} from {state.runs} where sync_name = ?"
            out.total = int(session.scalar(f"select count(*) from {state.runs} where sync_name = ?", (sync.name,)))
            out.runs = [_run(r, columns) for r in session.fetchall(
                select + " order by started_at desc, run_id desc limit ? offset ?", (sync.name, int(limit), int(offset)))]
            ended = [_run(r, columns) for r in session.fetchall(
                select + " and status not in (?, ?) order by started_at desc, run_id desc limit ?",
                (sync.name, *ACTIVE_STATUSES, CHART_RUNS))]
            q = runner.warehouse.relation_sql
            if session.columns(sync.relation_of("")) is not None:
                out.audience_size = int(session.scalar(f"select count(*) from {q(sync.relation_of(''))}"))
            if session.columns(sync.relation_of("snapshot")) is not None:
                out.held = int(session.scalar(f"select count(*) from {q(sync.relation_of('snapshot'))}"))
            if ended:
                out.last = ended[0]
                out.last_errors_total = int(session.scalar(
                    f"select count(*) from {state.errors} where run_id = ?", (out.last["run_id"],)))
                out.last_errors = [_error(dict(zip(ERROR_COLUMNS, r))) for r in session.fetchall(
                    f"select {', '.join(ERROR_COLUMNS)} from {state.errors} where run_id = ?"
                    " order by member_key, op limit ?", (out.last["run_id"], 20))]
    finally:
        runner.warehouse.close()
    out.chart = _with_held(list(reversed(ended)), out.held)
    return out


def _with_held(runs: list[dict[str, Any]], held_now: int | None) -> list[dict[str, Any]]:
    """Each run (oldest first) with ``held_after``: the members the destination held after it,
    as audsync knows them, walked back from the snapshot's size now through each run's
    applied adds, removes and recorded rows."""
    held = held_now
    for run in reversed(runs):
        run["held_after"] = held
        if held is not None:
            held = held - (run.get("rows_added") or 0) - (run.get("rows_recorded") or 0) + (run.get("rows_removed") or 0)
            held = max(held, 0)
    return runs


def _error(row: dict[str, Any]) -> dict[str, Any]:
    return {"member_key": str(row["member_key"]), "op": row["op"] or "", "error_code": row["error_code"] or "",
            "error_message": redact(row["error_message"] or ""), "retryable": bool(row["retryable"]),
            "recorded_at": iso(row.get("recorded_at"))}


def run_extras(ws: Workspace, sync, run_id: str) -> dict[str, Any] | None:
    """Every column of one run of ``sync`` (the API's run object has the documented ones)."""
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            if runner.state.missing_tables(session):
                return None
            columns = _run_columns(session, runner.state)
            row = session.fetchone(f"select {', '.join(columns)} from {runner.state.runs}"
                                   " where sync_name = ? and run_id = ?", (sync.name, run_id))
    finally:
        runner.warehouse.close()
    return _run(row, columns) if row else None


def row_errors(ws: Workspace, sync, run_id: str, chunk: int = 5000) -> Iterator[dict[str, Any]]:
    """Every row error of one run of ``sync``, by key, read in chunks (for the CSV)."""
    offset = 0
    while True:
        runner = ws.state_runner()
        try:
            with runner.warehouse.session() as session:
                rows = session.fetchall(
                    f"select {', '.join(ERROR_COLUMNS)} from {runner.state.errors}"
                    " where run_id = ? and sync_name = ? order by member_key, op limit ? offset ?",
                    (run_id, sync.name, chunk, offset))
        finally:
            runner.warehouse.close()
        for r in rows:
            yield _error(dict(zip(ERROR_COLUMNS, r)))
        if len(rows) < chunk:
            return
        offset += chunk
