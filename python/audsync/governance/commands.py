"""What the governance commands print: ``audsync history`` and ``audsync plan --format
markdown`` (called from their blocks in ``cli.py``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from . import history
from .hooks import verdict_for


def show_history(app, sync_name: str, key: str | None, since: dt.datetime | None, limit: int, fmt: str) -> None:
    """``audsync history S [--key K] [--since T]``: when each key entered and left, and what
    was sent, newest first."""
    from ..errors import ConfigError
    from ..output import print_json, print_table

    sync = app.project.get(sync_name)
    with app.warehouse.session() as session:
        if session.columns(history.history_relation(sync)) is None:
            raise ConfigError(f"sync {sync.name!r}: {history.history_relation(sync)} does not exist yet; "
                              f"run `dbt run --select {sync.name}` to build it")
        rows = history.read(session, app.warehouse, sync, key=key, since=since, limit=limit)
    if fmt == "json":
        print_json(rows)
        return
    if not rows:
        click.echo(f"{sync.name}: no history" + (f" for {key!r}" if key else "") + (f" since {since}" if since else ""))
        return
    print_table(["committed_at", "key", "op", "split group", "run_id", "hash"],
                [[r["committed_at"], r["key"], r["op"], r["split_group"], r["run_id"], r["hash"]] for r in rows],
                title=f"history of {sync.name}")


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_plan(sync, counts, verdict, sample_rows: list[dict[str, Any]]) -> str:
    """A plan as a Markdown block for a pull request: counts, guardrail verdict, a sample."""
    status = "⛔ blocked" if verdict.blocked else "✅ pass"
    lines = [
        f"### audsync plan: `{sync.name}`",
        "",
        f"`{sync.mode}` → `{sync.destination}` · guardrails: **{status}**",
        "",
        "| op | rows |",
        "|---|---:|",
        f"| add | {counts.adds} |",
        f"| remove | {counts.removes} |",
        f"| update | {counts.updates} |",
    ]
    if counts.recorded:
        lines.append(f"| recorded without sending | {counts.recorded} |")
    lines += ["", f"The destination holds {verdict.held} members; the audience has {verdict.audience}.", ""]
    if verdict.blocked:
        lines.append("**Guardrails:** the next run would be blocked:")
        lines += [f"- {reason}" for reason in verdict.reasons]
        lines.append(f"\nIf the change is intended, run `audsync run {sync.name} --force` once.")
    else:
        limits = verdict.limits
        lines.append(
            f"**Guardrails:** within the limits (max_removals_pct {limits.max_removals_pct}, "
            f"guard_min_rows {limits.guard_min_rows}, max_removals {limits.max_removals}, "
            f"max_changes_pct {limits.max_changes_pct}, allow_empty {str(limits.allow_empty).lower()})."
        )
    if sample_rows:
        lines += ["", f"<details><summary>Sample ({len(sample_rows)} rows)</summary>", "",
                  "| op | key | fields |", "|---|---|---|"]
        lines += [f"| {_cell(r['op'])} | {_cell(r['key'])} | {_cell(r['fields'])} |" for r in sample_rows]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def print_markdown_plan(app, sync, tables, counts, sample_rows) -> None:
    """``audsync plan S --format markdown``."""
    runner = app.state_runner()
    verdict = app.warehouse.in_session(lambda session: verdict_for(runner, sync, tables, session, counts))
    click.echo(markdown_plan(sync, counts, verdict, sample_rows), nl=False)


def alerts_problems(app) -> list[str]:
    """For ``audsync check``: every bad entry of the project's ``alerts.yml`` (none when the
    project has no alerts file), validated as runs load it."""
    from .alerts import check_alerts, find_alerts_file

    path = find_alerts_file(app.project.project_dir)
    return [] if path is None else check_alerts(path, project=app.project)
