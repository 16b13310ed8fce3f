"""The package's relation SQL on Snowflake, BigQuery and Databricks (issue 14, item 4).

dbt renders every relation the `audience_sync` materialization builds with each of those
adapters, offline, and sqlglot parses every statement in that warehouse's dialect
(tests/portability/render.py, run in the portability environment of its own that
`.ci/portability_env.sh` makes: the adapters are never audsync's dependencies). Without that
environment these tests skip with the command that makes it, except under ``CI=true``, where a
missing environment fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RENDER = Path(__file__).resolve().parent / "render.py"
ADAPTERS = ("snowflake", "bigquery", "databricks")

# What every sync takes (the project's vars.audsync_exclude gives each an S__excluded; the
# freshness write goes to audsync_syncs), and what a split_group adds
# (portability_statements.sql).
RELATIONS = {"S", "S__snapshot", "S__plan", "S__candidates", "S__adds", "S__removes",
             "S__updates", "S__changes", "S__invalid", "S__excluded", "S__history",
             "audsync_syncs"}
GOVERNED = {"sync_upsert_split": {"S__split"}, "sync_mirror_hashed": {"S__split"}}
SYNCS = {"sync_mirror", "sync_add_excluded", "sync_upsert_split", "sync_remove",
         "sync_mirror_hashed"}
STATE_MODELS = {p.stem for p in (REPO_ROOT / "models" / "state").glob("*.sql")}

# The tests that render (20-40 s each on a loaded machine) are marked slow and kept in CI's run.


def _portability_python() -> Path:
    env = Path(os.environ.get("AUDSYNC_PORTABILITY_ENV", REPO_ROOT / ".venv-portability"))
    python = env / "bin" / "python"
    if not python.exists():
        reason = (f"the portability environment {env} is missing: make it with "
                  "`bash .ci/portability_env.sh` (dbt-snowflake, dbt-bigquery, dbt-databricks)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the portability check, and cannot: {reason}", pytrace=False)
        pytest.skip(reason)
    return python


def _render(tmp: Path, adapters=ADAPTERS, overrides=()) -> tuple[int, dict, str]:
    output = tmp / "report.json"
    args = [str(_portability_python()), str(RENDER), "--repo", str(REPO_ROOT), "--work",
            str(tmp), "--adapters", ",".join(adapters), "--output", str(output)]
    for override in overrides:
        args += ["--override", str(override)]
    env = dict(os.environ, DBT_SEND_ANONYMOUS_USAGE_STATS="false")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    if not output.exists():
        pytest.fail(f"render.py wrote no report (exit {done.returncode}):\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}", pytrace=False)
    return done.returncode, json.loads(output.read_text()), done.stdout + done.stderr


def _describe(failures: list[dict]) -> str:
    return "\n\n".join(
        f"{f['dialect']} ({f['adapter']}): macro {f['macro']} for relation {f['relation']} "
        f"of {f.get('sync', '-')}: {f['error']}" for f in failures)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    returncode, report, output = _render(tmp_path_factory.mktemp("portability"))
    report["returncode"], report["output"] = returncode, output
    return report


@pytest.mark.slow
@pytest.mark.ci
def test_every_relation_parses_in_each_dialect(report):
    """Every relation's SQL, rendered by each adapter, parses in its dialect."""
    assert not report["failures"], _describe(report["failures"])
    assert report["returncode"] == 0, report["output"][-3000:]
    for adapter in ADAPTERS:
        rendered = [s for s in report["statements"] if s["adapter"] == adapter]
        assert all(s["parsed"] for s in rendered)
        for sync in SYNCS:
            relations = {s["relation"] for s in rendered if s["sync"] == sync}
            assert relations == RELATIONS | GOVERNED.get(sync, set()), (adapter, sync)
        assert {s["relation"] for s in rendered if s["sync"] == "-"} == STATE_MODELS, adapter
        # The statements the package runs on its tables are there too, not only relations.
        macros = {s["macro"].split(" (statement")[0] for s in rendered}
        assert "apply_history_retention, delete_history_before" in macros, adapter
        assert "record_evaluation, write_evaluation" in macros, adapter


