"""The alternatives: ``dbt snapshot`` plus the change query, and drt-core.

drt-core is installed by the benchmark into its own virtual environment (``bench/.venv-peers``),
never as a dependency of audsync. The plain Python diff is :mod:`bench.pydiff`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from . import measure

PEERS_VENV = Path(__file__).resolve().parent / ".venv-peers"
PEER_PACKAGES = ["drt-core[duckdb]", "py-spy"]
DRT_BATCH = 10_000
"""drt's ``sync.batch_size`` and the REST destination's ``max_records_per_request``."""


def ensure_peers_venv() -> Path:
    """Create ``bench/.venv-peers`` with drt-core once; return its ``bin`` folder."""
    bin_dir = PEERS_VENV / "bin"
    if not (bin_dir / "drt").exists():
        print(f"installing the peers ({', '.join(PEER_PACKAGES)}) into {PEERS_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return bin_dir


def drt_version() -> str:
    try:
        out = subprocess.run([str(PEERS_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('drt-core'))"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


# -- dbt snapshot -----------------------------------------------------------------------------

def snapshot_changes_sql(snap: str, out: str, target: str) -> str:
    """What a dbt user writes without audsync: the latest snapshot's adds, removes and updates.

    A check-strategy snapshot stamps the new versions' ``dbt_valid_from`` and the closed (or,
    with ``hard_deletes: invalidate``, deleted) versions' ``dbt_valid_to`` with the same
    snapshot time T. New version without a closed one: add; closed without a new one: remove;
    both: update.
    """
    create = "create or replace table" if target == "duckdb" else "create table"
    drop = "" if target == "duckdb" else f"drop table if exists {out};\n"
    return (
        f"{drop}{create} {out} as\n"
        f"with t as (select max(x) as t from (select max(dbt_valid_from) as x from {snap}"
        f" union all select max(dbt_valid_to) from {snap}) as m),\n"
        f"new_v as (select s.* from {snap} as s, t where s.dbt_valid_from = t.t and s.dbt_valid_to is null),\n"
        f"old_v as (select s.* from {snap} as s, t where s.dbt_valid_to = t.t)\n"
        f"select coalesce(n.email, o.email) as email,"
        f" case when o.email is null then 'add' when n.email is null then 'remove' else 'update' end as op,"
        f" n.first_name, n.country, n.ltv\n"
        f"from new_v as n full outer join old_v as o on n.email = o.email"
    )


# -- drt ----------------------------------------------------------------------------------------

def write_drt_project(folder: Path, target: str, conn: dict[str, Any], source_relation: str, url: str) -> dict[str, str]:
    """A drt project that sends the audience to ``url`` in batches; returns the env to run it.

    ``mode: full`` re-sends every row each run (what drt does without its own state); rate
    limit off (``requests_per_second: 0``); batches of :data:`DRT_BATCH` rows rendered by a
    ``batch_template``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    home = folder / "home"
    (home / ".drt").mkdir(parents=True, exist_ok=True)
    (folder / "drt_project.yml").write_text(yaml.safe_dump({"name": "bench", "version": "0.1", "profile": "bench"}))
    profile = {"type": "duckdb", "database": conn["path"]} if target == "duckdb" else {
        "type": "postgres", "host": conn["host"], "port": conn["port"], "dbname": conn["dbname"],
        "user": conn["user"], "password": conn.get("password") or ""}
    (home / ".drt" / "profiles.yml").write_text(yaml.safe_dump({"bench": profile}))
    sync = {
        "name": "audience",
        "description": "the benchmark audience to the loopback receiver",
        "model": f"select email, first_name, country, ltv from {source_relation}",
        "destination": {
            "type": "rest_api", "url": url.rsplit("/", 1)[0] + "/drt", "method": "POST",
            "headers": {"Content-Type": "application/json"},
            "body_mode": "batch",
            "batch_template": '{"rows": {{ rows | tojson_safe }}}',
            "max_records_per_request": DRT_BATCH,
            "rate_limit": {"requests_per_second": 0},
        },
        "sync": {"mode": "full", "batch_size": DRT_BATCH, "rate_limit": {"requests_per_second": 0},
                 "on_error": "fail"},
    }
    (folder / "syncs").mkdir(exist_ok=True)
    (folder / "syncs" / "audience.yml").write_text(yaml.safe_dump(sync, sort_keys=False))
    return {"HOME": str(home), "DO_NOT_TRACK": "1"}


def run_drt(folder: Path, env: dict[str, str]) -> measure.Measured:
    return measure.run([PEERS_VENV / "bin" / "drt", "run"], cwd=folder, env=env)
