"""Spark as a warehouse (issue 14): the focused subset CI runs against a real Thrift server.

Every test is marked ``spark`` and runs only with ``--warehouses ...,spark``; they share one
Thrift server for the session (``spark_server``, started from the installed pyspark) and
each project has a schema of its own. The diff is checked against the independent Python
diff of ``test_dbt_package`` on the same kind of random audiences.
"""

from __future__ import annotations

import random

import pytest

from audsync import names
from tests.support.syncs import write_audience
from tests.integration.test_dbt_package import (
    MODES,
    expected_changes,
    python_diff,
    random_audience,
    relation_rows,
    sync_sql,
    valid_members,
)

# Slow (minutes each on two shared cores): selected by `-m spark --warehouses spark`.
pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]
SPARK_MODE_STEPS = 3
"""Audience states of the mode test: an initial sync and two random changes (each step is a
`dbt run` and an `audsync run` of four syncs, about a minute on Spark)."""


def set_snapshot(project, model: str, keys) -> None:
    """Make the snapshot hold exactly the members ``keys`` of S, as a commit would."""
    snapshot = project.relation(model, "__snapshot")
    keys = list(keys)
    where = f"{names.KEY} in ({', '.join('%s' for _ in keys)})" if keys else "false"
    project.execute(
        f"insert overwrite table {snapshot} ({names.KEY}, email, first_name, ltv, {names.HASH},"
        f" {names.DESTINATION_ID}, {names.SYNCED_AT}, {names.RUN_ID})"
        f" select {names.KEY}, email, first_name, ltv, {names.HASH}, null, null, 'r0'"
        f" from {project.relation(model)} where {where}",
        keys or None,
    )


def test_diff_views_equal_a_python_diff_and_dbt_never_replaces_the_snapshot(spark_project):
    """Every view of every mode equals the Python diff after a change of a random audience;
    the snapshot the runner wrote survives `dbt run --full-refresh`; and a rewrite of a state
    table killed between its two renames is finished by the next `dbt run`."""
    project = spark_project
    rng = random.Random(14)
    for mode in MODES:
        project.write_model(f"sync_{mode}", sync_sql(project, mode))
    first = random_audience(rng)
    write_audience(project, first)
    project.dbt("run")

    members = valid_members(first)
    kept = sorted(k for k in members if rng.random() < 0.7)
    assert kept, "the seed must give a non-empty snapshot"
    for mode in MODES:
        set_snapshot(project, f"sync_{mode}", kept)
    snapshot = {k: members[k] for k in kept}
    second = random_audience(rng, first)
    write_audience(project, second)

    # A rewrite of audsync_syncs killed after `T -> T__audsync_old` and before
    # `T__audsync_next -> T`: the next dbt run must roll it forward, not lose the table.
    state = project.relation(names.SYNCS_TABLE, schema=project.schema + "_audsync")
    old = project.relation(names.SYNCS_TABLE + names.REWRITE_SUFFIXES["old"], schema=project.schema + "_audsync")
    nxt = project.relation(names.SYNCS_TABLE + names.REWRITE_SUFFIXES["next"], schema=project.schema + "_audsync")
    project.execute(f"insert into {state} (sync_name, status) values ('kept_row', 'paused')")
    project.execute(f"create table {nxt} using parquet as select * from {state}")
    project.execute(f"alter table {state} rename to {old}")

    project.dbt("run", "--full-refresh")

    assert {r[0] for r in project.query(f"select sync_name from {state}")} == {f"sync_{m}" for m in MODES} | {"kept_row"}
    assert not project.relation_exists(names.SYNCS_TABLE + names.REWRITE_SUFFIXES["old"], schema=project.schema + "_audsync")
    audience = valid_members(second)
    adds, removes, updates = python_diff(snapshot, audience)
    for mode in MODES:
        model = f"sync_{mode}"
        snapshot_keys = {r[0] for r in project.query(f"select {names.KEY} from {project.relation(model, '__snapshot')}")}
        assert snapshot_keys == set(kept), f"{model}: dbt run --full-refresh changed the snapshot"
        assert relation_rows(project, model, "") == {(k, *v) for k, v in audience.items()}
        assert relation_rows(project, model, "__adds") == {(k, *v) for k, v in adds.items()}
        assert relation_rows(project, model, "__removes") == {(k, *v) for k, v in removes.items()}
        assert relation_rows(project, model, "__updates") == {(k, *v) for k, v in updates.items()}
        assert relation_rows(project, model, "__changes", with_op=True) == expected_changes(mode, adds, removes, updates), mode


