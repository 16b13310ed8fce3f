"""The row hash is persisted in the snapshot: a build that hashed any value differently would
re-send every member. S's hash, built as S builds it now (each value cast to text once, the
duplicates found by an aggregate), must equal byte for byte the hash of the first release's
expression, written out here as it rendered then, over values that are easy to get wrong.
Real dbt on DuckDB and PostgreSQL."""

from __future__ import annotations

import datetime
import hashlib

from audsync import names
from tests.support.syncs import write_destinations

COLUMNS = ["t", "d", "i", "ts", "b"]
ROWS = [
    ("nulls", None, None, None, None, None),
    ("empties", "", -0.0, 0, datetime.datetime(1970, 1, 1), False),
    ("words", "null", float("nan"), 9223372036854775807, datetime.datetime(2026, 12, 2, 7, 10, 0, 123456), True),
    ("unicode", "héllo ✓ 日本 😀", float("inf"), -9223372036854775808, datetime.datetime(1, 1, 1), None),
    ("delimiters", "a|V3:x", float("-inf"), -1, datetime.datetime(9999, 12, 31, 23, 59, 59, 999999), False),
    ("letters", "N", 1e300, 1, None, True),
    ("tiny", " padded ", 5e-324, 42, datetime.datetime(2000, 2, 29, 12), False),
    ("fraction", "x", 0.1, 10**15, datetime.datetime(2026, 1, 1), True),
    ("dup", "first", 1.0, 1, None, None),
    ("dup", "second", 2.0, 2, None, None),
]


def old_row_hash(mapping: list[dict[str, str]]) -> str:
    """The hash expression of the first release (macros/sync/row_hash.sql before issue 16's
    diff build), as dbt rendered it on DuckDB and PostgreSQL."""
    signature = hashlib.md5(";".join(f"{m['destination_field']}={m['source_column']}" for m in mapping).encode()).hexdigest()[:8]
    parts = [f"'{signature}|'"]
    for m in mapping:
        x = f'"{m["source_column"]}"'
        parts.append(f"case when {x} is null then 'N' else 'V' || cast(length(cast({x} as text)) as text)"
                     f" || ':' || cast({x} as text) end")
    return f"md5(cast({' || '.join(parts)} as text))"


def test_s_hashes_tricky_values_as_the_first_release_did(dbt_project):
    project = dbt_project
    double = "double" if project.target == "duckdb" else "double precision"
    source = project.relation("tricky_src")
    project.execute(f"create table {source} (k text, t text, d {double}, i bigint, ts timestamp, b boolean)")
    for row in ROWS:
        project.execute(f"insert into {source} values (%s, %s, %s, %s, %s, %s)", list(row))
    mapping = [{"source_column": c, "destination_field": f"f_{c}"} for c in COLUMNS]
    write_destinations(project, {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/unused"}})
    project.write_model(
        "tricky",
        "{{ config(materialized='audience_sync', destination='hook', sync_mode='mirror',"
        f" identifier='k', field_mapping={mapping!r}) }}}}\n"
        f"select k, {', '.join(COLUMNS)} from {source}",
    )
    project.dbt("run", "--select", "tricky")

    built = dict(project.query(f"select {names.KEY}, {names.HASH} from {project.relation('tricky')}"))
    expected = dict(project.query(f"select k, {old_row_hash(mapping)} from {source} where k <> 'dup'"))
    assert set(built) == {row[0] for row in ROWS} - {"dup"}  # a duplicate key is left out
    assert built == expected
    # The values really reach the hash: no two rows hash alike.
    assert len(set(built.values())) == len(built)
