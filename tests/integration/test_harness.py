"""Tests of the test harness itself: the PostgreSQL cluster, DbtProject, and the fixtures.

Every other integration test stands on these, so each assertion here checks a value that a
broken harness would get wrong.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import postgres as pgsupport
from tests.support.dbt_project import REPO_ROOT, DbtProject

PEOPLE = [
    {"id": 1, "email": "ana@example.com", "score": 10},
    {"id": 2, "email": "ben@example.com", "score": 20},
    {"id": 3, "email": None, "score": 30},
]

TABLE_MODEL = """
{{ config(materialized='table') }}
select id, email, score * 2 as double_score
from {{ ref('people') }}
"""


def test_seed_and_table_model_round_trip(dbt_project: DbtProject) -> None:
    dbt_project.write_seed("people", PEOPLE)
    dbt_project.write_model("members", TABLE_MODEL, subdir="audiences")

    seeded = dbt_project.dbt("seed")
    assert seeded.success
    assert seeded.status("people") == "success"
    ran = dbt_project.dbt("run", "--select", "members")
    assert ran.statuses == {"members": "success"}

    members = dbt_project.relation("members")
    assert dbt_project.query(f"select id, email, double_score from {members} order by id") == [
        (1, "ana@example.com", 20),
        (2, "ben@example.com", 40),
        (3, None, 60),
    ]
    assert dbt_project.columns("members") == ["id", "email", "double_score"]
    kind = dbt_project.query(
        "select table_type from information_schema.tables "
        "where table_schema = %s and table_name = %s",
        [dbt_project.schema, "members"],
    )
    assert kind == [("BASE TABLE",)]


def test_seed_from_csv_text_and_rows_with_header(dbt_project: DbtProject) -> None:
    dbt_project.write_seed("from_text", "code,label\nA,alpha\nB,beta")
    dbt_project.write_seed("from_rows", [["code", "label"], ["C", "gamma"]])
    dbt_project.dbt("seed")
    assert dbt_project.rows("from_text") == [("A", "alpha"), ("B", "beta")]
    assert dbt_project.rows(dbt_project.relation("from_rows")) == [("C", "gamma")]


def test_failing_model_error_text_is_captured(dbt_project: DbtProject) -> None:
    dbt_project.write_seed("people", PEOPLE)
    dbt_project.write_model("good", TABLE_MODEL)
    dbt_project.write_model("bad", "select no_such_column from {{ ref('people') }}")
    dbt_project.dbt("seed")

    result = dbt_project.dbt("run", "--select", "good", "bad", expect_ok=False)

    assert not result.success
    assert result.statuses == {"good": "success", "bad": "error"}
    assert "model.proj.bad" in result.error_text
    assert "no_such_column" in result.error_text
    assert "\x1b[" not in result.error_text  # colours are stripped for assertions


def test_compilation_error_message_is_captured(dbt_project: DbtProject) -> None:
    message = "sync 'bad_sync': key 'sync_mode' is 'sideways'; expected mirror, add, upsert"
    dbt_project.write_model(
        "bad_sync", '{{ exceptions.raise_compiler_error("' + message + '") }}\nselect 1 as id'
    )
    result = dbt_project.dbt("run", "--select", "bad_sync", expect_ok=False)
    assert message in result.error_text


def test_expect_ok_raises_with_the_error_text(dbt_project: DbtProject) -> None:
    dbt_project.write_model("bad", "select no_such_column from nowhere_at_all")
    with pytest.raises(AssertionError, match="nowhere_at_all"):
        dbt_project.dbt("run", "--select", "bad")

    dbt_project.write_model("bad", "select 1 as id")
    with pytest.raises(AssertionError, match="failure was expected"):
        dbt_project.dbt("run", "--select", "bad", expect_ok=False)


def test_a_parse_error_fails_with_its_message(dbt_project: DbtProject) -> None:
    dbt_project.write_model("broken", "select {{ ref('model_that_does_not_exist') }}")
    result = dbt_project.dbt("parse", expect_ok=False)
    assert "model_that_does_not_exist" in result.error_text


def test_remove_model_takes_it_out_of_the_project(dbt_project: DbtProject) -> None:
    dbt_project.write_model("one", "select 1 as id", subdir="nested")
    dbt_project.write_model("two", "select 2 as id")
    assert set(dbt_project.dbt("run", "--select", "one", "two").statuses) == {"one", "two"}

    dbt_project.remove_model("one")
    assert not (dbt_project.root / "models" / "nested" / "one.sql").exists()
    assert set(dbt_project.dbt("run", "--select", "one", "two").statuses) == {"two"}
    with pytest.raises(FileNotFoundError):
        dbt_project.remove_model("one")


def test_the_audsync_package_is_installed(dbt_project: DbtProject) -> None:
    result = dbt_project.dbt("parse")
    packages = {macro.package_name for macro in result.result.macros.values()}
    assert "audsync" in packages
    installed = dbt_project.root / "dbt_packages" / "audsync"
    assert installed.resolve() == REPO_ROOT


def test_query_parameters_and_literal_percent(dbt_project: DbtProject) -> None:
    rows = dbt_project.query("select %s as a, 'x%%y' as b", ["p"])
    assert rows == [("p", "x%y")]
    assert dbt_project.query("select 'x%y' as b") == [("x%y",)]


def test_relation_quotes_schema_and_name(dbt_project: DbtProject) -> None:
    expected_schema = {"duckdb": "main", "postgres": "public"}[dbt_project.target]
    assert dbt_project.relation("s", "__adds") == f'"{expected_schema}"."s__adds"'
    assert dbt_project.relation("s", schema='we"ird') == '"we""ird"."s"'


def test_execute_commits(dbt_project: DbtProject) -> None:
    dbt_project.execute("create table committed_here (id integer)")
    dbt_project.execute("insert into committed_here values (%s)", [5])
    assert dbt_project.rows("committed_here") == [(5,)]


def test_projects_do_not_share_a_warehouse(dbt_project_factory) -> None:
    first, second = dbt_project_factory("first"), dbt_project_factory("second")
    assert first.root != second.root
    first.write_model("only_in_first", "{{ config(materialized='table') }} select 1 as id")
    first.dbt("run", "--select", "only_in_first")
    assert first.relation_exists("only_in_first")
    assert not second.relation_exists("only_in_first")
    if first.target == "postgres":
        assert first.database != second.database


def test_duckdb_file_is_free_after_dbt(tmp_path: Path) -> None:
    """After a dbt call another process can open the file (DuckDB locks it per process)."""
    project = DbtProject(tmp_path / "p", "duckdb")
    project.write_model("m", "{{ config(materialized='table') }} select 42 as answer")
    project.dbt("run", "--select", "m")
    code = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
        "print(c.execute('select answer from main.m').fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(project.duckdb_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"


def test_postgres_server_is_ours_and_tuned(postgres_server) -> None:
    assert postgres_server.host == "127.0.0.1"
    socket_file = postgres_server.socket_dir / f".s.PGSQL.{postgres_server.port}"
    assert socket_file.exists()
    conn = postgres_server.connect()
    try:
        with conn.cursor() as cur:
            settings = {}
            for name in (
                "fsync",
                "synchronous_commit",
                "full_page_writes",
                "listen_addresses",
                "port",
                "data_directory",
            ):
                cur.execute(f"show {name}")
                settings[name] = cur.fetchone()[0]
    finally:
        conn.close()
    assert settings["fsync"] == "off"
    assert settings["synchronous_commit"] == "off"
    assert settings["full_page_writes"] == "off"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert int(settings["port"]) == postgres_server.port
    assert Path(settings["data_directory"]) == postgres_server.data_dir
    assert postgres_server.dsn == (
        f"host=127.0.0.1 port={postgres_server.port} user=postgres dbname=postgres"
    )


def test_create_database_gives_an_empty_database(postgres_server) -> None:
    name = postgres_server.create_database("Harness-Check 1")
    assert name == "harness_check_1"
    conn = postgres_server.connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute("create table t (id int)")
    finally:
        conn.close()
    # Asking again starts from scratch.
    assert postgres_server.create_database("harness_check_1") == "harness_check_1"
    conn = postgres_server.connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute("select count(*) from information_schema.tables where table_name = 't'")
            assert cur.fetchone()[0] == 0
    finally:
        conn.close()
    postgres_server.drop_database(name)


def test_stale_cluster_folders_are_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=pgsupport.TEMP_PREFIX))
    live = Path(tempfile.mkdtemp(prefix=pgsupport.TEMP_PREFIX))
    try:
        (stale / "owner.pid").write_text(str(dead.pid))
        (live / "owner.pid").write_text(str(os.getpid()))
        removed = pgsupport.remove_stale_clusters(pgsupport.find_bin_dir() or Path("/nonexistent"))
        assert stale in removed
        assert not stale.exists()
        assert live.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)


def test_warehouse_option_deselects_visibly() -> None:
    """``--warehouses duckdb`` leaves out the postgres cases and says how many."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--warehouses",
            "duckdb",
            f"{__file__}::test_execute_commits",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_execute_commits[duckdb]" in out.stdout
    assert "test_execute_commits[postgres]" not in out.stdout
    assert "1 deselected" in out.stdout


