"""Split groups (governance.md): the bucket formula computed in the warehouse by one
dispatched macro agrees with the Python reference on DuckDB and PostgreSQL; shares match
the percents; growing a group keeps its members; two syncs of one split send disjoint
groups whose union is the audience; bad splits fail `dbt run` naming the split."""

from __future__ import annotations

import json

import pytest

from audsync.governance.splits import bucket, group_of
from tests.fakes.webhook_server import FakeWebhook
from tests.integration.governance_helpers import add_config
from tests.support.dbt_project import with_spark
from tests.support.syncs import audsync, write_audience, write_destinations, write_sync

SPLITS = {"hv_q4": {"salt": "hv-2026-q4", "groups": [{"name": "treatment", "percent": 80},
                                                      {"name": "holdout", "percent": 20}]}}
KEYS = 100_000

# 100k keys made in SQL, not a seed: the warehouse's own text for each key.
KEYS_MODEL = """
{%- if target.type == 'duckdb' %}
with k as (select 'user-' || cast(i as varchar) || '@example.com' as email from range(""" + str(KEYS) + """) as t(i))
{%- elif target.type == 'spark' %}
with k as (select concat('user-', cast(id as string), '@example.com') as email from range(""" + str(KEYS) + """))
{%- else %}
with k as (select 'user-' || i::text || '@example.com' as email from generate_series(0, """ + str(KEYS - 1) + """) as i)
{%- endif %}
select email,
       {{ audsync.split_bucket(audsync._split_key('email'), 'hv-2026-q4') }} as bucket,
       {{ audsync.split_group('email', 'hv_q4') }} as hv_group
from k
"""


# Spark too (spark__split_bucket: Spark 4's ANSI mode refuses the default's cast of 0x-prefixed
# text), selected only with --warehouses spark.
@pytest.mark.parametrize("warehouse", with_spark(pytest.mark.slow, pytest.mark.timeout(900)))
def test_assignment_matches_the_python_reference_and_the_percents(dbt_project_factory):
    project = dbt_project_factory(vars={"audsync_splits": SPLITS})
    project.write_model("split_keys", KEYS_MODEL)
    project.dbt("run", "--select", "split_keys")
    rows = project.query(f"select email, bucket, hv_group from {project.relation('split_keys')}")
    assert len(rows) == KEYS
    groups = [("treatment", 80), ("holdout", 20)]
    mismatched = [r for r in rows if r[1] != bucket("hv-2026-q4", r[0]) or r[2] != group_of("hv-2026-q4", r[0], groups)]
    assert mismatched == []
    share = sum(1 for r in rows if r[2] == "treatment") / KEYS
    assert abs(share - 0.80) < 0.01, share

    # Growing treatment to 90% keeps every member it had.
    before = {r[0] for r in rows if r[2] == "treatment"}
    grown = {"hv_q4": {"salt": "hv-2026-q4", "groups": [{"name": "treatment", "percent": 90},
                                                         {"name": "holdout", "percent": 10}]}}
    project.dbt("run", "--select", "split_keys", "--vars", json.dumps({"audsync_splits": grown}))
    after = {r[0] for r in project.query(f"select email from {project.relation('split_keys')} where hv_group = 'treatment'")}
    assert before < after
    assert abs(len(after) / KEYS - 0.90) < 0.01


@pytest.fixture
def hooks():
    fakes = {name: FakeWebhook().start() for name in ("a", "b")}
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.mark.slow
def test_two_syncs_of_one_split_send_disjoint_groups(dbt_project_factory, hooks, warehouse):
    splits = {"ab": {"salt": "ab-test", "groups": [{"name": "a", "percent": 50}, {"name": "b", "percent": 50}]}}
    project = dbt_project_factory(vars={"audsync_splits": splits})
    rows = [(f"m{i}@example.com", f"n{i}", float(i)) for i in range(40)]
    write_audience(project, rows)
    for group in ("a", "b"):
        write_sync(project, f"to_{group}", destination=f"hook_{group}", tags=["ab"])
        add_config(project, f"to_{group}", split_group=f"ab.{group}")
    write_destinations(project, {f"hook_{g}": {"type": "webhook", "url": hooks[g].url} for g in ("a", "b")})
    project.dbt("run")
    audsync(project, "run", "--select", "tag:ab")
    sent_a, sent_b = set(hooks["a"].members), set(hooks["b"].members)
    assert sent_a and sent_b and not sent_a & sent_b
    assert sent_a | sent_b == {r[0] for r in rows}
    assert sent_a == {r[0] for r in rows if group_of("ab-test", r[0], [("a", 50), ("b", 50)]) == "a"}
    # S__split lists every member with its group, whatever group the sync sends.
    listed = project.query(f"select _audsync_key, split, split_group, bucket from {project.relation('to_a__split')}")
    assert len(listed) == 40
    assert {r[0] for r in listed if r[2] == "b"} == sent_b
    assert all(r[1] == "ab" and r[3] == bucket("ab-test", r[0]) for r in listed)


@pytest.mark.parametrize("split, group, expected", [
    ({"salt": "s", "groups": [{"name": "t", "percent": 70}, {"name": "h", "percent": 20}]}, "t",
     "split 'x1' (vars.audsync_splits.x1): the groups' percents sum to 90.0; expected 100"),
    ({"groups": [{"name": "t", "percent": 100}]}, "t", "split 'x1' (vars.audsync_splits.x1): key 'salt' is missing"),
    ({"salt": "s", "groups": [{"name": "t", "percent": 100}]}, "nope", "split 'x1' has no group 'nope'; expected one of t"),
])
def test_bad_split_fails_dbt_run_naming_the_split(dbt_project_factory, split, group, expected):
    project = dbt_project_factory(vars={"audsync_splits": {"x1": split}})
    write_audience(project, [("a@example.com", "a", 1.0)])
    write_sync(project, "s1")
    add_config(project, "s1", split_group=f"x1.{group}")
    result = project.dbt("run", expect_ok=False)
    assert expected in result.error_text, result.error_text


def test_unknown_split_fails_dbt_run(dbt_project):
    write_audience(dbt_project, [("a@example.com", "a", 1.0)])
    write_sync(dbt_project, "s1")
    add_config(dbt_project, "s1", split_group="nosuch.t")
    result = dbt_project.dbt("run", expect_ok=False)
    assert "sync 's1'" in result.error_text
    assert "split 'nosuch' is not declared in vars.audsync_splits" in result.error_text
