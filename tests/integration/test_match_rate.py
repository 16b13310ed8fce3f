"""Through the real CLI against the fake Meta API: rows Meta reports as invalid entries are
counted as unmatched, the run's ``match_rate`` is (accepted - unmatched) / sent in
``audsync_runs`` and in ``audsync runs``; a list created on the first run is recorded in the
sync's ``destination_state`` and reused, and each upload session is closed with
``last_batch_flag``."""

from __future__ import annotations

import json

import pytest

from audsync import names
from tests.fakes.facebook import FakeFacebook
from tests.support.syncs import audsync, write_audience, write_destinations, write_sync


def state_of(project, sync: str):
    relation = project.relation(names.SYNCS_TABLE, schema=project.schema + "_audsync")
    (row,) = project.query(f"select destination_state from {relation} where sync_name = %s", [sync])
    return json.loads(row[0]) if row[0] else {}


def match_rates(project, sync: str) -> list:
    relation = project.relation(names.RUNS_TABLE, schema=project.schema + "_audsync")
    rows = project.query(
        f"select rows_unmatched, match_rate from {relation} where sync_name = %s order by started_at", [sync]
    )
    return [(r[0], None if r[1] is None else round(float(r[1]), 4)) for r in rows]


@pytest.mark.slow
def test_match_rate_and_a_created_audience_through_the_cli(dbt_project_factory):
    project = dbt_project_factory()
    with FakeFacebook() as fake:
        write_destinations(project, {"meta": fake.destination_config(audience_id=None, create_if_missing=True)})
        write_sync(project, "mr", destination="meta", mapping=fake.field_mapping())
        rows = [(f"m{i}@example.com", "Ann", float(i)) for i in range(5)]
        write_audience(project, rows)
        project.dbt("run")
        fake.reject_keys(["m1@example.com", "m3@example.com"])
        audsync(project, "run", "--select", "mr")
        assert match_rates(project, "mr") == [(2, 0.6)]
        assert "60%" in audsync(project, "runs", "mr").output
        audience = state_of(project, "mr")["audience_id"]
        assert fake.audience_ids().count(audience) == 1 and len(fake.created) == 1
        assert len(fake.closed_sessions) == 1 and fake.violations == []
        # The next run reuses the audience; nothing to send: no rate.
        audsync(project, "run", "--select", "mr")
        assert len(fake.created) == 1
        assert match_rates(project, "mr")[-1] == (0, None)
