"""``audsync serve`` for real (api.md): a subprocess on a loopback port, the example shop on a
real warehouse, a fake webhook that holds the destination's members.

One example project is built once for the module (one ``dbt build``); every test makes its own
syncs in it through the API. The service re-evaluates each triggered sync with
``dbt run --select <sync>`` in a child process, as in production.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fakes.webhook_server import FakeWebhook
from tests.support.dbt_project import DbtProject
from tests.support.service import ServiceProcess
from tests.support.syncs import audsync, audsync_process, valid_members

pytestmark = pytest.mark.slow

TOKEN_A = "shop-token-0123456789"
TOKEN_B = "other-token-9876543210"
HAND_WRITTEN = ("churn_risk_to_file", "high_value_to_webhook", "recent_buyers_to_file")


def _query(project: DbtProject, sql: str, params=None, attempts: int = 60):
    """A query that waits while the service holds the DuckDB file for a moment."""
    for attempt in range(attempts):
        try:
            return project.query(sql, params)
        except Exception as error:  # noqa: BLE001 - duckdb's lock error; anything else re-raised
            if "lock" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def _count(project: DbtProject, model: str) -> int:
    return _query(project, f"select count(*) from {project.relation(model)}")[0][0]


def _members(project: DbtProject, model: str, columns: str) -> dict:
    """The members a sync of ``model`` sends: keys (the first column) not null and not
    duplicated."""
    return valid_members(_query(project, f"select {columns} from {project.relation(model)}"))


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """The example shop on DuckDB, built, with its hand-written syncs paused (so that the
    scheduler leaves them alone while the tests use their own syncs)."""
    project = DbtProject.from_example("jaffle_audiences", tmp_path_factory.mktemp("serve") / "shop", "duckdb")
    project.dbt("build", "--vars", '{as_of_date: "2026-09-28"}')
    for name in HAND_WRITTEN:
        audsync(project, "pause", name)
    return project


def _workspaces_file(tmp_path: Path, shop: DbtProject, other: DbtProject) -> Path:
    path = tmp_path / "workspaces.yml"
    path.write_text(yaml.safe_dump({"workspaces": [
        {"name": "shop", "project_dir": str(shop.root), "profiles_dir": str(shop.root),
         "tokens": [{"name": "ci", "sha256": hashlib.sha256(TOKEN_A.encode()).hexdigest()}]},
        {"name": "other", "project_dir": str(other.root), "profiles_dir": str(other.root),
         "tokens": [{"name": "ops", "token": "{{ env_var('OTHER_TOKEN') }}"}]},
    ]}))
    return path


def _ws_id(name: str, target: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:workspace:{name}:{target}"))


@pytest.mark.ci
def test_the_api_creates_triggers_updates_schedules_pauses_and_deletes_syncs(shop, tmp_path):
    other = DbtProject(tmp_path / "other", "duckdb", name="other")
    workspaces = _workspaces_file(tmp_path, shop, other)
    ws_a, ws_b = _ws_id("jaffle_audiences", "duckdb"), _ws_id("other", "duckdb")
    a = f"/api/v1/workspaces/{ws_a}"
    with FakeWebhook(secret="demo-secret") as hook, ServiceProcess(
        shop, "--workspaces", str(workspaces), "--scheduler-tick", "1", "--workers", "2",
        env={"AUDSYNC_DEMO_WEBHOOK_URL": hook.url, "OTHER_TOKEN": TOKEN_B},
    ) as service:
        # The hand-written syncs are listed, managed by the project, and take only status changes.
        listing = service.call("GET", f"{a}/audience-syncs", TOKEN_A)
        assert listing.status_code == 200, listing.text
        by_slug = {s["slug"]: s for s in listing.json()}
        assert set(HAND_WRITTEN) <= set(by_slug)
        hand = by_slug["high_value_to_webhook"]
        assert hand["managed_by"] == "project" and hand["status"] == "paused" and hand["next_run_at"] is None
        assert hand["id"] == str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:sync:{ws_a}:high_value_to_webhook"))
        refused = service.call("PUT", f"{a}/audience-syncs/{hand['id']}", TOKEN_A, json={"schedule": "daily"})
        assert refused.status_code == 409 and "models/syncs/high_value_to_webhook.sql" in refused.json()["error"]["message"]

        # Create: a managed model file, parsed before the answer; names or ids for references.
        destinations = {d["name"]: d for d in service.call("GET", f"{a}/destinations", TOKEN_A).json()}
        assert destinations["demo_webhook"] == {"id": destinations["demo_webhook"]["id"], "name": "demo_webhook",
                                                "type": "webhook"}
        assert "secret" not in str(destinations) and "demo-secret" not in str(destinations)
        body = {"name": "VIP hook", "audience_id": "high_value_customers",
                "destination_id": destinations["demo_webhook"]["id"],
                "field_mapping": [{"source_column": "email", "destination_field": "email"},
                                  {"source_column": "lifetime_value", "destination_field": "ltv"}]}
        created = service.call("POST", f"{a}/audience-syncs", TOKEN_A, json=body)
        assert created.status_code == 201, created.text
        sync = created.json()
        sid = sync["id"]
        assert sync["slug"] == "vip_hook" and sync["managed_by"] == "api" and sync["status"] == "active"
        assert sync["created_by"] == "ci" and sync["destination_name"] == "demo_webhook"
        assert sid == str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:sync:{ws_a}:vip_hook"))
        model = shop.root / "models" / "audsync_api" / "vip_hook.sql"
        assert model.read_text().startswith("-- audsync:managed")
        assert service.call("GET", f"{a}/audience-syncs/{sid}", TOKEN_A).json() == sync

        # An invalid sync is refused naming the field, and leaves no file.
        bad = dict(body, name="Bad one", field_mapping=[{"source_column": "mail", "destination_field": "email"}])
        answer = service.call("POST", f"{a}/audience-syncs", TOKEN_A, json=bad)
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "field_mapping[0].source_column"
        assert "'mail'" in answer.json()["error"]["message"]
        assert not (shop.root / "models" / "audsync_api" / "bad_one.sql").exists()

        # Trigger: queued at once, a second trigger is refused naming the run, then success.
        triggered = service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A)
        assert triggered.status_code == 201 and triggered.json()["status"] == "queued", triggered.text
        run_id = triggered.json()["id"]
        again = service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A)
        assert again.status_code == 409 and again.json()["error"]["run_id"] == run_id
        run = service.wait_run(a, sid, run_id, TOKEN_A)
        expected = _members(shop, "high_value_customers", "email, lifetime_value")
        assert run["rows_added"] == len(expected) > 0 and run["trigger"] == "api"
        assert run["evaluated_at"] is not None and run["row_errors"] == [] and run["row_errors_total"] == 0
        assert set(hook.members) == set(expected)
        assert all(set(fields) == {"email", "ltv"} for fields in hook.members.values())
        runs = service.call("GET", f"{a}/audience-syncs/{sid}/runs?limit=5", TOKEN_A)
        assert runs.headers["X-Total-Count"] == "1" and runs.json()[0]["id"] == run_id

        # Update the mapping: the file is rewritten; the next run sends the new shape.
        mapping = [{"source_column": "email", "destination_field": "email"},
                   {"source_column": "lifetime_value", "destination_field": "Customer Value"}]
        updated = service.call("PUT", f"{a}/audience-syncs/{sid}", TOKEN_A,
                               json={"field_mapping": mapping, "description": "the best customers"})
        assert updated.status_code == 200, updated.text
        assert updated.json()["field_mapping"] == mapping and updated.json()["description"] == "the best customers"
        assert "Customer Value" in model.read_text()
        assert service.call("GET", f"{a}/audience-syncs/{sid}/runs", TOKEN_A).headers["X-Total-Count"] == "1"
        run = service.wait_run(a, sid, service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"], TOKEN_A)
        assert run["rows_updated"] == len(expected)
        assert all(set(fields) == {"email", "Customer Value"} for fields in hook.members.values())

        # Workspace B's token sees nothing of A: 404 on every endpoint, an empty list of its own.
        b = f"/api/v1/workspaces/{ws_b}"
        assert service.call("GET", f"{b}/audience-syncs", TOKEN_B).json() == []
        for method, path in (("GET", "/audience-syncs"), ("POST", "/audience-syncs"), ("GET", f"/audience-syncs/{sid}"),
                             ("PUT", f"/audience-syncs/{sid}"), ("DELETE", f"/audience-syncs/{sid}"),
                             ("POST", f"/audience-syncs/{sid}/trigger"), ("GET", f"/audience-syncs/{sid}/runs"),
                             ("GET", f"/audience-syncs/{sid}/runs/{run_id}"), ("GET", "/audiences"),
                             ("GET", "/destinations")):
            json_body = body if (method, path) == ("POST", "/audience-syncs") else ({} if method == "PUT" else None)
            crossed = service.call(method, a + path, TOKEN_B, json=json_body)
            assert crossed.status_code == 404, (method, path, crossed.text)
            assert crossed.json()["error"]["code"] == "not_found"
            short = service.call(method, "/api/v1" + path, TOKEN_B, json=json_body, headers={"X-Workspace-ID": ws_a})
            assert short.status_code == 404, (method, path, short.text)
            own = service.call(method, b + path, TOKEN_B, json=json_body)
            assert own.status_code in (200, 404, 422), (method, path, own.text)
            assert ws_a not in own.text and "vip_hook" not in own.text
        assert service.call("GET", f"{a}/audience-syncs", None).status_code == 401
        assert service.call("GET", f"{a}/audience-syncs", "wrong").status_code == 401
        # The short form with the seed's header; a contradicting header is 400.
        seed = service.call("GET", "/api/v1/audience-syncs", TOKEN_A, headers={"X-Workspace-ID": ws_a})
        assert seed.status_code == 200 and sid in {s["id"] for s in seed.json()}
        assert service.call("GET", f"{a}/audience-syncs", TOKEN_A, headers={"X-Workspace-ID": ws_b}).status_code == 400

        # Delete: the file, relations and state rows go; the destination keeps its members.
        held = dict(hook.members)
        deleted = service.call("DELETE", f"{a}/audience-syncs/{sid}", TOKEN_A)
        assert deleted.status_code == 200 and deleted.json() == {"status": "deleted"}
        assert not model.exists()
        assert not _query(shop, "select count(*) from information_schema.tables where table_name like 'vip_hook%'")[0][0]
        assert not _query(shop, "select count(*) from main_audsync.audsync_runs where sync_name = 'vip_hook'")[0][0]
        assert service.call("GET", f"{a}/audience-syncs/{sid}", TOKEN_A).status_code == 404
        assert hook.members == held

        # The scheduler: a minutely sync fires by itself (it never ran, so it is due).
        hook.reset()
        body = {"name": "Recent minutely", "audience_id": "recent_buyers", "destination_id": "demo_webhook",
                "schedule": "* * * * *", "sync_mode": "mirror",
                "field_mapping": [{"source_column": "email", "destination_field": "email"},
                                  {"source_column": "country", "destination_field": "country"}]}
        created = service.call("POST", f"{a}/audience-syncs", TOKEN_A, json=body)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        first = _wait_scheduled(service, a, sid, 1)
        service.wait_run(a, sid, first["id"], TOKEN_A)
        recent = _members(shop, "recent_buyers", "email")
        assert set(hook.members) == set(recent)

        # Paused: the scheduler skips it even once its slot has come round.
        paused = service.call("PUT", f"{a}/audience-syncs/{sid}", TOKEN_A, json={"status": "paused"})
        assert paused.status_code == 200 and paused.json()["next_run_at"] is None
        refused = service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "sync_paused"
        _query(shop, "update main_audsync.audsync_runs set started_at = started_at - interval 1 hour"
                     " where sync_name = 'recent_minutely'")
        time.sleep(3.5)
        assert service.call("GET", f"{a}/audience-syncs/{sid}/runs", TOKEN_A).headers["X-Total-Count"] == "1"

        # Resumed with everything to send again, it fires; a CLI run racing it is refused by
        # the lock, and the destination ends right.
        audsync(shop, "reset", "recent_minutely", "--yes")
        hook.delay_next(1, 12)
        resumed = service.call("PUT", f"{a}/audience-syncs/{sid}", TOKEN_A, json={"status": "active"})
        assert resumed.status_code == 200 and resumed.json()["next_run_at"] is not None
        second = _wait_scheduled(service, a, sid, 2, status="running")
        racer = audsync_process(shop, "run", "recent_minutely")
        out, err = racer.communicate(timeout=120)
        assert racer.returncode == 1 and f"locked by run {second['id']}" in out + err, out + err
        done = service.wait_run(a, sid, second["id"], TOKEN_A)
        assert done["trigger"] == "schedule" and done["rows_added"] == len(recent)
        assert set(hook.members) == set(recent) and hook.violations == []

        # CLI list and status show the same lifecycle and the next run.
        listed = {r["sync"]: r for r in _json(audsync(shop, "list", "--format", "json").stdout)}
        assert listed["recent_minutely"]["status"] == "active" and listed["recent_minutely"]["next_run_at"]
        assert listed["high_value_to_webhook"]["status"] == "paused" and listed["high_value_to_webhook"]["next_run_at"] is None
        assert "demo-secret" not in service.log and TOKEN_A not in service.log and TOKEN_B not in service.log
        openapi = service.call("GET", "/openapi.json").text
        assert TOKEN_A not in openapi and "demo-secret" not in openapi
        assert service.call("DELETE", f"{a}/audience-syncs/{sid}", TOKEN_A).status_code == 200
    assert service.process.returncode == 0, service.log[-3000:]


def _json(text: str):
    import json

    return json.loads(text)


def _wait_scheduled(service, prefix, sid, n, status=None, timeout_s=90.0):
    """Wait for the ``n``-th run of the sync, made by the scheduler (and in ``status``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = service.call("GET", f"{prefix}/audience-syncs/{sid}/runs", TOKEN_A).json()
        if len(runs) >= n and runs[0]["trigger"] == "schedule" and (status is None or runs[0]["status"] == status):
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"the scheduler made no run {n} of {sid} in {timeout_s:.0f} s: {runs}\n{service.log[-3000:]}")


