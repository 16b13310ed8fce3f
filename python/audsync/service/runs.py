"""Runs as the API sees them, and the service's bounded pool of workers (api.md, Triggers).

A trigger (or a scheduled slot) inserts a ``queued`` row in ``audsync_runs`` at once and
answers; a worker then re-evaluates the audience with ``dbt run --select <sync>`` (unless
``--no-evaluate``) and runs the sync with that run id (convention 3), under the same lock as
the CLI. At shutdown the runners are asked to stop (convention 2): the current run commits
what was answered and ends ``aborted``; queued runs that never started end ``aborted`` too.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import AudsyncError, LockHeld
from ..redact import redact
from ..schedule import aware, freshness_skip_reason, record_skip, row_value
from ..state import RUN_COLUMNS, lock_timeout_s, utcnow
from .errors import Conflict, NotFound
from .workspaces import DBT_LOCK, Workspace

logger = logging.getLogger("audsync.serve")

ROW_ERRORS_SHOWN = 100
RUN_FIELDS = ("status", "trigger", "started_at", "finished_at", "duration_ms", "planned_adds",
              "planned_removes", "planned_updates", "rows_added", "rows_removed", "rows_updated",
              "rows_failed", "error_message", "full_resync", "evaluated_at")
# A dbt that finds the DuckDB file held by a runner's step for a moment is tried again.
DBT_ATTEMPTS = 4


def _iso(moment):
    moment = aware(moment) if isinstance(moment, dt.datetime) else moment
    return moment.isoformat().replace("+00:00", "Z") if isinstance(moment, dt.datetime) else moment


def run_object(ws: Workspace, sync_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """An ``audsync_runs`` row as the API's run object."""
    out = {"id": row["run_id"], "sync_id": sync_id, "workspace_id": ws.id}
    for name in RUN_FIELDS:
        value = row.get(name)
        if name.endswith("_at"):
            value = _iso(value)
        elif name == "full_resync":
            value = bool(value)
        elif name not in ("status", "trigger", "error_message") and value is not None:
            value = int(value)
        out[name] = value
    out["error_message"] = out["error_message"] or ""
    return out


def list_runs(ws: Workspace, sync, sync_id: str, limit: int = 20, offset: int = 0) -> tuple[list[dict], int]:
    """Runs of ``sync``, newest first, and how many there are in all."""
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            if runner.state.missing_tables(session):
                return [], 0
            runs = runner.state.runs
            total = int(session.scalar(f"select count(*) from {runs} where sync_name = ?", (sync.name,)))
            rows = session.fetchall(
                f"select {', '.join(RUN_COLUMNS)} from {runs} where sync_name = ?"
                " order by started_at desc, run_id desc limit ? offset ?",
                (sync.name, int(limit), int(offset)),
            )
    finally:
        runner.warehouse.close()
    return [run_object(ws, sync_id, dict(zip(RUN_COLUMNS, r))) for r in rows], total


def get_run(ws: Workspace, sync, sync_id: str, run_id: str) -> dict[str, Any]:
    """One run of ``sync`` with its first row errors; NotFound otherwise."""
    from ..state import ERROR_COLUMNS

    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            row = None
            if not runner.state.missing_tables(session):
                row = session.fetchone(
                    f"select {', '.join(RUN_COLUMNS)} from {runner.state.runs} where sync_name = ? and run_id = ?",
                    (sync.name, run_id),
                )
            if row is None:
                raise NotFound(f"no run {run_id!r} of audience sync {sync_id}", field="run_id")
            errors = runner.state.errors
            total = int(session.scalar(f"select count(*) from {errors} where run_id = ?", (run_id,)))
            shown = session.fetchall(
                f"select {', '.join(ERROR_COLUMNS)} from {errors} where run_id = ?"
                " order by member_key, op limit ?",
                (run_id, ROW_ERRORS_SHOWN),
            )
    finally:
        runner.warehouse.close()
    out = run_object(ws, sync_id, dict(zip(RUN_COLUMNS, row)))
    out["row_errors"] = [
        {"member_key": str(e["member_key"]), "op": e["op"] or "", "error_code": e["error_code"] or "",
         "error_message": redact(e["error_message"] or ""), "retryable": bool(e["retryable"])}
        for e in (dict(zip(ERROR_COLUMNS, r)) for r in shown)
    ]
    out["row_errors_total"] = total
    return out


