"""The Spark session's parts that need no server: dbt-spark's credential rules, and the
placeholders of the statements it rewrites (the rest runs against a real Thrift server in
tests/integration/test_spark.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from audsync.errors import ConfigError
from audsync.profiles import load_credentials
from audsync.warehouse.spark import _mark_params, _typed_placeholders, _unmark, normalise_credentials


def profile(tmp_path, **output) -> None:
    import yaml

    (tmp_path / "profiles.yml").write_text(yaml.safe_dump({"p": {"target": "s", "outputs": {"s": output}}}))


def test_a_thrift_target_is_read_as_dbt_spark_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_PASSWORD", "pw-123")
    profile(tmp_path, type="spark", method="thrift", host="h", schema="mkt", user="u",
            password="{{ env_var('SPARK_PASSWORD') }}", port="{{ 10000 | as_number }}")
    credentials, target = load_credentials(tmp_path, "p", None)
    assert (credentials.type, target, credentials.host, credentials.port, credentials.schema) == ("spark", "s", "h", 10000, "mkt")
    assert credentials.password == "pw-123" and credentials.database is None
    assert credentials.connect_timeout == 10
    assert "pw-123" not in repr(credentials)


@pytest.mark.parametrize("output, words", [
    ({"method": "session", "host": "h", "schema": "s"}, ["'method'", "'session'", "thrift"]),
    ({"method": "thrift", "schema": "s"}, ["'host'", "missing"]),
    ({"method": "thrift", "host": "h"}, ["'schema'", "missing"]),
    ({"method": "thrift", "host": "h", "schema": "s", "database": "other"}, ["'database'", "'other'", "'s'"]),
    ({"method": "thrift", "host": "h", "schema": "s", "port": "ten"}, ["'port'", "'ten'", "number"]),
    ({"method": "thrift", "host": "h", "schema": "s", "use_ssl": True}, ["'use_ssl'"]),
])
def test_targets_the_runner_cannot_reach_are_errors_naming_the_key(output, words):
    with pytest.raises(ConfigError) as error:
        normalise_credentials(dict(output), "profile 'p', target 's'")
    for word in words:
        assert word in str(error.value)


def test_placeholders_follow_the_rewritten_statement_in_order():
    marked = _mark_params("update t set a = ?, b = ? where c = ? and d = ?")
    condition = marked.split("where ", 1)[1]
    # A rewrite repeats the condition (once per column) after the values: the parameters follow.
    sql, params = _unmark(f"select case when {condition} then {marked.split('a = ')[1].split(',')[0]} end,"
                          f" count(*) from t where {condition}", ["A", "B", "C", "D"])
    assert params == ["C", "D", "A", "C", "D"]
    assert sql == "select case when c = ? and d = ? then ? end, count(*) from t where c = ? and d = ?"


def test_datetimes_are_bound_as_timestamps():
    when = dt.datetime(2026, 12, 2, 1, 2, 3)
    assert _typed_placeholders("insert into t values (?, ?, ?)", ["a", when, 1]) == "insert into t values (?, timestamp ?, ?)"
    assert _typed_placeholders("select ?", ["a"]) == "select ?"
