"""The file destination: each run's operations written to one JSONL or CSV file in a folder.

The file is named from the sync and the run (``<sync>__<run_id>.jsonl``), written under a
temporary name in the same folder and renamed into place in :meth:`FileConnector.close`, so
a reader never sees half a file: a run that dies leaves only the temporary file, and its rows,
never committed, are planned again by the next run.

JSONL lines are the webhook's operations (``{"op", "key", "fields"}``); CSV has the columns
``op,key,<field...>`` in ``field_mapping`` order.
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
from typing import IO, Any, ClassVar, Mapping, Sequence

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


def file_name(sync: str, run_id: str, fmt: str) -> str:
    """The final name of a run's file: ``<sync>__<run_id>.<format>``, made safe for a path."""
    return f"{_UNSAFE.sub('_', sync)}__{_UNSAFE.sub('_', run_id)}.{fmt}"


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
    """Write a run's operations to one file, renamed into place when the run closes it."""

    type: ClassVar[str] = "file"
    description: ClassVar[str] = "write each run's operations to a JSONL or CSV file in a folder"
    config_keys: ClassVar[tuple[ConfigKey, ...]] = (
        ConfigKey("path", "the folder files are written to (created if missing; relative to the dbt project)", required=True),
        ConfigKey("format", "jsonl or csv", default="jsonl"),
    )
    # Batches only bound memory here: no API limits them.
    max_batch_size: ClassVar[int] = 100_000
    default_batch_size: ClassVar[int | None] = 10_000
    # Writes are serialised; a second thread encodes while the first writes.
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
        self.path = self.folder / file_name(sync.name, sync.run_id, fmt)
        """Where the file is once the run closes it."""
        self.temp_path = self.folder / f".{self.path.name}.tmp"
        """Where it is written until then."""
        self.columns: tuple[str, ...] = tuple(sync.fields)
        self.rows_written = 0
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folder and the temporary file (with the CSV header)."""
        with self._lock:
            self._open_locked()
        return None

    def _open_locked(self) -> IO[bytes]:
        if self._file is None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._file = open(self.temp_path, "wb")
            except OSError as exc:
                raise FatalDestinationError(
                    f"destination {self.name!r}: cannot write in {str(self.folder)!r}: {exc}"
                ) from exc
            if self.format == "csv" and self.columns:
                self._file.write(self._csv_lines([("op", "key", *self.columns)]))
        return self._file

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        """Append ``batch`` to the file. Every row is taken but one that cannot be encoded."""
        if self.format == "jsonl":
            data, invalid = self._jsonl(batch)
        else:
            data, invalid = self._csv(batch), []
        # Encoding happens outside the lock; only the write is serialised.
        with self._lock:
            self._open_locked().write(data)
            self.rows_written += len(batch) - len(invalid)
        return BatchResult(rejected=invalid)

    def close(self, succeeded: bool = True) -> None:
        """Flush and rename the file into place, whether or not the run succeeded.

        The rows written were accepted and will be committed, so the file must exist even when
        a later batch failed the run.
        """
        with self._lock:
            if self._file is None:
                return
            handle, self._file = self._file, None
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.temp_path, self.path)
            _fsync_folder(self.folder)

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
            # No field_mapping known: take the first row's fields, once, for the whole file.
            # The header is written under the lock that sets the columns, so no thread can
            # write rows before it.
            with self._lock:
                if not self.columns:
                    self.columns = tuple(batch[0].fields)
                    self._open_locked().write(self._csv_lines([("op", "key", *self.columns)]))
        columns = self.columns
        rows = [
            (op, key, *[_csv_value(fields.get(c)) for c in columns])
            for _, op, key, fields, _ in batch
        ]
        return self._csv_lines(rows)

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
