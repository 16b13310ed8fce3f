"""The file destination: each batch published durably (fsync, rename), JSONL and CSV content,
threads."""

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


def published(folder) -> list[str]:
    """Names a reader picks up: files not starting with a dot."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_each_batch_is_published_durably_before_send_batch_returns(tmp_path):
    folder = tmp_path / "out" / "nested"  # created when missing
    target = FileConnector("files", {"path": str(folder)}, SYNC, None)
    target.open()
    batch = changes(2) + [Change(3, "remove", "old@example.com", {"Customer Value": 1}, None)]
    assert target.send_batch(batch).rejected == []
    # Published at once, not at close: a run killed now has its reported rows readable.
    first = folder / "high_value__run-9__0000000001.jsonl"
    assert published(folder) == [first.name]
    assert [p.name for p in folder.iterdir()] == [first.name]  # no temporary file left
    lines = [orjson.loads(line) for line in first.read_bytes().splitlines()]
    assert lines == [
        {"op": "add", "key": "u1@example.com", "fields": {"Customer Value": 1, "since": None}},
        {"op": "add", "key": "u2@example.com", "fields": {"Customer Value": 2, "since": None}},
        {"op": "remove", "key": "old@example.com", "fields": {"Customer Value": 1}},
    ]
    target.send_batch(changes(2, start=4))
    assert published(folder) == [first.name, "high_value__run-9__0000000004.jsonl"]
    target.close(succeeded=True)
    assert published(folder) == [first.name, "high_value__run-9__0000000004.jsonl"]


def test_a_batch_is_fsynced_and_renamed_before_it_is_reported(tmp_path, monkeypatch):
    import os

    from audsync.destinations import file as file_module

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(file_module.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(file_module.os, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b))[1])
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    target.send_batch(changes(3))
    # The file's data, then the rename, then the folder's entry.
    assert calls == ["fsync", "rename", "fsync"]


def test_a_failed_write_publishes_nothing_and_stops_the_run(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    target.path_of(1).mkdir()  # the rename cannot replace a folder (root ignores permissions)
    with pytest.raises(FatalDestinationError, match="cannot write"):
        target.send_batch(changes(2))
    assert [p.name for p in tmp_path.iterdir()] == [target.path_of(1).name]
    assert target.files == [] and target.rows_written == 0


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(tmp_path):
    leftover = tmp_path / ".high_value__run-8__0000000001.jsonl.tmp"
    leftover.write_bytes(b'{"op":"add","key":"half')
    other_sync = tmp_path / ".other__run-8__0000000001.jsonl.tmp"
    other_sync.write_bytes(b"")
    FileConnector("files", {"path": str(tmp_path)}, SYNC, None).open()
    assert not leftover.exists() and other_sync.exists()


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
    with open(tmp_path / "high_value__run-9__0000000001.csv", newline="") as handle:
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
    reported: list[int] = []

    def on_result(batch_no, batch, result):
        # When a batch is reported, its file is already where the reader picks it up.
        assert target.path_of(batch[0].seq).exists()
        reported.append(batch_no)

    stats = deliver(target, batches, max_concurrency=8, on_result=on_result)
    target.close(succeeded=True)
    assert stats.rows_sent == 20_000 and stats.rows_rejected == 0 and len(reported) == 40
    files = published(tmp_path)
    assert len(files) == 40 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Sorted by name, the files are the plan in order, each batch whole.
    keys = [
        orjson.loads(line)["key"]
        for name in files
        for line in (tmp_path / name).read_bytes().splitlines()
    ]
    assert keys == [f"u{seq}@example.com" for seq in range(1, 20_001)]


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
    files = published(tmp_path)
    assert len(files) == 4
    for name in files:
        lines = (tmp_path / name).read_text().splitlines()
        assert lines[0] == "op,key,Customer Value,since"  # every file has the header
        assert len(lines) == 51 and "op,key" not in "".join(lines[1:])


def test_unencodable_row_is_rejected_alone(tmp_path):
    target = FileConnector("files", {"path": str(tmp_path)}, SYNC, None)
    target.open()
    result = target.send_batch(
        [Change(1, "add", "a", {"x": 1}, None), Change(2, "add", "b", {"x": b"raw"}, None)]
    )
    target.close(True)
    assert [(r.key, r.error_code) for r in result.rejected] == [("b", "invalid_value")]
    written = (tmp_path / "high_value__run-9__0000000001.jsonl").read_bytes()
    assert written == b'{"op":"add","key":"a","fields":{"x":1}}\n'


def test_bad_format_names_the_key():
    with pytest.raises(FatalDestinationError, match="'format'.*'parquet'"):
        FileConnector("files", {"path": "/tmp", "format": "parquet"}, SYNC, None)
