"""One run of one sync (contract section 5): lock, plan, deliver, commit, record.

Delivery is at least once and nothing undelivered is ever committed:

* the plan is frozen under the run id before anything is sent;
* each answered batch is recorded (``audsync_batches``, ``audsync_row_errors``) as it
  returns, about once a second, so a run killed midway leaves a record of what arrived;
* the commit applies, in one transaction, the rows of answered batches that were not
  rejected; the next run plans everything else again;
* a run whose heartbeat stopped is taken over by the next one, which commits what that run
  had recorded as delivered and marks it ``aborted``.
"""

from __future__ import annotations

import json
import logging
import secrets as _secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from . import names
from .config import DestinationConfig
from .delivery.engine import DeliverySettings, DeliveryStats, deliver
from .destinations.base import BatchResult, Change, FatalDestinationError, RowError, SyncInfo
from .errors import ConfigError
from .errors import EXIT_BLOCKED  # governance:
from .governance import hooks as governance  # governance:
from .plan import CommitCounts, PlanCounts, SyncTables
from .project import Project, SyncModel
from .redact import redact, register_secrets
from .state import StateStore, lock_timeout_s, utcnow
from .warehouse import Session, Warehouse

logger = logging.getLogger("audsync.run")

# Plan rows read per warehouse session during delivery; bounded memory, few sessions.
READ_CHUNK_ROWS = 50_000
# How often answered batches are written to the warehouse during delivery.
FLUSH_EVERY_S = 1.0