@pytest.mark.ci
def test_sigterm_aborts_the_run_kill_9_loses_nothing_and_the_limits_hold(shop):
    env = {"AUDSYNC_API_TOKEN": TOKEN_A, "AUDSYNC_LOCK_TIMEOUT_S": "3"}
    a = "/api/v1"
    with FakeWebhook(secret="demo-secret", latency_s=0.4) as hook:
        env["AUDSYNC_DEMO_WEBHOOK_URL"] = hook.url
        service = ServiceProcess(shop, "--no-scheduler", env=env)
        with service:
            body = {"name": "Slow hook", "audience_id": "high_value_customers", "destination_id": "demo_webhook",
                    "config": {"batch_size": 2, "max_concurrency": 1},
                    "field_mapping": [{"source_column": "email", "destination_field": "email"}]}
            created = service.call("POST", f"{a}/audience-syncs", TOKEN_A, json=body)
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            run_id = service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"]
            deadline = time.monotonic() + 90
            while len(hook.members) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(hook.members) >= 2, service.log[-3000:]
            assert service.stop() == 0, service.log[-3000:]
        expected = _members(shop, "high_value_customers", "email")
        row = _query(shop, "select status, rows_added, error_message from main_audsync.audsync_runs where run_id = %s",
                     [run_id])[0]
        assert row[0] == "aborted" and 0 < row[1] < len(expected), row
        # A new service finishes the work with the next trigger.
        with ServiceProcess(shop, "--no-scheduler", env=env) as again:
            next_id = again.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"]
            run = again.wait_run(a, sid, next_id, TOKEN_A)
            assert run["rows_added"] == len(expected) - row[1]
            assert set(hook.members) == set(expected)

            # Bodies over 1 MB are refused; a token over 200 requests in 10 s gets 429.
            big = again.call("POST", f"{a}/audience-syncs", TOKEN_A, data=b"x" * 1_100_000,
                             headers={"Content-Type": "application/json"})
            assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
            codes = [again.call("GET", "/healthz", "burst-token").status_code for _ in range(201)]
            assert codes[:200] == [200] * 200 and codes[200] == 429
            limited = again.call("GET", "/healthz", "burst-token")
            assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 10

            # kill -9 in the middle of a run loses nothing: the next run takes the lock over.
            hook.reset()
            audsync(shop, "reset", "slow_hook", "--yes")
            killed_id = again.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"]
            deadline = time.monotonic() + 90
            while len(hook.members) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            again.process.kill()
            again.process.wait()
        with ServiceProcess(shop, "--no-scheduler", env=env) as third:
            time.sleep(3.5)  # the killed run's heartbeat is older than AUDSYNC_LOCK_TIMEOUT_S
            next_id = third.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"]
            third.wait_run(a, sid, next_id, TOKEN_A)
            killed = third.call("GET", f"{a}/audience-syncs/{sid}/runs/{killed_id}", TOKEN_A).json()
            assert killed["status"] == "aborted" and "abandoned" in killed["error_message"], killed
            assert set(hook.members) == set(expected) and hook.violations == []
            assert third.call("DELETE", f"{a}/audience-syncs/{sid}", TOKEN_A).status_code == 200


