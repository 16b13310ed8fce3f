"""One run of one sync (contract section 5), in phases: lock, plan, deliver, commit, record.

Delivery is at least once, nothing undelivered is ever committed, and nothing whose outcome
is unknown is forgotten:

* **lock**: the sync's lock is taken with a new generation (a fencing token); a holder whose
  heartbeat (by the warehouse's clock) is older than ``AUDSYNC_LOCK_TIMEOUT_S`` is taken over.
  Then every earlier run of the sync that left a plan or delivery records is recovered,
  whatever its status: what it delivered is committed, what it may have delivered is written
  as unknown (convention 1: a snapshot row with a null hash).
* **plan**: ``S__changes`` is frozen under the run id before anything is sent.
* **deliver**: batches stream to the destination; each answered batch is recorded about
  once a second, in a transaction that first checks the lock's generation (a run that lost
  its lock stops within one batch). A sending thread starts no request once the lease has run
  out (the monotonic time since the last good heartbeat is near the lock timeout: a process
  stopped with SIGSTOP and resumed sends nothing stale). :meth:`SyncRunner.request_stop`
  (the CLI's SIGTERM) stops taking batches and wakes retry waits.
* **commit**: in one fenced transaction, rows of answered batches that were accepted go to the
  snapshot and the rest whose outcome is unknown go there with a null hash.
* **record**: the run's row, and the lock released (fenced: a pause during the run stays).
* **lost** (a run that found its lock taken over): it commits nothing; once its threads have
  stopped it records the keys of the batches it had started and no flush recorded as unknown
  marks, which the next holder of the lock applies (:meth:`_Run._record_unknown`): a request
  it had started before a stall may land after the run that took over.

The heartbeat thread runs from the lock until the record is done, on its own connection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from . import names
from .config import DestinationConfig
from .delivery.engine import DeliverySettings, DeliveryStats, deliver
from .destinations.base import (
    BatchResult, Change, DestinationUnreachable, FatalDestinationError, RowError, SyncInfo,
)
from .errors import ConfigError, LockHeld, LockLost, RunStopped, exit_code_of
from .governance import hooks as governance
from .plan import CommitCounts, PlanCounts, SyncTables, is_unknown_marks, unknown_marks_id
from .project import Project, SyncModel
from .redact import redact, register_secrets
from .state import Lock, RunRow, StateStore, Takeover, clean_text, lock_timeout_s, utcnow
from .warehouse import Session, Warehouse

logger = logging.getLogger("audsync.run")

# Plan rows read per warehouse session during delivery; bounded memory, few sessions. Also
# when the warehouse encodes the rows: 100k rows a session ran out of DuckDB's 100 MB (the
# retry then left the run at four times that) where 50k stay under it, at 1M members.
READ_CHUNK_ROWS = 50_000
# How often answered batches are written to the warehouse during delivery: every second, and
# sooner once this many rows were answered since the last write, because until a write the run
# keeps their changes (for unknown marks if it loses its lock): at 500k rows/s a second of
# Python changes held 350 MB.
FLUSH_EVERY_S = 1.0
FLUSH_EVERY_ROWS = 100_000
# The heartbeat's period: at most this, and a quarter of the lock timeout.
HEARTBEAT_MAX_INTERVAL_S = 5.0
# How long a heartbeat's statements may take (PostgreSQL): a beat never hangs for ever.
HEARTBEAT_STATEMENT_S = 10.0

STOPPED_BEFORE_START = "stopped before it started"
# A run that lost its lock and recorded unknown marks waits this long at most (and twice the
# lock timeout at most) for a live holder, to apply them itself (_Run._record_unknown).
RELOCK_WAIT_MAX_S = 60.0
# How a recovered run's row names the run that took its lock over (recover_unfinished).
TAKER_PATTERN = r"run (\S+) took the lock over"


@dataclass
class RunResult:
    """What a run did, as recorded in ``audsync_runs``."""

    run_id: str
    sync_name: str
    status: str
    planned: PlanCounts = field(default_factory=PlanCounts)
    committed: CommitCounts = field(default_factory=CommitCounts)
    duration_ms: int = 0
    error_message: str | None = None
    stats: DeliveryStats | None = None
    destination: str = ""
    mode: str = ""

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this run (:data:`audsync.errors.RUN_STATUS_EXIT`)."""
        return exit_code_of(self.status)


class Reporter:
    """Where a run tells its progress; the CLI supplies a terminal or JSON one."""

    def event(self, name: str, **fields: Any) -> None:
        """A step of the run (lock taken, plan frozen, ...)."""

    def progress_start(self, sync: str, total: int) -> None:
        """Delivery of ``total`` rows begins."""

    def progress_update(self, rows_done: int) -> None:
        """``rows_done`` rows have been answered so far."""

    def progress_stop(self) -> None:
        """Delivery ended."""


