"""The service's scheduler (api.md, Triggers, runs and the scheduler).

A thread that wakes every ``tick_s`` seconds (at most 60), in UTC, and queues a run of every
sync whose schedule is due, by :func:`audsync.schedule.due_syncs`: the same rule as
``audsync run --due``. A slot missed while the service was down fires once, since "due" looks
only at the last run's start. A sync with a run queued or running (here or on the command
line, through its lock) is left for the next tick.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Callable

from ..errors import AudsyncError
from ..schedule import due_syncs, last_slot_starts
from .errors import ApiError
from .syncs import sync_id_of

logger = logging.getLogger("audsync.serve")

MAX_TICK_S = 60.0


class Scheduler:
    """Queues due syncs of every workspace through a :class:`~audsync.service.runs.RunManager`."""

    def __init__(self, registry, manager, tick_s: float = 30.0,
                 clock: Callable[[], dt.datetime] | None = None):
        self.registry = registry
        self.manager = manager
        self.tick_s = min(MAX_TICK_S, max(0.2, float(tick_s)))
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="audsync-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not end the scheduler
                logger.warning("scheduler tick failed", exc_info=True)
            self._stop.wait(self.tick_s)

    def tick(self) -> list[str]:
        """Queue every due sync now; return the run ids queued."""
        queued = []
        now = self.clock()
        for ws in self.registry.workspaces.values():
            if self._stop.is_set() or self.manager.stopping:
                break
            try:
                project = ws.project()
                runner = ws.state_runner()
                try:
                    with runner.warehouse.session() as session:
                        if runner.state.missing_tables(session):
                            continue
                        states = runner.state.all_sync_rows(session)
                        starts = last_slot_starts(session, runner.state)
                finally:
                    runner.warehouse.close()
                due = due_syncs(project.syncs.values(), states, starts, now)
            except (AudsyncError, ValueError) as error:
                logger.warning("scheduler: workspace %s: %s", ws.name, getattr(error, "message", error))
                continue
            for sync in due:
                try:
                    run = self.manager.trigger(ws, sync, sync_id_of(ws, sync.name), trigger="schedule")
                    queued.append(run["id"])
                    logger.info("scheduler: queued run %s of %s", run["id"], sync.name)
                except ApiError as error:
                    logger.info("scheduler: %s not queued: %s", sync.name, error.message)
        return queued