def test_the_service_refuses_to_start_without_a_token(shop):
    service = ServiceProcess(shop, env={"AUDSYNC_API_TOKEN": "", "AUDSYNC_API_TOKENS": ""}, startup_s=30)
    with pytest.raises(AssertionError, match="exited 2"):
        service.start()
    assert "AUDSYNC_API_TOKEN" in service.log and len(service.log.strip().splitlines()) <= 2


def test_due_skips_an_audience_not_rebuilt_since_the_last_run_and_check_warns(shop):
    """Freshness (api.md): ``--due`` sends nothing, and records ``skipped`` with the reason,
    when S was not rebuilt since the last successful run; ``audsync check`` then warns."""
    names = [row["sync"] for row in _json(audsync(shop, "list", "--format", "json").stdout)]
    for name in names:
        audsync(shop, "pause", name)
    audsync(shop, "resume", "churn_risk_to_file")  # daily at 06:00 UTC, never run: due
    runs = "main_audsync.audsync_runs"

    def back_a_day():
        _query(shop, f"update {runs} set started_at = started_at - interval 1 day where sync_name = 'churn_risk_to_file'")

    first = audsync(shop, "run", "--due")
    assert "churn_risk_to_file" in first.stdout
    back_a_day()
    audsync(shop, "run", "--due")
    last = _query(shop, f"select status, error_message, evaluated_at from {runs} where sync_name = 'churn_risk_to_file'"
                        " order by started_at desc limit 1")[0]
    assert last[0] == "skipped" and "audience not re-evaluated since" in last[1] and last[2] is not None, last
    # The skip used the slot: not due again until the next one.
    assert "no sync is due" in audsync(shop, "run", "--due").stdout
    back_a_day()
    shop.dbt("run", "--select", "churn_risk_to_file")  # the audience is rebuilt: the next slot runs
    audsync(shop, "run", "--due")
    statuses = [r[0] for r in _query(shop, f"select status from {runs} where sync_name = 'churn_risk_to_file'"
                                           " order by started_at")]
    assert statuses == ["success", "skipped", "success"], statuses
    check = audsync(shop, "check", expect=None)
    assert "churn_risk_to_file" in check.stderr and "rebuilt" in check.stderr, check.output


