"""The runner end to end: real dbt, a real warehouse, the CLI, a fake webhook on loopback.

Covers contract sections 4 to 8: mode properties over random audience sequences, rejected
rows, retries and fatal answers, a runner killed mid-delivery, concurrent runs, signatures
and secrets, and the commands around a run.
"""

from __future__ import annotations

import json
import random
import secrets as _secrets
import signal
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

MODES = ("mirror", "add", "upsert", "remove")
NAMES = ["Ann", "Bob", None, "", "zoë", "o'brien"]


def audience_state(rng: random.Random, size: int = 30) -> list[tuple]:
    rows = [(f"u{rng.randint(0, 45)}@example.com", rng.choice(NAMES), rng.choice([None, float(rng.randint(0, 99))]))
            for _ in range(rng.randint(0, size))]
    if rng.random() < 0.3:
        rows.append((None, "no key", 1.0))
    return rows


@pytest.fixture
def hooks():
    """Four fake webhooks, one per sync; each verifies signatures with its secret."""
    fakes = {mode: FakeWebhook(secret=f"secret-{mode}").start() for mode in MODES}
    yield fakes
    for fake in fakes.values():
        fake.stop()


def hook_destination(fake: FakeWebhook, mode: str, **extra) -> dict:
    return {"type": "webhook", "url": fake.url, "secret": f"secret-{mode}", **extra}


@pytest.mark.parametrize("seed", [1, 2])
def test_mode_properties_hold_after_every_run(dbt_project, hooks, seed):
    """Over a random sequence of audiences, each mode leaves the destination as it promises."""
    rng = random.Random(seed)
    initial = {f"u{i}@example.com": {"first_name": "seeded", "ltv": 0} for i in range(0, 46, 3)}
    hooks["remove"].seed_members(initial)
    oracles = {mode: ModeOracle(mode, initial if mode == "remove" else None) for mode in MODES}
    for mode in MODES:
        # governance: random audiences come back empty at times, which allow_empty=False blocks.
        write_sync(dbt_project, f"sync_{mode}", mode=mode, destination=f"hook_{mode}", tags=["random"], extra={"allow_empty": True})
    write_destinations(dbt_project, {f"hook_{m}": hook_destination(hooks[m], m, batch_size=7) for m in MODES})
    for step in range(4):
        state = audience_state(rng)
        write_audience(dbt_project, state)
        dbt_project.dbt("run")
        result = audsync(dbt_project, "run", "--select", "tag:random")
        assert "audsync run summary" in result.stdout
        audience = valid_members(state)
        for mode in MODES:
            oracles[mode].observe(audience)
            oracles[mode].check(hooks[mode].members, webhook_values)
            assert hooks[mode].bad_signatures == 0 and hooks[mode].violations == []
        for mode in MODES:
            assert run_rows(dbt_project, f"sync_{mode}")[-1]["status"] == "success"
    # remove mode never sent an add; the others never sent more than they had to.
    assert hooks["remove"].ops.get("add", 0) == 0 and hooks["remove"].ops.get("update", 0) == 0
    assert hooks["add"].ops.get("remove", 0) == 0 and hooks["add"].ops.get("update", 0) == 0


@pytest.fixture
def one_hook(dbt_project):
    """A mirror sync ``s`` to a fake webhook, batch 5, with 20 members."""
    fake = FakeWebhook(secret="hook-secret").start()
    write_sync(dbt_project, "s", mode="mirror", destination="hook")
    write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url, "secret": "hook-secret",
                                              "batch_size": 5, "max_concurrency": 2, "max_retries": 3}})
    rows = [(f"m{i:02d}@example.com", f"name{i}", float(i)) for i in range(20)]
    write_audience(dbt_project, rows)
    dbt_project.dbt("run")
    yield fake, rows
    fake.stop()