@dataclass
class Job:
    """One queued run: which sync, why, and what is working on it now."""

    ws: Workspace
    sync_name: str
    run_id: str
    trigger: str
    full_resync: bool = False
    force: bool = False
    """The trigger's ``force``: the guardrails are overridden for this run (governance)."""
    runner: Any = None
    process: subprocess.Popen | None = None
    future: Future | None = None
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class RunManager:
    """Queues runs and works them off in a bounded pool (``--workers``)."""

    def __init__(self, workers: int = 2, evaluate: bool = True):
        self.workers = max(1, int(workers))
        self.evaluate = evaluate
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="audsync-worker")
        self.jobs: dict[tuple[str, str], Job] = {}
        self.lock = threading.Lock()
        self.stopping = False

    # -- queueing ---------------------------------------------------------------------------

    def busy_run(self, ws: Workspace, sync_name: str) -> str | None:
        """The id of a run of the sync that is queued or running (here, or by another process
        that holds its lock with a fresh heartbeat), else ``None``."""
        with self.lock:
            job = self.jobs.get((ws.id, sync_name))
            if job is not None:
                return job.run_id
        runner = ws.state_runner()
        try:
            with runner.warehouse.session() as session:
                if runner.state.missing_tables(session):
                    return None
                row = runner.state.sync_row(session, sync_name)
        finally:
            runner.warehouse.close()
        holder, beat = row_value(row, "lock_run_id"), row_value(row, "lock_heartbeat_at")
        if holder and beat and (utcnow() - beat).total_seconds() <= lock_timeout_s():
            return holder
        return None

    def trigger(self, ws: Workspace, sync, sync_id: str, *, trigger: str = "api",
                full_resync: bool = False, force: bool = False) -> dict[str, Any]:
        """Queue a run of ``sync``; return the queued run's object. Conflict (409) naming the
        run while one is queued or running, or when the service is stopping. ``force``
        overrides the guardrails for that run, as ``audsync run --force`` does."""
        from ..runner import new_run_id

        if self.stopping:
            raise Conflict("the service is shutting down and takes no new runs", code="shutting_down")
        with ws.write_lock:
            busy = self.busy_run(ws, sync.name)
            if busy:
                raise Conflict(f"sync {sync.name!r} has run {busy} queued or running; wait for it to end",
                               code="run_in_progress", extra={"run_id": busy})
            run_id = new_run_id()
            now = utcnow()
            runner = ws.state_runner()
            try:
                with runner.warehouse.session() as session:
                    runner.state.insert_run(session, {
                        "run_id": run_id, "sync_name": sync.name, "trigger": trigger, "status": "queued",
                        "started_at": now, "destination": sync.destination, "sync_mode": sync.mode,
                        "full_resync": bool(full_resync),
                    })
            finally:
                runner.warehouse.close()
            job = Job(ws, sync.name, run_id, trigger, bool(full_resync), force=bool(force))
            with self.lock:
                self.jobs[(ws.id, sync.name)] = job
            job.future = self.pool.submit(self._work, job)
        row = {"run_id": run_id, "status": "queued", "trigger": trigger, "started_at": now,
               "full_resync": bool(full_resync)}
        return run_object(ws, sync_id, row)

    # -- working ----------------------------------------------------------------------------

    def _work(self, job: Job) -> None:
        try:
            self._run(job)
        except Exception as error:  # noqa: BLE001 - recorded on the run: a worker never dies
            logger.warning("run %s of %s failed: %s", job.run_id, job.sync_name, redact(str(error)))
            self._finish(job, "error", redact(f"{type(error).__name__}: {error}"))
        finally:
            with self.lock:
                if self.jobs.get((job.ws.id, job.sync_name)) is job:
                    del self.jobs[(job.ws.id, job.sync_name)]
            job.done.set()

    def _run(self, job: Job) -> None:
        if self.stopping:
            self._finish(job, "aborted", "the service stopped before the run started")
            return
        job.started = True
        ws = job.ws
        if self.evaluate:
            failure = self._evaluate(job)
            if failure:
                self._finish(job, "aborted" if self.stopping else "error", failure)
                return
        elif job.trigger == "schedule":
            reason = self._freshness(job)
            if reason:
                return
        if self.stopping:
            self._finish(job, "aborted", "the service stopped before the run started")
            return
        project = ws.project()
        sync = project.syncs.get(job.sync_name)
        if sync is None:
            self._finish(job, "error", f"sync {job.sync_name!r} is no longer in the project")
            return
        try:
            job.runner = ws.runner()
        except AudsyncError as error:
            self._finish(job, "error", error.message)
            return
        if self.stopping:
            job.runner.request_stop()
        try:
            result = job.runner.run(sync, trigger=job.trigger, full_resync=job.full_resync, run_id=job.run_id,
                                    force=job.force)
        except LockHeld as error:
            self._finish(job, "skipped", f"another run holds the sync: {error.message}")
            return
        except AudsyncError as error:
            self._finish(job, "error", error.message)
            return
        finally:
            job.runner.warehouse.close()
        if result.status == "aborted" and result.error_message == "stopped before it started":
            self._finish(job, "aborted", "the service stopped before the run started")
        logger.info("run %s of %s: %s", job.run_id, job.sync_name, result.status)

    def _freshness(self, job: Job) -> str | None:
        """Under --no-evaluate, a scheduled run of an audience not rebuilt is skipped."""
        ws = job.ws
        runner = ws.state_runner()
        try:
            sync = ws.project().syncs[job.sync_name]
            tables = runner.check_ready(sync)
            with runner.warehouse.session() as session:
                reason = freshness_skip_reason(session, runner.state, tables, sync.name)
                if reason:
                    record_skip(session, runner.state, sync, reason, trigger=job.trigger, run_id=job.run_id)
            return reason
        finally:
            runner.warehouse.close()

    def _evaluate(self, job: Job) -> str | None:
        """``dbt run --select <sync>`` in a child process; the failure's text, or ``None``."""
        ws = job.ws
        project = ws.project()
        args = [sys.executable, "-m", "dbt.cli.main", "run", "--select", job.sync_name, "--quiet",
                "--project-dir", str(project.project_dir), "--profiles-dir", str(project.profiles_dir)]
        if ws.target:
            args += ["--target", ws.target]
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
        output = ""
        for attempt in range(DBT_ATTEMPTS):
            with DBT_LOCK:
                if self.stopping:
                    return "the service stopped before the audience was re-evaluated"
                job.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, start_new_session=True)
                try:
                    output, _ = job.process.communicate()
                finally:
                    code = job.process.returncode
                    job.process = None
            if code == 0:
                return None
            if self.stopping:
                return "the service stopped while the audience was re-evaluated"
            if "lock" not in output.lower():
                break
            time.sleep(0.5 * (attempt + 1))
        tail = " ".join(output.strip().splitlines()[-5:])[-800:]
        return redact(f"`dbt run --select {job.sync_name}` failed (exit {code}): {tail}")

    def _finish(self, job: Job, status: str, message: str) -> None:
        """End the job's run row (still ``queued``) with ``status`` and ``message``."""
        runner = job.ws.state_runner()
        try:
            with runner.warehouse.session() as session:
                now = utcnow()
                session.execute(
                    f"update {runner.state.runs} set status = ?, error_message = ?, finished_at = ?,"
                    " duration_ms = 0 where run_id = ? and status = ?",
                    (status, redact(message)[:2000], now, job.run_id, "queued"),
                )
        except Exception:  # noqa: BLE001 - the warehouse is failing: the next start cleans up
            logger.debug("could not record the end of run %s", job.run_id, exc_info=True)
        finally:
            runner.warehouse.close()

    # -- stopping ---------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Take no new runs; ask running ones to stop; wait up to ``timeout_s`` for them."""
        self.stopping = True
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.runner is not None:
                job.runner.request_stop()
            process = job.process
            if process is not None and process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        for job in jobs:
            if not job.done.is_set() and job.future is not None and job.future.cancelled():
                self._finish(job, "aborted", "the service stopped before the run started")


def recover_queued(ws: Workspace) -> int:
    """At start: runs left ``queued`` by a service that died never started; end them
    ``aborted`` so that they hold nothing up. Returns how many there were."""
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            if runner.state.missing_tables(session):
                return 0
            return session.execute_count(
                f"update {runner.state.runs} set status = ?, finished_at = ?, duration_ms = 0, error_message = ?"
                " where status = ?",
                ("aborted", utcnow(), "queued when the service stopped; it never started", "queued"),
            )
    finally:
        runner.warehouse.close()