@pytest.mark.ci
def test_the_api_creates_runs_updates_and_deletes_a_sync_on_postgres(tmp_path, postgres_server):
    project = DbtProject.from_example("jaffle_audiences", tmp_path / "shop", "postgres", pg=postgres_server)
    try:
        project.dbt("build", "--vars", '{as_of_date: "2026-09-28"}')
        for name in HAND_WRITTEN:
            audsync(project, "pause", name)
        a = "/api/v1"
        with FakeWebhook(secret="demo-secret") as hook, ServiceProcess(
            project, "--no-scheduler", env={"AUDSYNC_API_TOKEN": TOKEN_A, "AUDSYNC_DEMO_WEBHOOK_URL": hook.url},
        ) as service:
            body = {"name": "PG hook", "audience_id": "high_value_customers", "destination_id": "demo_webhook",
                    "sync_mode": "upsert", "schedule": "hourly",
                    "field_mapping": [{"source_column": "email", "destination_field": "email"},
                                      {"source_column": "first_name", "destination_field": "firstName"}]}
            created = service.call("POST", f"{a}/audience-syncs", TOKEN_A, json=body)
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            assert created.json()["sync_mode"] == "upsert" and created.json()["next_run_at"] is not None
            run = service.wait_run(a, sid, service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"],
                                   TOKEN_A)
            expected = valid_members(project.query(f"select email from {project.relation('high_value_customers')}"))
            assert run["rows_added"] == len(expected) > 0 and set(hook.members) == set(expected)
            assert all(set(f) == {"email", "firstName"} for f in hook.members.values())
            updated = service.call("PUT", f"{a}/audience-syncs/{sid}", TOKEN_A, json={
                "field_mapping": [{"source_column": "email", "destination_field": "email"},
                                  {"source_column": "lifetime_value", "destination_field": "ltv"}]})
            assert updated.status_code == 200, updated.text
            run = service.wait_run(a, sid, service.call("POST", f"{a}/audience-syncs/{sid}/trigger", TOKEN_A).json()["id"],
                                   TOKEN_A)
            assert run["rows_updated"] == len(expected)
            assert all(set(f) == {"email", "ltv"} for f in hook.members.values())
            runs = service.call("GET", f"{a}/audience-syncs/{sid}/runs?limit=1&offset=1", TOKEN_A)
            assert runs.headers["X-Total-Count"] == "2" and len(runs.json()) == 1
            assert service.call("DELETE", f"{a}/audience-syncs/{sid}", TOKEN_A).status_code == 200
            assert not project.relation_exists("pg_hook") and not project.relation_exists("pg_hook__snapshot")
            assert set(hook.members) == set(expected)
        assert service.process.returncode == 0
    finally:
        postgres_server.drop_database(project.database)
