"""The example project, as the README's demo runs it: build, sync, move a day, sync the diff.

Also covers the runner finding syncs on its own: it runs ``dbt parse`` when the manifest is
missing or older than the project's files.
"""

from __future__ import annotations

import json

from tests.fakes.webhook_server import FakeWebhook
from tests.support.dbt_project import DbtProject
from tests.support.syncs import audsync, run_rows

SYNCS = ("churn_risk_to_file", "high_value_to_webhook", "recent_buyers_to_file")


def test_the_example_syncs_its_audiences_then_only_the_diff(tmp_path, warehouse, request, monkeypatch):
    pg = request.getfixturevalue("postgres_server") if warehouse == "postgres" else None
    project = DbtProject.from_example("jaffle_audiences", tmp_path / "shop", warehouse, pg=pg)
    with FakeWebhook(secret="demo-secret") as hook:
        monkeypatch.setenv("AUDSYNC_DEMO_WEBHOOK_URL", hook.url)
        project.dbt("build", "--vars", '{as_of_date: "2026-09-28"}')
        first = audsync(project, "run", "--select", "path:models/syncs")
        assert all(name in first.stdout for name in SYNCS)
        initial = {name: run_rows(project, name)[-1] for name in SYNCS}
        for name, run in initial.items():
            assert run["status"] == "success" and run["rows_added"] == run["planned_adds"] > 0, name
        assert len(hook.members) == initial["high_value_to_webhook"]["rows_added"]
        assert hook.bad_signatures == 0

        # The file destination wrote one JSON Lines file per run, in the project's folder.
        files = sorted((project.root / "output" / "files").glob("churn_risk_to_file__*.jsonl"))
        assert len(files) == 1
        lines = [json.loads(line) for line in files[0].read_text().splitlines()]
        assert len(lines) == initial["churn_risk_to_file"]["rows_added"]
        assert {line["op"] for line in lines} == {"add"} and "days_inactive" in lines[0]["fields"]

        # Two weeks later the audiences have moved: only the diff is sent.
        project.dbt("run", "--vars", '{as_of_date: "2026-10-12"}')
        second = audsync(project, "run", "--select", "path:models/syncs")
        churn = run_rows(project, "churn_risk_to_file")[-1]
        high_value = run_rows(project, "high_value_to_webhook")[-1]
        assert churn["status"] == "success" and churn["rows_removed"] > 0 and churn["rows_added"] > 0
        assert high_value["rows_removed"] == 0  # upsert never removes
        assert high_value["rows_added"] + high_value["rows_updated"] > 0
        assert "churn_risk_to_file" in second.stdout
        assert len(sorted((project.root / "output" / "files").glob("churn_risk_to_file__*.jsonl"))) == 2
        # Nothing changed since: a third run sends nothing.
        audsync(project, "run", "--select", "path:models/syncs")
        for name in SYNCS:
            last = run_rows(project, name)[-1]
            assert (last["planned_adds"], last["planned_removes"], last["planned_updates"]) == (0, 0, 0), name


def test_the_runner_parses_the_project_when_the_manifest_is_missing_or_stale(tmp_path):
    project = DbtProject.from_example("jaffle_audiences", tmp_path / "shop", "duckdb")
    project.dbt("build", "--vars", '{as_of_date: "2026-09-28"}')
    manifest = project.root / "target" / "manifest.json"
    manifest.unlink()
    listing = json.loads(audsync(project, "list", "--format", "json").stdout)
    assert {row["sync"] for row in listing} == set(SYNCS)
    assert manifest.exists()
    # A new sync file makes the manifest stale: the runner parses again and finds it.
    (project.root / "models" / "syncs" / "vip_to_file.sql").write_text(
        "{{ config(materialized='audience_sync', destination='demo_file', identifier='email') }}\n"
        "select email from {{ ref('high_value_customers') }}\n"
    )
    listing = json.loads(audsync(project, "list", "--format", "json").stdout)
    assert "vip_to_file" in {row["sync"] for row in listing}