def test_rejected_rows_fail_alone_and_are_sent_again(dbt_project, one_hook):
    fake, rows = one_hook
    fake.reject_keys = {"m03@example.com", "m11@example.com"}
    result = audsync(dbt_project, "run", "s", expect=3)
    assert "partial_failure" in result.stdout
    run = run_rows(dbt_project, "s")[-1]
    assert (run["status"], run["rows_failed"], run["rows_added"], run["planned_adds"]) == ("partial_failure", 2, 18, 20)
    errors = state_rows(dbt_project, names.ROW_ERRORS_TABLE, "where run_id = %s order by member_key", [run["run_id"]])
    assert [(e[2], e[3]) for e in errors] == [("m03@example.com", "add"), ("m11@example.com", "add")]
    assert set(fake.members) == {r[0] for r in rows} - fake.reject_keys
    # Only the rejected keys are left where S and the snapshot differ.
    candidates = f"select {names.KEY} from {dbt_project.relation('s', '__candidates')}"
    assert {r[0] for r in dbt_project.query(candidates)} == fake.reject_keys
    # The snapshot does not hold them, so the next run plans exactly them again.
    fake.reject_keys = set()
    audsync(dbt_project, "run", "s")
    run = run_rows(dbt_project, "s")[-1]
    assert (run["status"], run["planned_adds"], run["rows_added"]) == ("success", 2, 2)
    assert set(fake.members) == {r[0] for r in rows}
    assert dbt_project.query(candidates) == []


def test_rate_limits_and_server_errors_are_retried_within_the_run(dbt_project, one_hook):
    fake, rows = one_hook
    fake.fail_next(1, 429, retry_after="1")
    fake.fail_next(2, 503)
    started = time.monotonic()
    audsync(dbt_project, "run", "s")
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert fake.requests == 4 + 3  # 4 batches of 5, plus the 3 answers that failed
    assert set(fake.members) == {r[0] for r in rows}
    assert run_rows(dbt_project, "s")[-1]["status"] == "success"


def test_other_client_errors_fail_the_batch_rows_with_the_answer(dbt_project, one_hook):
    fake, rows = one_hook
    fake.fail_next(1, 422, body="field ltv must be positive")
    audsync(dbt_project, "run", "s", expect=3)
    run = run_rows(dbt_project, "s")[-1]
    assert (run["status"], run["rows_failed"], run["rows_added"]) == ("partial_failure", 5, 15)
    errors = state_rows(dbt_project, names.ROW_ERRORS_TABLE, "where run_id = %s", [run["run_id"]])
    assert len(errors) == 5 and all("field ltv must be positive" in e[5] and e[4] == "422" for e in errors)
    assert len(fake.members) == 15


def test_an_auth_failure_stops_the_run_and_the_next_success_clears_it(dbt_project, one_hook):
    fake, rows = one_hook
    fake.fail_next(50, 401, body="bad credentials")
    result = audsync(dbt_project, "run", "s", expect=1)
    assert "error" in result.stdout
    run = run_rows(dbt_project, "s")[-1]
    assert run["status"] == "error" and "401" in run["error_message"]
    sync_row = state_rows(dbt_project, names.SYNCS_TABLE, "where sync_name = %s", ["s"])[0]
    assert sync_row[1] == "error" and "401" in sync_row[2]
    assert fake.members == {}
    fake.reset()
    audsync(dbt_project, "run", "s")
    sync_row = state_rows(dbt_project, names.SYNCS_TABLE, "where sync_name = %s", ["s"])[0]
    assert (sync_row[1], sync_row[2]) == ("active", None)
    assert set(fake.members) == {r[0] for r in rows}


def wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_mid_delivery(dbt_project, fake: FakeWebhook) -> dict:
    """Start ``audsync run s`` as a process, SIGKILL it once ten more batches were accepted and
    at least one flush of answered batches has happened; return its run row."""
    before = fake.accepted_requests
    process = audsync_process(dbt_project, "run", "s", env={"AUDSYNC_LOCK_TIMEOUT_S": "2"})
    wait_for(lambda: fake.accepted_requests >= before + 10, what="ten batches delivered")
    time.sleep(1.2)  # at least one flush of answered batches has happened
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    time.sleep(0.5)  # a request in flight at the kill is still applied by the fake
    return run_rows(dbt_project, "s")[-1]