def test_every_mode_keeps_a_fake_webhook_over_random_audiences_on_spark(spark_project):
    """`dbt run` plus `audsync run` of one sync per mode on Spark, over an initial sync and a
    random sequence of audience states (adds, removes, updates, invalid rows): after every run
    each fake webhook holds what its mode promises, the mirror's snapshot equals what its
    destination holds, and each run's counts are those of the independent Python diff."""
    from tests.fakes.webhook_server import FakeWebhook
    from tests.integration.test_runner import audience_state
    from tests.support.syncs import ModeOracle, audsync, run_rows, webhook_values, write_destinations, write_sync

    project = spark_project
    rng = random.Random(1414)
    fakes = {mode: FakeWebhook(secret=f"spark-{mode}").start() for mode in MODES}
    try:
        initial = {f"u{i}@example.com": {"first_name": "seeded", "ltv": 0} for i in range(0, 46, 3)}
        fakes["remove"].seed_members(initial)
        oracles = {mode: ModeOracle(mode, initial if mode == "remove" else None) for mode in MODES}
        for mode in MODES:
            write_sync(project, f"s_{mode}", mode=mode, destination=f"hook_{mode}", tags=["random"],
                       extra={"allow_empty": True})
        write_destinations(project, {f"hook_{m}": {"type": "webhook", "url": fakes[m].url, "secret": f"spark-{m}",
                                                   "batch_size": 7} for m in MODES})
        previous: dict[str, tuple] = {}
        for step in range(SPARK_MODE_STEPS):
            state = audience_state(rng)
            write_audience(project, state)
            project.dbt("run")
            audsync(project, "run", "--select", "tag:random")
            audience = valid_members(state)
            adds, removes, updates = python_diff(previous, audience)
            for mode in MODES:
                oracles[mode].observe(audience)
                oracles[mode].check(fakes[mode].members, webhook_values)
                assert fakes[mode].bad_signatures == 0 and fakes[mode].violations == [], mode
            run = run_rows(project, "s_mirror")[-1]
            assert (run["status"], run["planned_adds"], run["planned_removes"], run["planned_updates"]) == (
                "success", len(adds), len(removes), len(updates)), f"step {step}"
            held = {key: webhook_values(fields) for key, fields in fakes["mirror"].members.items()}
            snapshot = project.query(f"select {names.KEY}, first_name, ltv from {project.relation('s_mirror', '__snapshot')}")
            assert {r[0]: (r[1], r[2]) for r in snapshot} == held, f"step {step}: the snapshot claims otherwise"
            for mode in MODES:
                assert run_rows(project, f"s_{mode}")[-1]["status"] == "success", (mode, step)
            previous = audience
        # Nothing changed since the last run: nothing is sent.
        sent = {mode: fakes[mode].requests for mode in MODES}
        audsync(project, "run", "s_mirror")
        assert fakes["mirror"].requests == sent["mirror"]
        assert fakes["remove"].ops.get("add", 0) == 0 and fakes["remove"].ops.get("update", 0) == 0
        assert fakes["add"].ops.get("remove", 0) == 0 and fakes["add"].ops.get("update", 0) == 0
    finally:
        for fake in fakes.values():
            fake.stop()


