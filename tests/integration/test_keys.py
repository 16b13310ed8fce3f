"""Keys the destination cannot take as audsync sees them (issue 10, points 9 and 13): keys too
long for PostgreSQL's index, and keys that differ only by case or surrounding spaces at a
destination that normalises them. Real dbt on DuckDB and PostgreSQL."""

from __future__ import annotations

import pytest

from audsync import names
from tests.fakes.webhook_server import FakeWebhook
from tests.support.syncs import audsync, run_rows, write_destinations

MAX_KEY = 512  # macros/sync/config.sql max_key_length()


def write_keys(project, rows) -> None:
    """A source table with unbounded text keys: (email, first_name, ltv)."""
    relation = project.relation("keys_src")
    project.execute(f"create table if not exists {relation} (email text, first_name text, ltv double precision)")
    project.execute(f"delete from {relation}")
    for row in rows:
        project.execute(f"insert into {relation} values (%s, %s, %s)", list(row))


def write_key_sync(project, name: str, extra: str = "", destination: str = "hook") -> None:
    mapping = [{"source_column": "email", "destination_field": "email"},
               {"source_column": "first_name", "destination_field": "first_name"}]
    project.write_model(
        name,
        "{{ config(materialized='audience_sync', destination='" + destination + "', sync_mode='mirror',"
        f" identifier='email', field_mapping={mapping!r}{extra}) }}}}\n"
        f"select email, first_name, ltv from {project.relation('keys_src')}",
    )


def members(project, name: str) -> set[str]:
    return {k for (k,) in project.query(f"select {names.KEY} from {project.relation(name)}")}


def invalid(project, name: str) -> list[tuple]:
    return sorted(project.query(
        f"select {names.KEY}, {names.REASON}, first_name from {project.relation(name, '__invalid')}"),
        key=lambda r: r[2])


# -- point 9: an oversized key -------------------------------------------------------------------


def test_an_oversized_key_is_an_invalid_row_not_a_wedged_sync(dbt_project):
    longest = "k" * (MAX_KEY - len("@x.com")) + "@x.com"
    too_long = "k" + longest
    huge = "h" * 3000 + "@x.com"  # past PostgreSQL's btree limit of about 2.7 kB
    write_keys(dbt_project, [("a@x.com", "A", 1.0), (longest, "L", 2.0), (too_long, "T", 3.0),
                             (huge, "H", 4.0), (huge, "H2", 5.0)])
    write_key_sync(dbt_project, "s")
    dbt_project.dbt("run")
    assert members(dbt_project, "s") == {"a@x.com", longest}
    assert invalid(dbt_project, "s") == [
        (huge, "identifier_too_long", "H"),
        (huge, "identifier_too_long", "H2"),
        (too_long, "identifier_too_long", "T"),
    ]
    fake = FakeWebhook().start()
    try:
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url}})
        audsync(dbt_project, "run", "s")
        audsync(dbt_project, "run", "s")  # not wedged: the next run has nothing to do
        assert set(fake.members) == {"a@x.com", longest}
    finally:
        fake.stop()
    assert [(r["status"], r["rows_added"]) for r in run_rows(dbt_project, "s")] == [("success", 2), ("success", 0)]
    assert len(dbt_project.query(f"select * from {dbt_project.relation('s', '__snapshot')}")) == 2


# -- point 13: keys that are one member at a destination that normalises them ---------------------


ROWS = [
    ("A@x.com", "A1", 1.0), (" a@x.com", "A2", 2.0),           # one member once normalised
    ("b@x.com", "B1", 3.0), ("b@x.com", "B2", 4.0), ("B@X.COM ", "B3", 5.0),  # exact, then case
    ("c@x.com", "C", 6.0), ("D@x.com", "D", 7.0),                # distinct
    ("e@x.com", "E1", 8.0), ("e@x.com  ", "E2", 9.0),            # differ by spaces only
]


def test_keys_that_collide_after_normalising_are_duplicates(dbt_project):
    write_keys(dbt_project, ROWS)
    write_key_sync(dbt_project, "as_given")
    write_key_sync(dbt_project, "normalised", ", identifier_normalise='lower_trim'")
    write_key_sync(dbt_project, "trimmed", ", identifier_normalise='trim'")
    dbt_project.dbt("run")
    # As given, only the exact duplicate is left out.
    assert members(dbt_project, "as_given") == {"A@x.com", " a@x.com", "B@X.COM ", "c@x.com", "D@x.com",
                                                "e@x.com", "e@x.com  "}
    assert [r[1] for r in invalid(dbt_project, "as_given")] == ["duplicate_identifier"] * 2
    # Normalised, every row of a colliding member is left out and listed with its reason.
    assert members(dbt_project, "normalised") == {"c@x.com", "D@x.com"}
    assert invalid(dbt_project, "normalised") == [
        ("A@x.com", "duplicate_after_normalising", "A1"),
        (" a@x.com", "duplicate_after_normalising", "A2"),
        ("b@x.com", "duplicate_identifier", "B1"),
        ("b@x.com", "duplicate_identifier", "B2"),
        ("B@X.COM ", "duplicate_after_normalising", "B3"),
        ("e@x.com", "duplicate_after_normalising", "E1"),
        ("e@x.com  ", "duplicate_after_normalising", "E2"),
    ]
    # trim: case still tells keys apart; the key S keeps is the key as given.
    assert members(dbt_project, "trimmed") == {"A@x.com", " a@x.com", "B@X.COM ", "c@x.com", "D@x.com"}
    assert [(r[1], r[2]) for r in invalid(dbt_project, "trimmed")] == [
        ("duplicate_identifier", "B1"), ("duplicate_identifier", "B2"),
        ("duplicate_after_normalising", "E1"), ("duplicate_after_normalising", "E2")]
    changes = {k for (k,) in dbt_project.query(
        f"select {names.KEY} from {dbt_project.relation('normalised', '__changes')}")}
    assert changes == {"c@x.com", "D@x.com"}


def test_a_bad_identifier_normalise_fails_dbt_run_naming_the_key(duckdb_project):
    write_keys(duckdb_project, ROWS)
    write_key_sync(duckdb_project, "s", ", identifier_normalise='casefold'")
    result = duckdb_project.dbt("run", expect_ok=False)
    for word in ("sync 's'", "identifier_normalise", "casefold", "lower_trim"):
        assert word in result.error_text, word


@pytest.fixture
def duckdb_project(tmp_path):
    from tests.support.dbt_project import DbtProject

    return DbtProject(tmp_path / "proj", "duckdb")


def test_check_warns_when_a_normalising_destination_has_no_identifier_normalise(duckdb_project):
    write_keys(duckdb_project, ROWS)
    write_key_sync(duckdb_project, "plain", destination="meta")
    write_key_sync(duckdb_project, "declared", ", identifier_normalise='lower_trim'", destination="meta")
    write_key_sync(duckdb_project, "to_hook", destination="hook")
    write_destinations(duckdb_project, {
        "meta": {"type": "facebook_custom_audience", "access_token": "t0ken", "audience_id": "123"},
        "hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook"},
    })
    duckdb_project.dbt("run")
    result = audsync(duckdb_project, "check")  # a warning, not a problem: exit 0
    warnings = [line for line in result.output.splitlines() if "warning:" in line]
    assert len(warnings) == 1, result.output
    assert "sync 'plain'" in warnings[0] and "identifier_normalise='lower_trim'" in warnings[0]
    assert "facebook_custom_audience" in warnings[0]