EXIT_CODES = {"success": 0, "skipped": 0, "partial_failure": 3, "error": 1, "aborted": 1}
EXIT_CODES["blocked"] = EXIT_BLOCKED  # governance: a guardrail stopped the run before sending


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
        return EXIT_CODES[self.status]


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

    # -- helpers ----------------------------------------------------------------------------

    def tables(self, sync: SyncModel) -> SyncTables:
        return SyncTables(self.warehouse, sync, self.state)

    def destination_of(self, sync: SyncModel) -> DestinationConfig:
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
            tables.resolve(session)
        return tables

    # -- a run ------------------------------------------------------------------------------

    def run(self, sync: SyncModel, *, trigger: str = "manual", full_resync: bool = False,
            force: bool = False) -> RunResult:  # governance: force overrides the guardrails once
        """Run ``sync`` once; return its result (the status says how it went)."""
        destination = self.destination_of(sync)
        register_secrets(destination.secret_values())
        settings = {**destination.settings, **sync.settings}
        try:
            delivery = DeliverySettings.from_settings(destination.connector, settings, destination=destination.name)
        except ValueError as error:
            raise ConfigError(f"sync {sync.name!r}: {error}", sync=sync.name) from None
        tables = self.check_ready(sync)
        run_id = new_run_id()
        started = utcnow()
        clock = time.monotonic()
        base_run = {
            "run_id": run_id, "sync_name": sync.name, "trigger": trigger, "started_at": started,
            "destination": sync.destination, "sync_mode": sync.mode, "full_resync": full_resync,
        }
        result = RunResult(run_id, sync.name, "running", destination=sync.destination, mode=sync.mode)

        # 1. Lock (or skip a paused sync).
        with self.warehouse.session() as session:
            row = self.state.ensure_sync_row(session, sync.name)
            if row["status"] == "paused":
                self.state.insert_run(session, {
                    **base_run, "status": "skipped", "finished_at": started, "duration_ms": 0,
                    "error_message": "the sync is paused; `audsync resume` it to run again",
                })
                result.status = "skipped"
                result.error_message = f"sync {sync.name!r} is paused; skipped (audsync resume {sync.name})"
                self.reporter.event("skipped", sync=sync.name, run_id=run_id, reason="paused")
                return result
            takeover = self.state.acquire_lock(session, sync.name, run_id, lock_timeout_s())
            self.state.insert_run(session, {**base_run, "status": "running"})
            destination_state = json.loads(row["destination_state"]) if row["destination_state"] else {}
        if takeover:
            self.reporter.event("lock_taken_over", sync=sync.name, run_id=run_id, from_run=takeover.run_id)
        self.reporter.event("locked", sync=sync.name, run_id=run_id)

        heartbeat = _Heartbeat(self.warehouse, self.state, sync.name, run_id)
        heartbeat.start()
        status, error_message, fatal = "success", None, None
        connector = None
        stats = None
        new_state = None
        try:
            self._recover_abandoned(sync, tables, run_id)

            # 2. Plan.
            def freeze(session: Session) -> tuple[PlanCounts, int]:
                counts = tables.freeze(session, run_id, full_resync=full_resync)
                self.state.update_run(session, run_id, planned_adds=counts.adds,
                                      planned_removes=counts.removes, planned_updates=counts.updates)
                return counts, tables.plan_size(session, run_id)

            planned, size = self.warehouse.in_session(freeze)
            result.planned = planned
            self.reporter.event("planned", sync=sync.name, run_id=run_id, adds=planned.adds,
                                removes=planned.removes, updates=planned.updates, recorded=planned.recorded,
                                peak_rss_mb=peak_rss_mb())
            blocked = governance.check_guardrails(self, sync, tables, run_id, planned, force=force, clock=clock)  # governance:
            if blocked: return blocked  # noqa: E701 - governance: a blocked run sends and commits nothing

            # 3. Deliver.
            if planned.sent:
                info = SyncInfo(
                    name=sync.name, mode=sync.mode, run_id=run_id, identifier=sync.identifier,
                    fields=tuple(m.destination_field for m in sync.mapping),
                    settings=dict(sync.settings), state=destination_state,
                    project_dir=str(self.project.project_dir),
                )
                http = delivery.http_client(secrets=destination.secret_values())
                connector = destination.create_connector(info, http)
                # Secrets a connector derives (a signed proof, a refreshed token) are masked too.
                http.add_secrets(connector.secret_values())
                register_secrets(connector.secret_values())
                http.classify = getattr(connector, "classify", None) or http.classify
                opened = connector.open()
                if opened:
                    new_state = json.dumps({**destination_state, **opened}, sort_keys=True, default=str)
                    with self.warehouse.session() as session:
                        self.state.set_destination_state(session, sync.name, new_state)
                recorder = _DeliveryRecorder(self.warehouse, self.state, sync.name, run_id, heartbeat)
                self.reporter.progress_start(sync.name, planned.sent)
                try:
                    stats = deliver(
                        connector,
                        self._batches(tables, run_id, size, delivery.batch_size, heartbeat),
                        max_concurrency=delivery.max_concurrency,
                        on_result=recorder.on_result,
                        on_progress=self.reporter.progress_update,
                    )
                finally:
                    recorder.flush()
                    self.reporter.progress_stop()
                self.reporter.event("delivered", sync=sync.name, run_id=run_id, peak_rss_mb=peak_rss_mb())
                connector.close(True)
                http.close()
        except FatalDestinationError as error:
            fatal = redact(str(error))
            status, error_message = "error", f"destination {sync.destination!r}: {fatal}"
        except KeyboardInterrupt:
            status, error_message = "aborted", "interrupted"
        except LockLost as error:
            status, error_message = "aborted", str(error)
        except Exception as error:  # noqa: BLE001 - recorded as the run's error, exit 1
            status, error_message = "error", redact(f"{type(error).__name__}: {error}")
            logger.debug("run failed", exc_info=True)
        finally:
            if connector is not None and status != "success":
                try:
                    connector.close(False)
                    http.close()
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    logger.debug("connector close failed", exc_info=True)
            heartbeat.stop()

        # 4. Commit what the destination accepted, and 5. record the run.
        if not heartbeat.lost:
            try:
                # A run that ended normally had every batch answered: commit it without
                # matching plan rows to batch ranges.
                result.committed = self._commit(tables, run_id, status, error_message, clock,
                                                every_batch_answered=status == "success",
                                                full_resync=full_resync)
            except Exception as error:  # noqa: BLE001
                status = "error"
                error_message = redact(f"commit failed: {type(error).__name__}: {error}")
                self._record_failure(run_id, status, error_message, clock)
        result.duration_ms = int((time.monotonic() - clock) * 1000)
        if result.committed.failed and status == "success":
            status = "partial_failure"
            with self.warehouse.session() as session:
                self.state.update_run(session, run_id, status=status)
        result.status = status
        result.error_message = error_message
        result.stats = stats
        if not heartbeat.lost:
            with self.warehouse.session() as session:
                sync_status = "error" if fatal else "active"
                self.state.release_lock(
                    session, sync.name, run_id,
                    status=sync_status if (fatal or status in ("success", "partial_failure")) else None,
                    status_error=error_message if fatal else None,
                    synced_at=utcnow() if status in ("success", "partial_failure") else None,
                )
        self.reporter.event("finished", sync=sync.name, run_id=run_id, status=status,
                            rows_added=result.committed.added, rows_removed=result.committed.removed,
                            rows_updated=result.committed.updated, rows_failed=result.committed.failed,
                            duration_ms=result.duration_ms, peak_rss_mb=peak_rss_mb())
        return governance.after_run(self, sync, result)  # governance: alerts

    def _batches(
        self, tables: SyncTables, run_id: str, size: int, batch_size: int, heartbeat: "_Heartbeat"
    ) -> Iterator[tuple[int, list[Change]]]:
        """The plan's sent rows in batches, read one chunk per warehouse session."""
        chunk = max(batch_size, (READ_CHUNK_ROWS // batch_size) * batch_size)
        batch_no = 0
        after = 0
        while after < size:
            if heartbeat.lost:
                raise LockLost(f"run {run_id} lost its lock; another run took the sync over")
            with self.warehouse.session() as session:
                rows = tables.read(session, run_id, after, after + chunk)
            after += chunk
            changes, _unsent = tables.to_changes(rows)
            del rows
            for start in range(0, len(changes), batch_size):
                yield batch_no, changes[start:start + batch_size]
                batch_no += 1

    def _commit(
        self, tables: SyncTables, run_id: str, status: str, error_message: str | None, clock: float,
        every_batch_answered: bool = False, full_resync: bool = False,
    ) -> CommitCounts:
        def commit(session: Session) -> CommitCounts:
            pending = governance.history_before_commit(session, tables, run_id)  # governance:
            committed = tables.commit(session, run_id, utcnow(), every_batch_answered, full_resync)
            governance.history_after_commit(self, session, tables, run_id, pending)  # governance:
            final = status
            if status == "success" and committed.failed:
                final = "partial_failure"
            self.state.update_run(
                session, run_id, status=final, finished_at=utcnow(),
                duration_ms=int((time.monotonic() - clock) * 1000),
                error_message=error_message, **committed.run_columns(),
            )
            return committed

        return self.warehouse.in_session(commit)

    def _record_failure(self, run_id: str, status: str, error_message: str, clock: float) -> None:
        try:
            with self.warehouse.session() as session:
                self.state.update_run(session, run_id, status=status, finished_at=utcnow(),
                                      duration_ms=int((time.monotonic() - clock) * 1000),
                                      error_message=error_message)
        except Exception:  # noqa: BLE001 - the warehouse itself is failing; nothing more to do
            logger.debug("could not record the failed run", exc_info=True)

    def _recover_abandoned(self, sync: SyncModel, tables: SyncTables, run_id: str) -> None:
        """Commit what abandoned runs of ``sync`` delivered, and mark them aborted."""
        with self.warehouse.session() as session:
            abandoned = [r for r in self.state.running_runs(session, sync.name) if r["run_id"] != run_id]
        for run in abandoned:
            committed = self.warehouse.in_session(lambda session, run=run: self._recover(session, tables, run, run_id))
            self.reporter.event("recovered", sync=sync.name, run_id=run_id, abandoned_run=run["run_id"],
                                rows_committed=committed.applied)

    def _recover(self, session: Session, tables: SyncTables, run: dict, run_id: str) -> CommitCounts:
        """Commit what the abandoned ``run`` had delivered; mark it aborted."""
        pending = governance.history_before_commit(session, tables, run["run_id"])  # governance:
        committed = tables.commit(session, run["run_id"], utcnow())
        governance.history_after_commit(self, session, tables, run["run_id"], pending)  # governance:
        finished = utcnow()
        duration = int((finished - run["started_at"]).total_seconds() * 1000) if run["started_at"] else None
        self.state.update_run(
            session, run["run_id"], status="aborted", finished_at=finished, duration_ms=duration,
            error_message=(
                f"abandoned: its heartbeat stopped; run {run_id} took the lock over and "
                f"committed the {committed.applied} rows it had delivered"
            ),
            **committed.run_columns(),
        )
        return committed


class LockLost(Exception):
    """Another run took this run's lock over (its heartbeat had stopped for too long)."""


class _Heartbeat:
    """Refreshes the lock's heartbeat from a thread of its own while the run works."""

    def __init__(self, warehouse: Warehouse, state: StateStore, sync_name: str, run_id: str):
        self.warehouse = warehouse
        self.state = state
        self.sync_name = sync_name
        self.run_id = run_id
        self.interval_s = min(30.0, lock_timeout_s() / 4)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audsync-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    with self.warehouse.session() as session:
                        if not self.state.heartbeat(session, self.sync_name, self.run_id):
                            self.lost = True
                            return
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next tick
                    logger.debug("heartbeat failed", exc_info=True)
        finally:
            self.warehouse.close()


class _DeliveryRecorder:
    """Buffers answered batches and writes them to the warehouse about once a second."""

    def __init__(self, warehouse: Warehouse, state: StateStore, sync_name: str, run_id: str, heartbeat: _Heartbeat):
        self.warehouse = warehouse
        self.state = state
        self.sync_name = sync_name
        self.run_id = run_id
        self.heartbeat = heartbeat
        self.batches: list[tuple[int, int, int, int, int]] = []
        self.errors: list[RowError] = []
        self.ids: list[tuple[str, str]] = []
        self.last_flush = time.monotonic()

    def on_result(self, batch_no: int, batch: Sequence[Change], result: BatchResult) -> None:
        if not batch:
            return
        self.batches.append((batch_no, batch[0].seq, batch[-1].seq, len(result.rejected), result.unmatched))
        self.errors.extend(result.rejected)
        if result.destination_ids:
            self.ids.extend(result.destination_ids.items())
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.batches or self.errors or self.ids:
            errors = [
                RowError(e.key, e.op, e.error_code, redact(e.error_message)[:2000], e.retryable)
                for e in self.errors
            ]
            with self.warehouse.session() as session:
                self.state.record_delivery(session, self.run_id, self.sync_name, self.batches, errors, self.ids)
            self.batches, self.errors, self.ids = [], [], []
        self.last_flush = time.monotonic()