def test_a_kill_9_mid_delivery_is_recovered_and_the_lock_holds_on_spark(spark_project, monkeypatch):
    """A runner killed (SIGKILL) mid-delivery on Spark: while its heartbeat is fresh a second
    run is refused naming it; once stale, the next run takes the lock over, records it aborted,
    commits what it delivered and sends the rest, and the snapshot equals the destination.
    The lock's generations are marker tables: a generation taken cannot be taken again, and
    its holder is fenced once a later one exists."""
    import signal
    import time

    from audsync.errors import LockHeld
    from audsync.profiles import load_credentials
    from audsync.warehouse import Relation
    from audsync.warehouse.spark import SparkWarehouse
    from tests.fakes.webhook_server import FakeWebhook
    from tests.support.syncs import audsync, audsync_process, run_rows, write_destinations, write_sync

    project = spark_project
    fake = FakeWebhook(secret="kill-secret", latency_s=0.3).start()
    try:
        write_sync(project, "s", mode="mirror")
        write_destinations(project, {"hook": {"type": "webhook", "url": fake.url, "secret": "kill-secret",
                                              "batch_size": 2, "max_concurrency": 1}})
        # 30 batches of 0.3 s: delivery outlasts the four batches and the 3 s waited before the
        # kill (with 12, a lightly loaded machine delivered all of them before it).
        rows = [(f"k{i:03d}@example.com", "n", float(i)) for i in range(60)]
        write_audience(project, rows)
        project.dbt("run")

        process = audsync_process(project, "run", "s")
        deadline = time.monotonic() + 300
        while fake.accepted_requests < 4:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "timed out waiting for four batches"
            time.sleep(0.05)
        time.sleep(3)  # at least one flush of answered batches
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        killed = run_rows(project, "s")[-1]
        assert killed["status"] == "running"
        assert 0 < len(fake.members) < len(rows)

        refused = audsync(project, "run", "s", expect=1)
        assert killed["run_id"] in refused.output and "locked" in refused.output

        fake.latency_s = 0
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        time.sleep(2.5)
        audsync(project, "run", "s")
        history = {r["run_id"]: r for r in run_rows(project, "s")}
        assert history[killed["run_id"]]["status"] == "aborted"
        new = run_rows(project, "s")[-1]
        assert new["status"] == "success" and new["planned_adds"] < len(rows)
        assert set(fake.members) == {r[0] for r in rows}
        snapshot = project.query(
            f"select {names.KEY} from {project.relation('s', '__snapshot')} where {names.HASH} is not null")
        assert {r[0] for r in snapshot} == {r[0] for r in rows}
        assert fake.violations == []

        credentials, target = load_credentials(project.root, project.name, None)
        spark = SparkWarehouse(credentials, target)
        syncs = Relation(None, project.schema + "_audsync", names.SYNCS_TABLE)
        with spark.session() as session:
            generation = int(session.scalar(f"select lock_generation from {spark.relation_sql(syncs)} where sync_name = ?", ("s",)))
            assert generation == 2
            with pytest.raises(LockHeld):
                spark.claim_lock_generation(session, syncs, "s", generation)
            assert spark.superseded(session, syncs, "s", generation - 1)
            assert not spark.superseded(session, syncs, "s", generation)
    finally:
        fake.stop()


def test_a_session_reads_what_other_sessions_rewrote_and_appended(spark_project):
    """A Spark session caches the file listing of a table it read: without a refresh, its next
    read fails on a file another session's rewrite removed, or silently misses the rows
    another session appended. The runner's session reads the table as it is now, both ways
    (the heartbeat rewrites ``audsync_syncs`` while the commit's session reads it)."""
    from audsync.profiles import load_credentials
    from audsync.warehouse import Relation
    from audsync.warehouse.spark import SparkWarehouse

    credentials, target = load_credentials(spark_project.root, spark_project.name, None)
    spark = SparkWarehouse(credentials, target)
    table = Relation(None, spark_project.schema, "listing_probe")
    name = spark.relation_sql(table)
    with spark.session() as other:
        other.execute(f"create table {name} using parquet as select 1 as n")
    with spark.session() as reader:
        assert reader.scalar(f"select sum(n) from {name}") == 1
        with spark.session() as other:
            spark.rewrite(other, table, "select 2 as n union all select 3 as n", ())
        assert reader.scalar(f"select sum(n) from {name}") == 5
        with spark.session() as other:
            other.execute(f"insert into {name} select 10 as n")
        assert reader.scalar(f"select sum(n) from {name}") == 15
        assert reader.execute_count(f"insert into {name} select n from {name}") == 3
        assert reader.scalar(f"select sum(n) from {name}") == 30