@pytest.mark.slow
def test_example_project_builds(warehouse: str, tmp_path: Path, request) -> None:
    """The example builds, shows invalid identifiers, and its audiences follow ``as_of_date``."""
    pg = request.getfixturevalue("postgres_server") if warehouse == "postgres" else None
    project = DbtProject.from_example("jaffle_audiences", tmp_path / "jaffle", warehouse, pg)
    built = project.dbt("build")
    assert {built.status(name) for name in SYNCS} == {"success"}

    def audience(name: str) -> set[str | None]:
        return {row[0] for row in project.query(f"select email from {project.relation(name)}")}

    stats = project.query(
        f"select count(*), count(*) - count(email), count(email) - count(distinct email) "
        f"from {project.relation('customer_stats')}"
    )
    assert stats == [(200, 3, 2)]
    for sync in SYNCS:
        invalid = project.query(f"select count(*) from {project.relation(sync, '__invalid')}")
        assert invalid[0][0] > 0, f"{sync}__invalid is empty"
    before = {name: audience(name) for name in AUDIENCES}
    assert all(before.values())

    project.dbt("run", "--select", "audiences", "--vars", "{as_of_date: '2026-10-12'}")
    after = {name: audience(name) for name in AUDIENCES}
    for name in AUDIENCES:
        assert after[name] != before[name], f"{name} did not change with as_of_date"
    assert after["churn_risk"] - before["churn_risk"], "nobody joined churn_risk"
    assert before["churn_risk"] - after["churn_risk"], "nobody left churn_risk"


AUDIENCES = ("high_value_customers", "churn_risk", "recent_buyers")
SYNCS = ("high_value_to_webhook", "churn_risk_to_file", "recent_buyers_to_file")


def test_example_seeds_match_their_generator() -> None:
    script = REPO_ROOT / "examples" / "jaffle_audiences" / "scripts" / "generate_seeds.py"
    out = subprocess.run(
        [sys.executable, str(script), "--check"],
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
