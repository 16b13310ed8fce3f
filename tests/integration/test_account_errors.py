"""Account-level refusals stop the run, through the real CLI: Meta 2655 and 100/1713230,
Google's ADVERTISER_TOS_NOT_ACCEPTED and DESTINATION_ACCOUNT_TYPE_MISMATCH.

The run ends ``error``, the sync's status becomes ``error`` with the vendor's message, no row
is recorded as failed (the rows are planned again), and the next successful run clears the
status and sends them.
"""

from __future__ import annotations

import pytest

from audsync import names
from tests.fakes.facebook import FakeFacebook
from tests.fakes.google import FakeGoogle
from tests.support.dbt_project import DbtProject
from tests.support.syncs import audsync, run_rows, write_audience, write_destinations, write_sync

CASES = [
    (FakeFacebook, "terms_not_accepted", {}, "Terms of service has not been accepted"),
    (FakeFacebook, "upload_blocked", {}, "1713230"),
    (FakeGoogle, "account_error", {"reason": "ADVERTISER_TOS_NOT_ACCEPTED"}, "ADVERTISER_TOS_NOT_ACCEPTED"),
    (FakeGoogle, "account_error", {"reason": "DESTINATION_ACCOUNT_TYPE_MISMATCH"},
     "DESTINATION_ACCOUNT_TYPE_MISMATCH"),
]


def sync_status(project, sync: str) -> tuple[str, str | None]:
    relation = project.relation(names.SYNCS_TABLE, schema=project.schema + "_audsync")
    (row,) = project.query(f"select status, status_error from {relation} where sync_name = %s", [sync])
    return row[0], row[1]


@pytest.mark.slow
@pytest.mark.parametrize("fake_class,kind,options,expected", CASES,
                         ids=[f"{c[0].__name__}-{c[2].get('reason', c[1])}" for c in CASES])
def test_account_error_stops_the_run_and_the_next_run_clears_it(tmp_path, fake_class, kind, options, expected):
    project = DbtProject(tmp_path / "proj", "duckdb")
    with fake_class() as fake:
        write_destinations(project, {"dest": fake.destination_config()})
        write_sync(project, "acct", destination="dest", mapping=fake.field_mapping())
        rows = [(f"a{i}@example.com", "Ann", float(i)) for i in range(5)]
        write_audience(project, rows)
        project.dbt("run")
        fake.fail_next(kind, n=50, **options)
        result = audsync(project, "run", "--select", "acct", expect=None)
        assert result.code != 0
        run = run_rows(project, "acct")[-1]
        assert run["status"] == "error"
        assert expected in (run["error_message"] or "")
        assert run["rows_failed"] in (0, None)  # the rows are not failed one by one
        status, error = sync_status(project, "acct")
        assert status == "error" and expected in (error or "")
        assert fake.members([r[0] for r in rows]) == {}

        fake.reset()
        audsync(project, "run", "--select", "acct")
        assert run_rows(project, "acct")[-1]["status"] == "success"
        assert sync_status(project, "acct") == ("active", None)
        assert set(fake.members([r[0] for r in rows])) == {r[0] for r in rows}
        assert fake.violations == []