def one_by_one_sync(dbt_project, fake: FakeWebhook) -> list[tuple]:
    """A mirror sync ``s`` of 120 members to ``fake`` in batches of 5, one request at a time,
    built with ``dbt run``; returns the members."""
    write_sync(dbt_project, "s", mode="mirror", destination="hook")
    write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url, "secret": fake.secret.decode(),
                                              "batch_size": 5, "max_concurrency": 1}})
    rows = [(f"k{i:03d}@example.com", "n", float(i)) for i in range(120)]
    write_audience(dbt_project, rows)
    dbt_project.dbt("run")
    return rows


@pytest.mark.slow
@pytest.mark.ci
def test_a_runner_killed_mid_delivery_loses_nothing(dbt_project, monkeypatch):
    fake = FakeWebhook(secret="kill-secret", latency_s=0.15).start()
    try:
        rows = one_by_one_sync(dbt_project, fake)
        killed = kill_mid_delivery(dbt_project, fake)
        assert killed["status"] == "running"
        delivered_before = len(fake.members)
        assert 0 < delivered_before < 120

        fake.latency_s = 0
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        time.sleep(2.2)  # the killed run's heartbeat is now stale
        audsync(dbt_project, "run", "s")
        history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
        assert history[killed["run_id"]]["status"] == "aborted"
        assert "abandoned" in history[killed["run_id"]]["error_message"]
        assert all(r["status"] != "running" for r in history.values())
        # Recovery committed what the killed run delivered, so the new run resent only the rest.
        new = run_rows(dbt_project, "s")[-1]
        assert new["status"] == "success"
        assert history[killed["run_id"]]["rows_added"] + new["rows_added"] >= 120
        assert new["planned_adds"] < 120
        assert set(fake.members) == {r[0] for r in rows}
        snapshot = dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__snapshot')}")
        assert snapshot == [(120,)]
    finally:
        fake.stop()


@pytest.mark.slow
@pytest.mark.ci
def test_a_second_concurrent_run_is_refused_naming_the_holder(dbt_project):
    fake = FakeWebhook(secret="lock-secret", latency_s=0.1).start()
    try:
        rows = one_by_one_sync(dbt_project, fake)
        first = audsync_process(dbt_project, "run", "s")
        wait_for(lambda: fake.requests >= 2, what="the first run to deliver")
        holder = run_rows(dbt_project, "s")[-1]
        assert holder["status"] == "running"
        second = audsync(dbt_project, "run", "s", expect=1)
        assert holder["run_id"] in second.output and "locked" in second.output
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, out + err
        assert set(fake.members) == {r[0] for r in rows}
        assert [r["status"] for r in run_rows(dbt_project, "s")] == ["success"]
    finally:
        fake.stop()


def test_requests_are_signed_and_secrets_never_leak(dbt_project, monkeypatch):
    secret = "whsec-" + _secrets.token_hex(12)
    monkeypatch.setenv("HOOK_SECRET", secret)
    fake = FakeWebhook(secret=secret).start()
    try:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        (dbt_project.root / "destinations.yml").write_text(
            f"hook:\n  type: webhook\n  url: {fake.url}\n  secret: \"{{{{ env_var('HOOK_SECRET') }}}}\"\n  batch_size: 4\n"
        )
        write_audience(dbt_project, [(f"s{i}@example.com", "n", 1.0) for i in range(10)])
        dbt_project.dbt("run")
        # An answer that echoes the secret must not carry it into a table or the output.
        fake.fail_next(1, 400, body=f"signature mismatch for secret {secret}")
        outputs = [audsync(dbt_project, "-v", "run", "s", expect=3).output,
                   audsync(dbt_project, "--log-format", "json", "-v", "run", "s").output,
                   audsync(dbt_project, "runs", "s", "--format", "json").output,
                   audsync(dbt_project, "check").output]
        assert fake.bad_signatures == 0 and fake.violations == []
        assert fake.accepted_requests >= 3
        for output in outputs:
            assert secret not in output
        for table in names.STATE_TABLES:
            assert secret not in repr(state_rows(dbt_project, table))
        for suffix in ("", "__snapshot", "__plan"):
            assert secret not in repr(dbt_project.rows(dbt_project.relation("s", suffix)))
        errors = state_rows(dbt_project, names.ROW_ERRORS_TABLE)
        assert errors and all("***" in e[5] for e in errors)
    finally:
        fake.stop()


