"""Plan rows encoded by the warehouse (DuckDB): the same operations, batches and changes as the
rows the runner encodes itself, on a real DuckDB file and the webhook's fake on loopback."""

from __future__ import annotations

import math
from types import SimpleNamespace

import duckdb
import orjson
import pytest

from audsync import names as n
from audsync.delivery.http import HttpClient, dumps
from audsync.destinations.base import Change, EncodedBatch, SyncInfo
from audsync.destinations.webhook import WebhookConnector
from audsync.plan import EncodedReader
from audsync.warehouse.duckdb import DuckDBWarehouse
from tests.fakes.webhook_server import FakeWebhook

# Values where JSON writers disagree most: escapes, non-ASCII, float formatting, the ends of
# the integer range, non-finite doubles (orjson writes null), a REAL the driver widens.
TEXTS = ["plain", 'quote " and \\ back', "tab\tnew\nline\x01\x1f", "é ü 中文 😀", "\u2028\u2029/", "", None]
DOUBLES = [0.1, 1e20, 1e-7, -0.0, 5e-324, 1.7976931348623157e308, 1 / 3, 100.0, math.nan, math.inf, -math.inf, None]
BIGINTS = [0, -1, 2**63 - 1, -(2**63), 42, None]
FIELDS = {"First Name": "name", "ltv": "ltv", "count": "n", "vip": "flag", "score": "score"}


@pytest.fixture
def plan(tmp_path):
    """A plan table of 40 rows, every 7th not sent, every 3rd with a destination id."""
    path = str(tmp_path / "w.duckdb")
    connection = duckdb.connect(path)
    connection.execute(
        f"create table plan ({n.RUN_ID} varchar, {n.SEQ} bigint, {n.OP} varchar, {n.SEND} boolean,"
        f" {n.KEY} varchar, name varchar, ltv double, n bigint, flag boolean, score real,"
        f" {n.DESTINATION_ID} varchar)"
    )
    rows = []
    for seq in range(1, 41):
        rows.append((
            "run1", seq, ("add", "remove", "update")[seq % 3], seq % 7 != 0, f"user{seq}@example.com",
            TEXTS[seq % len(TEXTS)], DOUBLES[seq % len(DOUBLES)], BIGINTS[seq % len(BIGINTS)],
            (True, False, None)[seq % 3], 1.1 if seq % 2 else None, f"id-{seq}" if seq % 3 == 0 else None,
        ))
    connection.executemany("insert into plan values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    # Another run's rows are never read.
    connection.execute("insert into plan select 'run0', seq, op, send, key, name, ltv, n, flag, score, id"
                       " from (select * from plan) as p(r, seq, op, send, key, name, ltv, n, flag, score, id)")
    yield connection, path
    connection.close()


def encoded(connection, path, after: int, upto: int, batch_size: int) -> list[EncodedBatch]:
    warehouse = DuckDBWarehouse(SimpleNamespace(path=path, settings={}, database="w"), "test")
    sql = warehouse.encoded_batches_sql(
        "plan", [(c, t) for c, t in zip(FIELDS.values(), ("VARCHAR", "DOUBLE", "BIGINT", "BOOLEAN", "FLOAT"))]
    )
    session = SimpleNamespace(fetchall=lambda q, p: connection.execute(q, p).fetchall())
    return EncodedReader(sql, list(FIELDS)).read(session, "run1", after, upto, batch_size)


def expected(connection, after: int, upto: int, batch_size: int) -> list[list[Change]]:
    """What the runner's own path makes of the same rows: sent rows as Changes, then cut."""
    rows = connection.execute(
        f"select {n.SEQ}, {n.OP}, {n.KEY}, name, ltv, n, flag, score, {n.DESTINATION_ID} from plan"
        f" where {n.RUN_ID} = 'run1' and {n.SEQ} > ? and {n.SEQ} <= ? and {n.SEND} order by {n.SEQ}",
        (after, upto),
    ).fetchall()
    changes = [Change(r[0], r[1], r[2], dict(zip(FIELDS, r[3:8])), r[8]) for r in rows]
    return [changes[i:i + batch_size] for i in range(0, len(changes), batch_size)]


def as_json(value):
    """``value`` as the receiver reads it: encoded by the runner's ``dumps``, parsed."""
    return orjson.loads(dumps(value))


@pytest.mark.parametrize("after,upto,batch_size", [(0, 40, 4), (0, 40, 100), (10, 30, 3)])
def test_the_warehouse_encodes_what_the_runner_would(plan, after, upto, batch_size):
    connection, path = plan
    got = encoded(connection, path, after, upto, batch_size)
    want = expected(connection, after, upto, batch_size)
    assert [len(b) for b in got] == [len(b) for b in want]
    for batch, changes in zip(got, want):
        operations = orjson.loads(b"[" + batch.operations_json + b"]")
        assert operations == as_json([{"op": c.op, "key": c.key, "fields": c.fields} for c in changes])
        # The edges without decoding the batch, then every change decoded from what was sent.
        assert batch[0].seq == changes[0].seq and batch[-1].seq == changes[-1].seq
        assert batch._changes is None
        assert [tuple(c) for c in batch] == [
            (c.seq, c.op, c.key, as_json(c.fields), c.destination_id) for c in changes
        ]
        assert batch[0] == batch.changes()[0] and batch[-1] == batch.changes()[-1]


def test_a_type_the_warehouse_cannot_encode_leaves_encoding_to_the_runner(plan):
    _, path = plan
    warehouse = DuckDBWarehouse(SimpleNamespace(path=path, settings={}, database="w"), "test")
    assert warehouse.encoded_batches_sql("plan", [("name", "VARCHAR"), ("at", "TIMESTAMP")]) is None
    assert warehouse.encoded_batches_sql("plan", [("d", "DECIMAL(18,3)")]) is None


def test_the_webhook_sends_an_encoded_batch_as_it_sends_changes(plan):
    connection, path = plan
    batch = encoded(connection, path, 0, 40, 100)[0]
    changes = expected(connection, 0, 40, 100)[0]
    bodies = []
    with FakeWebhook(secret="s3cret") as fake:
        sync = SyncInfo("s", "mirror", "run1", "email", tuple(FIELDS))
        for sent in (batch, changes):
            hook = WebhookConnector("hook", {"url": fake.url, "secret": "s3cret"}, sync,
                                    HttpClient(max_retries=0, sleep=lambda s: None, timeout_s=5))
            assert hook.send_batch(sent).rejected == []
            headers, raw = fake.last_request
            body = orjson.loads(raw)
            body.pop("sent_at")
            bodies.append((headers["Idempotency-Key"], body))
    assert bodies[0] == bodies[1]
    assert bodies[0][1]["batch_id"] == f"run1-{changes[0].seq}"
