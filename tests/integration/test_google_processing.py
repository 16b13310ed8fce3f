"""Google's asynchronous processing errors through the real CLI: the runner asks the connector
for late row errors after delivery and before the commit; those rows fail with Google's reason
(``audsync_row_errors``, ``rows_failed``) and are planned again by the next run."""

from __future__ import annotations

import pytest

from audsync import names
from tests.fakes.google import FakeGoogle
from tests.support.dbt_project import DbtProject
from tests.support.syncs import audsync, run_rows, write_audience, write_destinations, write_sync


@pytest.mark.slow
def test_processing_errors_fail_their_rows_and_are_planned_again(tmp_path):
    project = DbtProject(tmp_path / "proj", "duckdb")
    with FakeGoogle() as fake:
        write_destinations(project, {"g": fake.destination_config(batch_size=2)})
        write_sync(project, "gp", destination="g", mapping=fake.field_mapping())
        write_audience(project, [("nc@example.com", "N", 1.0), ("x@example.com", "X", 2.0),
                                 ("y@example.com", "Y", 3.0), ("z@example.com", "Z", 4.0)])
        project.dbt("run")
        fake.fail_processing(["nc@example.com", "x@example.com"])  # one request of two, whole
        audsync(project, "run", "--select", "gp", expect=3)
        run = run_rows(project, "gp")[-1]
        assert run["status"] == "partial_failure" and run["rows_failed"] == 2
        errors = project.query(
            f"select member_key, error_code from {project.relation(names.ROW_ERRORS_TABLE, schema=project.schema + '_audsync')}"
            " order by member_key"
        )
        assert [tuple(e) for e in errors] == [("nc@example.com", "google_no_consent"),
                                               ("x@example.com", "google_no_consent")]
        # Consent given since: the next run plans the two again and they land.
        with fake._lock:
            fake._processing_failures.clear()
        audsync(project, "run", "--select", "gp")
        last = run_rows(project, "gp")[-1]
        assert last["status"] == "success" and last["planned_adds"] == 2
        assert set(fake.members(["nc@example.com", "x@example.com", "y@example.com", "z@example.com"])) == {
            "nc@example.com", "x@example.com", "y@example.com", "z@example.com"}