def test_json_logs_are_one_object_per_line(dbt_project, one_hook):
    result = audsync(dbt_project, "--log-format", "json", "run", "s")
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert {"locked", "planned", "finished"} <= {e.get("event") for e in events}
    summary = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert summary[0]["event"] == "summary" and summary[0]["rows_added"] == 20


def test_pause_resume_plan_status_runs_list_and_reset(dbt_project, one_hook):
    fake, rows = one_hook
    plan = json.loads(audsync(dbt_project, "plan", "s", "--format", "json").stdout)
    assert (plan["adds"], plan["removes"], plan["updates"], len(plan["sample"])) == (20, 0, 0, 5)
    assert fake.requests == 0  # plan sends nothing
    audsync(dbt_project, "pause", "s")
    paused = audsync(dbt_project, "run", "s")
    assert "paused" in paused.output and fake.requests == 0
    assert run_rows(dbt_project, "s")[-1]["status"] == "skipped"
    audsync(dbt_project, "resume", "s")
    audsync(dbt_project, "run", "s")
    assert len(fake.members) == 20
    status = json.loads(audsync(dbt_project, "status", "--format", "json").stdout)
    assert status[0]["sync"] == "s" and status[0]["status"] == "active" and status[0]["locked_by"] is None
    listing = json.loads(audsync(dbt_project, "list", "--format", "json").stdout)
    assert listing[0]["mode"] == "mirror" and listing[0]["destination"] == "hook"
    history = json.loads(audsync(dbt_project, "runs", "s", "--format", "json").stdout)
    assert [r["status"] for r in history] == ["success", "skipped"]
    assert "success" in audsync(dbt_project, "runs", "s").stdout
    # reset: the next run is an initial sync again.
    audsync(dbt_project, "reset", "s", "--yes")
    assert json.loads(audsync(dbt_project, "plan", "s", "--format", "json").stdout)["adds"] == 20
    # Remove a member and change one: the plan is incremental.
    audsync(dbt_project, "run", "s")
    write_audience(dbt_project, [r if r[0] != "m01@example.com" else (r[0], "renamed", r[2]) for r in rows[1:]])
    dbt_project.dbt("run")
    plan = json.loads(audsync(dbt_project, "plan", "s", "--format", "json").stdout)
    assert (plan["adds"], plan["removes"], plan["updates"]) == (0, 1, 1)
    audsync(dbt_project, "run", "s")
    assert "m00@example.com" not in fake.members and fake.members["m01@example.com"]["first_name"] == "renamed"


def test_check_names_every_problem(dbt_project, one_hook):
    write_sync(dbt_project, "t", destination="nowhere")
    dbt_project.write_file("destinations.yml", "hook:\n  type: webhook\n  batch_size: 0\nother:\n  type: smoke_signal\n")
    result = audsync(dbt_project, "check", expect=2)
    for words in ("'hook'", "url", "batch_size", "'other'", "smoke_signal", "'nowhere'"):
        assert words in result.stderr, (words, result.stderr)


def test_unknown_destination_is_a_configuration_error(dbt_project, one_hook):
    write_sync(dbt_project, "t", destination="nowhere")
    dbt_project.dbt("run")
    result = audsync(dbt_project, "run", "t", expect=2)
    assert "'nowhere'" in result.stderr and "hook" in result.stderr


def test_select_by_tag_and_due_schedules(dbt_project, one_hook):
    fake, rows = one_hook
    write_sync(dbt_project, "daily_sync", destination="hook", schedule="daily", tags=["nightly"])
    write_sync(dbt_project, "manual_sync", destination="hook", tags=["nightly"])
    dbt_project.dbt("run")
    due = audsync(dbt_project, "run", "--due")
    assert "daily_sync" in due.stdout and "manual_sync" not in due.stdout and " s " not in due.stdout
    assert run_rows(dbt_project, "daily_sync")[-1]["trigger"] == "schedule"
    assert "no sync is due" in audsync(dbt_project, "run", "--due").output  # ran a moment ago
    tagged = audsync(dbt_project, "run", "--select", "tag:nightly")
    assert "daily_sync" in tagged.stdout and "manual_sync" in tagged.stdout
    audsync(dbt_project, "run", "--select", "tag:nothing", expect=2)