def peak_rss_mb() -> int:
    """The process's peak resident memory so far, in MB (reported with a run's steps)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def new_run_id() -> str:
    """A run id that sorts by start time and is unique across machines."""
    return f"{utcnow():%Y%m%dT%H%M%S}-{_secrets.token_hex(4)}"


class SyncRunner:
    """Runs syncs of one project against one warehouse and one destinations file."""

    def __init__(
        self,
        project: Project,
        warehouse: Warehouse,
        destinations: Mapping[str, DestinationConfig],
        reporter: Reporter | None = None,
    ):
        self.project = project
        self.warehouse = warehouse
        self.destinations = destinations
        self.reporter = reporter or Reporter()
        self.state = StateStore(
            warehouse, {t: project.state_relation(t) for t in names.STATE_TABLES}
        )
        self._stop = threading.Event()
        warehouse.on_wait = lambda message: self.reporter.event("waiting", message=message)

    # -- helpers ----------------------------------------------------------------------------

    def tables(self, sync: SyncModel) -> SyncTables:
        """The sync's relations, unresolved."""
        return SyncTables(self.warehouse, sync, self.state)

    def destination_of(self, sync: SyncModel) -> DestinationConfig:
        """The destination ``sync`` sends to; :class:`ConfigError` when it is not declared."""
        if sync.destination not in self.destinations:
            known = ", ".join(sorted(self.destinations)) or "none"
            raise ConfigError(
                f"sync {sync.name!r} ({sync.path}): destination {sync.destination!r} is not in "
                f"destinations.yml; destinations: {known}",
                sync=sync.name, key="destination",
            )
        return self.destinations[sync.destination]

    def check_ready(self, sync: SyncModel) -> SyncTables:
        """Check state tables and the sync's relations exist; return its tables, resolved."""
        tables = self.tables(sync)
        with self.warehouse.session() as session:
            missing = self.state.missing_tables(session)
            if missing:
                raise ConfigError(
                    f"audsync's state tables {', '.join(missing)} are not in {self.warehouse.describe()}; "
                    "run `dbt run --select package:audsync` (or `dbt run`) first"
                )
            columns = self.state.missing_columns(session)
            if columns:
                raise ConfigError(
                    f"audsync's state tables lack the column(s) {', '.join(columns)} of this version;"
                    " run `dbt run --select package:audsync` (or `dbt run`) to add them"
                )
            tables.resolve(session)
        return tables

    # -- stopping ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the current run to stop, from any thread (a signal handler, a service).

        The run stops taking batches, wakes its retry waits, lets requests in flight finish
        (within their timeout), records their answers, commits what was answered (the rest as
        unknown) and ends ``aborted``. Later :meth:`run` calls do not start.
        """
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stop.is_set()

    # -- a run ------------------------------------------------------------------------------

    def run(
        self, sync: SyncModel, *, trigger: str = "manual", full_resync: bool = False, run_id: str | None = None,
        force: bool = False,
    ) -> RunResult:
        """Run ``sync`` once; return its result (the status says how it went).

        Raises :class:`~audsync.errors.LockHeld` when another live run holds the sync, and
        :class:`~audsync.errors.ConfigError` for a sync that cannot run as declared.
        """
        run_id = run_id or new_run_id()
        if self.stopping:
            return RunResult(run_id, sync.name, "aborted", error_message=STOPPED_BEFORE_START,
                             destination=sync.destination, mode=sync.mode)
        return _Run(self, sync, run_id, trigger=trigger, full_resync=full_resync, force=force).execute()

    def reset(self, sync: SyncModel) -> int:
        """Forget ``sync``'s snapshot under its lock, as a run takes it: a dead holder is
        recovered first, a live one refuses (``LockHeld``). Returns the rows forgotten."""
        tables = self.check_ready(sync)
        reset_id = "reset-" + new_run_id()
        with self.warehouse.session() as session:
            lock, _takeover = self.state.acquire_lock(session, sync.name, reset_id, lock_timeout_s())
        try:
            recover_unfinished(self, sync, tables, lock)

            def forget(session: Session) -> int:
                self.state.fence(session, lock)
                return tables.reset(session)

            return self.warehouse.in_session(forget)
        finally:
            with self.warehouse.session() as session:
                self.state.release_lock(session, lock)


def recover_unfinished(runner: SyncRunner, sync: SyncModel, tables: SyncTables, lock: Lock) -> None:
    """Recover every earlier run of ``sync`` that did not finish cleanly, under ``lock``.

    A run whose plan rows, answered batches or delivered ids remain (whatever its status:
    ``running`` after a kill, ``error`` after a failed commit, ``aborted``) has what it
    delivered committed and what it may have delivered written as unknown; a run still
    marked ``running`` becomes ``aborted``. The unknown marks a run that lost its lock left
    (:meth:`_Run._record_unknown`) are applied: their keys become unknown. After this, those
    tables hold nothing of any run but the current one.
    """
    with runner.warehouse.session() as session:
        leftover = tables.plan_run_ids(session) | runner.state.runs_with_delivery_records(session, sync.name)
        running = {r.run_id for r in runner.state.running_runs(session, sync.name)}
    for other in sorted((leftover | running) - {lock.run_id}):
        if is_unknown_marks(other):
            def apply(session: Session, marks_id: str = other) -> int:
                runner.state.fence(session, lock)
                return tables.apply_marks(session, marks_id, utcnow())

            marked = runner.warehouse.in_session(apply)
            runner.reporter.event("recovered", sync=sync.name, run_id=lock.run_id, unknown_marks_of=other,
                                  rows_committed=0, rows_unknown=marked)
            continue

        def recover(session: Session, other: str = other) -> CommitCounts:
            runner.state.fence(session, lock)
            committed = CommitCounts()
            if other in leftover:
                pending = governance.history_before_commit(session, tables, other)
                committed = tables.commit(session, other, utcnow())
                governance.history_after_commit(runner, session, tables, other, pending)
            row = runner.state.run_row(session, other)
            if row is None:  # plan rows of a run without a row (a reset's, a bug's): commit only
                return committed
            finished = utcnow()
            counts = committed.run_columns()
            if row.status == "running" or row.status is None:
                duration = int((finished - row.started_at).total_seconds() * 1000) if row.started_at else None
                runner.state.update_run(
                    session, other, status="aborted", finished_at=finished, duration_ms=duration,
                    error_message=(
                        f"abandoned: it did not finish (killed, stalled or stopped); run {lock.run_id}"
                        f" took the lock over and committed the {committed.applied} rows it had delivered"
                        f" ({committed.unknown} of unknown outcome, to be sent again)"
                    ),
                    **counts,
                )
            else:
                note = (f"; run {lock.run_id} recovered its delivery: {committed.applied} rows committed,"
                        f" {committed.unknown} of unknown outcome")
                runner.state.update_run(
                    session, other, error_message=((row.error_message or "") + note)[:4000],
                    # Counts add up; a rate does not, and is left as the run recorded it.
                    **{k: (getattr(row, k) or 0) + v for k, v in counts.items() if k != "match_rate"},
                )
            return committed

        committed = runner.warehouse.in_session(recover)
        runner.reporter.event("recovered", sync=sync.name, run_id=lock.run_id, abandoned_run=other,
                              rows_committed=committed.applied, rows_unknown=committed.unknown)


class _Run:
    """One run of one sync: each phase is a method, called in order by :meth:`execute`."""

    def __init__(self, runner: SyncRunner, sync: SyncModel, run_id: str, *, trigger: str, full_resync: bool,
                 force: bool = False):
        self.runner = runner
        self.warehouse = runner.warehouse
        self.state = runner.state
        self.reporter = runner.reporter
        self.sync = sync
        self.run_id = run_id
        self.trigger = trigger
        self.full_resync = full_resync
        self.force = force
        """``--force``: the guardrails are overridden for this run (recorded on its row)."""
        self.blocked: RunResult | None = None
        """Set when a guardrail stopped the run after the freeze (governance)."""
        self.clock = time.monotonic()
        self.result = RunResult(run_id, sync.name, "running", destination=sync.destination, mode=sync.mode)
        self.status = "success"
        self.error_message: str | None = None
        self.fatal = False
        self.lock: Lock | None = None
        self.heartbeat: _Heartbeat | None = None
        self.destination_state: dict[str, Any] = {}
        self.every_batch_answered = False
        self.size = 0
        self.in_flight: _InFlight | None = None
        """Set once delivery starts: what was on the wire when it ended."""
        self.evaluated_at: dt.datetime | None = None

    # -- the sequence ---------------------------------------------------------------------

    def execute(self) -> RunResult:
        destination = self.runner.destination_of(self.sync)
        register_secrets(destination.secret_values())
        settings = {**destination.settings, **self.sync.settings}
        try:
            self.delivery = DeliverySettings.from_settings(destination.connector, settings, destination=destination.name)
        except ValueError as error:
            raise ConfigError(f"sync {self.sync.name!r}: {error}", sync=self.sync.name) from None
        self.destination = destination
        self.tables = self.runner.check_ready(self.sync)
        self.started = utcnow()

        if not self.lock_sync():
            return self.result
        with contextlib.ExitStack() as stack:
            self.heartbeat = _Heartbeat(self.warehouse, self.state, self.lock)
            self.heartbeat.start()
            # The heartbeat runs until the commit and the record are done.
            stack.callback(self.heartbeat.stop)
            try:
                recover_unfinished(self.runner, self.sync, self.tables, self.lock)
                self.plan()
                if self.blocked is not None:
                    # A guardrail stopped the run: nothing sent, nothing committed, lock released.
                    return governance.after_run(self.runner, self.sync, self.blocked)
                self.deliver()
                self.commit()
                self.record()
            except LockLost as error:
                return self.lost(error)
        # Alerts that fire for this run; they never change its outcome.
        return governance.after_run(self.runner, self.sync, self.result)

    # -- 1. lock --------------------------------------------------------------------------

    def base_row(self, **values: Any) -> RunRow:
        return RunRow(
            run_id=self.run_id, sync_name=self.sync.name, trigger=self.trigger, started_at=self.started,
            destination=self.sync.destination, sync_mode=self.sync.mode, full_resync=self.full_resync,
            evaluated_at=self.evaluated_at, **values,
        )

    def lock_sync(self) -> bool:
        """Take the lock and insert the run's row; False when the sync is paused (the run is
        recorded as skipped). Raises ``LockHeld`` when a live run holds the sync."""
        with self.warehouse.session() as session:
            row = self.state.ensure_sync_row(session, self.sync.name)
            # When S was last built, as this run saw it (freshness, api.md).
            self.evaluated_at = row.evaluated_at
            if row.status in ("paused", "draft"):
                # A draft (api.md) is not run until it is activated, from any trigger.
                what = "paused" if row.status == "paused" else "a draft"
                fix = "`audsync resume` it" if row.status == "paused" else "activate it (status active)"
                self.state.start_run(session, self.base_row(
                    status="skipped", finished_at=self.started, duration_ms=0,
                    error_message=f"the sync is {what}; {fix} to run again",
                ))
                self.result.status = "skipped"
                self.result.error_message = (f"sync {self.sync.name!r} is {what}; skipped"
                                             f" (audsync resume {self.sync.name})")
                self.reporter.event("skipped", sync=self.sync.name, run_id=self.run_id, reason=row.status)
                return False
        with self.warehouse.session() as session:
            self.lock, takeover = self.state.acquire_lock(session, self.sync.name, self.run_id, lock_timeout_s())
            self.state.start_run(session, self.base_row(status="running"))
            row = self.state.sync_row(session, self.sync.name)
            self.destination_state = json.loads(row.destination_state) if row.destination_state else {}
        if takeover:
            self.reporter.event("lock_taken_over", sync=self.sync.name, run_id=self.run_id, from_run=takeover.run_id)
        self.reporter.event("locked", sync=self.sync.name, run_id=self.run_id, generation=self.lock.generation)
        return True

    # -- 2. plan --------------------------------------------------------------------------

    def plan(self) -> None:
        """Freeze this run's changes into ``S__plan``."""
        def freeze(session: Session) -> tuple[PlanCounts, int]:
            self.state.fence(session, self.lock)
            counts = self.tables.freeze(session, self.run_id, full_resync=self.full_resync)
            self.state.update_run(session, self.run_id, planned_adds=counts.adds,
                                  planned_removes=counts.removes, planned_updates=counts.updates)
            return counts, self.tables.plan_size(session, self.run_id)

        try:
            planned, self.size = self.warehouse.in_session(freeze)
        except LockLost:
            raise
        except Exception as error:  # noqa: BLE001 - recorded as the run's error, exit 1
            self.fail("error", redact(f"{type(error).__name__}: {error}"))
            logger.debug("freeze failed", exc_info=True)
            return
        self.result.planned = planned
        self.reporter.event("planned", sync=self.sync.name, run_id=self.run_id, adds=planned.adds,
                            removes=planned.removes, updates=planned.updates, recorded=planned.recorded,
                            peak_rss_mb=peak_rss_mb())
        # Guardrails (governance.md), on the frozen plan and before anything is sent.
        self.blocked = governance.check_guardrails(self, planned)

    # -- 3. deliver -----------------------------------------------------------------------

    def deliver(self) -> None:
        """Send the plan; record each answered batch (fenced); stop on a stop request."""
        if self.status != "success":
            return
        planned = self.result.planned
        if not planned.sent:
            self.every_batch_answered = not self.runner.stopping
            if self.runner.stopping:
                self.fail("aborted", "stopped (SIGTERM or a stop request) before sending")
            return
        if self.runner.stopping:
            self.fail("aborted", "stopped (SIGTERM or a stop request) before sending")
            return
        guard = _SendGuard(self.runner._stop, self.heartbeat)
        self.in_flight = _InFlight()
        connector = http = None
        completed = False
        try:
            info = SyncInfo(
                name=self.sync.name, mode=self.sync.mode, run_id=self.run_id, identifier=self.sync.identifier,
                fields=tuple(m.destination_field for m in self.sync.mapping),
                settings=dict(self.sync.settings), state=dict(self.destination_state),
                project_dir=str(self.runner.project.project_dir), remember=self._remember,
            )
            # Retry waits wake at once on a stop request, or when the lease runs out.
            # Waits the destination asks for (Retry-After) show in the progress output.
            http = self.delivery.http_client(
                secrets=self.destination.secret_values(), sleep=guard.sleep,
                on_wait=lambda seconds, reason: self.reporter.event(
                    "waiting", sync=self.sync.name, run_id=self.run_id, seconds=round(seconds, 1), reason=reason),
            )
            connector = self.destination.create_connector(info, http)
            # Secrets a connector derives (a signed proof, a refreshed token) are masked too.
            http.add_secrets(connector.secret_values())
            register_secrets(connector.secret_values())
            http.classify = getattr(connector, "classify", None) or http.classify
            opened = connector.open()
            if opened:
                new_state = json.dumps({**self.destination_state, **opened}, sort_keys=True, default=str)
                with self.heartbeat.held(), self.warehouse.session() as session:
                    self.state.fence(session, self.lock)
                    self.state.set_destination_state(session, self.sync.name, new_state)
            recorder = _DeliveryRecorder(self.warehouse, self.state, self.lock, self.in_flight)
            self.reporter.progress_start(self.sync.name, planned.sent)
            try:
                self.result.stats = deliver(
                    _GuardedConnector(connector, guard, self.in_flight),
                    self._batches(self.delivery.batch_size, guard,
                                  encoded=getattr(connector, "accepts_encoded_batches", False)),
                    max_concurrency=self.delivery.max_concurrency,
                    on_result=recorder.on_result,
                    on_progress=self.reporter.progress_update,
                )
            finally:
                try:
                    recorder.flush()
                finally:
                    self.reporter.progress_stop()
            # Rows refused after their request was accepted (Google's asynchronous
            # processing, convention 5): recorded as rejected rows before the commit.
            late = connector.late_row_errors()
            if late:
                recorder.record_late(late)
            completed = True
            self.reporter.event("delivered", sync=self.sync.name, run_id=self.run_id, peak_rss_mb=peak_rss_mb())
        except LockLost:
            raise
        except RunStopped:
            self.fail("aborted", "stopped (SIGTERM or a stop request) during delivery")
        except DestinationUnreachable as error:
            # Convention 4: one error for the run, starting "destination unreachable".
            self.fatal = True
            detail = redact(str(error)).removeprefix("destination unreachable: ")
            self.fail("error", f"destination unreachable: {self.sync.destination!r}: {detail}")
        except FatalDestinationError as error:
            self.fatal = True
            text = redact(str(error))
            # Convention 4: the circuit breaker's error (periphery branch) says "destination
            # unreachable" first, as it is; other fatal answers are prefixed with the destination.
            unreachable = type(error).__name__ == "DestinationUnreachable"
            self.fail("error", text if unreachable else f"destination {self.sync.destination!r}: {text}")
        except Exception as error:  # noqa: BLE001 - recorded as the run's error, exit 1
            self.fail("error", redact(f"{type(error).__name__}: {error}"))
            logger.debug("run failed", exc_info=True)
        finally:
            if completed and self.runner.stopping and self.status == "success" and not guard.exhausted:
                self.fail("aborted", "stopped (SIGTERM or a stop request) during delivery")
            self.every_batch_answered = completed and self.status == "success" and guard.lost_error is None
            if connector is not None:
                try:
                    connector.close(self.every_batch_answered)
                    http.close()
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    logger.debug("connector close failed", exc_info=True)
        if guard.lost_error is not None:
            raise guard.lost_error

    def _remember(self, state: Mapping[str, Any]) -> None:
        """Save what a connector learnt (a created list's id) at once, before ``open()``
        returns, so that a crash right after a create cannot lose it (fenced like a flush)."""
        self.destination_state.update(state)
        with self.heartbeat.held(), self.warehouse.session() as session:
            self.state.fence(session, self.lock)
            self.state.set_destination_state(
                session, self.sync.name, json.dumps(self.destination_state, sort_keys=True, default=str))

    def _batches(self, batch_size: int, guard: "_SendGuard", encoded: bool = False) -> Iterator[tuple[int, Sequence[Change]]]:
        """The plan's sent rows in batches, read one chunk per warehouse session; ends early
        on a stop request, raises ``LockLost`` once the lock is lost.

        ``encoded``: the connector takes :class:`EncodedBatch` es; the warehouse encodes the
        rows when it can encode every mapped column (no Python object per row)."""
        batch_no = 0
        after = 0
        reader = None
        if encoded:
            with self.warehouse.session() as session:
                reader = self.tables.encoded_reader(session)
        chunk = max(batch_size, (READ_CHUNK_ROWS // batch_size) * batch_size)
        while after < self.size:
            guard.raise_if_lost()
            if self.runner.stopping:
                return
            rows = None
            # A read is retried with more memory when DuckDB runs out (a read changes nothing).
            if reader is not None:
                batches = self.warehouse.in_session(
                    lambda session: reader.read(session, self.run_id, after, after + chunk, batch_size))
            else:
                rows = self.warehouse.in_session(
                    lambda session: self.tables.read(session, self.run_id, after, after + chunk))
            after += chunk
            if rows is not None:
                changes, _unsent = self.tables.to_changes(rows)
                del rows
                batches = [changes[i:i + batch_size] for i in range(0, len(changes), batch_size)]
                del changes
            while batches:
                guard.raise_if_lost()
                if self.runner.stopping:
                    return
                yield batch_no, batches.pop(0)  # popped: a sent batch is not held here
                batch_no += 1
        guard.exhausted = True

    # -- 4. commit ------------------------------------------------------------------------

    def commit(self) -> None:
        """Apply what the destination accepted, and write what is unknown, in one fenced
        transaction with the run's row."""
        def commit(session: Session) -> CommitCounts:
            self.state.fence(session, self.lock)
            if not self.every_batch_answered:
                # This process knows what was sent: rows of batches never started were not,
                # and leave the plan (the next run plans them again); started and unanswered
                # ones stay, and the commit writes them as unknown.
                in_flight = self.in_flight.ranges() if self.in_flight is not None else []
                self.tables.drop_unsent(session, self.run_id, in_flight)
            # The history is appended in the commit's own transaction: it never disagrees
            # with the snapshot.
            pending = governance.history_before_commit(session, self.tables, self.run_id)
            committed = self.tables.commit(session, self.run_id, utcnow(), self.every_batch_answered,
                                           self.full_resync)
            governance.history_after_commit(self.runner, session, self.tables, self.run_id, pending)
            if self.status == "success" and committed.failed:
                self.status = "partial_failure"
            self.state.update_run(
                session, self.run_id, status=self.status, finished_at=utcnow(),
                duration_ms=int((time.monotonic() - self.clock) * 1000),
                error_message=self.error_message, **committed.run_columns(),
            )
            return committed

        try:
            self.result.committed = self.warehouse.in_session(commit)
        except LockLost:
            raise
        except Exception as error:  # noqa: BLE001 - recorded; the next run recovers the plan
            self.fail("error", redact(f"commit failed: {type(error).__name__}: {error}"), force=True)
            logger.debug("commit failed", exc_info=True)
            try:
                with self.warehouse.session() as session:
                    self.state.fence(session, self.lock)
                    self.state.update_run(session, self.run_id, status=self.status, finished_at=utcnow(),
                                          duration_ms=int((time.monotonic() - self.clock) * 1000),
                                          error_message=self.error_message)
            except LockLost:
                raise
            except Exception:  # noqa: BLE001 - the warehouse itself is failing; nothing more to do
                logger.debug("could not record the failed run", exc_info=True)

    # -- 5. record ------------------------------------------------------------------------

    def record(self) -> None:
        """Release the lock and set the sync's state; fill the result."""
        self.result.duration_ms = int((time.monotonic() - self.clock) * 1000)
        self.result.status = self.status
        self.result.error_message = self.error_message
        finished = self.status in ("success", "partial_failure")
        with self.heartbeat.held(), self.warehouse.session() as session:
            held = self.state.release_lock(
                session, self.lock,
                status="error" if self.fatal else ("active" if finished else None),
                status_error=self.error_message if self.fatal else None,
                synced_at=utcnow() if finished else None,
            )
        if not held:  # taken over after the commit: the run's own row is already final
            logger.warning("sync %r: run %s found its lock taken over when releasing it", self.sync.name, self.run_id)
        c = self.result.committed
        self.reporter.event("finished", sync=self.sync.name, run_id=self.run_id, status=self.status,
                            rows_added=c.added, rows_removed=c.removed, rows_updated=c.updated,
                            rows_failed=c.failed, rows_unknown=c.unknown, duration_ms=self.result.duration_ms,
                            peak_rss_mb=peak_rss_mb())

    # -- endings --------------------------------------------------------------------------

    def fail(self, status: str, message: str, force: bool = False) -> None:
        """Note the run's first failure (or, with ``force``, this one over it)."""
        if self.status in ("success", "partial_failure") or force:
            self.status = status
            self.error_message = clean_text(message)

    def lost(self, error: LockLost) -> RunResult:
        """The run lost its lock: it committed nothing and leaves its row to the taker."""
        taken_by = getattr(error, "taken_by", None)
        message = error.message
        if taken_by is None:
            try:
                with self.warehouse.session() as session:
                    row = self.state.sync_row(session, self.sync.name)
                    own = self.state.run_row(session, self.run_id)
                # The taker names itself in this run's row when it recovers it.
                named = re.search(TAKER_PATTERN, (own.error_message or "") if own else "")
                taken_by = named.group(1) if named else (row.lock_run_id or row.last_run_id if row else None)
            except Exception:  # noqa: BLE001 - the message is the best we can do then
                logger.debug("could not read who took the lock", exc_info=True)
            if taken_by:
                message += f"; run {taken_by} took the sync over"
            error = LockLost(message, sync=self.sync.name, taken_by=taken_by)
        message += self._record_unknown()
        self.result.status = "aborted"
        self.result.error_message = message
        self.result.duration_ms = int((time.monotonic() - self.clock) * 1000)
        self.result.committed = CommitCounts()
        self.reporter.event("lock_lost", sync=self.sync.name, run_id=self.run_id,
                            taken_by=taken_by, message=message)
        return self.result


    def _record_unknown(self) -> str:
        """After a lost lock, once this run's sending threads have stopped: record the keys of
        the batches it had sent or started and no fenced flush recorded as *unknown*
        (convention 1), and return a note for the run's message.

        Why this run, and why now. A request that was past its lease check (or partly
        written) when the process stalled goes out when it goes on, after the run that took
        over. That run already treats this run's unrecorded batches as unknown (its recovery
        writes them with a null hash) and sends their truth, but the stale request can land
        after that truth, and after any number of later runs while the stall lasts: only this
        run knows when its requests have ended, which is now (``deliver`` has joined its
        threads). So it records them now, in two steps that are correct whatever other runs
        do meanwhile:

        1. *Marks*, with no lock: the changes go to ``S__plan`` under a run id of their own
           (:func:`~audsync.plan.unknown_marks_id`), in one transaction. Nothing reads them
           but the recovery of a lock holder, so they overwrite nothing.
        2. *Apply*: the marks are applied by the next holder of the sync's lock, in its
           recovery, before it freezes a plan (:func:`recover_unfinished`): each key's
           snapshot row loses its hash, keeping its values, or a key without one gets the
           mark's values; the key joins ``S__candidates``. This run tries to be that holder:
           it takes the lock as a run does (a dead holder is taken over, a live one waited
           for, up to twice the lock timeout, at most ``RELOCK_WAIT_MAX_S``), recovers, and
           releases it without recording a run. Else the next run applies them.

        Every holder applies the marks after every stale landing (they were written after),
        so a truth it sends afterwards is sent after them too; a run that was live while they
        were written and commits a key as known is followed by the holder that applies them,
        which makes it unknown again: unknown is always safe (the next run sends the truth),
        so no interleaving leaves a claim the destination may not hold. What stays open: a
        process killed between its stale request and its marks, and a destination that
        applies a request after the client gave up on it (as for every unknown outcome).
        """
        changes = self.in_flight.unrecorded() if self.in_flight is not None else []
        if not changes:
            return ""
        marks_id = unknown_marks_id(self.run_id)
        timeout = lock_timeout_s()
        deadline = time.monotonic() + min(2 * timeout, RELOCK_WAIT_MAX_S)
        pause = min(0.5, max(0.05, timeout / 10))
        keys = len({c.key for c in changes})

        def write(session: Session) -> int:
            return self.tables.write_marks(session, marks_id, changes)

        marked, error = self._retrying(deadline, pause, lambda: self.warehouse.in_session(write))
        if marked is None:
            logger.warning("sync %r: run %s could not record the %d key(s) it may have delivered after"
                           " the takeover as unknown: %s", self.sync.name, self.run_id, keys, error)
            return (f"; {keys} key(s) of the batches it had sent or started after its last record may"
                    f" have reached the destination and could not be recorded as unknown:"
                    f" {redact(str(error))}")
        self.reporter.event("marked_unknown", sync=self.sync.name, run_id=self.run_id, rows_unknown=marked)
        note = (f"; it recorded the {marked} key(s) of the batches it had sent or started after its last"
                f" record as of unknown outcome (the next run sends their truth)")

        def take(session: Session) -> Lock:
            return self.state.acquire_lock(session, self.sync.name, self.run_id, timeout)[0]

        lock, error = self._retrying(deadline, pause, lambda: self.warehouse.in_session(take), stop=True)
        if lock is None:
            logger.info("sync %r: run %s left its unknown marks to the next run: %s",
                        self.sync.name, self.run_id, error)
            return note
        try:
            recover_unfinished(self.runner, self.sync, self.tables, lock)
        except Exception as failed:  # noqa: BLE001 - the marks stay for the next run
            logger.debug("could not apply the unknown marks", exc_info=True)
            logger.info("sync %r: run %s left its unknown marks to the next run: %s",
                        self.sync.name, self.run_id, failed)
        finally:
            try:
                with self.warehouse.session() as session:
                    self.state.release_lock(session, lock, record_run=False)
            except Exception:  # noqa: BLE001 - a stale lock is taken over by the next run
                logger.debug("could not release the lock after applying the unknown marks", exc_info=True)
        return note

    def _retrying(self, deadline: float, pause: float, attempt, stop: bool = False) -> tuple[Any, Exception | None]:
        """``(attempt(), None)``, trying again every ``pause`` s until ``deadline`` (or, with
        ``stop``, a stop request); ``(None, last error)`` when no attempt passed."""
        while True:
            try:
                return attempt(), None
            except Exception as error:  # noqa: BLE001 - returned; the caller reports it
                last = error
                if not isinstance(error, LockHeld):
                    logger.debug("attempt failed", exc_info=True)
            if time.monotonic() + pause > deadline or (stop and self.runner.stopping):
                return None, last
            if stop:
                self.runner._stop.wait(pause)
            else:
                time.sleep(pause)


class _Heartbeat:
    """Refreshes the lock's heartbeat from a thread of its own, on its own connection, from
    the lock until the run's record: delivery, flushes and commits never delay it."""

    def __init__(self, warehouse: Warehouse, state: StateStore, lock: Lock):
        self.warehouse = warehouse
        self.state = state
        self.lock = lock
        self.timeout_s = lock_timeout_s()
        self.interval_s = min(HEARTBEAT_MAX_INTERVAL_S, self.timeout_s / 4)
        # The lease: a sender starts no request once this long has passed since the last good
        # beat (two beats short of the timeout), so it stops before another run may take over.
        self.lease_s = max(self.timeout_s - 2 * self.interval_s, self.interval_s)
        self.lost = False
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._beat = threading.Condition()
        self._writing = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="audsync-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No beat during the block: for another transaction of this process that updates the
        sync's row (on DuckDB two open transactions updating one row conflict)."""
        with self._writing:
            yield

    def stop(self) -> None:
        """Stop beating; waits a bounded time for a beat in progress."""
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_STATEMENT_S + self.interval_s)

    def fresh(self) -> bool:
        """True while the lease holds (the lock is surely still this run's)."""
        return not self.lost and time.monotonic() - self.last_ok < self.lease_s

    def wait_fresh(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the next beat."""
        with self._beat:
            self._beat.wait(timeout_s)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                beat_started = time.monotonic()
                try:
                    with self._writing, self.warehouse.session() as session:
                        self.warehouse.limit_statements(session, HEARTBEAT_STATEMENT_S)
                        held = self.state.heartbeat(session, self.lock)
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next tick
                    logger.debug("heartbeat failed", exc_info=True)
                    continue
                with self._beat:
                    if held:
                        # The beat's start: the lock was surely held then.
                        self.last_ok = beat_started
                    else:
                        self.lost = True
                    self._beat.notify_all()
                if not held:
                    return
        finally:
            self.warehouse.close()


class _SendGuard:
    """What a sending thread checks before each request: no stop request, the lock held, and
    the lease fresh. A retry's wait ends at once on a stop request."""

    def __init__(self, stop: threading.Event, heartbeat: _Heartbeat):
        self.stop = stop
        self.heartbeat = heartbeat
        self.lost_error: LockLost | None = None
        self.exhausted = False

    def raise_if_lost(self) -> None:
        if self.heartbeat.lost:
            self._lost("its heartbeat found the lock taken over")

    def _lost(self, why: str) -> None:
        lock = self.heartbeat.lock
        if self.lost_error is None:
            self.lost_error = LockLost(
                f"sync {lock.sync_name!r}: run {lock.run_id} lost its lock ({why}); it stopped"
                " sending and committed nothing; the run that took over recovers its delivery",
                sync=lock.sync_name,
            )
        raise self.lost_error

    def before_request(self) -> None:
        """Block until the lease is fresh; raise on a stop request or a lost lock."""
        while True:
            self.raise_if_lost()
            if self.stop.is_set():
                raise RunStopped("the run was asked to stop")
            if self.heartbeat.fresh():
                return
            # A stall (SIGSTOP, a warehouse that does not answer): wait for a good beat, which
            # also tells whether another run took the lock meanwhile.
            self.heartbeat.wait_fresh(0.1)

    def sleep(self, seconds: float) -> None:
        """A retry's wait, cut short by a stop request."""
        if self.stop.wait(seconds):
            raise RunStopped("the run was asked to stop while waiting to retry")
        self.before_request()


class _InFlight:
    """The seq ranges of batches that were started but not answered yet (thread-safe): at an
    abnormal end of a run in this process they are the rows of unknown outcome; batches never
    started were not sent, and are planned again by the next run.

    It also keeps the changes of every batch started since the last successful flush
    (unanswered, or answered but not yet recorded): a run that lost its lock records them as
    unknown marks (:meth:`_Run._record_unknown`), as only it knows when they stopped being on
    the wire. At most about a second of batches, and ``FLUSH_EVERY_ROWS`` rows of answered
    ones (the recorder writes them sooner), plus those in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: set[tuple[int, int]] = set()
        self._unrecorded: dict[tuple[int, int], Sequence[Change]] = {}

    def started(self, batch: Sequence[Change]) -> None:
        if batch:
            with self._lock:
                self._ranges.add((batch[0].seq, batch[-1].seq))
                # The batch itself: an EncodedBatch builds its Change objects only if the run
                # loses its lock and asks for them (unrecorded), never on the sending path.
                self._unrecorded[(batch[0].seq, batch[-1].seq)] = batch

    def answered(self, batch: Sequence[Change]) -> None:
        if batch:
            with self._lock:
                self._ranges.discard((batch[0].seq, batch[-1].seq))

    def recorded(self, ranges: Sequence[tuple[int, int]]) -> None:
        """A fenced flush wrote these answered batches: a run that takes over recovers them."""
        with self._lock:
            for seq_range in ranges:
                self._unrecorded.pop(seq_range, None)

    def ranges(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._ranges)

    def unrecorded(self) -> list[Change]:
        """The changes of batches started and not recorded by a successful flush, by seq."""
        with self._lock:
            return [c for _range, batch in sorted(self._unrecorded.items()) for c in batch]


class _GuardedConnector:
    """A connector whose ``send_batch`` first passes the :class:`_SendGuard`, and whose
    started batches are tracked in :class:`_InFlight`."""

    def __init__(self, connector: Any, guard: _SendGuard, in_flight: _InFlight):
        self._connector = connector
        self._guard = guard
        self._in_flight = in_flight

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connector, name)

    def send_batch(self, batch: Sequence[Change]) -> BatchResult:
        self._guard.before_request()
        self._in_flight.started(batch)
        return self._connector.send_batch(batch)


class _DeliveryRecorder:
    """Buffers answered batches and writes them to the warehouse about once a second, each
    write in a transaction that first checks the lock (fencing)."""

    def __init__(self, warehouse: Warehouse, state: StateStore, lock: Lock, in_flight: "_InFlight"):
        self.warehouse = warehouse
        self.state = state
        self.lock = lock
        self.in_flight = in_flight
        self.batches: list[tuple[int, int, int, int, int]] = []
        self.errors: list[RowError] = []
        self.ids: list[tuple[str, str]] = []
        self.rows = 0
        """Rows of the batches answered since the last write."""
        self.last_flush = time.monotonic()

    def on_result(self, batch_no: int, batch: Sequence[Change], result: BatchResult) -> None:
        if not batch:
            return
        self.in_flight.answered(batch)
        self.batches.append((batch_no, batch[0].seq, batch[-1].seq, len(result.rejected), result.unmatched))
        self.rows += len(batch)
        self.errors.extend(result.rejected)
        if result.destination_ids:
            self.ids.extend(result.destination_ids.items())
        if self.rows >= FLUSH_EVERY_ROWS or time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def record_late(self, errors: Sequence[RowError]) -> None:
        """Rows refused after delivery (connectors branch): recorded as rejected rows, counted
        by an empty-range batch row so that the run's ``rows_failed`` includes them."""
        self.batches.append((-1, 1, 0, len(errors), 0))
        self.errors.extend(errors)
        self.flush()

    def flush(self) -> None:
        if self.batches or self.errors or self.ids:
            errors = [
                RowError(e.key, e.op, e.error_code, redact(e.error_message)[:2000], e.retryable)
                for e in self.errors
            ]
            with self.warehouse.session() as session:
                self.state.fence(session, self.lock)
                self.state.record_delivery(session, self.lock.run_id, self.lock.sync_name,
                                           self.batches, errors, self.ids)
            self.in_flight.recorded([(first, last) for _no, first, last, _r, _u in self.batches])
            self.batches, self.errors, self.ids = [], [], []
        self.rows = 0
        self.last_flush = time.monotonic()


__all__ = ["Reporter", "RunResult", "SyncRunner", "Takeover", "new_run_id", "recover_unfinished"]
