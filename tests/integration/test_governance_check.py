"""`audsync check` validates `alerts.yml` (governance.md, Alerts) with the loader runs use:
every bad entry is listed, with the file, the entry, the key and what was expected, and the
command exits 2; a valid file passes."""

from __future__ import annotations

import yaml

from tests.support.syncs import audsync, write_audience, write_destinations, write_sync

UNSET = "AUDSYNC_TEST_ALERT_URL_NEVER_SET"
SLACK_URL = "http://127.0.0.1:9/services/T0/B0/secret-path"

GOOD = {
    "channels": {"ops": {"type": "slack", "url": SLACK_URL}},
    "rules": [
        {"when": ["error", "blocked"], "channels": ["ops"]},
        {"when": "size_change", "above": 0.3, "runs": 5, "select": "tag:paid", "channels": ["ops"]},
    ],
}

BAD = {
    "channels": {
        "ops": {"type": "slack", "url": SLACK_URL},
        "sms": {"type": "sms", "url": "http://127.0.0.1:9/x"},                          # channel type
        "noenv": {"type": "slack", "url": "{{ env_var('" + UNSET + "') }}"},            # URL env var
    },
    "rules": [
        {"when": "queue_depth", "channels": ["ops"]},                                    # rule kind
        {"when": "size_change", "above": -0.5, "channels": ["ops"]},                    # threshold
        {"when": "row_failure_rate", "above": "high", "channels": ["ops"]},             # threshold
        {"when": "size_change", "above": 0.3, "runs": 0, "channels": ["ops"]},          # threshold
        {"when": ["error"], "select": "colour:blue", "channels": ["ops"]},              # selector
        {"when": ["error"], "select": 42, "channels": ["ops"]},                          # selector
        {"when": ["error"], "channels": ["ops"]},                                        # fine
    ],
}


def test_check_lists_every_bad_alerts_entry_and_exits_2(dbt_project, monkeypatch):
    monkeypatch.delenv(UNSET, raising=False)
    project = dbt_project
    write_sync(project, "s1", destination="hook", tags=["paid"])
    write_destinations(project, {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}})
    write_audience(project, [("a@example.com", "A", 1.0)])
    project.dbt("run")
    alerts = project.root / "alerts.yml"

    alerts.write_text(yaml.safe_dump(GOOD))
    assert "OK: 1 sync(s)" in audsync(project, "check").output

    alerts.write_text(yaml.safe_dump(BAD))
    output = audsync(project, "check", expect=2).output
    # Each problem on its own line, naming the file.
    lines = [line.strip() for line in output.splitlines()
             if line.strip().startswith("- alerts file ") and line.strip().split(":")[0].endswith("alerts.yml")]
    expected = [
        "channel 'sms', key 'type' is 'sms'; expected slack or webhook",
        f"channel 'noenv', key 'url': environment variable '{UNSET}' is not set",
        "rules[0], key 'when' is 'queue_depth'; expected run statuses",
        "rules[1], key 'above' is -0.5; expected a ratio",
        "rules[2], key 'above' is 'high'; expected a ratio",
        "rules[3], key 'runs' is 0; expected a whole number, 1 or more",
        "rules[4], key 'select' is 'colour:blue': unknown selector method 'colour'",
        "rules[5], key 'select' is 42; expected a selector",
    ]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, output)
    assert len(lines) == len(expected), output
    assert "rules[6]" not in output
    assert f"{len(expected)} problem(s) found" in output
    # The channel URL is a credential (a Slack webhook's path): never printed.
    assert "secret-path" not in output