def run_in_pty(project, *args: str, env=None, timeout_s: float = 120) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdout and stderr; return (exit code, output)."""
    import os
    import pty
    import select
    import subprocess
    import sys

    leader, follower = pty.openpty()
    argv = [sys.executable, "-m", "audsync.cli", "--project-dir", str(project.root),
            "--profiles-dir", str(project.root), *args]
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower,
                               env={**os.environ, "COLUMNS": "120", **(env or {})}, close_fds=True)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    os.close(leader)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_a_progress_bar_on_a_terminal_and_none_in_a_pipe(dbt_project):
    fake = FakeWebhook(secret="progress-secret", latency_s=0.05).start()
    try:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url, "secret": "progress-secret",
                                                  "batch_size": 5, "max_concurrency": 1}})
        write_audience(dbt_project, [(f"p{i:03d}@example.com", "n", 1.0) for i in range(60)])
        dbt_project.dbt("run")
        code, output = run_in_pty(dbt_project, "run", "s")
        assert code == 0, output
        assert "rows/s" in output and "60/60" in output  # the bar: rows sent of planned, rate
        assert "audsync run summary" in output
        # Not a terminal: no bar, only the summary.
        audsync(dbt_project, "reset", "s", "--yes")
        piped = audsync_process(dbt_project, "run", "s")
        out, err = piped.communicate(timeout=120)
        assert piped.returncode == 0, out + err
        assert "rows/s" in out  # the summary's column header
        assert "/60" not in out + err and "\r" not in err
    finally:
        fake.stop()


def test_the_planner_knows_the_snapshot_after_a_commit(dbt_project, one_hook, warehouse):
    """On PostgreSQL a commit refreshes the snapshot's statistics: left to autovacuum, the next
    run's freeze was planned as if the snapshot were empty (nested loops over every member)."""
    audsync(dbt_project, "run", "s")
    if warehouse == "postgres":
        reltuples = dbt_project.query("select reltuples from pg_class where relname = %s", ["s__snapshot"])
        assert reltuples == [(20.0,)]
    else:  # DuckDB keeps exact counts itself; the snapshot simply holds the members.
        assert dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__snapshot')}") == [(20,)]


def test_duckdb_steps_that_run_out_of_memory_are_retried_with_more(tmp_path, monkeypatch):
    """DuckDB runs inside the runner with a small memory limit; a step that exceeds it (here a
    4 MB limit and 200k members) is rolled back and retried with four times as much."""
    from tests.support.dbt_project import DbtProject

    project = DbtProject(tmp_path / "proj", "duckdb")
    project.execute(
        f"create table {project.relation('audience_src')} as select 'm' || range || '@example.com' as email,"
        " 'n' || (range % 100) as first_name, (range % 97) * 1.5 as ltv from range(200000)"
    )
    with FakeWebhook(secret="memory-secret") as fake:
        write_sync(project, "s", mode="mirror", destination="hook")
        write_destinations(project, {"hook": {"type": "webhook", "url": fake.url, "secret": "memory-secret"}})
        project.dbt("run")
        monkeypatch.setenv("AUDSYNC_DUCKDB_MEMORY_LIMIT", "4MB")
        result = audsync(project, "run", "s")
        assert "ran out of its 4MB memory limit; retrying the step with 16 MB" in result.stderr
        assert run_rows(project, "s")[-1]["rows_added"] == 200000
        assert len(fake.members) == 200000


