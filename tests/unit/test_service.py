"""Unit tests of the service's pure parts: workspaces and tokens, model files, what is due."""

from __future__ import annotations

import datetime as dt
import hashlib
from types import SimpleNamespace

import pytest

from audsync.errors import ConfigError
from audsync.schedule import due_syncs, next_run_at, rebuild_warning
from audsync.service.errors import Invalid
from audsync.service.syncs import MARKER, _literal, render_model, slugify
from audsync.service.workspaces import Registry, Token, Workspace, digest, load_workspaces, stable_id

UTC = dt.timezone.utc


def _workspace(tmp_path, name, tokens):
    return Workspace(name=name, project_dir=tmp_path, tokens=[Token(n, digest(t)) for n, t in tokens], id=name)


def test_tokens_are_kept_as_digests_and_reach_only_their_workspace(tmp_path):
    a = _workspace(tmp_path, "a", [("ci", "token-a")])
    b = _workspace(tmp_path, "b", [("ops", "token-b")])
    registry = Registry([a, b])
    assert [(w.id, n) for w, n in registry.authenticate("token-a")] == [("a", "ci")]
    assert [(w.id, n) for w, n in registry.authenticate("token-b")] == [("b", "ops")]
    assert registry.authenticate("token-c") == [] and registry.authenticate("") == []
    assert "token-a" not in repr(a) and a.tokens[0].sha256 == hashlib.sha256(b"token-a").hexdigest()


def test_the_workspaces_file_takes_digests_and_rendered_tokens(tmp_path, monkeypatch):
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "dbt_project.yml").write_text("name: proj\nprofile: proj\n")
    monkeypatch.setenv("OPS_TOKEN", "s3cret")
    path = tmp_path / "workspaces.yml"
    path.write_text(
        "workspaces:\n"
        "  - id: 660e8400-e29b-41d4-a716-446655440000\n"
        "    project_dir: proj\n"
        "    tokens:\n"
        f"      - {{name: ci, sha256: '{hashlib.sha256(b'ci-token').hexdigest()}'}}\n"
        "      - {name: ops, token: \"{{ env_var('OPS_TOKEN') }}\"}\n"
    )
    [ws] = load_workspaces(path)
    assert ws.id == "660e8400-e29b-41d4-a716-446655440000" and ws.name == "proj"
    assert ws.token_name(digest("ci-token")) == "ci" and ws.token_name(digest("s3cret")) == "ops"
    path.write_text("workspaces:\n  - {project_dir: proj, tokens: [{name: ci, sha256: nothex}]}\n")
    with pytest.raises(ConfigError, match="'sha256' is not 64 hex digits"):
        load_workspaces(path)
    path.write_text("workspaces:\n  - {project_dir: proj, colour: red}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_workspaces(path)


def test_ids_are_the_uuid5s_of_api_md():
    import uuid

    assert stable_id("sync", "w", "s") == str(uuid.uuid5(uuid.NAMESPACE_URL, "audsync:sync:w:s"))


def test_model_files_hold_only_safe_literals():
    spec = {"destination": "hook", "mode": "mirror", "identifier": "email", "schedule": "*/5 * * * *",
            "mapping": [{"source_column": "email", "destination_field": "Customer Value"}],
            "config": {"list_id": "123", "batch_size": 2, "flags": [True, None]}, "audience": "vip"}
    text = render_model(spec)
    assert text.splitlines()[0] == MARKER
    assert "select email from {{ ref('vip') }}" in text and "'batch_size': 2" in text
    for bad in ("it's", "a\\b", "{{ x }}", "{% if %}", "50%", "#1", "line\nbreak"):
        with pytest.raises(Invalid) as error:
            render_model({**spec, "config": {"list_id": bad}})
        assert error.value.field == "config.list_id"
    with pytest.raises(Invalid):
        _literal(float("nan"), "config.x")
    assert slugify("VIP customers -> Google!") == "vip_customers_google" and slugify("2024 list") == "sync_2024_list"


def test_due_and_next_run_follow_the_lifecycle():
    now = dt.datetime(2026, 12, 1, 12, 0, 30, tzinfo=UTC)
    syncs = [SimpleNamespace(name=n, schedule=s) for n, s in
             (("never", "hourly"), ("recent", "hourly"), ("old", "hourly"), ("paused", "hourly"),
              ("draft", "* * * * *"), ("manual", "manual"), ("cron", "0 * * * *"))]
    starts = {"recent": now - dt.timedelta(minutes=10), "old": now - dt.timedelta(hours=2),
              "paused": now - dt.timedelta(hours=2), "cron": now - dt.timedelta(minutes=45)}
    states = {"paused": {"status": "paused"}, "draft": SimpleNamespace(status="draft")}
    assert [s.name for s in due_syncs(syncs, states, starts, now)] == ["cron", "never", "old"]
    assert next_run_at("hourly", "paused", starts["paused"], now) is None
    assert next_run_at("manual", "active", None, now) is None
    assert next_run_at("hourly", "active", None, now) == now
    assert next_run_at("0 * * * *", "active", starts["cron"], now) == dt.datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_check_warns_when_runs_see_the_same_build():
    built = dt.datetime(2026, 12, 1, 6, 0)
    runs = [{"started_at": built + dt.timedelta(hours=h), "evaluated_at": built} for h in (3, 2, 1)]
    assert "rebuilt once" in rebuild_warning("hourly", runs)
    fresh = [{"started_at": built + dt.timedelta(hours=h), "evaluated_at": built + dt.timedelta(hours=h)}
             for h in (3, 2, 1)]
    assert rebuild_warning("hourly", fresh) is None and rebuild_warning("manual", runs) is None
