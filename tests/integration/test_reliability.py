"""Issue 10, runner core: the destination ends exactly right under every fault.

Each test drives the real CLI against a real warehouse and a fake webhook on loopback, and
covers one point: unknown outcomes (per mode), fencing after a stall, the warehouse's clock,
SIGTERM, recovery of every unfinished run, PostgreSQL's edges, DuckDB file contention, and
state changes during a run.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time

import pytest

from audsync import names
from tests.fakes.webhook_server import FakeWebhook
from tests.support.syncs import (
    ModeOracle,
    audsync,
    audsync_process,
    run_rows,
    state_rows,
    valid_members,
    webhook_values,
    write_audience,
    write_destinations,
    write_sync,
)

LOCK_ENV = {"AUDSYNC_LOCK_TIMEOUT_S": "2"}


def wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def leftovers(project, sync: str = "s") -> dict[str, int]:
    """Rows left in the plan and the delivery records: all 0 between runs."""
    return {
        "plan": project.query(f"select count(*) from {project.relation(sync, '__plan')}")[0][0],
        "batches": len(state_rows(project, names.BATCHES_TABLE)),
        "ids": len(state_rows(project, names.DELIVERED_IDS_TABLE)),
    }


def lock_holder(project, sync: str = "s"):
    rows = project.query(
        f"select lock_run_id, status from {project.relation(names.SYNCS_TABLE, schema=project.schema + '_audsync')}"
        " where sync_name = %s", [sync])
    return rows[0] if rows else None


def snapshot_rows(project, sync: str = "s") -> dict[str, tuple]:
    """key -> (first_name, ltv, hash) of the snapshot."""
    rows = project.query(
        f"select {names.KEY}, first_name, ltv, {names.HASH} from {project.relation(sync, '__snapshot')}")
    return {r[0]: tuple(r[1:]) for r in rows}


def clear_failures(fake: FakeWebhook) -> None:
    """Drop the failures still queued in ``fake`` (the fake has no public way yet)."""
    fake._failures._queue.clear()


def hook(fake: FakeWebhook, **extra) -> dict:
    return {"type": "webhook", "url": fake.url, "secret": fake.secret.decode(), **extra}


def members(prefix: str, n: int, name: str = "n", start: int = 0) -> list[tuple]:
    return [(f"{prefix}{i:03d}@example.com", name, float(i)) for i in range(start, start + n)]


# -- 1. unknown outcomes ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mirror", "add", "upsert", "remove"])
def test_a_lost_answer_is_unknown_and_the_next_run_sends_the_truth(dbt_project, mode):
    """The destination applies every batch but its answer is lost (the client times out, no
    retries left); the audience then reverts. The rows whose outcome was lost are unknown, and
    the next run makes the destination hold exactly what the mode promises. Before unknown
    outcomes, mirror kept the extra members, missed the removed ones, and upsert kept the
    changed values: nothing was planned once S equalled the snapshot again."""
    with FakeWebhook(secret="unknown-secret") as fake:
        initial = {k: {"first_name": "seeded", "ltv": 0} for k, *_ in members("m", 10)}
        if mode == "remove":
            fake.seed_members(initial)
        oracle = ModeOracle(mode, initial if mode == "remove" else None)
        write_sync(dbt_project, "s", mode=mode, destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1, timeout_s=0.4,
                                                      max_retries=0)})
        base = members("m", 10)
        write_audience(dbt_project, base)
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        oracle.observe(valid_members(base))
        oracle.check(fake.members, webhook_values)

        # Five leave, five join, one changes its values; every answer is lost.
        changed = [(base[5][0], "changed", 99.0)] + base[6:] + members("j", 5)
        write_audience(dbt_project, changed)
        dbt_project.dbt("run")
        sent = {"mirror": 11, "add": 5, "upsert": 6, "remove": 5}[mode]
        batches = (sent + 4) // 5
        applied_before = fake.accepted_requests
        fake.delay_next(batches, 0.8)
        audsync(dbt_project, "run", "s", expect=3)
        run = run_rows(dbt_project, "s")[-1]
        assert run["status"] == "partial_failure"
        assert (run["rows_added"], run["rows_removed"], run["rows_updated"]) == (0, 0, 0)
        unknown = {k for k, v in snapshot_rows(dbt_project).items() if v[2] is None}
        assert len(unknown) == sent
        wait_for(lambda: fake.accepted_requests >= applied_before + batches, what="the delayed batches applied")
        oracle.observe(valid_members(changed))

        # The audience reverts; the next run sends the truth for every unknown key.
        write_audience(dbt_project, base)
        dbt_project.dbt("run")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1)})
        audsync(dbt_project, "run", "s")
        oracle.observe(valid_members(base))
        oracle.check(fake.members, webhook_values)
        assert all(v[2] is not None for v in snapshot_rows(dbt_project).values())
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}
        # Nothing further to send: the snapshot agrees with the audience again.
        audsync(dbt_project, "run", "s")
        last = run_rows(dbt_project, "s")[-1]
        assert (last["planned_adds"], last["planned_removes"], last["planned_updates"]) == (0, 0, 0)


def test_unknown_rows_are_counted_and_never_as_applied(dbt_project):
    """A 503 after the destination applied (timeouts after retries) makes the rows unknown:
    counted in rows_unknown, not in rows_added; rejected-for-good rows are not unknown."""
    with FakeWebhook(secret="count-secret") as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1, timeout_s=0.4,
                                                      max_retries=0)})
        write_audience(dbt_project, members("m", 15))
        dbt_project.dbt("run")
        fake.delay_next(1, 0.8)          # batch 1: applied, answer lost (retryable)
        fake.fail_next(1, 422, body="no")  # batch 2: refused for good (known not applied)
        audsync(dbt_project, "run", "s", expect=3)
        relation = dbt_project.relation(names.RUNS_TABLE, schema=dbt_project.schema + "_audsync")
        [(added, failed, unknown)] = dbt_project.query(
            f"select rows_added, rows_failed, rows_unknown from {relation} where sync_name = %s", ["s"])
        assert (added, failed, unknown) == (5, 10, 5)
        snapshot = snapshot_rows(dbt_project)
        assert len(snapshot) == 10 and sum(v[2] is None for v in snapshot.values()) == 5
        candidates = {r[0] for r in dbt_project.query(f"select {names.KEY} from {dbt_project.relation('s', '__candidates')}")}
        assert len(candidates) == 10  # the unknown and the refused keys
        time.sleep(0.9)
        audsync(dbt_project, "run", "s")
        last = run_rows(dbt_project, "s")[-1]
        assert (last["planned_adds"], last["rows_added"], last["status"]) == (10, 10, "success")
        assert set(fake.members) == {m[0] for m in members("m", 15)}


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_a_killed_run_whose_audience_reverts_leaves_the_destination_exact(dbt_project, monkeypatch):
    """kill -9 after the fake applied batches whose answers were never flushed; the audience
    reverts before the next run. Recovery marks every unanswered row unknown, and the next run
    removes the members that were added meanwhile (mirror). The audience comes back empty on
    purpose, so the empty-audience guardrail is off for this sync."""
    with FakeWebhook(secret="kill-secret", latency_s=0.1) as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook", extra={"allow_empty": True})
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1)})
        write_audience(dbt_project, [])
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        write_audience(dbt_project, members("k", 80))
        dbt_project.dbt("run")
        process = audsync_process(dbt_project, "run", "s", env=LOCK_ENV)
        wait_for(lambda: fake.accepted_requests >= 4, what="four batches delivered")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        time.sleep(0.3)
        assert 0 < len(fake.members) < 80
        write_audience(dbt_project, [])  # the audience changes back
        dbt_project.dbt("run")
        fake.latency_s = 0
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        time.sleep(2.2)
        audsync(dbt_project, "run", "s")
        assert fake.members == {}
        assert snapshot_rows(dbt_project) == {}
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}
        assert all(r["status"] != "running" for r in run_rows(dbt_project, "s"))


# -- 2. fencing -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci
def test_a_stalled_run_that_was_taken_over_sends_nothing_and_commits_nothing(dbt_project, monkeypatch):
    """SIGSTOP past the lock timeout, a second run takes over and finishes, SIGCONT: the first
    run sends no further request, exits 1 naming the run that took over, and its row stays
    `aborted` as the taker marked it. Before fencing it delivered its stale plan and exited 0."""
    with FakeWebhook(secret="fence-secret", latency_s=0.15) as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1)})
        rows = members("f", 100)
        write_audience(dbt_project, rows)
        dbt_project.dbt("run")
        first = audsync_process(dbt_project, "run", "s", env=LOCK_ENV)
        wait_for(lambda: fake.accepted_requests >= 3, what="the first run to deliver")
        first.send_signal(signal.SIGSTOP)
        try:
            stalled_id = run_rows(dbt_project, "s")[-1]["run_id"]
            time.sleep(2.5)
            fake.latency_s = 0
            monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
            audsync(dbt_project, "run", "s")
            taker = run_rows(dbt_project, "s")[-1]
            assert taker["status"] == "success" and taker["run_id"] != stalled_id
            sent_by_stalled = sum(k.startswith(stalled_id) for k in fake.idempotency_keys)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 1, out + err
        assert taker["run_id"] in out + err and "lost its lock" in out + err
        assert sum(k.startswith(stalled_id) for k in fake.idempotency_keys) == sent_by_stalled
        history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
        assert history[stalled_id]["status"] == "aborted"
        assert set(fake.members) == {r[0] for r in rows}
        assert lock_holder(dbt_project)[0] is None
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_a_fenced_runs_unknown_marks_keep_the_newest_values_and_are_applied_once(dbt_project):
    """The marks a fenced run leaves for batches that landed after the takeover (written by
    the runner's own ``write_marks``, as ``_Run._record_unknown`` does) are applied by the
    next run's recovery, before its freeze: a key the snapshot holds keeps its values, the
    newest known, and loses its hash; a key it does not hold gets the mark's values. Here in
    upsert mode the stale batch put old values at the destination: the next run sends each
    key's truth (a departed key its last committed values, not the stale batch's), and the
    marks are gone."""
    from audsync.destinations.base import Change
    from audsync.plan import unknown_marks_id
    from audsync.project import Project
    from audsync.runner import SyncRunner

    with FakeWebhook(secret="marks-secret") as fake:
        write_sync(dbt_project, "s", mode="upsert", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake)})
        write_audience(dbt_project, [("a@x.com", "A1", 1.0), ("b@x.com", "B1", 2.0)])
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        write_audience(dbt_project, [("a@x.com", "A2", 1.0)])  # b leaves: upsert keeps it
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        # A fenced run's stale batch lands: old values for a and b, and an add of c.
        stale = [("update", "a@x.com", "A0", 0.0), ("update", "b@x.com", "B0", 0.0), ("add", "c@x.com", "C0", 3.0)]
        fake.seed_members({k: {"email": k, "first_name": n, "ltv": v} for _op, k, n, v in stale})
        project = Project.load(dbt_project.root, dbt_project.root)
        runner = SyncRunner(project, project.open_warehouse(), {})
        tables = runner.check_ready(project.get("s"))
        changes = [Change(i, op, k, {"email": k, "first_name": n, "ltv": v}, None)
                   for i, (op, k, n, v) in enumerate(stale, start=1)]
        with runner.warehouse.session() as session:
            assert tables.write_marks(session, unknown_marks_id("fenced-run"), changes) == 3
        runner.warehouse.close()
        assert leftovers(dbt_project)["plan"] == 3
        audsync(dbt_project, "run", "s")
        assert {k: webhook_values(f) for k, f in fake.members.items()} == {
            "a@x.com": ("A2", 1.0), "b@x.com": ("B1", 2.0), "c@x.com": ("C0", 3.0)}
        snapshot = snapshot_rows(dbt_project)
        assert {k: v[:2] for k, v in snapshot.items()} == {
            "a@x.com": ("A2", 1.0), "b@x.com": ("B1", 2.0), "c@x.com": ("C0", 3.0)}
        assert all(v[2] is not None for v in snapshot.values())  # nothing left unknown
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}
        assert run_rows(dbt_project, "s")[-1]["status"] == "success"


# -- 3. the warehouse's clock -----------------------------------------------------------------


def test_the_lock_compares_heartbeats_by_the_warehouse_clock(dbt_project, monkeypatch):
    """A host whose clock runs an hour ahead must not take over a live lock (and one an hour
    behind must take over a dead one): heartbeats are written and aged by the warehouse."""
    with FakeWebhook(secret="clock-secret") as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake)})
        write_audience(dbt_project, members("c", 5))
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")  # creates the sync's row
        syncs = dbt_project.relation(names.SYNCS_TABLE, schema=dbt_project.schema + "_audsync")
        now = "(current_timestamp at time zone 'UTC')"
        dbt_project.execute(f"update {syncs} set lock_run_id = 'live-run', lock_heartbeat_at = {now}")
        import audsync.state as state_module

        real = state_module.utcnow
        monkeypatch.setattr(state_module, "utcnow", lambda: real() + dt.timedelta(hours=1))
        result = audsync(dbt_project, "run", "s", expect=1)
        assert "locked by run live-run" in result.output
        # An hour-old heartbeat, by the warehouse's clock, on a host an hour behind: taken over.
        monkeypatch.setattr(state_module, "utcnow", lambda: real() - dt.timedelta(hours=1))
        dbt_project.execute(f"update {syncs} set lock_heartbeat_at = {now} - interval '1 hour'")
        audsync(dbt_project, "run", "s")
        assert lock_holder(dbt_project)[0] is None


# -- 4. SIGTERM -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_sigterm_stops_the_command_quickly_and_the_next_sync_does_not_start(dbt_project, monkeypatch):
    """SIGTERM while a batch waits 30 s to retry a 503: the wait ends at once, the answered
    batches are committed, the run ends `aborted`, the second sync never starts, the lock is
    free and nothing is left in the plan; the next run completes the destination."""
    with FakeWebhook(secret="term-secret", latency_s=0.05) as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_sync(dbt_project, "t", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1, max_retries=5)})
        rows = members("t", 40)
        write_audience(dbt_project, rows)
        dbt_project.dbt("run")
        process = audsync_process(dbt_project, "run", "s", "t", env=LOCK_ENV)
        wait_for(lambda: fake.accepted_requests >= 3, what="three batches delivered")
        fake.fail_next(50, 503, retry_after=30)
        wait_for(lambda: fake.requests > fake.accepted_requests, what="a 503 answered")
        time.sleep(1.2)  # answered batches flushed; the run now waits 30 s to retry
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert time.monotonic() - started < 10, "SIGTERM took too long"
        assert process.returncode == 1, out + err
        s_runs = run_rows(dbt_project, "s")
        assert [r["status"] for r in s_runs] == ["aborted"]
        assert s_runs[0]["rows_added"] >= 15
        assert run_rows(dbt_project, "t") == []
        assert "stopped before it started" in out
        assert lock_holder(dbt_project, "s")[0] is None
        assert leftovers(dbt_project, "s") == {"plan": 0, "batches": 0, "ids": 0}
        clear_failures(fake)
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5)})
        fake_members_before = set(fake.members)
        assert fake_members_before
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        audsync(dbt_project, "run", "s")
        assert set(fake.members) == {r[0] for r in rows}


# -- 5. recovery of every unfinished run ------------------------------------------------------


def test_a_run_whose_commit_failed_is_recovered_by_the_next(dbt_project, monkeypatch):
    """A run that ended `error` after delivering (its commit failed) left its plan and batch
    records; the next run recovers it, whatever its status, and the tables end empty. Before,
    only `running` runs were recovered and the records leaked for good."""
    from audsync import plan as plan_module

    with FakeWebhook(secret="recover-secret") as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5)})
        rows = members("r", 20)
        write_audience(dbt_project, rows)
        dbt_project.dbt("run")
        real_commit = plan_module.SyncTables.commit
        calls = []

        def failing_commit(self, session, run_id, *args, **kwargs):
            calls.append(run_id)
            if len(calls) == 1:
                raise RuntimeError("the warehouse went away")
            return real_commit(self, session, run_id, *args, **kwargs)

        monkeypatch.setattr(plan_module.SyncTables, "commit", failing_commit)
        audsync(dbt_project, "run", "s", expect=1)
        failed = run_rows(dbt_project, "s")[-1]
        assert failed["status"] == "error" and "commit failed" in failed["error_message"]
        assert leftovers(dbt_project)["plan"] == 20 and leftovers(dbt_project)["batches"] == 4
        audsync(dbt_project, "run", "s")
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}
        history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
        assert history[failed["run_id"]]["rows_added"] == 20  # recovered: every batch was answered
        assert history[failed["run_id"]]["status"] == "error"
        assert len(snapshot_rows(dbt_project)) == 20
        assert set(fake.members) == {r[0] for r in rows}


# -- 9. PostgreSQL ----------------------------------------------------------------------------


def test_two_first_runs_at_once_do_not_deadlock(dbt_project, warehouse, monkeypatch):
    """Two first-ever runs of a sync start together (the window in which both insert the
    sync's row is widened): one runs, the other is refused naming it or runs after it; neither
    fails with a deadlock, and the sync has one state row. Before, both inserted the row and
    then waited for each other's table lock: PostgreSQL killed one with "deadlock detected"."""
    import threading

    from audsync.config import load_destinations
    from audsync.errors import LockHeld
    from audsync.project import Project
    from audsync.runner import SyncRunner
    from audsync.state import StateStore

    with FakeWebhook(secret="first-secret", latency_s=0.05) as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        path = write_destinations(dbt_project, {"hook": hook(fake, batch_size=5)})
        write_audience(dbt_project, members("d", 20))
        dbt_project.dbt("run")
        real = StateStore.ensure_sync_row
        barrier = threading.Barrier(2, timeout=5)

        def slow_first_insert(self, session, sync_name):
            row = real(self, session, sync_name)
            try:
                barrier.wait()  # both runs have inserted (or tried to) before either goes on
            except threading.BrokenBarrierError:
                pass
            return row

        monkeypatch.setattr(StateStore, "ensure_sync_row", slow_first_insert)
        outcomes: list = []

        def one_run():
            project = Project.load(dbt_project.root, dbt_project.root)
            wh = project.open_warehouse()
            try:
                outcomes.append(SyncRunner(project, wh, load_destinations(path)).run(project.get("s")).status)
            except Exception as error:  # noqa: BLE001 - the outcome under test
                outcomes.append(error)
            finally:
                wh.close()

        threads = [threading.Thread(target=one_run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(isinstance(o, Exception) and not isinstance(o, LockHeld) for o in outcomes), outcomes
        assert "success" in outcomes and len(outcomes) == 2, outcomes
        assert len(state_rows(dbt_project, names.SYNCS_TABLE, "where sync_name = %s", ["s"])) == 1


def test_postgres_sync_names_are_unique_and_sessions_have_timeouts(dbt_project, warehouse, monkeypatch):
    if warehouse != "postgres":
        pytest.skip("PostgreSQL only")
    write_sync(dbt_project, "s", mode="mirror", destination="hook")
    write_audience(dbt_project, members("u", 3))
    dbt_project.dbt("run")
    syncs = dbt_project.relation(names.SYNCS_TABLE, schema=dbt_project.schema + "_audsync")
    dbt_project.execute(f"insert into {syncs} (sync_name, status) values ('x', 'active')")
    with pytest.raises(Exception, match="duplicate key|unique"):
        dbt_project.execute(f"insert into {syncs} (sync_name, status) values ('x', 'active')")
    from audsync.project import Project

    monkeypatch.setenv("AUDSYNC_PG_STATEMENT_TIMEOUT_S", "12")
    project = Project.load(dbt_project.root, dbt_project.root, None)
    warehouse_ = project.open_warehouse()
    try:
        with warehouse_.session() as session:
            assert session.scalar("show statement_timeout") == "12s"
            assert session.scalar("show lock_timeout") == "1min"
    finally:
        warehouse_.close()


def test_a_nul_in_a_destinations_error_text_is_recorded(dbt_project):
    """A destination's error text with a NUL character is recorded (without it) as the row's
    error; PostgreSQL refused it, and the flush failed the whole run."""
    with FakeWebhook(secret="nul-secret") as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5)})
        write_audience(dbt_project, members("z", 10))
        dbt_project.dbt("run")
        fake.fail_next(1, 422, body=b"bad\x00value")
        audsync(dbt_project, "run", "s", expect=3)
        run = run_rows(dbt_project, "s")[-1]
        assert (run["status"], run["rows_failed"], run["rows_added"]) == ("partial_failure", 5, 5)
        errors = state_rows(dbt_project, names.ROW_ERRORS_TABLE, "where run_id = %s", [run["run_id"]])
        assert len(errors) == 5 and all("badvalue" in e[5] for e in errors)