@pytest.mark.slow
@pytest.mark.ci
def test_a_dbt_run_between_freeze_and_commit_leaves_the_diff_exact(dbt_project, monkeypatch):
    """The diff views compare S and the snapshot only over S__candidates. A run killed after
    delivering new values, then a `dbt run` that puts the old values back, then the recovery
    that commits the delivered values: the keys it commits must be candidates again, or the
    destination would keep values the audience no longer has."""
    fake = FakeWebhook(secret="race-secret").start()
    try:
        original = one_by_one_sync(dbt_project, fake)
        audsync(dbt_project, "run", "s")
        assert {k: m["ltv"] for k, m in fake.members.items()} == {r[0]: r[2] for r in original}

        # Every member changes; the run is killed part-way through sending the new values.
        write_audience(dbt_project, [(k, n, ltv + 1000) for k, n, ltv in original])
        dbt_project.dbt("run")
        fake.latency_s = 0.15
        killed_id = kill_mid_delivery(dbt_project, fake)["run_id"]
        changed = {k for k, m in fake.members.items() if m["ltv"] >= 1000}
        assert 0 < len(changed) < 120

        # The audience goes back: S now equals the snapshot, which still holds the old values.
        write_audience(dbt_project, original)
        dbt_project.dbt("run")
        assert dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__changes')}") == [(0,)]

        # Recovery commits what the killed run delivered; those keys now differ from S again.
        fake.latency_s = 0
        monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
        time.sleep(2.2)
        audsync(dbt_project, "run", "s")
        history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
        recovered = history[killed_id]["rows_updated"]
        new = run_rows(dbt_project, "s")[-1]
        assert recovered > 0
        assert (new["status"], new["planned_updates"]) == ("success", recovered)
        # Batches answered after the last flush before the kill, and the one in flight, were
        # never learnt as delivered: recovery wrote them as unknown outcomes, so the new run
        # sent them again as adds with S's values, and no member keeps a new value.
        [(unknown,)] = dbt_project.query(
            f"select rows_unknown from {dbt_project.relation(names.RUNS_TABLE, schema=dbt_project.schema + '_audsync')}"
            " where run_id = %s", [killed_id])
        assert unknown > 0 and new["planned_adds"] == unknown
        still_new = {k for k, m in fake.members.items() if m["ltv"] >= 1000}
        assert still_new == set()
        assert dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__changes')}") == [(0,)]
    finally:
        fake.stop()


def runner_of(dbt_project):
    """The project as the runner loads it, and a runner on its warehouse (no destinations)."""
    from audsync.project import Project
    from audsync.runner import SyncRunner

    project = Project.load(dbt_project.root, dbt_project.root)
    return project, SyncRunner(project, project.open_warehouse(), {})


def sync_tables(dbt_project, name: str = "s"):
    """The runner's own view of sync ``name`` (its tables, resolved) and its warehouse."""
    project, runner = runner_of(dbt_project)
    return runner.check_ready(project.get(name)), runner.warehouse


@pytest.mark.parametrize("rebuilt", [False, True], ids=["same-S", "S-rebuilt"])
def test_a_commit_checks_its_keys_against_s_only_after_a_dbt_run(dbt_project, rebuilt):
    """The freeze marks S__candidates; a `dbt run` that rebuilds S clears the mark, and only
    then does the commit check the keys it writes against S. Without the check the diff
    would miss a rebuild that puts old values back; with it always, a commit of 10M keys
    joins them with S for nothing."""
    from audsync.state import utcnow

    fake = FakeWebhook(secret="mark-secret").start()
    tables, warehouse = None, None
    try:
        original = one_by_one_sync(dbt_project, fake)
        audsync(dbt_project, "run", "s")
        write_audience(dbt_project, [(k, n, ltv + 1000) for k, n, ltv in original])
        dbt_project.dbt("run")
        tables, warehouse = sync_tables(dbt_project)
        marks = f"select count(*) from {dbt_project.relation('s', '__candidates')} where {names.KEY} is null"
        changes = f"select {names.OP}, count(*) from {dbt_project.relation('s', '__changes')} group by 1"

        with warehouse.session() as session:
            assert tables.freeze(session, "run-mark").updates == 120
        assert dbt_project.query(marks) == [(1,)]
        if rebuilt:
            # The audience goes back to the values the snapshot holds, while the plan is out.
            write_audience(dbt_project, original)
            dbt_project.dbt("run")
            assert dbt_project.query(marks) == [(0,)]
            assert dbt_project.query(changes) == []
        with warehouse.session() as session:
            tables.commit(session, "run-mark", utcnow(), every_batch_answered=True)

        assert dbt_project.query(marks) == [(0,)]
        # The snapshot now holds the new values: S differs from it again only if it was rebuilt.
        assert dbt_project.query(changes) == ([("update", 120)] if rebuilt else [])
    finally:
        fake.stop()
        if warehouse is not None:
            warehouse.close()


