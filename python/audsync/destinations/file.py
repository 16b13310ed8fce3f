"""The file destination: each batch of a run's operations published as one JSONL or CSV file.

A batch is written to ``<sync>__<run_id>__<first seq>.<format>`` (the batch's first plan
position, ten digits, so a run's files sort in plan order): under a temporary name
(``.<name>.tmp``) in the same folder, fsynced, renamed into place and the folder fsynced,
all before :meth:`FileConnector.send_batch` returns. A row counts as delivered only once it
is durable where the reader picks it up; a reader that takes the files whose names do not
start with ``.`` sees whole batches only, and every file it sees holds rows the runner may
commit. A run killed mid-write leaves at most a temporary file, whose rows were never
reported and are planned again; the next run of the sync removes it.

(Before issue 10 a run wrote one file, renamed into place at close: rows counted as
delivered while they sat in a buffered temporary file, so after a kill -9 the recovery
committed rows no reader could see. A run of at most ``batch_size`` rows, 10,000 by default,
still writes one file.)

JSONL lines are the webhook's operations (``{"op", "key", "fields"}``); CSV has the columns
``op,key,<field...>`` in ``field_mapping`` order, with the header in every file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import os
import re
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from audsync.delivery.http import dumps
from audsync.destinations.base import (
    BatchResult,
    Change,
    ConfigKey,
    Connector,
    FatalDestinationError,
    RowError,
)
from audsync.destinations.webhook import encode_operations

FORMATS = ("jsonl", "csv")

# Characters kept as they are in file names; anything else (a path separator above all)
# becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(sync: str, run_id: str, fmt: str, first_seq: int) -> str:
    """The published name of a batch's file, ``<sync>__<run_id>__<first seq>.<format>``,
    made safe for a path."""
    return f"{run_prefix(sync, run_id)}{first_seq:010d}.{fmt}"


def run_prefix(sync: str, run_id: str) -> str:
    """The start of the names of a run's files."""
    return f"{sync_prefix(sync)}{_UNSAFE.sub('_', run_id)}__"


def sync_prefix(sync: str) -> str:
    """The start of the names of every file of a sync."""
    return f"{_UNSAFE.sub('_', sync)}__"


def _csv_value(value: Any) -> Any:
    """A field value as CSV text: ISO 8601 dates, JSON for lists and mappings, "" for null."""
    if value is None or isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dict, list, tuple)):
        return dumps(value).decode()
    return str(value)


class FileConnector(Connector):
    """Publish each batch of a run as one file, durable before the batch is reported."""

    type: ClassVar[str] = "file"
    description: ClassVar[str] = (
        "write each batch of a run's operations to a JSONL or CSV file in a folder, atomically"
    )
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey("path", "the folder files are written to (created if missing; relative to the dbt project)", required=True),
        ConfigKey("format", "jsonl or csv", default="jsonl"),
    )
    # One file per batch: batches bound memory and the number of files; no API limits them.
    max_batch_size: ClassVar[int] = 100_000
    default_batch_size: ClassVar[int | None] = 10_000
    # Each batch is its own file: threads write in parallel; one encodes while another syncs.
    max_concurrency: ClassVar[int] = 8
    default_concurrency: ClassVar[int] = 2

    def __init__(self, name: str, settings: Mapping[str, Any], sync: Any, http: Any):
        super().__init__(name, settings, sync, http)
        fmt = str(self.setting("format") or "jsonl").lower()
        if fmt not in FORMATS:
            raise FatalDestinationError(
                f"destination {name!r}: key 'format' must be one of {', '.join(FORMATS)},"
                f" got {fmt!r}"
            )
        folder = self.setting("path")
        if not folder:
            raise FatalDestinationError(f"destination {name!r}: key 'path' is missing")
        self.format = fmt
        self.folder = Path(str(folder)).expanduser()
        if not self.folder.is_absolute() and sync.project_dir:
            # Like destinations.yml itself, a relative folder belongs to the dbt project.
            self.folder = Path(sync.project_dir) / self.folder
        self.columns: tuple[str, ...] = tuple(sync.fields)
        self.rows_written = 0
        self.files: list[Path] = []
        """The files this run published, in the order they were published."""
        self._lock = threading.Lock()
        self._opened = False

    def path_of(self, first_seq: int) -> Path:
        """Where the batch starting at plan position ``first_seq`` is published."""
        return self.folder / file_name(self.sync.name, self.sync.run_id, self.format, first_seq)

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folder; remove temporary files that killed runs of this sync left."""
        with self._lock:
            self._open_locked()
        return None

    def _open_locked(self) -> None:
        if self._opened:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FatalDestinationError(
                f"destination {self.name!r}: cannot write in {str(self.folder)!r}: {exc}"
            ) from exc
        # One run of a sync at a time (the lock): a temporary file of this sync is a killed
        # run's, whose rows were never reported as delivered.
        for leftover in self.folder.glob(f".{sync_prefix(self.sync.name)}*.tmp"):
            try:
                leftover.unlink()
            except OSError:
                pass
        self._opened = True

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Publish ``batch`` as one file, durably; every row is taken but one that cannot be
        encoded."""
        if not batch:
            return BatchResult()
        if self.format == "jsonl":
            data, invalid = self._jsonl(batch)
        else:
            data, invalid = self._csv(batch), []
        if data:
            with self._lock:
                self._open_locked()
            self._publish(self.path_of(batch[0].seq), data)
            with self._lock:
                self.rows_written += len(batch) - len(invalid)
        return BatchResult(rejected=invalid)

    def _publish(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably: a temporary file, fsync, rename,
        fsync of the folder. Only then may the batch be reported as delivered."""
        temp = path.with_name(f".{path.name}.tmp")
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
            _fsync_folder(self.folder)
        except OSError as exc:
            try:
                temp.unlink()
            except OSError:
                pass
            # The folder cannot take the batch (full, read-only): no later batch would fare
            # better, so the run stops; nothing of this batch was published.
            raise FatalDestinationError(
                f"destination {self.name!r}: cannot write {str(path)!r}: {exc}"
            ) from exc
        with self._lock:
            self.files.append(path)

    def close(self, succeeded: bool = True) -> None:
        """Nothing to finish: every batch was published when it was sent."""

    # -- encoding -------------------------------------------------------------------------

    def _jsonl(self, batch: Sequence[Change]) -> tuple[bytes, list[RowError]]:
        try:
            lines = [
                dumps({"op": op, "key": key, "fields": fields}) for _, op, key, fields, _ in batch
            ]
            invalid: list[RowError] = []
        except TypeError:
            operations, invalid = encode_operations(batch)
            lines = [dumps(operation) for operation in operations]
        if not lines:
            return b"", invalid
        return b"\n".join(lines) + b"\n", invalid

    def _csv(self, batch: Sequence[Change]) -> bytes:
        if not self.columns:
            # No field_mapping known: take the first row's fields, once, for every file of the
            # run, so that all of them have the same columns.
            with self._lock:
                if not self.columns:
                    self.columns = tuple(batch[0].fields)
        columns = self.columns
        rows = [
            (op, key, *[_csv_value(fields.get(c)) for c in columns])
            for _, op, key, fields, _ in batch
        ]
        return self._csv_lines([("op", "key", *columns), *rows])

    @staticmethod
    def _csv_lines(rows: list[tuple[Any, ...]]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue().encode("utf-8")


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
