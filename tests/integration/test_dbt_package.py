"""The dbt package on real warehouses: the relations, the diff, validation, the row hash.

Every test runs real dbt on DuckDB and on PostgreSQL. The diff is checked against an
independent diff computed in Python over random pairs of (snapshot, audience) states.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from audsync import names

MODES = ("mirror", "add", "upsert", "remove")
MAPPING = [
    {"source_column": "email", "destination_field": "email"},
    {"source_column": "first_name", "destination_field": "First Name"},
    {"source_column": "ltv", "destination_field": "Customer Value"},
]
# Values that break naive hashing: nulls, empty strings, the word null, delimiters.
TRICKY_NAMES = [None, "", "null", "NULL", "a|", "|b", "V3:", "N", "ann", "Ann", "o'brien", "zoë", " x "]


def sync_sql(project, mode: str, mapping=MAPPING, identifier: str = "email", extra: str = "") -> str:
    return (
        "{{ config(materialized='audience_sync', destination='hook', "
        f"sync_mode='{mode}', identifier='{identifier}', field_mapping={mapping!r}{extra}) }}}}\n"
        f"select email, first_name, ltv from {project.relation('audience_src')}"
    )


def write_audience(project, rows) -> None:
    """Replace the source table with ``rows`` of (email, first_name, ltv)."""
    # Emptied, not dropped: on PostgreSQL the S__invalid views depend on it, as any view would.
    project.execute(f"create table if not exists {project.relation('audience_src')} (email varchar(200), first_name varchar(200), ltv double precision)")
    project.execute(f"delete from {project.relation('audience_src')}")
    for row in rows:
        project.execute(f"insert into {project.relation('audience_src')} values (%s, %s, %s)", list(row))


def valid_members(rows) -> dict[str, tuple]:
    """What S must hold: rows whose email is not null and appears once."""
    counts: dict[str, int] = {}
    for email, *_ in rows:
        if email is not None:
            counts[email] = counts.get(email, 0) + 1
    return {r[0]: (r[1], r[2]) for r in rows if r[0] is not None and counts[r[0]] == 1}


def python_diff(snapshot: dict[str, tuple], audience: dict[str, tuple]):
    adds = {k: v for k, v in audience.items() if k not in snapshot}
    removes = {k: v for k, v in snapshot.items() if k not in audience}
    updates = {k: v for k, v in audience.items() if k in snapshot and snapshot[k] != v}
    return adds, removes, updates


def expected_changes(mode: str, adds, removes, updates) -> set[tuple]:
    sends = names.MODE_SENDS[mode]
    out = set()
    for op, rows in (("add", adds), ("remove", removes), ("update", updates)):
        if op in sends:
            out |= {(op, k, *v) for k, v in rows.items()}
    return out


def relation_rows(project, model: str, suffix: str, with_op: bool = False) -> set[tuple]:
    op = f"{names.OP}, " if with_op else ""
    rows = project.query(f"select {op}{names.KEY}, first_name, ltv from {project.relation(model, suffix)}")
    return {tuple(r) for r in rows}


def set_snapshot(project, model: str, keys) -> None:
    """Make the snapshot hold exactly the members ``keys`` of S, as a commit would."""
    snapshot = project.relation(model, "__snapshot")
    project.execute(f"delete from {snapshot}")
    for key in keys:
        project.execute(
            f"insert into {snapshot} ({names.KEY}, email, first_name, ltv, {names.HASH}, {names.RUN_ID})"
            f" select {names.KEY}, email, first_name, ltv, {names.HASH}, 'r0'"
            f" from {project.relation(model)} where {names.KEY} = %s",
            [key],
        )


def random_audience(rng: random.Random, base: list[tuple] | None = None) -> list[tuple]:
    """A random audience, or a random change of ``base``: keep, change, drop, add, break."""
    rows = []
    for email, name, ltv in base or []:
        fate = rng.random()
        if fate < 0.45:
            rows.append((email, name, ltv))
        elif fate < 0.75:
            rows.append((email, rng.choice(TRICKY_NAMES), rng.choice([None, ltv, rng.randint(0, 500) / 2])))
    for i in range(rng.randint(0, 25)):
        rows.append((f"user{rng.randint(0, 60)}@example.com", rng.choice(TRICKY_NAMES), rng.choice([None, 0.0, rng.randint(0, 999) / 4])))
    if rng.random() < 0.5:
        rows.append((None, "no email", 1.0))
    if rows and rng.random() < 0.5:
        rows.append(rng.choice(rows))  # a duplicate identifier
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_diff_views_equal_a_python_diff(dbt_project, seed):
    """For random (snapshot, audience) pairs, every view of every mode equals the Python diff."""
    rng = random.Random(seed)
    for mode in MODES:
        dbt_project.write_model(f"sync_{mode}", sync_sql(dbt_project, mode))
    first = random_audience(rng)
    write_audience(dbt_project, first)
    dbt_project.dbt("run")
    for step in range(2):
        members = valid_members(first)
        kept = sorted(k for k in members if rng.random() < 0.7)  # some rows failed earlier
        for mode in MODES:
            set_snapshot(dbt_project, f"sync_{mode}", kept)
        snapshot = {k: members[k] for k in kept}
        second = random_audience(rng, first)
        write_audience(dbt_project, second)
        dbt_project.dbt("run")

        audience = valid_members(second)
        adds, removes, updates = python_diff(snapshot, audience)
        for mode in MODES:
            model = f"sync_{mode}"
            assert relation_rows(dbt_project, model, "") == {(k, *v) for k, v in audience.items()}
            assert relation_rows(dbt_project, model, "__adds") == {(k, *v) for k, v in adds.items()}
            assert relation_rows(dbt_project, model, "__removes") == {(k, *v) for k, v in removes.items()}
            assert relation_rows(dbt_project, model, "__updates") == {(k, *v) for k, v in updates.items()}
            assert relation_rows(dbt_project, model, "__changes", with_op=True) == expected_changes(mode, adds, removes, updates), mode
        first = second


def test_first_run_builds_every_relation(dbt_project):
    dbt_project.write_model("hv_sync", sync_sql(dbt_project, "mirror"))
    dbt_project.write_model("base_sync", sync_sql(dbt_project, "remove"))
    write_audience(dbt_project, [("a@x.com", "Ann", 10.0), ("b@x.com", None, None)])
    dbt_project.dbt("run")
    for suffix in ["", *names.SUFFIXES.values()]:
        assert dbt_project.relation_exists("hv_sync" + suffix), suffix
    assert dbt_project.columns(dbt_project.relation("hv_sync")) == [names.KEY, "email", "first_name", "ltv", names.HASH]
    snapshot_columns = dbt_project.columns(dbt_project.relation("hv_sync", "__snapshot"))
    for column in (names.KEY, names.HASH, names.SYNCED_AT, names.RUN_ID, names.DESTINATION_ID, "email", "first_name", "ltv"):
        assert column in snapshot_columns
    assert dbt_project.rows(dbt_project.relation("hv_sync", "__snapshot")) == []
    # The first run of a sync sends every member; in remove mode it sends nothing.
    assert relation_rows(dbt_project, "hv_sync", "__changes", with_op=True) == {
        ("add", "a@x.com", "Ann", 10.0), ("add", "b@x.com", None, None)}
    assert relation_rows(dbt_project, "base_sync", "__changes", with_op=True) == set()
    assert len(relation_rows(dbt_project, "base_sync", "__adds")) == 2
    # The state tables are typed, empty, and in the package's own schema.
    state_schema = dbt_project.schema + "_audsync"
    for table in names.STATE_TABLES:
        assert dbt_project.relation_exists(table, schema=state_schema), table
    runs_columns = dbt_project.columns(dbt_project.relation(names.RUNS_TABLE, schema=state_schema))
    for column in ("run_id", "sync_name", "trigger", "status", "started_at", "finished_at", "duration_ms",
                   "planned_adds", "planned_removes", "planned_updates", "rows_added", "rows_removed",
                   "rows_updated", "rows_failed", "error_message"):
        assert column in runs_columns


def test_full_refresh_keeps_snapshot_plan_and_history(dbt_project):
    dbt_project.write_model("s", sync_sql(dbt_project, "mirror"))
    write_audience(dbt_project, [("a@x.com", "Ann", 10.0), ("b@x.com", "Bob", 2.0)])
    dbt_project.dbt("run")
    set_snapshot(dbt_project, "s", ["a@x.com"])
    dbt_project.execute(
        f"insert into {dbt_project.relation('s', '__plan')} ({names.RUN_ID}, {names.SEQ}, {names.OP}, {names.SEND}, {names.KEY})"
        " values ('r1', 1, 'add', true, 'b@x.com')")
    runs = dbt_project.relation(names.RUNS_TABLE, schema=dbt_project.schema + "_audsync")
    dbt_project.execute(f"insert into {runs} (run_id, sync_name, status) values ('r1', 's', 'success')")
    for args in (("run",), ("run", "--full-refresh")):
        dbt_project.dbt(*args)
        assert [r[0] for r in dbt_project.query(f"select {names.KEY} from {dbt_project.relation('s', '__snapshot')}")] == ["a@x.com"]
        assert dbt_project.query(f"select {names.KEY} from {dbt_project.relation('s', '__plan')}") == [("b@x.com",)]
        assert dbt_project.query(f"select run_id from {runs}") == [("r1",)]
    assert relation_rows(dbt_project, "s", "__adds") == {("b@x.com", "Bob", 2.0)}


def test_added_and_renamed_mapped_columns_widen_the_snapshot_and_resend(dbt_project):
    mapping = MAPPING[:2]
    dbt_project.write_model("s", sync_sql(dbt_project, "upsert", mapping=mapping))
    write_audience(dbt_project, [("a@x.com", "Ann", 10.0), ("b@x.com", "Bob", 2.0)])
    dbt_project.dbt("run")
    set_snapshot_cols = f"({names.KEY}, email, first_name, {names.HASH})"
    dbt_project.execute(
        f"insert into {dbt_project.relation('s', '__snapshot')} {set_snapshot_cols}"
        f" select {names.KEY}, email, first_name, {names.HASH} from {dbt_project.relation('s')}")
    assert relation_rows_no_ltv(dbt_project, "s", "__changes") == set()
    # Add a mapped column: the snapshot gains it, and every member is an update.
    dbt_project.write_model("s", sync_sql(dbt_project, "upsert", mapping=MAPPING))
    dbt_project.dbt("run")
    assert "ltv" in dbt_project.columns(dbt_project.relation("s", "__snapshot"))
    assert "ltv" in dbt_project.columns(dbt_project.relation("s", "__plan"))
    assert relation_rows(dbt_project, "s", "__changes", with_op=True) == {
        ("update", "a@x.com", "Ann", 10.0), ("update", "b@x.com", "Bob", 2.0)}
    # Rename a destination field only: the values are the same, the shape sent is not.
    renamed = [dict(m) for m in MAPPING]
    renamed[1]["destination_field"] = "given_name"
    dbt_project.execute(
        f"update {dbt_project.relation('s', '__snapshot')} set ltv = s.ltv, {names.HASH} = s.{names.HASH}"
        f" from {dbt_project.relation('s')} as s where s.{names.KEY} = {dbt_project.relation('s', '__snapshot')}.{names.KEY}")
    assert relation_rows(dbt_project, "s", "__changes", with_op=True) == set()
    dbt_project.write_model("s", sync_sql(dbt_project, "upsert", mapping=renamed))
    dbt_project.dbt("run")
    assert {r[0] for r in relation_rows(dbt_project, "s", "__changes", with_op=True)} == {"update"}
    assert len(relation_rows(dbt_project, "s", "__changes", with_op=True)) == 2


def relation_rows_no_ltv(project, model, suffix):
    return {tuple(r) for r in project.query(f"select {names.OP}, {names.KEY} from {project.relation(model, suffix)}")}


def test_invalid_rows_are_left_out_with_their_reason(dbt_project):
    dbt_project.write_model("s", sync_sql(dbt_project, "mirror"))
    write_audience(dbt_project, [
        ("a@x.com", "Ann", 1.0), ("dup@x.com", "D1", 2.0), ("dup@x.com", "D2", 3.0), (None, "Nobody", 4.0), ("", "Empty", 5.0),
    ])
    dbt_project.dbt("run")
    assert {r[0] for r in relation_rows(dbt_project, "s", "")} == {"a@x.com", ""}
    invalid = dbt_project.query(
        f"select {names.KEY}, {names.REASON}, first_name from {dbt_project.relation('s', '__invalid')}")
    assert sorted(invalid, key=lambda r: r[2]) == [
        ("dup@x.com", "duplicate_identifier", "D1"),
        ("dup@x.com", "duplicate_identifier", "D2"),
        (None, "null_identifier", "Nobody"),
    ]
    assert {r[1] for r in relation_rows(dbt_project, "s", "__changes", with_op=True)} == {"a@x.com", ""}


def expected_hash(mapping, values) -> str:
    """The row hash, recomputed in Python from its documented encoding."""
    mapping_text = ";".join(f"{m['destination_field']}={m['source_column']}" for m in mapping)
    signature = hashlib.md5(mapping_text.encode()).hexdigest()[:8] + "|"
    encoded = "".join("N" if v is None else f"V{len(v)}:{v}" for v in values)
    return hashlib.md5((signature + encoded).encode()).hexdigest()


def test_row_hash_is_null_safe_delimiter_safe_stable_and_documented(dbt_project):
    mapping = [{"source_column": "email", "destination_field": "e"}, {"source_column": "first_name", "destination_field": "f"}]
    dbt_project.write_model("s", sync_sql(dbt_project, "mirror", mapping=mapping))
    rows = [("k1", None, 1.0), ("k2", "", 1.0), ("k3", "null", 1.0), ("a|", "b", 1.0), ("a", "|b", 1.0), ("zoë", "x", 1.0)]
    write_audience(dbt_project, rows)
    dbt_project.dbt("run")

    def hashes():
        return dict(dbt_project.query(f"select {names.KEY}, {names.HASH} from {dbt_project.relation('s')}"))

    first = hashes()
    assert len(set(first.values())) == len(rows)  # null, '' and 'null' differ; ('a|','b') != ('a','|b')
    for email, name, _ in rows:
        assert first[email] == expected_hash(mapping, [email, name]), email
    dbt_project.dbt("run", "--full-refresh")
    assert hashes() == first  # the same values give the same hash when the table is rebuilt


def test_numeric_values_hash_by_value(dbt_project):
    dbt_project.write_model("s", sync_sql(dbt_project, "mirror"))
    write_audience(dbt_project, [("a@x.com", "Ann", 10.5), ("b@x.com", "Ann", 10.25)])
    dbt_project.dbt("run")
    hashes = dict(dbt_project.query(f"select {names.KEY}, {names.HASH} from {dbt_project.relation('s')}"))
    assert hashes["a@x.com"] != hashes["b@x.com"]
    set_snapshot(dbt_project, "s", ["a@x.com", "b@x.com"])
    write_audience(dbt_project, [("a@x.com", "Ann", 10.5), ("b@x.com", "Ann", 10.5)])
    dbt_project.dbt("run")
    assert relation_rows(dbt_project, "s", "__updates") == {("b@x.com", "Ann", 10.5)}


BAD_CONFIGS = [
    # (config fragment, words the error must contain)
    ("destination='hook', sync_mode='mirorr', identifier='email'", ["bad_sync", "sync_mode", "mirorr", "mirror, add, upsert, remove"]),
    ("sync_mode='mirror', identifier='email'", ["bad_sync", "destination", "missing", "destinations.yml"]),
    ("destination='hook', sync_mode='add'", ["bad_sync", "identifier", "missing", "email, first_name, ltv"]),
    ("destination='hook', identifier='mail'", ["bad_sync", "identifier", "'mail'", "does not return", "email, first_name, ltv"]),
    ("destination='hook', identifier='email', field_mapping=[{'source_column': 'nope', 'destination_field': 'x'}]",
     ["bad_sync", "field_mapping[0].source_column", "'nope'", "does not return"]),
    ("destination='hook', identifier='email', field_mapping='email'", ["bad_sync", "field_mapping", "expected a list"]),
    ("destination='hook', identifier='email', field_mapping=[{'source_column': 'email'}]",
     ["bad_sync", "field_mapping[0]", "source_column and destination_field"]),
    ("destination='hook', identifier='email', field_mapping=[{'source_column': 'email', 'destination_field': 'e', 'type': 'x'}]",
     ["bad_sync", "field_mapping[0]", "exactly the keys"]),
    ("destination='hook', identifier='email', field_mapping=[{'source_column': 'email', 'destination_field': 'e'}, {'source_column': 'ltv', 'destination_field': 'e'}]",
     ["bad_sync", "field_mapping[1].destination_field", "'e'", "once"]),
    ("destination='hook', identifier='email', schedule='every day'", ["bad_sync", "schedule", "every day", "cron"]),
    ("destination='hook', identifier='email', config='list-1'", ["bad_sync", "'config'", "list-1", "mapping"]),
    ("destination='hook', identifier='email', sync_mod='add'", ["bad_sync", "sync_mod", "unknown config key"]),
]


@pytest.fixture
def duckdb_project(tmp_path):
    """Validation runs before any SQL is sent, so its many cases run on DuckDB only; one
    case runs on both warehouses (``test_validation_error_on_every_warehouse``)."""
    from tests.support.dbt_project import DbtProject

    return DbtProject(tmp_path / "proj", "duckdb")


def test_validation_error_on_every_warehouse(dbt_project):
    fragment, words = BAD_CONFIGS[3]
    check_validation_error(dbt_project, fragment, words)


@pytest.mark.parametrize("fragment,words", BAD_CONFIGS, ids=[w[1] for _, w in BAD_CONFIGS])
def test_validation_errors_name_the_sync_key_value_and_expectation(duckdb_project, fragment, words):
    check_validation_error(duckdb_project, fragment, words)


def check_validation_error(dbt_project, fragment, words):
    dbt_project.write_model(
        "bad_sync",
        f"{{{{ config(materialized='audience_sync', {fragment}) }}}}\nselect email, first_name, ltv from {dbt_project.relation('audience_src')}",
    )
    write_audience(dbt_project, [("a@x.com", "Ann", 1.0)])
    result = dbt_project.dbt("run", expect_ok=False)
    for word in words:
        assert word in result.error_text, (word, result.error_text)


def test_mode_aliases(dbt_project):
    dbt_project.write_model("s_additive", sync_sql(dbt_project, "additive"))
    dbt_project.write_model("s_subtractive", sync_sql(dbt_project, "subtractive"))
    write_audience(dbt_project, [("a@x.com", "Ann", 1.0)])
    dbt_project.dbt("run")
    assert relation_rows(dbt_project, "s_additive", "__changes", with_op=True) == {("add", "a@x.com", "Ann", 1.0)}
    assert relation_rows(dbt_project, "s_subtractive", "__changes", with_op=True) == set()