# -- 10. DuckDB file contention ---------------------------------------------------------------


def test_waiting_for_the_duckdb_file_shows_in_the_json_events(dbt_project, warehouse):
    """While another process holds the DuckDB file the runner waits, and says so."""
    if warehouse != "duckdb":
        pytest.skip("DuckDB only")
    with FakeWebhook(secret="wait-secret") as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake)})
        write_audience(dbt_project, members("w", 5))
        dbt_project.dbt("run")
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
             " time.sleep(2.5); c.close()", str(dbt_project.duckdb_path)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            result = audsync(dbt_project, "--log-format", "json", "run", "s")
        finally:
            holder.wait(timeout=30)
        events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        waits = [e for e in events if e.get("event") == "waiting"]
        assert waits and "DuckDB file" in waits[0]["message"]
        assert run_rows(dbt_project, "s")[-1]["status"] == "success"


# -- 11. state changes during a run -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_a_pause_during_a_run_stays_and_reset_takes_over_like_a_run(dbt_project, monkeypatch):
    """`audsync pause` while a run delivers: the sync is still paused after the run. `audsync
    reset` refuses a live holder, and recovers a dead one (its run `aborted`, its plan and
    records gone) before it forgets the snapshot."""
    with FakeWebhook(secret="pause-secret", latency_s=0.1) as fake:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": hook(fake, batch_size=5, max_concurrency=1)})
        write_audience(dbt_project, members("p", 40))
        dbt_project.dbt("run")
        process = audsync_process(dbt_project, "run", "s", env=LOCK_ENV)
        wait_for(lambda: fake.accepted_requests >= 2, what="the run to deliver")
        audsync(dbt_project, "pause", "s")
        refused = audsync(dbt_project, "reset", "s", "--yes", expect=1)
        assert "locked by run" in refused.output
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, out + err
        assert lock_holder(dbt_project) == (None, "paused")
        audsync(dbt_project, "resume", "s")

        # A run killed mid-delivery, then a reset once its lock is stale.
        write_audience(dbt_project, members("q", 40))
        dbt_project.dbt("run")
        process = audsync_process(dbt_project, "run", "s", env=LOCK_ENV)
        wait_for(lambda: fake.accepted_requests >= 12, what="the second run to deliver")
        time.sleep(1.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        killed = run_rows(dbt_project, "s")[-1]
        assert killed["status"] == "running"
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        time.sleep(2.2)
        audsync(dbt_project, "reset", "s", "--yes")
        history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
        assert history[killed["run_id"]]["status"] == "aborted"
        assert leftovers(dbt_project) == {"plan": 0, "batches": 0, "ids": 0}
        assert snapshot_rows(dbt_project) == {}
        assert lock_holder(dbt_project)[0] is None


def test_the_diff_views_send_the_truth_for_unknown_rows_in_every_mode(dbt_project):
    """Convention 1 in SQL: an unknown snapshot row (null hash) of a key in S is an `add` with
    S's values (a `remove` in remove mode); of a key not in S, a `remove` in mirror and remove
    modes and an `add` with its own values and a computed hash in add and upsert modes. Never
    an update; a known row that equals S sends nothing."""
    modes = ("mirror", "add", "upsert", "remove")
    for mode in modes:
        write_sync(dbt_project, f"v_{mode}", mode=mode, destination="hook")
    write_destinations(dbt_project, {"hook": {"type": "file", "path": "out"}})
    write_audience(dbt_project, [("a@x.com", "Ann", 1.0), ("b@x.com", "Bob", 2.0)])
    dbt_project.dbt("run")
    departed_hash = {}
    for mode in modes:
        snapshot = dbt_project.relation(f"v_{mode}", "__snapshot")
        candidates = dbt_project.relation(f"v_{mode}", "__candidates")
        k, h = names.KEY, names.HASH
        dbt_project.execute(
            f"insert into {snapshot} ({k}, email, first_name, ltv, {h}) select {k}, email, first_name, ltv, {h}"
            f" from {dbt_project.relation(f'v_{mode}')}")
        dbt_project.execute(f"update {snapshot} set {h} = null where {k} = 'a@x.com'")
        dbt_project.execute(
            f"insert into {snapshot} ({k}, email, first_name, ltv, {h}) values ('z@x.com', 'z@x.com', 'Zed', 9.0, null)")
        dbt_project.execute(f"delete from {candidates}")
        dbt_project.execute(f"insert into {candidates} ({k}) values ('a@x.com'), ('z@x.com'), ('b@x.com')")
        changes = dbt_project.query(
            f"select {names.OP}, {k}, first_name, ltv, {h} is not null"
            f" from {dbt_project.relation(f'v_{mode}', '__changes')} order by {k}")
        expected = {
            "mirror": [("add", "a@x.com", "Ann", 1.0, True), ("remove", "z@x.com", "Zed", 9.0, False)],
            "add": [("add", "a@x.com", "Ann", 1.0, True), ("add", "z@x.com", "Zed", 9.0, True)],
            "upsert": [("add", "a@x.com", "Ann", 1.0, True), ("add", "z@x.com", "Zed", 9.0, True)],
            "remove": [("remove", "a@x.com", "Ann", 1.0, False), ("remove", "z@x.com", "Zed", 9.0, False)],
        }[mode]
        assert [tuple(r) for r in changes] == expected, mode
        if mode in ("add", "upsert"):
            departed_hash[mode] = dbt_project.query(
                f"select {h} from {dbt_project.relation(f'v_{mode}', '__changes')} where {k} = 'z@x.com'")[0][0]
        assert dbt_project.query(f"select count(*) from {dbt_project.relation(f'v_{mode}', '__updates')}") == [(0,)]
        adds = {r[0] for r in dbt_project.query(f"select {k} from {dbt_project.relation(f'v_{mode}', '__adds')}")}
        assert adds == ({"a@x.com", "z@x.com"} if mode in ("add", "upsert") else {"a@x.com"} if mode == "mirror" else set())
    # add and upsert: the hash computed for the departed unknown row is the one S computes.
    write_audience(dbt_project, [("a@x.com", "Ann", 1.0), ("b@x.com", "Bob", 2.0), ("z@x.com", "Zed", 9.0)])
    dbt_project.dbt("run", "--select", "v_add", "v_upsert")
    for mode in ("add", "upsert"):
        [(in_s,)] = dbt_project.query(
            f"select {names.HASH} from {dbt_project.relation(f'v_{mode}')} where {names.KEY} = 'z@x.com'")
        assert departed_hash[mode] == in_s
