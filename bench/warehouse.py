"""One benchmark project on one warehouse: the audience generated in SQL, the sync model, dbt.

The audience has N members: an email-like key and three mapped fields (``first_name``,
``country``, ``ltv``), generated in the warehouse (``range()`` on DuckDB, ``generate_series``
on PostgreSQL). Two versions are built once: ``audience_v0`` and ``audience_v1``, which is v0
with 1% of members removed, 1% with a changed ``ltv`` and 1% new members. The sync model reads
the view ``audience_src``; pointing it at the other version is the 3% change. Changing back is
the same size of change (1% adds, 1% removes, 1% updates), so repeated runs alternate.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

from . import measure

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.dbt_project import DbtProject  # noqa: E402 - the tests' project scaffolding

VENV_BIN = Path(sys.executable).parent
SYNC = "bench_sync"
MAPPING = [
    {"source_column": "first_name", "destination_field": "first_name"},
    {"source_column": "country", "destination_field": "country"},
    {"source_column": "ltv", "destination_field": "ltv"},
]
ENV = {"DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1", "PYTHONWARNINGS": "ignore"}
DESTINATION = {"batch_size": 10_000, "max_concurrency": 4, "secret": "bench-secret"}
"""The webhook destination's settings: the API's maximum batch, the default concurrency."""


def _members_sql(target: str, upto: str, where: str, ltv_change: str) -> str:
    series = {
        "duckdb": f"range({upto}) as t(i)",
        "postgres": f"generate_series(0, {upto} - 1) as t(i)",
        "spark": f"(select id as i from range({upto})) as t",
    }[target]
    double = "double" if target == "spark" else "double precision"
    return (
        "select 'user' || i || '@example.com' as email,"
        " 'name' || (i % 5000) as first_name,"
        " 'country' || (i % 50) as country,"
        f" cast((i % 100000) / 100.0 {ltv_change} as {double}) as ltv"
        f" from {series} where {where}"
    )


class BenchProject:
    """A dbt project with one ``audience_sync`` model over ``audience_src`` on ``target``."""

    def __init__(self, root: Path, target: str, pg: Any = None, spark: Any = None):
        self.project = DbtProject(root, target, pg=pg, spark=spark, name="bench")
        self.root = self.project.root
        self.target = target
        self.version = 0

    # -- data ---------------------------------------------------------------------------

    def generate(self, n: int) -> float:
        """Create ``audience_v0`` / ``audience_v1`` of ``n`` members; return the seconds taken."""
        import time

        p = self.project
        started = time.perf_counter()
        v0, v1, src = p.relation("audience_v0"), p.relation("audience_v1"), p.relation("audience_src")
        p.execute(f"drop view if exists {src}")
        for table in (v0, v1):
            p.execute(f"drop table if exists {table}")
        using = " using parquet" if self.target == "spark" else ""
        p.execute(f"create table {v0}{using} as {_members_sql(self.target, str(n), 'true', '')}")
        # v1: every 100th member removed, the next one's ltv changed, n/100 new members.
        p.execute(
            f"create table {v1}{using} as "
            + _members_sql(self.target, str(n + n // 100), f"i >= {n} or i % 100 <> 0",
                           "+ case when i % 100 = 1 and i < " + str(n) + " then 1 else 0 end")
        )
        if self.target == "postgres":
            p.execute(f"analyze {v0}")
            p.execute(f"analyze {v1}")
        self.point_at(0)
        return time.perf_counter() - started

    def point_at(self, version: int) -> None:
        """Make ``audience_src`` the audience version ``version`` (0 or 1)."""
        p = self.project
        p.execute(f"create or replace view {p.relation('audience_src')} as "
                  f"select email, first_name, country, ltv from {p.relation(f'audience_v{version}')}")
        self.version = version

    def flip(self) -> None:
        """The 3% change: point ``audience_src`` at the other version."""
        self.point_at(1 - self.version)

    # -- project files ------------------------------------------------------------------

    def write_sync(self, receiver_url: str) -> None:
        config = (
            "{{ config(materialized='audience_sync', destination='hook', sync_mode='mirror', "
            f"identifier='email', field_mapping={MAPPING!r}) }}}}"
        )
        self.project.write_model(
            SYNC, config + f"\nselect email, first_name, country, ltv from {self.project.relation('audience_src')}\n"
        )
        destinations = {"hook": {"type": "webhook", "url": receiver_url, **DESTINATION}}
        (self.root / "destinations.yml").write_text(yaml.safe_dump(destinations, sort_keys=False))

    def write_snapshot(self) -> None:
        """The dbt-snapshot peer: check strategy over the audience, deletes invalidated."""
        snapshots = {"snapshots": [{
            "name": "audience_snap",
            "relation": "source('bench', 'audience_src')",
            "config": {"unique_key": "email", "strategy": "check",
                       "check_cols": ["first_name", "country", "ltv"], "hard_deletes": "invalidate"},
        }]}
        sources = {"sources": [{"name": "bench", "schema": self.project.schema,
                                "tables": [{"name": "audience_src"}]}]}
        if self.target == "duckdb":
            sources["sources"][0]["database"] = "warehouse"
        self.project.write_file("snapshots/audience_snap.yml", yaml.safe_dump(snapshots, sort_keys=False))
        self.project.write_file("models/sources.yml", yaml.safe_dump(sources, sort_keys=False))
        config = yaml.safe_load((self.root / "dbt_project.yml").read_text())
        config["snapshot-paths"] = ["snapshots"]
        (self.root / "dbt_project.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    # -- commands -----------------------------------------------------------------------

    def dbt(self, *args: str) -> measure.Measured:
        """``dbt <args>`` as a child process, as a user runs it."""
        return measure.run([VENV_BIN / "dbt", *args, "--project-dir", self.root, "--profiles-dir", self.root],
                           cwd=self.root, env=ENV)

    def node_time(self, name: str) -> float:
        """The execution time of node ``name`` in the latest ``target/run_results.json``."""
        results = orjson.loads((self.root / "target" / "run_results.json").read_bytes())
        for result in results["results"]:
            if result["unique_id"].split(".")[-1] == name:
                if result["status"] not in ("success", "pass"):
                    raise RuntimeError(f"{name}: {result['status']}: {result.get('message')}")
                return float(result["execution_time"])
        raise KeyError(f"{name} is not in run_results.json")

    def audsync_argv(self, *args: str) -> list[Any]:
        return [VENV_BIN / "audsync", "--project-dir", self.root, "--profiles-dir", self.root,
                "--log-format", "json", *args]

    def audsync(self, *args: str) -> tuple[measure.Measured, dict[str, Any]]:
        """``audsync <args>`` as a child process; returns it and its JSON summary line."""
        result = measure.run(self.audsync_argv(*args), cwd=self.root, env=ENV, check=False)
        if result.code not in (0,):
            raise RuntimeError(f"audsync {' '.join(args)} exited {result.code}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        summary: dict[str, Any] = {}
        for line in result.stdout.splitlines():
            if line.startswith("{") and '"summary"' in line:
                record = orjson.loads(line)
                if record.get("event") == "summary":
                    summary = record
        return result, summary

    def query(self, sql: str) -> list[tuple]:
        return self.project.query(sql)

    def relation(self, name: str) -> str:
        return self.project.relation(name)

    def disk_mb(self) -> float:
        total = 0
        for folder, _, files in os.walk(self.root):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(folder, f))
                except OSError:
                    pass
        return total / 1e6
