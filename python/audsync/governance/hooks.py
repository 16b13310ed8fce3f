"""The governance steps of a run, each called from one line of ``runner.py`` marked
``# governance:``, so the runner's own code stays as it is:

* :func:`check_guardrails` after the freeze, before anything is sent;
* :func:`history_before_commit` / :func:`history_after_commit` in the commit's transaction;
* :func:`after_run` when a run has ended (alerts).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import names
from ..state import utcnow
from . import history
from .config import guardrails_of, split_group_of
from .guardrails import Verdict, evaluate

logger = logging.getLogger("audsync.governance")


def verdict_for(runner, sync, tables, session, counts) -> Verdict:
    """The guardrail verdict on ``counts`` (a frozen plan's, or a preview's)."""
    held = int(session.scalar(f"select count(*) from {tables.snapshot}"))
    audience = int(session.scalar(f"select count(*) from {tables.membership}"))
    return evaluate(counts.adds, counts.removes, counts.updates, held, audience,
                    guardrails_of(runner.project, sync))


def check_guardrails(run, planned):
    """Check the frozen plan of ``run`` (the runner's ``_Run``); return its result when it
    is blocked, else ``None``.

    A blocked run sends and commits nothing: in one fenced transaction its plan is dropped,
    it is recorded with status ``blocked`` and the numbers, and the lock is released (the
    sync's status stays as it was); alerts go out when the run returns. With ``force`` the
    run goes on and is recorded ``forced``.
    """
    from ..runner import RunResult

    runner, sync, tables, run_id = run.runner, run.sync, run.tables, run.run_id
    guardrails_of(runner.project, sync)  # a bad guardrail config fails every run, empty or not
    if planned.sent == 0 and not run.force:
        # A plan that sends nothing breaks no guardrail (evaluate), so the two counts it would
        # read (a scan each of the snapshot and S on PostgreSQL) are not needed.
        return None
    verdict = runner.warehouse.in_session(lambda session: verdict_for(runner, sync, tables, session, planned))
    if run.force:
        with run.heartbeat.held(), runner.warehouse.session() as session:
            runner.state.fence(session, run.lock)
            runner.state.update_run(session, run_id, forced=True)
    if not verdict.blocked:
        return None
    if run.force:
        runner.reporter.event("guardrail_overridden", sync=sync.name, run_id=run_id, reasons=list(verdict.reasons))
        return None
    message = verdict.message(sync.name)
    duration_ms = int((time.monotonic() - run.clock) * 1000)

    def block(session) -> None:
        runner.state.fence(session, run.lock)
        session.execute(f"delete from {tables.plan} where {names.RUN_ID} = ?", (run_id,))
        # The freeze's mark (a null key): nothing of this plan will be committed.
        session.execute(f"delete from {tables.candidates} where {names.KEY} is null")
        runner.state.update_run(session, run_id, status="blocked", finished_at=utcnow(),
                                duration_ms=duration_ms, error_message=message)
        runner.state.release_lock(session, run.lock)

    with run.heartbeat.held():
        runner.warehouse.in_session(block)
    result = RunResult(run_id, sync.name, "blocked", planned=planned, error_message=message,
                       destination=sync.destination, mode=sync.mode, duration_ms=duration_ms)
    runner.reporter.event("blocked", sync=sync.name, run_id=run_id, reasons=list(verdict.reasons))
    return result


def history_before_commit(session, tables, run_id: str) -> str | None:
    """In the commit's transaction, before it: set the plan aside for the history."""
    return history.before_commit(session, tables, run_id)


def history_after_commit(runner, session, tables, run_id: str, pending: str | None) -> None:
    """In the commit's transaction, after it: append what the destination accepted."""
    history.after_commit(session, tables, run_id, pending, split_group_of(runner.project, tables.sync), utcnow())


def after_run(runner, sync, result: Any):
    """At the end of a run: record the audience's size and send the alerts that fire.
    Never fails the run; returns ``result``."""
    try:
        from . import alerts

        alerts.after_run(runner, sync, result)
    except Exception:  # noqa: BLE001 - an alert must never change a run's outcome
        logger.warning("audsync: alerts for run %s failed", result.run_id, exc_info=logger.isEnabledFor(logging.DEBUG))
    return result
