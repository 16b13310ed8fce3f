"""Alerts (governance.md): a fake Slack incoming webhook and a signed webhook on loopback get
one alert per rule that fires, with the documented text and no secret or member data; an
unreachable channel changes neither the run's outcome nor its exit code; every attempt is
recorded in audsync_alerts."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading

import pytest
import yaml

from tests.fakes._http import FakeServer
from tests.fakes.webhook_server import FakeWebhook
from tests.integration.governance_helpers import add_config
from tests.support.syncs import audsync, run_rows, state_rows, write_audience, write_destinations, write_sync

SLACK_PATH = "/services/T000/B000/XXXX"
PAGER_SECRET = "pager-secret-0123456789"


class FakeAlertReceiver(FakeServer):
    """Slack's incoming webhook (JSON ``{"text": ...}``, answered ``ok``), or audsync's signed
    alert webhook when ``secret`` is set (signature checked as the contract's webhook format)."""

    content_type = "text/plain"

    def __init__(self, secret: str | None = None):
        super().__init__()
        self.secret = secret
        self.messages: list[dict] = []
        self.bad = 0
        self.lock = threading.Lock()

    def handle(self, method, path, query, headers, body):
        document = json.loads(body)
        with self.lock:
            if method != "POST" or path != SLACK_PATH or "text" not in document:
                self.bad += 1
                return 400, b"invalid_payload", {}
            if self.secret is not None:
                stamp = headers.get("X-Audsync-Timestamp", "")
                expected = hmac.new(self.secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                if headers.get("X-Audsync-Signature") != f"sha256={expected}":
                    self.bad += 1
                    return 401, b"bad signature", {}
            elif set(document) != {"text"}:
                self.bad += 1
                return 400, b"invalid_payload", {}
            self.messages.append(document)
        return 200, b"ok", {}

    @property
    def url(self) -> str:
        return self.base_url + SLACK_PATH


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receivers():
    slack, pager, hook = FakeAlertReceiver().start(), FakeAlertReceiver(PAGER_SECRET).start(), FakeWebhook().start()
    yield slack, pager, hook
    for fake in (slack, pager, hook):
        fake.stop()


@pytest.mark.slow
def test_one_alert_per_rule_that_fires(dbt_project, receivers, monkeypatch):
    slack, pager, hook = receivers
    project = dbt_project
    monkeypatch.setenv("SLACK_WEBHOOK_URL", slack.url)
    monkeypatch.setenv("ALERT_SECRET", PAGER_SECRET)
    (project.root / "alerts.yml").write_text(yaml.safe_dump({
        "timeout_s": 2,
        "channels": {
            "ops_slack": {"type": "slack", "url": "{{ env_var('SLACK_WEBHOOK_URL') }}"},
            "pager": {"type": "webhook", "url": pager.url, "secret": "{{ env_var('ALERT_SECRET') }}"},
            "dead": {"type": "slack", "url": f"http://127.0.0.1:{closed_port()}{SLACK_PATH}"},
        },
        "rules": [
            {"when": ["error", "blocked"], "channels": ["ops_slack", "pager"]},
            {"when": "row_failure_rate", "above": 0.2, "channels": ["ops_slack"]},
            {"when": "size_change", "above": 0.3, "runs": 2, "select": "tag:paid", "channels": ["ops_slack"]},
            {"when": ["success", "partial_failure"], "channels": ["dead"]},
        ],
    }))
    write_sync(project, "s_paid", destination="hook", tags=["paid"])
    write_sync(project, "s_other", destination="hook2")
    write_destinations(project, {"hook": {"type": "webhook", "url": hook.url},
                                 "hook2": {"type": "webhook", "url": hook.url.replace("/hook", "/hook")}})
    first = [(f"a{i}@example.com", "n", 1.0) for i in range(10)]
    write_audience(project, first)
    project.dbt("run")

    # Run 1: success; only the unreachable channel's rule fires, and the run is unaffected.
    audsync(project, "run", "s_paid")
    assert slack.messages == [] and pager.messages == []
    alerts = state_rows(project, "audsync_alerts")
    assert [(a[2], a[3], a[4]) for a in alerts] == [("status:success,partial_failure", "dead", "failed")]

    # Run 2: 10 new members, 4 rejected (40% > 20%), and the audience doubled (+100% > 30%).
    second = first + [(f"b{i}@example.com", "n", 1.0) for i in range(10)]
    write_audience(project, second)
    project.dbt("run")
    hook.inject({"reject_keys": [f"b{i}@example.com" for i in range(4)]})
    audsync(project, "run", "s_paid", expect=3)
    rid = run_rows(project, "s_paid")[-1]["run_id"]
    assert [m["text"] for m in slack.messages] == [
        f"[audsync] s_paid: run {rid} had 4 of 10 rows rejected (40.0%, above 20.0%). "
        f"Next: see audsync_row_errors for run {rid}.",
        f"[audsync] s_paid: run {rid}: audience size 20 is +100.0% against the mean 10 of the last 1 run(s) "
        f"(limit 30%). Next: check the model before the next run.",
    ]
    hook.inject({"reject_keys": []})

    # s_other is not selected by the size rule: its first run (20 members) sends no size alert.
    audsync(project, "run", "s_other")
    assert len(slack.messages) == 2

    # Run 3: the model comes back empty: blocked; the status rule and the size rule fire.
    write_audience(project, [])
    project.dbt("run")
    audsync(project, "run", "s_paid", expect=4)
    rid = run_rows(project, "s_paid")[-1]["run_id"]
    status_text = (f"[audsync] s_paid: run {rid} ended blocked. blocked by a guardrail: the audience is empty and the "
                   f"run would remove 16 of the 16 members the destination holds (allow_empty is false). Nothing was "
                   f"sent. Fix the model, or raise the limit in the sync's config, or run once with `audsync run "
                   f"s_paid --force`. Next: check the model; if the change is intended, run `audsync run s_paid "
                   f"--force` once.")
    assert [m["text"] for m in slack.messages[2:]] == [
        status_text,
        f"[audsync] s_paid: run {rid}: audience size 0 is -100.0% against the mean 15 of the last 2 run(s) "
        f"(limit 30%). Next: check the model before the next run.",
    ]
    assert len(pager.messages) == 1 and pager.messages[0]["text"] == status_text
    assert pager.messages[0]["sync"] == "s_paid" and pager.messages[0]["status"] == "blocked"
    assert slack.bad == 0 and pager.bad == 0

    everything = json.dumps([m for m in slack.messages + pager.messages]) + json.dumps(
        [list(map(str, a)) for a in state_rows(project, "audsync_alerts")])
    for forbidden in ("@example.com", PAGER_SECRET, "XXXX"):
        assert forbidden not in everything, (forbidden, everything[max(0, everything.find(forbidden) - 300):][:400])
    statuses = sorted((a[3], a[4]) for a in state_rows(project, "audsync_alerts"))
    assert statuses.count(("ops_slack", "sent")) == 4 and ("pager", "sent") in statuses
    assert statuses.count(("dead", "failed")) == 3


def test_bad_alerts_file_is_a_config_error(tmp_path):
    from audsync.errors import ConfigError
    from audsync.governance.alerts import load_alerts

    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump({"channels": {"c": {"type": "slack", "url": "http://127.0.0.1:1/x"}},
                                    "rules": [{"when": "size_change", "channels": ["c"]}]}))
    with pytest.raises(ConfigError, match=r"rules\[0\], key 'above' is None; expected a ratio"):
        load_alerts(path)
    path.write_text(yaml.safe_dump({"channels": {"c": {"type": "sms", "url": "http://x"}}}))
    with pytest.raises(ConfigError, match="channel 'c', key 'type' is 'sms'; expected slack or webhook"):
        load_alerts(path)
    path.write_text(yaml.safe_dump({"channels": {"c": {"type": "slack", "url": "{{ env_var('NOPE_UNSET_X') }}"}}}))
    with pytest.raises(ConfigError, match="environment variable 'NOPE_UNSET_X' is not set"):
        load_alerts(path, env={})
