"""The edges of a run (issue 10): a dead destination, the file destination under kill -9,
manifest freshness and per-sync config isolation. Real dbt, a real warehouse, the CLI."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.fakes.webhook_server import FakeWebhook
from tests.integration.test_runner import wait_for
from tests.support.syncs import (
    audsync,
    audsync_process,
    run_rows,
    state_rows,
    write_audience,
    write_destinations,
    write_sync,
)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/hook"


# -- point 8: a dead destination ends the run in seconds, with one error ----------------------


@pytest.mark.slow  # the dbt run; the audsync run itself takes about a second
@pytest.mark.ci(warehouses=["duckdb"])
def test_a_run_against_a_closed_port_ends_in_seconds_as_destination_unreachable(dbt_project):
    write_sync(dbt_project, "s", mode="mirror", destination="hook")
    # 79 batches, as in the report.
    write_destinations(dbt_project, {"hook": {"type": "webhook", "url": closed_port_url(),
                                              "batch_size": 5, "max_concurrency": 4}})
    write_audience(dbt_project, [(f"k{i:03d}@example.com", "n", float(i)) for i in range(395)])
    dbt_project.dbt("run")
    started = time.monotonic()
    result = audsync(dbt_project, "run", "s", expect=1)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"the run took {elapsed:.1f}s"
    [run] = run_rows(dbt_project, "s")
    assert run["status"] == "error"
    assert run["error_message"].startswith("destination unreachable: 'hook': POST http://127.0.0.1:")
    assert "connection_error" in run["error_message"]
    assert "destination unreachable" in result.output
    assert run["rows_added"] == 0
    # One error for the run, not one per member.
    assert state_rows(dbt_project, "audsync_row_errors") == []
    # Nothing was committed as delivered (batches on the wire when the breaker opened are
    # unknown outcomes, a null hash), and the next run plans every member again.
    snapshot = dbt_project.query(
        f"select count(*) from {dbt_project.relation('s', '__snapshot')} where _audsync_hash is not null")
    assert snapshot == [(0,)]
    changes = dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__changes')}")
    assert changes == [(395,)]


# -- point 6: the file destination under kill -9 ------------------------------------------------


def published_keys(folder, run_id: str) -> set[str]:
    """Keys in the files a reader picks up (names not starting with a dot) of one run."""
    import orjson

    keys: set[str] = set()
    for path in folder.glob(f"s__{run_id}__*.jsonl"):
        keys.update(orjson.loads(line)["key"] for line in path.read_bytes().splitlines())
    return keys


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_a_file_run_killed_mid_write_never_commits_rows_a_reader_cannot_see(dbt_project, monkeypatch):
    folder = dbt_project.root / "out"
    write_sync(dbt_project, "s", mode="mirror", destination="files")
    # Small batches, one thread: thousands of fsynced files, so the kill lands mid-run. On an
    # idle machine PostgreSQL's runner publishes 1,000 such files in about a second, so the
    # run must be several times longer than the wait before the kill.
    write_destinations(dbt_project, {"files": {"type": "file", "path": "out", "batch_size": 4,
                                               "max_concurrency": 1}})
    rows = [(f"k{i:05d}@example.com", "n", float(i)) for i in range(40_000)]
    write_audience(dbt_project, rows)
    dbt_project.dbt("run")

    process = audsync_process(dbt_project, "run", "s", env={"AUDSYNC_LOCK_TIMEOUT_S": "2"})
    wait_for(lambda: len(list(folder.glob("s__*.jsonl"))) >= 20, what="twenty files published")
    # At least one flush of answered batches has happened: the runner flushes about once a
    # second while batches are answered, and a loaded machine slows the flush itself (the
    # test cannot look: the runner's process holds the DuckDB file).
    time.sleep(2.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    [killed] = run_rows(dbt_project, "s")
    assert killed["status"] == "running"
    visible = published_keys(folder, killed["run_id"])
    assert 0 < len(visible) < len(rows), "the kill did not land mid-run"

    monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
    time.sleep(2.2)  # the killed run's heartbeat is now stale
    audsync(dbt_project, "run", "s")
    history = {r["run_id"]: r for r in run_rows(dbt_project, "s")}
    assert history[killed["run_id"]]["status"] == "aborted"
    recovered = history[killed["run_id"]]["rows_added"]
    assert recovered > 0
    # What the recovery committed for the killed run is in files a reader can see.
    committed = {k for (k,) in dbt_project.query(
        f"select _audsync_key from {dbt_project.relation('s', '__snapshot')} where _audsync_run_id = %s",
        [killed["run_id"]])}
    assert committed and committed <= visible
    # Every member is in some published file, and no temporary file is left.
    everything = set().union(*(published_keys(folder, run_id) for run_id in history))
    assert everything == {r[0] for r in rows}
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


# -- point 12: manifest freshness and per-sync isolation ----------------------------------------


def listed(dbt_project) -> set[str]:
    import json

    return {row["sync"] for row in json.loads(audsync(dbt_project, "list", "--format", "json").stdout)}


@pytest.mark.slow  # four dbt parses
def test_adding_deleting_or_renaming_a_model_file_refreshes_the_manifest(dbt_project):
    import os

    write_destinations(dbt_project, {"hook": {"type": "webhook", "url": closed_port_url()}})
    write_audience(dbt_project, [("a@example.com", "n", 1.0)])
    write_sync(dbt_project, "a")
    write_sync(dbt_project, "b")
    dbt_project.dbt("run")
    assert listed(dbt_project) == {"a", "b"}
    models = dbt_project.root / "models"
    [b_file] = models.rglob("b.sql")
    [a_file] = models.rglob("a.sql")
    past = a_file.stat().st_mtime - 3600  # no file is newer than the manifest
    # Deleted.
    b_file.unlink()
    assert listed(dbt_project) == {"a"}
    # Renamed (a rename keeps the file's old mtime).
    os.utime(a_file, (past, past))
    a_file.rename(a_file.with_name("c.sql"))
    assert listed(dbt_project) == {"c"}
    # Added with an old mtime (copied with its times kept).
    b_file.write_text(a_file.with_name("c.sql").read_text())
    os.utime(b_file, (past, past))
    assert listed(dbt_project) == {"b", "c"}
    # Nothing changed: the manifest is fresh and is not parsed again.
    manifest = dbt_project.root / "target" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert listed(dbt_project) == {"b", "c"}
    assert manifest.stat().st_mtime_ns == before


@pytest.mark.slow  # a dbt run and several commands
def test_an_invalid_sync_fails_its_own_commands_and_check_not_the_others(dbt_project):
    fake = FakeWebhook().start()
    try:
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url}})
        write_audience(dbt_project, [("a@example.com", "n", 1.0), ("b@example.com", "m", 2.0)])
        write_sync(dbt_project, "other")
        write_sync(dbt_project, "bad", mode="sideways")
        dbt_project.dbt("run", "--exclude", "bad")
        audsync(dbt_project, "run", "other")
        assert set(fake.members) == {"a@example.com", "b@example.com"}
        assert "success" in audsync(dbt_project, "runs", "other").output
        assert listed(dbt_project) == {"other"}
        for args in (("run", "bad"), ("runs", "bad"), ("plan", "bad"), ("check",), ("run", "--select", "b*")):
            failed = audsync(dbt_project, *args, expect=2)
            assert "sync 'bad'" in failed.output and "sideways" in failed.output, args
    finally:
        fake.stop()


@pytest.mark.slow  # the dbt run
def test_a_retry_after_wait_shows_in_the_progress_output(dbt_project):
    import json

    fake = FakeWebhook().start()
    try:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url}})
        write_audience(dbt_project, [("a@example.com", "n", 1.0)])
        dbt_project.dbt("run")
        fake.fail_next(1, 429, retry_after=1)
        result = audsync(dbt_project, "--log-format", "json", "run", "s")
        events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        [waiting] = [e for e in events if e.get("event") == "waiting"]
        assert waiting["sync"] == "s" and waiting["seconds"] == 1
        assert "429" in waiting["reason"] and "Retry-After" in waiting["reason"]
        assert set(fake.members) == {"a@example.com"}
    finally:
        fake.stop()
