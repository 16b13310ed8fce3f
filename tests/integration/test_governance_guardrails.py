"""Guardrails (governance.md): checked on the frozen plan before anything is sent. A run
that would empty the destination, or remove too large a share of it, is blocked: nothing
sent, nothing committed, no plan and no lock left, recorded `blocked` with the numbers,
exit 4. `--force` sends once and is recorded."""

from __future__ import annotations

import pytest

from audsync import names
from tests.fakes.webhook_server import FakeWebhook
from tests.integration.governance_helpers import add_config
from tests.support.syncs import audsync, run_rows, state_rows, write_audience, write_destinations, write_sync

ROWS = [(f"u{i}@example.com", f"n{i}", float(i)) for i in range(20)]


@pytest.fixture
def hook():
    fake = FakeWebhook().start()
    yield fake
    fake.stop()


def leftovers(project, sync: str) -> tuple[int, list]:
    """Plan rows left for the sync, and its lock."""
    plan = project.query(f"select count(*) from {project.relation(sync + '__plan')}")[0][0]
    lock = state_rows(project, names.SYNCS_TABLE, "where sync_name = %s", [sync])
    columns = project.columns(project.relation(names.SYNCS_TABLE, schema=project.schema + "_audsync"))
    row = dict(zip(columns, lock[0]))
    return plan, [row["lock_run_id"], row["status"]]


def forced_of(project, run_id: str):
    relation = project.relation(names.RUNS_TABLE, schema=project.schema + "_audsync")
    return project.query(f"select forced from {relation} where run_id = %s", [run_id])[0][0]


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_emptied_and_shrunk_audiences_are_blocked_and_force_sends(dbt_project, hook):
    project = dbt_project
    write_sync(project, "s1", destination="hook")
    add_config(project, "s1", guard_min_rows=5)
    write_destinations(project, {"hook": {"type": "webhook", "url": hook.url}})
    write_audience(project, ROWS)
    project.dbt("run")
    audsync(project, "run", "s1")
    assert len(hook.members) == 20

    # A broken model returns nothing: blocked by allow_empty (and by the share removed).
    write_audience(project, [])
    project.dbt("run")
    requests_before = hook.requests
    result = audsync(project, "run", "s1", expect=4)
    assert "blocked" in result.output
    assert hook.requests == requests_before and len(hook.members) == 20
    run = run_rows(project, "s1")[-1]
    assert run["status"] == "blocked"
    assert "the audience is empty and the run would remove 20 of the 20 members" in run["error_message"]
    assert "allow_empty" in run["error_message"] and "--force" in run["error_message"]
    assert run["rows_removed"] in (None, 0)
    assert leftovers(project, "s1") == (0, [None, "active"])
    assert project.query(f"select count(*) from {project.relation('s1__snapshot')}") == [(20,)]

    # It loses 60%: blocked by max_removals_pct (50 by default).
    write_audience(project, ROWS[:8])
    project.dbt("run")
    result = audsync(project, "run", "s1", expect=4)
    run = run_rows(project, "s1")[-1]
    assert run["status"] == "blocked"
    assert "remove 12 of the 20 members the destination holds (60.0%), above max_removals_pct 50%" in run["error_message"]
    assert hook.requests == requests_before and len(hook.members) == 20
    assert leftovers(project, "s1") == (0, [None, "active"])

    # --force sends it, once; the run records it.
    audsync(project, "run", "s1", "--force")
    run = run_rows(project, "s1")[-1]
    assert run["status"] == "success" and run["rows_removed"] == 12
    assert forced_of(project, run["run_id"]) is True
    assert set(hook.members) == {r[0] for r in ROWS[:8]}

    # The next run checks again (force was for one run only).
    write_audience(project, [])
    project.dbt("run")
    audsync(project, "run", "s1", expect=4)


@pytest.mark.slow
def test_max_removals_and_allow_empty(dbt_project, hook):
    project = dbt_project
    write_sync(project, "s2", destination="hook")
    add_config(project, "s2", max_removals=3, allow_empty=True)
    # The same limits as dbt tests shipped by the package, so `dbt build` can stop first.
    project.write_file("models/_s2.yml", (
        "version: 2\nmodels:\n  - name: s2\n    data_tests:\n"
        "      - audsync.removals_below:\n          arguments: {max_pct: 50, min_rows: 1}\n"
        "      - audsync.not_emptied\n"))
    write_destinations(project, {"hook": {"type": "webhook", "url": hook.url}})
    write_audience(project, ROWS[:5])
    project.dbt("run")
    audsync(project, "run", "s2")
    write_audience(project, ROWS[:1])
    project.dbt("run")
    audsync(project, "run", "s2", expect=4)
    assert "remove 4 members, above max_removals 3" in run_rows(project, "s2")[-1]["error_message"]
    tested = project.dbt("test", "--select", "s2", expect_ok=False)
    by_test = {("removals_below" if "removals_below" in k else "not_emptied" if "not_emptied" in k else k): v
               for k, v in tested.statuses.items()}
    assert by_test == {"removals_below": "fail", "not_emptied": "pass"}, tested.statuses
    write_audience(project, ROWS[:3])
    project.dbt("run")
    audsync(project, "run", "s2")
    # allow_empty: an empty audience of 3 held is within max_removals 3.
    write_audience(project, [])
    project.dbt("run")
    audsync(project, "run", "s2")
    assert hook.members == {}


@pytest.mark.parametrize("key, value, expected", [
    ("max_removals_pct", 150, "expected a percent from 0 to 100"),
    ("guard_min_rows", "many", "expected a number of rows"),
    ("allow_empty", "yes", "expected true or false"),
])
def test_bad_guardrail_config_fails_dbt_run(dbt_project, key, value, expected):
    project = dbt_project
    write_sync(project, "s3")
    add_config(project, "s3", **{key: value})
    write_audience(project, ROWS[:2])
    result = project.dbt("run", expect_ok=False)
    assert "sync 's3'" in result.error_text
    assert f"config key '{key}' is {value}" in result.error_text and expected in result.error_text
