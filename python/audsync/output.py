"""How the CLI talks: logs and progress on stderr, results on stdout.

``--log-format text`` gives a progress bar when stderr is a terminal (quiet otherwise) and
a one-screen summary; ``--log-format json`` gives one JSON object per line, for
orchestrators. Every line passes through :func:`audsync.redact.redact`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from decimal import Decimal
from typing import Any, Iterable, Sequence

from .redact import RedactingFilter, redact
from .runner import Reporter, RunResult


def _jsonable(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def _cell(value: Any) -> str:
    """A value as a table cell: short timestamps, fields as JSON."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_jsonable, ensure_ascii=False)
    return str(value)


def setup_logging(log_format: str, verbose: bool) -> None:
    """Send audsync's logs to stderr, in text or JSON lines, with secrets masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("audsync")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line)


class JsonReporter(Reporter):
    """One JSON object per line on stderr for each step of a run."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._last = 0.0
        self._sync = ""

    def _emit(self, event: str, **fields: Any) -> None:
        line = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(), "event": event}
        line.update({k: _jsonable(v) for k, v in fields.items()})
        self.stream.write(redact(json.dumps(line, default=str)) + "\n")
        self.stream.flush()

    def event(self, name: str, **fields: Any) -> None:
        self._emit(name, **fields)

    def progress_start(self, sync: str, total: int) -> None:
        self._sync = sync
        self._total = total
        self._started = time.monotonic()
        self._emit("delivery_started", sync=sync, rows=total)

    def progress_update(self, rows_done: int) -> None:
        # At most one progress line every 5 s: orchestrator logs stay readable.
        now = time.monotonic()
        if now - self._last >= 5:
            self._last = now
            elapsed = max(now - self._started, 1e-9)
            self._emit("progress", sync=self._sync, rows_done=rows_done, rows_total=self._total,
                       rows_per_s=round(rows_done / elapsed))


class TextReporter(Reporter):
    """A progress bar (rows sent, rows per second) when stderr is a terminal; else quiet."""

    def __init__(self, verbose: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.interactive = self.console.is_terminal
        self.verbose = verbose
        self._progress = None

    def event(self, name: str, **fields: Any) -> None:
        if name in ("skipped", "lock_taken_over", "recovered", "waiting", "lock_lost") or self.verbose:
            detail = " ".join(f"{k}={v}" for k, v in fields.items())
            self.console.print(redact(f"[audsync] {name} {detail}"), markup=False, highlight=False)

    def progress_start(self, sync: str, total: int) -> None:
        if not self.interactive:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(sync, total=total, rate="-")
        self._started = time.monotonic()

    def progress_update(self, rows_done: int) -> None:
        if self._progress is not None:
            elapsed = max(time.monotonic() - self._started, 1e-9)
            self._progress.update(self._task, completed=rows_done, rate=f"{rows_done / elapsed:,.0f}")

    def progress_stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


# -- results on stdout --------------------------------------------------------------------------


def result_record(result: RunResult) -> dict[str, Any]:
    """A run's result as a flat record (JSON output, tests)."""
    p, c = result.planned, result.committed
    record = {
        "sync": result.sync_name, "run_id": result.run_id, "status": result.status,
        "destination": result.destination, "mode": result.mode,
        "planned_adds": p.adds, "planned_removes": p.removes, "planned_updates": p.updates,
        "rows_added": c.added, "rows_removed": c.removed, "rows_updated": c.updated,
        "rows_failed": c.failed, "rows_recorded": c.recorded, "rows_unmatched": c.unmatched,
        "rows_unknown": c.unknown,
        "duration_ms": result.duration_ms, "error_message": result.error_message,
    }
    if result.stats is not None:
        record["rows_per_s"] = round(result.stats.rows_per_s)
        record["requests"] = result.stats.requests
        record["retries"] = result.stats.retries
    return record


def print_summary(results: Sequence[RunResult], log_format: str) -> None:
    """The run summary: a table on a terminal or in text logs, JSON with --log-format json."""
    if log_format == "json":
        for result in results:
            sys.stdout.write(redact(json.dumps({"event": "summary", **result_record(result)}, default=str)) + "\n")
        sys.stdout.flush()
        return
    rows = []
    for r in results:
        rec = result_record(r)
        rows.append([
            r.sync_name, r.status, f"{rec['planned_adds']}/{rec['planned_removes']}/{rec['planned_updates']}",
            str(rec["rows_added"]), str(rec["rows_removed"]), str(rec["rows_updated"]),
            str(rec["rows_failed"]), f"{r.duration_ms / 1000:.1f}s",
            f"{rec['rows_per_s']:,}" if "rows_per_s" in rec else "-",
        ])
    print_table(
        ["sync", "status", "planned a/r/u", "added", "removed", "updated", "failed", "time", "rows/s"],
        rows, title="audsync run summary",
    )
    for r in results:
        if r.error_message and r.status != "success":
            sys.stdout.write(redact(f"  {r.sync_name}: {r.error_message}") + "\n")
        if r.committed.recorded:
            sys.stdout.write(f"  {r.sync_name}: {r.committed.recorded} new member(s) recorded without sending (remove mode)\n")
        if r.committed.unknown:
            sys.stdout.write(f"  {r.sync_name}: {r.committed.unknown} row(s) of unknown outcome (sent, answer lost);"
                             " the next run sends their current state again\n")
        if r.committed.unmatched:
            sys.stdout.write(f"  {r.sync_name}: {r.committed.unmatched} row(s) accepted but not matched by the destination\n")
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    """A plain table on stdout, via rich (which drops colour when not on a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_lines=False)
    for header in headers:
        # Ids and timestamps are copied into other commands: never wrap them.
        compact = header in ("run_id", "last run", "locked by", "started_at", "last synced", "sync")
        table.add_column(header, no_wrap=compact, overflow="ellipsis" if compact else "fold")
    for row in rows:
        table.add_row(*[redact(_cell(v)) for v in row])
    console = Console()
    # Off a terminal (logs, pipes) rich assumes 80 columns; history tables need more.
    Console(width=console.width if console.is_terminal else 200).print(table)


def print_json(value: Any) -> None:
    """``value`` as JSON on stdout."""
    sys.stdout.write(redact(json.dumps(value, default=_jsonable, indent=2)) + "\n")
    sys.stdout.flush()
