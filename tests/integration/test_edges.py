"""The edges of a run (issue 10): a dead destination, the file destination under kill -9,
manifest freshness and per-sync config isolation. Real dbt, a real warehouse, the CLI."""

from __future__ import annotations

import socket
import time

from tests.support.syncs import (
    audsync,
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
    assert elapsed < 20, f"the run took {elapsed:.1f}s"
    [run] = run_rows(dbt_project, "s")
    assert run["status"] == "error"
    assert run["error_message"].startswith("destination unreachable: 'hook': POST http://127.0.0.1:")
    assert "connection_error" in run["error_message"]
    assert "destination unreachable" in result.output
    assert run["rows_added"] == 0
    # One error for the run, not one per member.
    assert state_rows(dbt_project, "audsync_row_errors") == []
    # Nothing was committed: the next run plans every member again.
    snapshot = dbt_project.query(f"select count(*) from {dbt_project.relation('s', '__snapshot')}")
    assert snapshot == [(0,)]
