"""Helpers to declare syncs in a test project, run the ``audsync`` CLI, and check the
mode properties of contract section 4 against what a fake destination holds."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from audsync import names
from audsync.cli import run_cli

AUDIENCE_COLUMNS = ("email", "first_name", "ltv")
DEFAULT_MAPPING = [
    {"source_column": "email", "destination_field": "email"},
    {"source_column": "first_name", "destination_field": "first_name"},
    {"source_column": "ltv", "destination_field": "ltv"},
]


def write_audience(project, rows: Iterable[tuple], table: str = "audience_src") -> None:
    """Make the source table hold exactly ``rows`` of (email, first_name, ltv).

    On Spark, whose Parquet tables take no DELETE, the table is made anew (a sync's views read
    it by name when they are queried, so they follow)."""
    relation = project.relation(table)
    if project.target == "spark":
        project.execute(f"drop table if exists {relation}")
        project.execute(f"create table {relation} (email string, first_name string, ltv double) using parquet")
        rows = list(rows)
        if rows:
            values = ", ".join("(%s, %s, %s)" for _ in rows)
            project.execute(f"insert into {relation} values {values}", [v for row in rows for v in row])
        return
    project.execute(
        f"create table if not exists {relation} (email varchar(200), first_name varchar(200), ltv double precision)"
    )
    project.execute(f"delete from {relation}")
    rows = list(rows)
    if not rows:
        return
    if project.target == "duckdb":
        import duckdb

        con = duckdb.connect(str(project.duckdb_path))
        try:
            con.executemany(f"insert into {relation} values (?, ?, ?)", rows)
        finally:
            con.close()
    else:
        conn = project.pg.connect(project.database)
        try:
            from psycopg2.extras import execute_values

            with conn.cursor() as cur:
                execute_values(cur, f"insert into {relation} values %s", rows)
        finally:
            conn.close()


def write_sync(
    project,
    name: str,
    *,
    mode: str = "mirror",
    destination: str = "hook",
    mapping: list[dict] | None = None,
    config: Mapping[str, Any] | None = None,
    schedule: str | None = None,
    table: str = "audience_src",
    tags: list[str] | None = None,
    extra: Mapping[str, Any] | None = None,  # governance: more model config keys (allow_empty=True, ...)
) -> None:
    """Declare a sync model over the source table, as contract section 2 shows."""
    parts = [
        "materialized='audience_sync'",
        f"destination={destination!r}",
        f"sync_mode={mode!r}",
        "identifier='email'",
        f"field_mapping={mapping if mapping is not None else DEFAULT_MAPPING!r}",
    ]
    if config:
        parts.append(f"config={dict(config)!r}")
    if schedule:
        parts.append(f"schedule={schedule!r}")
    if tags:
        parts.append(f"tags={tags!r}")
    parts += [f"{key}={value!r}" for key, value in (extra or {}).items()]  # governance:
    project.write_model(
        name,
        "{{ config(" + ", ".join(parts) + ") }}\n"
        f"select email, first_name, ltv from {project.relation(table)}",
    )


def write_destinations(project, destinations: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write ``destinations.yml`` beside ``dbt_project.yml``."""
    path = project.root / "destinations.yml"
    path.write_text(yaml.safe_dump({k: dict(v) for k, v in destinations.items()}, sort_keys=False))
    return path


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def audsync(project, *args: str, expect: int | None = 0) -> CliResult:
    """Run the ``audsync`` CLI in-process on ``project``; assert its exit code."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["--project-dir", str(project.root), "--profiles-dir", str(project.root), *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(argv)
    result = CliResult(code, out.getvalue(), err.getvalue())
    if expect is not None:
        assert code == expect, f"audsync {' '.join(args)} exited {code}, expected {expect}:\n{result.output}"
    return result


def audsync_process(project, *args: str, env: Mapping[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start the ``audsync`` CLI as a separate process (for kills and concurrency)."""
    argv = [sys.executable, "-m", "audsync.cli", "--project-dir", str(project.root),
            "--profiles-dir", str(project.root), *args]
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def valid_members(rows: Iterable[tuple]) -> dict[str, tuple]:
    """The members a sync sends: rows whose identifier is not null and appears once."""
    rows = list(rows)
    counts: dict[Any, int] = {}
    for row in rows:
        counts[row[0]] = counts.get(row[0], 0) + 1
    return {r[0]: tuple(r[1:]) for r in rows if r[0] is not None and counts[r[0]] == 1}


class ModeOracle:
    """What a destination must hold after each failure-free run, by mode (contract section 4)."""

    def __init__(self, mode: str, initial: Mapping[str, Any] | None = None):
        self.mode = names.normalise_mode(mode)
        self.initial = dict(initial or {})
        self.ever: dict[str, tuple] = {}
        self.seen_before: set[str] = set()
        self.left: set[str] = set()
        self.current: dict[str, tuple] = {}

    def observe(self, audience: Mapping[str, tuple]) -> None:
        """Record the audience a run has just synced."""
        self.left |= self.seen_before - set(audience)
        self.seen_before |= set(audience)
        self.current = dict(audience)
        self.ever.update(audience)

    def expected(self) -> dict[str, tuple | None]:
        """Expected members: key -> values (None where the values do not matter)."""
        if self.mode == "mirror":
            return dict(self.current)
        if self.mode == "upsert":
            return dict(self.ever)
        if self.mode == "add":
            return {k: None for k in self.ever}
        return {k: None for k in self.initial if k not in self.left}

    def check(self, held: Mapping[str, Any], to_values) -> None:
        """Assert ``held`` (key -> destination fields) is what the mode promises.

        ``to_values`` turns one member's destination fields into the audience's value tuple,
        or returns None when the destination keeps no fields.
        """
        expected = self.expected()
        assert set(held) == set(expected), (
            f"{self.mode}: missing {sorted(set(expected) - set(held))[:10]}, "
            f"unexpected {sorted(set(held) - set(expected))[:10]}"
        )
        if self.mode in ("mirror", "upsert"):
            for key, values in expected.items():
                got = to_values(held[key])
                if got is not None:
                    assert got == values, f"{self.mode}: {key} holds {got}, expected {values}"


def webhook_values(fields: Mapping[str, Any]) -> tuple:
    """The audience values of a webhook member, as the default mapping sends them."""
    return (fields.get("first_name"), None if fields.get("ltv") is None else float(fields["ltv"]))


def run_rows(project, sync: str) -> list[dict[str, Any]]:
    """The sync's rows of ``audsync_runs``, oldest first."""
    relation = project.relation(names.RUNS_TABLE, schema=project.schema + "_audsync")
    columns = ["run_id", "status", "planned_adds", "planned_removes", "planned_updates", "rows_added",
               "rows_removed", "rows_updated", "rows_failed", "error_message", "trigger"]
    rows = project.query(
        f"select {', '.join(columns)} from {relation} where sync_name = %s order by started_at, run_id", [sync]
    )
    return [dict(zip(columns, r)) for r in rows]


def state_rows(project, table: str, where: str = "", params: list | None = None) -> list[tuple]:
    relation = project.relation(table, schema=project.schema + "_audsync")
    return project.query(f"select * from {relation} {where}", params)