def test_a_full_resync_in_upsert_mode_keeps_the_members_that_left(dbt_project):
    """A full resync plans every member of S, not only the candidates: here the plan (a, c)
    is as large as the candidates (b, c), and the commit must still keep b, which left S but
    which upsert mode never removes."""
    fake = FakeWebhook(secret="resync-secret").start()
    try:
        write_sync(dbt_project, "s", mode="upsert", destination="hook")
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url, "secret": "resync-secret"}})
        write_audience(dbt_project, [("a@example.com", "A", 1.0), ("b@example.com", "B", 2.0)])
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        write_audience(dbt_project, [("a@example.com", "A", 1.0), ("c@example.com", "C", 3.0)])
        dbt_project.dbt("run")
        candidates = f"select {names.KEY} from {dbt_project.relation('s', '__candidates')} order by 1"
        assert dbt_project.query(candidates) == [("b@example.com",), ("c@example.com",)]

        audsync(dbt_project, "run", "s", "--full-resync")
        assert run_rows(dbt_project, "s")[-1]["rows_added"] == 2
        assert dbt_project.query(candidates) == [("b@example.com",)]
        removes = f"select {names.KEY} from {dbt_project.relation('s', '__removes')}"
        assert dbt_project.query(removes) == [("b@example.com",)]
    finally:
        fake.stop()


def test_the_plan_is_numbered_one_to_n_on_each_warehouse(dbt_project):
    """Reads and batch ids rely on a plan numbered 1..N: DuckDB numbers it with a temporary
    sequence (a window would hold every row), PostgreSQL with row_number()."""
    write_audience(dbt_project, [(f"n{i}@example.com", "n", float(i)) for i in range(2500)])
    warehouse = runner_of(dbt_project)[1].warehouse
    numbered = dbt_project.relation("numbered")
    try:
        with warehouse.session() as session:
            session.execute(f"create table {numbered} (seq bigint, email varchar(100))")
            for _ in range(2):  # twice in one session: the sequence starts again at 1
                with warehouse.row_numbers(session) as row_number:
                    session.execute(f"insert into {numbered} select {row_number}, email"
                                    f" from {dbt_project.relation('audience_src')}")
        assert dbt_project.query(
            f"select count(*), count(distinct seq), min(seq), max(seq), count(distinct email) from {numbered}"
        ) == [(5000, 2500, 1, 2500, 2500)]
        assert dbt_project.query(f"select count(distinct email) from {numbered} group by seq having count(*) <> 2") == []
    finally:
        warehouse.close()


def test_answered_batches_are_written_every_so_many_rows_so_held_changes_stay_bounded(dbt_project, monkeypatch):
    """Until answered batches are written, the run keeps their changes (for unknown marks if
    it loses its lock). They are written once a second, and sooner once FLUSH_EVERY_ROWS rows
    were answered: at 500k rows/s, a second of changes held 350 MB. With the second made an
    hour, the rows held at each request stay within FLUSH_EVERY_ROWS plus the requests in
    flight, and the run is exact."""
    from audsync import runner

    monkeypatch.setattr(runner, "FLUSH_EVERY_S", 3600.0)
    monkeypatch.setattr(runner, "FLUSH_EVERY_ROWS", 20)
    held: list[int] = []
    started = runner._InFlight.started

    def counting(self, batch):
        started(self, batch)
        held.append(sum(len(b) for b in self._unrecorded.values()))

    monkeypatch.setattr(runner._InFlight, "started", counting)
    fake = FakeWebhook(secret="bounded-secret").start()
    try:
        rows = one_by_one_sync(dbt_project, fake)  # 120 members, batches of 5, one at a time
        audsync(dbt_project, "run", "s")
        assert len(held) == 24
        assert max(held) <= 20 + 5, held
        assert set(fake.members) == {r[0] for r in rows}
        assert run_rows(dbt_project, "s")[-1]["rows_added"] == 120
    finally:
        fake.stop()
