"""The measurements of one warehouse at one audience size, audsync and its peers alike."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import measure, peers
from .receiver import Receiver
from .warehouse import SYNC, BenchProject

SPARK_SKIPS = {"snapshot", "pydiff", "drt"}
HEAVY_ROWS = 5_000_000
"""From this size on, the slow steps (initial sync, drt, the Python diff) run ``heavy_runs`` times."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Scenario:
    """Everything measured on ``target`` at ``n`` members; ``values[metric]`` lists every run."""

    def __init__(self, target: str, n: int, *, runs: int, heavy_runs: int, workdir: Path, pg: Any,
                 receiver: Receiver, skip: set[str], spark: Any = None):
        self.target, self.n, self.runs = target, n, runs
        self.heavy_runs = heavy_runs if n >= HEAVY_ROWS else runs
        self.workdir, self.pg, self.receiver, self.spark = workdir, pg, receiver, spark
        # On Spark audsync alone: dbt-spark's snapshot needs Delta's MERGE, and the Python
        # diff and drt read DuckDB and PostgreSQL only.
        self.skip = skip | SPARK_SKIPS if target == "spark" else skip
        self.values: dict[str, list[float]] = defaultdict(list)
        self.notes: dict[str, str] = {}
        self.checks: list[str] = []
        self.load_before = self.load_after = None

    def add(self, metric: str, value: float) -> None:
        self.values[metric].append(value)

    def expect_rows(self, what: str, expected: int) -> int:
        got = self.receiver.count()["rows"]
        if got != expected:
            self.checks.append(f"{what}: the receiver counted {got:,} rows, expected {expected:,}")
            log(f"  WARNING {self.checks[-1]}")
        return got

    # -- the whole scenario -------------------------------------------------------------------

    def run(self) -> None:
        root = self.workdir / f"{self.target}_{self.n}"
        bp = BenchProject(root, self.target, self.pg, self.spark)
        self.load_before = os.getloadavg()[0]
        try:
            log(f"{self.target} N={self.n:,}: generating the audience in SQL")
            self.add("generate_s", bp.generate(self.n))
            bp.write_sync(self.receiver.url)
            bp.write_snapshot()
            bp.dbt("parse")
            bp.dbt("run", "--select", "package:audsync")
            self.audsync(bp)
            if "snapshot" not in self.skip:
                self.snapshot(bp)
            if "pydiff" not in self.skip:
                self.pydiff(bp)
            if "drt" not in self.skip and self.target == "duckdb":
                self.drt(bp)
            self.add("disk_mb", bp.disk_mb())
        finally:
            self.load_after = os.getloadavg()[0]
            if self.target == "postgres":
                try:
                    self.pg.drop_database(bp.project.database)
                except Exception as error:  # noqa: BLE001 - cleanup only
                    log(f"  could not drop {bp.project.database}: {error}")
            if self.target == "spark":
                try:
                    self.spark.drop_schema(bp.project.schema)
                except Exception as error:  # noqa: BLE001 - cleanup only
                    log(f"  could not drop {bp.project.schema}: {error}")
            shutil.rmtree(root, ignore_errors=True)

    # -- audsync ------------------------------------------------------------------------------

    def sync_run(self, bp: BenchProject, what: str, expected_rows: int, metric: str) -> tuple[Any, dict[str, Any]]:
        """``audsync run S`` against a reset receiver: checks that ``expected_rows`` arrived and
        records the run's wall time and peak RSS as ``<metric>_wall_s`` and ``<metric>_rss_mb``."""
        self.receiver.reset()
        m, summary = bp.audsync("run", SYNC)
        self.expect_rows(what, expected_rows)
        self.add(f"{metric}_wall_s", m.wall_s)
        self.add(f"{metric}_rss_mb", m.peak_rss_mb)
        return m, summary

    def audsync(self, bp: BenchProject) -> None:
        n, change = self.n, 3 * (self.n // 100)
        log(f"  diff build, initial: dbt run --select {SYNC} x{self.runs}")
        for _ in range(self.runs):
            m = bp.dbt("run", "--select", SYNC)
            self.add("dbt_initial_wall_s", m.wall_s)
            self.add("dbt_initial_model_s", bp.node_time(SYNC))
            self.add("dbt_rss_mb", m.peak_rss_mb)

        log(f"  initial sync: audsync run {SYNC} x{self.heavy_runs}")
        for i in range(self.heavy_runs):
            if i:
                bp.audsync("reset", SYNC)
            _, summary = self.sync_run(bp, "initial sync", n, "sync_initial")
            self.add("sync_initial_rows_per_s", summary.get("rows_per_s") or 0)
            self.add("sync_initial_run_s", (summary.get("duration_ms") or 0) / 1000)

        log(f"  no change: audsync run {SYNC} x{self.runs}")
        for _ in range(self.runs):
            self.sync_run(bp, "run with no change", 0, "sync_nochange")

        log(f"  3% change: dbt run + audsync run x{self.runs}")
        for _ in range(self.runs):
            bp.flip()
            d = bp.dbt("run", "--select", SYNC)
            self.add("dbt_change_wall_s", d.wall_s)
            self.add("dbt_change_model_s", bp.node_time(SYNC))
            m, summary = self.sync_run(bp, "incremental sync", change, "sync_incr")
            self.add("sync_incr_rows_per_s", summary.get("rows_per_s") or 0)
            self.add("incr_total_s", d.wall_s + m.wall_s)
        bp.point_at(0)

    # -- peers --------------------------------------------------------------------------------

    def snapshot(self, bp: BenchProject) -> None:
        log(f"  peer: dbt snapshot (check strategy) + the change query x{self.runs}")
        bp.point_at(0)
        m = bp.dbt("snapshot")
        self.add("snap_initial_wall_s", m.wall_s)
        self.add("snap_initial_node_s", bp.node_time("audience_snap"))
        sql = peers.snapshot_changes_sql(bp.relation("audience_snap"), bp.relation("snap_changes"), bp.target)
        for _ in range(self.runs):
            bp.flip()
            m = bp.dbt("snapshot")
            node = bp.node_time("audience_snap")
            started = time.perf_counter()
            for statement in sql.split(";\n"):
                bp.query(statement)
            derive = time.perf_counter() - started
            counts = dict(bp.query(f"select op, count(*) from {bp.relation('snap_changes')} group by op"))
            if counts != {"add": self.n // 100, "remove": self.n // 100, "update": self.n // 100}:
                self.checks.append(f"dbt snapshot change query found {counts}")
                log(f"  WARNING {self.checks[-1]}")
            self.add("snap_change_wall_s", m.wall_s)
            self.add("snap_change_node_s", node)
            self.add("snap_derive_s", derive)
            self.add("snap_total_s", m.wall_s + derive)
            self.add("snap_node_total_s", node + derive)
        bp.point_at(0)

    def pydiff(self, bp: BenchProject) -> None:
        log(f"  peer: plain Python diff x{self.heavy_runs}")
        where = str(bp.project.duckdb_path) if self.target == "duckdb" else self.pg.dsn_for(bp.project.database)
        for _ in range(self.heavy_runs):
            m = measure.run([sys.executable, "-m", "bench.pydiff", self.target, where,
                             bp.relation("audience_v0"), bp.relation("audience_v1")],
                            cwd=Path(__file__).resolve().parents[1])
            out = json.loads(m.stdout.strip().splitlines()[-1])
            if (out["adds"], out["removes"], out["updates"]) != (self.n // 100,) * 3:
                self.checks.append(f"Python diff found {out}")
            self.add("pydiff_wall_s", m.wall_s)
            self.add("pydiff_rss_mb", m.peak_rss_mb)

    def drt(self, bp: BenchProject) -> None:
        log(f"  peer: drt run (full re-send, batch {peers.DRT_BATCH:,}) x{self.heavy_runs}")
        folder = bp.root / "drt"
        env = peers.write_drt_project(folder, self.target, {"path": str(bp.project.duckdb_path)},
                                      bp.relation("audience_src"), self.receiver.url)
        bp.point_at(0)
        for _ in range(self.heavy_runs):
            self.receiver.reset()
            m = peers.run_drt(folder, env)
            got = self.expect_rows("drt run", self.n)
            self.add("drt_wall_s", m.wall_s)
            self.add("drt_rss_mb", m.peak_rss_mb)
            self.add("drt_rows_per_s", got / m.wall_s if m.wall_s else 0)

    # -- output -------------------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        return {
            "warehouse": self.target, "n": self.n, "runs": self.runs, "heavy_runs": self.heavy_runs,
            "metrics": {k: {"values": v, **measure.summary(v)} for k, v in self.values.items()},
            "checks": self.checks,
            "loadavg_1min": [self.load_before, self.load_after],
        }
