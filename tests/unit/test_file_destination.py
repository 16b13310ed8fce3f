"""The file destination: atomic rename on close, JSONL and CSV content, thread safety."""

from __future__ import annotations

import csv
import datetime as dt
import threading
from decimal import Decimal

import orjson
import pytest

from audsync.delivery.engine import deliver
from audsync.destinations.base import Change, FatalDestinationError, SyncInfo
from audsync.destinations.file import FileConnector

SYNC = SyncInfo("high_value", "mirror", "run-9", "email", ("Customer Value", "since"))


def changes(n: int, start: int = 1) -> list[Change]:
    """``n`` adds with plan positions from ``start``."""
    return [
        Change(seq, "add", f"u{seq}@example.com", {"Customer Value": seq, "since": None}, None)
        for seq in range(start, start + n)
    ]


def test_jsonl_is_renamed_into_place_on_close(tmp_path):
    folder = tmp_path / "out" / "nested"  # created when missing
    target = FileConnector("files", {"path": str(folder)}, SYNC, None)
    target.open()
    batch = changes(2) + [Change(3, "remove", "old@example.com", {"Customer Value": 1}, None)]
    assert target.send_batch(batch).rejected == []
    final = folder / "high_value__run-9.jsonl"
    assert not final.exists()  # a reader never sees a half-written file
    assert target.temp_path.exists() and target.temp_path.parent == folder
    target.close(succeeded=True)
    assert final.exists() and not target.temp_path.exists()
    assert [p.name for p in folder.iterdir()] == [final.name]
    lines = [orjson.loads(line) for line in final.read_bytes().splitlines()]
    assert lines == [
        {"op": "add", "key": "u1@example.com", "fields": {"Customer Value": 1, "since": None}},
        {"op": "add", "key": "u2@example.com", "fields": {"Customer Value": 2, "since": None}},
        {"op": "remove", "key": "old@example.com", "fields": {"Customer Value": 1}},
    ]


def test_close_renames_even_when_the_run_failed(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    target.send_batch(changes(1))
    target.close(succeeded=False)
    assert (tmp_path / "high_value__run-9.jsonl").read_bytes().count(b"\n") == 1
    assert not target.temp_path.exists()


def test_a_crash_leaves_only_the_temporary_file(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    target.send_batch(changes(3))
    # No close(): the process died here.
    assert [p.name for p in tmp_path.iterdir()] == [".high_value__run-9.jsonl.tmp"]


def test_csv_content(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path), "format": "csv"}, SYNC, None)
    target.open()
    target.send_batch(
        [
            Change(
                1, "add", "a@example.com",
                {"Customer Value": Decimal("120.50"), "since": dt.date(2026, 1, 2)}, None,
            ),  # fmt: skip
            Change(2, "update", "b,c@example.com", {"Customer Value": 3.5, "since": None}, None),
            Change(3, "remove", "d@example.com", {"Customer Value": None}, None),
        ]
    )
    target.close(succeeded=True)
    with open(tmp_path / "high_value__run-9.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["op", "key", "Customer Value", "since"],
        ["add", "a@example.com", "120.50", "2026-01-02"],
        ["update", "b,c@example.com", "3.5", ""],
        ["remove", "d@example.com", "", ""],
    ]


def test_concurrent_batches_through_the_engine(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path), "format": "jsonl"}, SYNC, None)
    target.open()
    batches = ((n, changes(500, start=n * 500 + 1)) for n in range(40))
    stats = deliver(target, batches, max_concurrency=8, on_result=lambda *a: None)
    target.close(succeeded=True)
    lines = (tmp_path / "high_value__run-9.jsonl").read_bytes().splitlines()
    assert stats.rows_sent == 20_000 and stats.rows_rejected == 0
    keys = [orjson.loads(line)["key"] for line in lines]
    assert sorted(keys) == sorted(f"u{seq}@example.com" for seq in range(1, 20_001))
    # Batches are written whole: each batch's 500 lines are contiguous and in order.
    seqs = [int(k[1:].split("@")[0]) for k in keys]
    for start in range(0, 20_000, 500):
        chunk = seqs[start : start + 500]
        assert chunk == list(range(chunk[0], chunk[0] + 500))


def test_csv_header_from_the_rows_when_no_field_mapping(tmp_path):
    sync = SyncInfo("s", "add", "r1", "id", ())
    target = FileConnector("files", {"path": str(tmp_path), "format": "csv"}, sync, None)
    target.open()
    threads = [
        threading.Thread(target=target.send_batch, args=(changes(50, start=n * 50 + 1),))
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target.close(True)
    lines = (tmp_path / "s__r1.csv").read_text().splitlines()
    assert lines[0] == "op,key,Customer Value,since"
    assert len(lines) == 201 and "op,key" not in "".join(lines[1:])


def test_unencodable_row_is_rejected_alone(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    result = target.send_batch(
        [Change(1, "add", "a", {"x": 1}, None), Change(2, "add", "b", {"x": b"raw"}, None)]
    )
    target.close(True)
    assert [(r.key, r.error_code) for r in result.rejected] == [("b", "invalid_value")]
    written = (tmp_path / "high_value__run-9.jsonl").read_bytes()
    assert written == b'{"op":"add","key":"a","fields":{"x":1}}\n'


def test_bad_format_names_the_key():
    with pytest.raises(FatalDestinationError, match="'format'.*'parquet'"):
        FileConnector("files", {"path": "/tmp", "format": "parquet"}, SYNC, None)
