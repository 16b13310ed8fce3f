"""Exclusions (governance.md): an excluded member is out of S, listed in S__excluded with its
list, removed from the destination in every mode, and kept out while excluded; emails match
ignoring case and surrounding spaces. Real dbt, a real warehouse, a fake webhook."""

from __future__ import annotations

import pytest

from tests.fakes.webhook_server import FakeWebhook
from tests.support.syncs import audsync, write_audience, write_destinations, write_sync

MODES = ("mirror", "add", "upsert", "remove")
ROWS = [(f"u{i}@example.com", f"n{i}", float(i)) for i in range(6)]


def write_exclusions(project, emails: list[str], name: str = "do_not_contact") -> None:
    """The exclusion list as a table the seed-like model reads (changed between runs)."""
    relation = project.relation(name + "_src")
    project.execute(f"create table if not exists {relation} (email varchar(200))")
    project.execute(f"delete from {relation}")
    for email in emails:
        project.execute(f"insert into {relation} values (%s)", [email])


@pytest.fixture
def hooks():
    fakes = {mode: FakeWebhook().start() for mode in MODES}
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.mark.slow
@pytest.mark.ci(warehouses=["duckdb"])
def test_excluded_member_is_removed_in_every_mode_and_stays_out(dbt_project, hooks):
    project = dbt_project
    write_exclusions(project, [])
    project.write_model("do_not_contact", f"select email from {project.relation('do_not_contact_src')}")
    for mode in MODES:
        write_sync(project, f"sync_{mode}", mode=mode, destination=f"hook_{mode}", tags=["x"])
        # The list must be built before the sync reads it.
        path = project.root / "models" / f"sync_{mode}.sql"
        path.write_text(path.read_text().replace(
            ") }}\n", ", exclude=['do_not_contact']) }}\n-- depends_on: {{ ref('do_not_contact') }}\n", 1))
    write_destinations(project, {f"hook_{m}": {"type": "webhook", "url": hooks[m].url} for m in MODES})
    # remove mode removes only what it has seen: the destination holds the audience already.
    hooks["remove"].seed_members({r[0]: {} for r in ROWS})

    write_audience(project, ROWS)
    project.dbt("run")
    audsync(project, "run", "--select", "tag:x")
    for mode in ("mirror", "add", "upsert"):
        assert set(hooks[mode].members) == {r[0] for r in ROWS}

    # u1 goes on the list, spelled with another case and spaces around.
    write_exclusions(project, ["  U1@Example.COM "])
    project.dbt("run")
    for mode in MODES:
        excluded = project.query(f"select _audsync_key, _audsync_reason, _audsync_exclusion_list"
                                 f" from {project.relation(f'sync_{mode}__excluded')}")
        assert excluded == [("u1@example.com", "excluded", "do_not_contact")]
        assert ("u1@example.com",) not in project.query(f"select _audsync_key from {project.relation(f'sync_{mode}')}")
    audsync(project, "run", "--select", "tag:x")
    for mode in MODES:
        assert "u1@example.com" not in hooks[mode].members, mode
        assert "u0@example.com" in hooks[mode].members, mode

    # It leaves the audience and comes back while still excluded: it stays out.
    write_audience(project, [r for r in ROWS if r[0] != "u1@example.com"])
    project.dbt("run")
    audsync(project, "run", "--select", "tag:x")
    write_audience(project, ROWS)
    project.dbt("run")
    audsync(project, "run", "--select", "tag:x")
    for mode in MODES:
        assert "u1@example.com" not in hooks[mode].members, mode
        # Never added again while excluded: the first run's adds are all there are.
        assert hooks[mode].ops["add"] == (0 if mode == "remove" else len(ROWS)), mode

    # Off the list again: the modes that add send it again.
    write_exclusions(project, [])
    project.dbt("run")
    audsync(project, "run", "--select", "tag:x")
    for mode in ("mirror", "add", "upsert"):
        assert "u1@example.com" in hooks[mode].members, mode


def test_unknown_exclusion_list_fails_dbt_run_naming_the_sync(dbt_project):
    project = dbt_project
    write_audience(project, ROWS)
    write_sync(project, "s1")
    path = project.root / "models" / "s1.sql"
    path.write_text(path.read_text().replace(") }}\n", ", exclude=['no_such_list']) }}\n", 1))
    write_destinations(project, {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}})
    result = project.dbt("run", expect_ok=False)
    assert "sync 's1'" in result.error_text
    assert "exclude[0]" in result.error_text and "no_such_list" in result.error_text