@pytest.mark.slow
@pytest.mark.ci
def test_rendering_contacts_no_server(report):
    """The dummy hosts are never contacted: no socket connects, no name is looked up."""
    assert report["connections"] == []


@pytest.mark.slow
@pytest.mark.ci
def test_statements_are_each_adapters_own(report):
    """The SQL is each adapter's: its DDL and its quoting (not one text for all)."""
    def s_of(adapter):
        return next(s["sql"] for s in report["statements"]
                    if s["adapter"] == adapter and s["sync"] == "sync_mirror"
                    and s["relation"] == "S")
    assert "transient table" in s_of("snowflake") and '"Lifetime Value"' in s_of("snowflake")
    assert "`Lifetime Value`" in s_of("bigquery") and "to_hex(md5(" in s_of("bigquery")
    assert "`Lifetime Value`" in s_of("databricks") and "using delta" in s_of("databricks")


@pytest.mark.slow
@pytest.mark.ci
def test_databricks_dispatches_to_the_spark_macros(report):
    """dbt-databricks declares spark as its plugin's dependency, so adapter.dispatch searches
    databricks__, then spark__, then default__: the package's spark__ versions serve
    Databricks where it has no databricks__ one."""
    picked = report["dispatch"]
    assert picked["databricks"]["write_evaluation"] == "spark__write_evaluation"
    assert picked["databricks"]["delete_history_before"] == "spark__delete_history_before"
    assert picked["databricks"]["split_bucket"] == "spark__split_bucket"
    assert picked["databricks"]["row_hash"] == "default__row_hash"
    assert picked["snowflake"]["write_evaluation"] == "default__write_evaluation"
    assert picked["bigquery"]["write_evaluation"] == "bigquery__write_evaluation"


@pytest.mark.slow
@pytest.mark.ci
def test_a_macro_a_dialect_cannot_parse_is_reported(tmp_path):
    """The check can fail: a row hash override with an unbalanced parenthesis is reported with
    the macro, the relation, the dialect and sqlglot's message."""
    bad = tmp_path / "bad_row_hash.sql"
    bad.write_text("{% macro snowflake__row_hash(mapping, prefix, texts=none) %}"
                   "md5((cast(1 as text){% endmacro %}\n")
    returncode, report, _ = _render(tmp_path / "work", adapters=("snowflake",), overrides=[bad])
    assert returncode == 1
    failures = report["failures"]
    assert failures, "the bad macro was not reported"
    relations = {f["relation"] for f in failures}
    assert "S" in relations and "S__snapshot" not in relations
    first = next(f for f in failures if f["relation"] == "S")
    assert first["dialect"] == "snowflake" and "row_hash" in first["macro"]
    assert "ParseError" in first["error"] or "TokenError" in first["error"]
    assert "snowflake" in _describe(failures) and "relation S " in _describe(failures)


@pytest.mark.parametrize("sql, finding", [
    ("select a % 10000 from t", "no % operator"),
    ("select 'x' as a where not exists (select 1 from t)", "WHERE in a select without FROM"),
    ("select mod(a, 10000) from t where a > 0", None),
    ("select * from (select 1 as a) as e where 1 = 0", None),
    ("select '%' as a from t", None),
])
def test_bigquery_lints(sql, finding):
    """What BigQuery refuses and sqlglot's BigQuery parser accepts is reported too."""
    from tests.portability import render

    error = render.parse({"sql": sql, "dialect": "bigquery"})
    assert (error is None) if finding is None else (finding in (error or "")), error


def test_the_connection_guard_refuses_and_records():
    """The guard that proves the renders offline does see a connection and a name lookup."""
    import socket

    from tests.portability import render

    with render.ConnectionGuard() as guard:
        with pytest.raises(OSError, match="no connection allowed"):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        with pytest.raises(OSError, match="no connection allowed"):
            socket.getaddrinfo("portability-dummy.invalid", 443)
    assert len(guard.attempts) == 2, guard.attempts
    assert socket.getaddrinfo is not None and "refuse" not in repr(socket.getaddrinfo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
