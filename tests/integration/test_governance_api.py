"""Governance through ``audsync serve`` (api.md, governance.md): the audience sync's
``split_group_id`` is read from and written to the sync's ``split_group`` config, and checked
against ``vars.audsync_splits`` (422 naming the field); a trigger runs the guardrails as the CLI
does: a run that removes too much is ``blocked`` with its numbers and sends nothing, and
``{"force": true}`` sends it once and is recorded ``forced``."""

from __future__ import annotations

import uuid

import pytest

from audsync import names
from audsync.governance.splits import group_of
from tests.fakes.webhook_server import FakeWebhook
from tests.integration.test_serve import _query
from tests.support.dbt_project import DbtProject
from tests.support.service import ServiceProcess
from tests.support.syncs import write_audience, write_destinations

pytestmark = pytest.mark.slow

TOKEN = "gov-token-0123456789"
SALT = "gov-api-salt"
GROUPS = [("treatment", 50), ("holdout", 50)]
ROWS = [(f"m{i}@example.com", f"n{i}", float(i)) for i in range(40)]
MAPPING = [{"source_column": "email", "destination_field": "email"}]


def _split_group_id(workspace: str, group: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:split_group:{workspace}:{group}"))


@pytest.fixture
def project(tmp_path):
    project = DbtProject(tmp_path / "gov", "duckdb", name="gov", vars={
        "audsync_splits": {"exp": {"salt": SALT, "groups": [{"name": n, "percent": p} for n, p in GROUPS]}},
        "audsync_guardrails": {"guard_min_rows": 5},
    })
    # A view, so that the sync's own `dbt run --select <sync>` (each trigger) sees a changed source.
    project.write_model("members", "{{ config(materialized='view') }}\n"
                                   f"select email, first_name, ltv from {project.relation('audience_src')}")
    write_audience(project, ROWS)
    project.dbt("run")
    return project


def _runs_forced(project, sync: str) -> dict[str, object]:
    relation = project.relation(names.RUNS_TABLE, schema=project.schema + "_audsync")
    return dict(_query(project, f"select run_id, forced from {relation} where sync_name = %s", [sync]))


@pytest.mark.ci  # the only end-to-end proof of the API's force and split_group_id
def test_split_group_id_is_read_written_and_checked_and_a_forced_trigger_sends(project):
    workspace = str(uuid.uuid5(uuid.NAMESPACE_URL, "audsync:workspace:gov:duckdb"))
    prefix = f"/api/v1/workspaces/{workspace}"
    treatment, holdout = (_split_group_id(workspace, f"exp.{g}") for g in ("treatment", "holdout"))
    with FakeWebhook() as hook:
        write_destinations(project, {"hook": {"type": "webhook", "url": hook.url}})
        with ServiceProcess(project, "--no-scheduler", env={"AUDSYNC_API_TOKEN": TOKEN}) as service:
            def call(method, path, body=None):
                return service.call(method, prefix + path, TOKEN, json=body)

            body = {"name": "Split hook", "audience_id": "members", "destination_id": "hook", "field_mapping": MAPPING}
            folder = project.root / "models" / "audsync_api"

            # An unknown group, or an unknown split: 422 naming the field, and no file stays.
            for bad in ("exp.control", "nope.treatment", str(uuid.uuid4())):
                answer = call("POST", "/audience-syncs", {**body, "split_group_id": bad})
                assert answer.status_code == 422, answer.text
                error = answer.json()["error"]
                assert error["field"] == "split_group_id" and repr(bad) in error["message"], error
                assert "exp.treatment, exp.holdout" in error["message"], error
            assert not list(folder.glob("split_hook*"))

            # Created with the group's name: the model file declares it, the object gives its id.
            created = call("POST", "/audience-syncs", {**body, "split_group_id": "exp.treatment"})
            assert created.status_code == 201, created.text
            sync = created.json()
            assert sync["split_group_id"] == treatment
            assert "split_group   = 'exp.treatment'" in (folder / "split_hook.sql").read_text()
            assert call("GET", f"/audience-syncs/{sync['id']}").json()["split_group_id"] == treatment

            # The written config is what runs: the destination gets the treatment group only.
            run = call("POST", f"/audience-syncs/{sync['id']}/trigger").json()
            run = service.wait_run(prefix, sync["id"], run["id"], TOKEN)
            expected = {r[0] for r in ROWS if group_of(SALT, r[0], GROUPS) == "treatment"}
            assert 0 < len(expected) < len(ROWS)
            assert set(hook.members) == expected and run["rows_added"] == len(expected)

            # PUT by id moves it to the other group; a bad one is refused and changes nothing.
            moved = call("PUT", f"/audience-syncs/{sync['id']}", {"split_group_id": holdout})
            assert moved.status_code == 200 and moved.json()["split_group_id"] == holdout, moved.text
            assert "split_group   = 'exp.holdout'" in (folder / "split_hook.sql").read_text()
            refused = call("PUT", f"/audience-syncs/{sync['id']}", {"split_group_id": "exp.nobody"})
            assert refused.status_code == 422 and refused.json()["error"]["field"] == "split_group_id"
            assert call("GET", f"/audience-syncs/{sync['id']}").json()["split_group_id"] == holdout
            # null clears it: the sync sends its whole audience again.
            cleared = call("PUT", f"/audience-syncs/{sync['id']}", {"split_group_id": None})
            assert cleared.status_code == 200 and cleared.json()["split_group_id"] is None, cleared.text
            assert "split_group" not in (folder / "split_hook.sql").read_text()
            hook.members.clear()
            run = call("POST", f"/audience-syncs/{sync['id']}/trigger").json()
            run = service.wait_run(prefix, sync["id"], run["id"], TOKEN)
            # Mirror mode after the switch: the members not yet sent are added.
            assert set(hook.members) == {r[0] for r in ROWS} - expected

            # A guarded sync loses 75% of its audience: the trigger is blocked, with its numbers.
            guarded = call("POST", "/audience-syncs", {**body, "name": "Guarded"}).json()
            run = call("POST", f"/audience-syncs/{guarded['id']}/trigger").json()
            service.wait_run(prefix, guarded["id"], run["id"], TOKEN)
            write_audience(project, ROWS[:10])
            requests_before = hook.requests
            run = call("POST", f"/audience-syncs/{guarded['id']}/trigger").json()
            blocked = service.wait_run(prefix, guarded["id"], run["id"], TOKEN, until=("blocked",))
            assert blocked["planned_removes"] == 30 and blocked["planned_adds"] == 0, blocked
            assert "remove 30 of the 40 members the destination holds (75.0%)" in blocked["error_message"]
            assert blocked["rows_removed"] in (None, 0) and hook.requests == requests_before

            # {"force": true} sends it, once, and the run is recorded forced.
            run = call("POST", f"/audience-syncs/{guarded['id']}/trigger", {"force": True})
            assert run.status_code == 201, run.text
            forced = service.wait_run(prefix, guarded["id"], run.json()["id"], TOKEN)
            assert forced["rows_removed"] == 30 and forced["trigger"] == "api"
            assert hook.requests > requests_before
            assert set(forced) == set(blocked)  # the seed's run shape, unchanged
            flags = _runs_forced(project, "guarded")
            assert flags[forced["id"]] is True and not flags[blocked["id"]]
