"""Membership history (governance.md): S__history holds every change the destination
accepted, written in the commit's transaction. Replaying it gives exactly the snapshot after
random mode sequences with retried faults and rejections; a rejected row has no entry;
a split sync logs its holdout's entries and exits; `audsync history` answers per key."""

from __future__ import annotations

import json
import random

import pytest

from tests.fakes.webhook_server import FakeWebhook
from tests.integration.governance_helpers import add_config
from tests.support.syncs import audsync, run_rows, state_rows, write_audience, write_destinations, write_sync

MODES = ("mirror", "add", "upsert", "remove")
HISTORY_COLUMNS = "_audsync_key, _audsync_op, _audsync_hash, _audsync_run_id, _audsync_committed_at, _audsync_split_group"


def history_of(project, sync: str) -> list[tuple]:
    return project.query(f"select {HISTORY_COLUMNS} from {project.relation(sync + '__history')}"
                         " order by _audsync_committed_at")


def replay(rows: list[tuple], own_group: str | None = None) -> dict[str, str]:
    """The snapshot a history gives: key -> hash, rows applied in commit order."""
    held: dict[str, str] = {}
    for key, op, hsh, _run, _at, group in rows:
        if group != own_group:
            continue  # a held-out member's log: never sent
        if op == "remove":
            held.pop(key, None)
        else:
            held[key] = hsh
    return held


def snapshot_of(project, sync: str) -> dict[str, str]:
    rows = project.query(f"select _audsync_key, _audsync_hash from {project.relation(sync + '__snapshot')}")
    return {k: h for k, h in rows}


@pytest.fixture
def hooks():
    fakes = {mode: FakeWebhook().start() for mode in MODES}
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_replaying_history_gives_the_snapshot(dbt_project, hooks):
    project = dbt_project
    rng = random.Random(13)
    for mode in MODES:
        write_sync(project, f"h_{mode}", mode=mode, destination=f"hook_{mode}", tags=["h"])
        add_config(project, f"h_{mode}", allow_empty=True)
    write_destinations(project, {f"hook_{m}": {"type": "webhook", "url": hooks[m].url, "batch_size": 5,
                                               "max_retries": 2} for m in MODES})
    seen_rejections = 0
    for step in range(4):
        rows = [(f"u{rng.randint(0, 30)}@example.com", rng.choice(["a", "b", None]), float(rng.randint(0, 3)))
                for _ in range(rng.randint(0, 20))]
        write_audience(project, rows)
        project.dbt("run")
        rejected = {f"u{i}@example.com" for i in rng.sample(range(31), 4)}
        for mode in MODES:
            hooks[mode].inject({"reject_keys": sorted(rejected)})
            if rng.random() < 0.5:
                hooks[mode].fail_next(1, 503)  # retried: the batch is applied on the second try
        audsync(project, "run", "--select", "tag:h", expect=None)
        for mode in MODES:
            sync = f"h_{mode}"
            history = history_of(project, sync)
            assert replay(history) == {k: h for k, h in snapshot_of(project, sync).items() if h is not None}, (mode, step)
            run_id = run_rows(project, sync)[-1]["run_id"]
            logged = {r[0] for r in history if r[3] == run_id}
            errors = {r[2] for r in state_rows(project, "audsync_row_errors", "where run_id = %s", [run_id])}
            seen_rejections += len(errors)
            # A row the destination rejected has no history entry for its run.
            assert not logged & errors, (mode, logged & errors)
    assert seen_rejections > 0
    assert any(r[1] == "remove" for r in history_of(project, "h_mirror"))
    assert any(r[1] == "recorded" for r in history_of(project, "h_remove"))

    # audsync history answers for one key, newest first.
    key = history_of(project, "h_mirror")[0][0]
    out = audsync(project, "history", "h_mirror", "--key", key, "--format", "json").stdout
    entries = json.loads(out)
    assert entries and all(e["key"] == key for e in entries)
    assert [e["committed_at"] for e in entries] == sorted((e["committed_at"] for e in entries), reverse=True)
    assert audsync(project, "history", "h_mirror", "--since", "2999-01-01").stdout.strip().endswith("no history since 2999-01-01 00:00:00")


@pytest.mark.slow
def test_holdout_entries_and_exits_are_logged(dbt_project_factory):
    splits = {"hv": {"salt": "hv-test", "groups": [{"name": "treatment", "percent": 50}, {"name": "holdout", "percent": 50}]}}
    project = dbt_project_factory(vars={"audsync_splits": splits})
    hook = FakeWebhook().start()
    try:
        rows = [(f"m{i}@example.com", "n", 1.0) for i in range(20)]
        write_audience(project, rows)
        write_sync(project, "hv_sync", destination="hook")
        add_config(project, "hv_sync", split_group="hv.treatment", allow_empty=True)
        write_destinations(project, {"hook": {"type": "webhook", "url": hook.url}})
        project.dbt("run")
        audsync(project, "run", "hv_sync")
        held_out = {r[0] for r in project.query(
            f"select _audsync_key from {project.relation('hv_sync__split')} where split_group = 'holdout'")}
        assert held_out and not held_out & set(hook.members)
        history = history_of(project, "hv_sync")
        assert {r[0] for r in history if r[5] == "hv.holdout" and r[1] == "add"} == held_out
        assert {r[0] for r in history if r[5] == "hv.treatment"} == set(hook.members)
        # Two held-out members leave the audience: their exits are logged, once.
        leaving = sorted(held_out)[:2]
        write_audience(project, [r for r in rows if r[0] not in leaving])
        project.dbt("run")
        audsync(project, "run", "hv_sync")
        audsync(project, "run", "hv_sync")
        exits = [r[0] for r in history_of(project, "hv_sync") if r[5] == "hv.holdout" and r[1] == "remove"]
        assert sorted(exits) == leaving
        assert replay(history_of(project, "hv_sync"), "hv.treatment") == snapshot_of(project, "hv_sync")
    finally:
        hook.stop()


def test_plan_markdown(dbt_project):
    project = dbt_project
    hook = FakeWebhook().start()
    try:
        rows = [(f"p{i}@example.com", f"n|{i}", float(i)) for i in range(10)]
        write_audience(project, rows)
        write_sync(project, "pm", destination="hook")
        add_config(project, "pm", guard_min_rows=2)
        write_destinations(project, {"hook": {"type": "webhook", "url": hook.url}})
        project.dbt("run")
        out = audsync(project, "plan", "pm", "--format", "markdown", "--sample", "2").stdout
        assert out.startswith("### audsync plan: `pm`\n")
        assert "guardrails: **✅ pass**" in out and "| add | 10 |" in out and "| remove | 0 |" in out
        assert "<details><summary>Sample (2 rows)</summary>" in out and "n\\|0" in out
        audsync(project, "run", "pm")
        write_audience(project, rows[:3])
        project.dbt("run")
        out = audsync(project, "plan", "pm", "--format", "markdown").stdout
        assert "guardrails: **⛔ blocked**" in out and "| remove | 7 |" in out
        assert "remove 7 of the 10 members the destination holds (70.0%)" in out
        assert hook.requests == 1  # plan sends nothing
    finally:
        hook.stop()
