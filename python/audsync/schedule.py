"""Sync schedules: when ``audsync run --due`` runs a sync.

A schedule is ``manual`` (the default: only an explicit ``audsync run`` runs the sync), an
interval (``15m``, ``hourly``, ``daily``, ``weekly``: due once that long has passed since the
last run *started*), or a five-field cron expression evaluated in UTC (due when a fire time has
passed since the last run started).

audsync has no daemon: an orchestrator calls ``audsync run --due`` often (every few minutes)
and each sync whose schedule is due runs. All datetimes are timezone-aware and compared in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from croniter import croniter

MANUAL = "manual"

INTERVALS: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "hourly": timedelta(hours=1),
    "daily": timedelta(days=1),
    "weekly": timedelta(weeks=1),
}

ACCEPTED_FORMS = "manual, 15m, hourly, daily, weekly, or a five-field cron expression"


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; build it with :func:`parse_schedule`."""

    text: str
    """The schedule as written (keywords in lower case)."""
    kind: str
    """``manual``, ``interval`` or ``cron``."""
    interval: timedelta | None = None
    """For ``interval`` schedules, the time between runs."""
    cron: str | None = None
    """For ``cron`` schedules, the five-field expression."""

    def __str__(self) -> str:
        return self.text

    @property
    def is_manual(self) -> bool:
        """True when only an explicit ``audsync run`` runs the sync."""
        return self.kind == MANUAL

    def next_run(self, after: datetime) -> datetime | None:
        """When a sync whose last run started at ``after`` is next due (``None``: never).

        For an interval, ``after`` plus the interval; for cron, the first fire time strictly
        after ``after``.
        """
        after = _utc(after, "after")
        if self.interval is not None:
            return after + self.interval
        if self.cron is not None:
            return croniter(self.cron, after).get_next(datetime).astimezone(timezone.utc)
        return None

    def is_due(
        self,
        last_started_at: datetime | None,
        now: datetime,
        *,
        tolerance: timedelta = timedelta(0),
    ) -> bool:
        """Whether the sync should run at ``now``, given when its last run started.

        ``manual`` is never due; otherwise a sync that never ran is due, an interval schedule
        is due once the interval has passed since ``last_started_at``, and a cron schedule is
        due when a fire time lies in ``(last_started_at, now]``.

        Args:
            last_started_at: start of the last run, or ``None`` if the sync never ran.
            now: the current time.
            tolerance: how early a run may come. An orchestrator calling ``--due`` every 15
                minutes reaches a ``15m`` sync a few seconds short of the interval; a
                tolerance of a minute keeps such a sync from skipping every other call.
        """
        now = _utc(now, "now")
        if self.is_manual:
            return False
        if last_started_at is None:
            return True
        due_at = self.next_run(last_started_at)
        return due_at is not None and due_at <= now + tolerance


def parse_schedule(text: str | None) -> Schedule:
    """Parse a sync's ``schedule`` config; ``None`` or empty means ``manual``.

    Raises:
        ValueError: naming the value and the accepted forms, for anything else, including
            six-field (seconds) cron expressions and cron expressions that never fire.
    """
    if text is None:
        return Schedule(MANUAL, MANUAL)
    if not isinstance(text, str):
        raise ValueError(_unaccepted(text, "not a string"))
    cleaned = " ".join(text.split())
    keyword = cleaned.lower()
    if keyword in ("", MANUAL):
        return Schedule(MANUAL, MANUAL)
    if keyword in INTERVALS:
        return Schedule(keyword, "interval", interval=INTERVALS[keyword])
    fields = cleaned.split(" ")
    if len(fields) != 5:
        # croniter also takes a sixth (seconds) field and @-keywords; the contract promises
        # five fields, and the dbt package validates the same forms.
        raise ValueError(_unaccepted(text, f"{len(fields)} fields where cron has five"))
    if not croniter.is_valid(cleaned):
        raise ValueError(_unaccepted(text, "not a valid cron expression"))
    try:
        # A valid expression may still never fire ("0 0 31 2 *"): find out now, not at run time.
        croniter(cleaned, datetime(2000, 1, 1, tzinfo=timezone.utc)).get_next(datetime)
    except Exception as exc:  # croniter raises its own error types, which vary by version
        raise ValueError(_unaccepted(text, f"the expression never fires ({exc})")) from exc
    return Schedule(cleaned, "cron", cron=cleaned)


def _unaccepted(value: object, reason: str) -> str:
    """The message for an unaccepted schedule value."""
    return f"invalid schedule {value!r}: {reason}; expected {ACCEPTED_FORMS}"


def _utc(moment: datetime, name: str) -> datetime:
    """``moment`` in UTC; a naive datetime is refused rather than guessed."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got naive {moment.isoformat()}")
    return moment.astimezone(timezone.utc)


# -- what is due: one implementation for `audsync run --due` and the service's scheduler ------

# Lifecycle states (api.md) that keep a sync off every schedule.
NOT_SCHEDULED = frozenset({"paused", "draft"})
# How early `audsync run --due` may reach a sync: an orchestrator calling every 15 minutes
# reaches a 15m sync a few seconds short of its interval. The service's scheduler wakes on its
# own clock and uses no tolerance.
CLI_TOLERANCE = timedelta(minutes=1)


def aware(moment: datetime | None) -> datetime | None:
    """A state table's naive UTC timestamp as an aware one (``None`` stays ``None``)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def row_value(row, column: str):
    """A column of a state row, whether a dict of columns or a typed row (``SyncRow``,
    ``RunRow`` of the core branch); ``None`` for a missing row or column."""
    if row is None:
        return None
    if isinstance(row, dict):
        return row.get(column)
    return getattr(row, column, None)


def last_slot_starts(session, state) -> dict[str, datetime]:
    """When each sync last took a schedule slot: the start of its latest run, counting a
    skipped run only when it was a scheduled one (a freshness skip uses its slot; a manual
    run of a paused sync does not)."""
    rows = session.fetchall(
        f"select sync_name, max(started_at) from {state.runs} where status <> ? or {_q(state, 'trigger')} = ?"
        " group by sync_name",
        ("skipped", "schedule"),
    )
    return {name: aware(started) for name, started in rows if started is not None}


def _q(state, column: str) -> str:
    """``trigger`` is a reserved word on PostgreSQL: quote it as the warehouse does."""
    return state.warehouse.quote(column)


def next_run_at(schedule_text: str | None, status: str | None, last_start: datetime | None,
                now: datetime) -> datetime | None:
    """When the scheduler next runs a sync: ``None`` for manual, paused and draft syncs; ``now``
    for one that never ran (it is due)."""
    try:
        schedule = parse_schedule(schedule_text)
    except ValueError:
        return None
    if schedule.is_manual or status in NOT_SCHEDULED:
        return None
    if last_start is None:
        return _utc(now, "now")
    return schedule.next_run(last_start)


def due_syncs(syncs, states: dict, last_starts: dict, now: datetime,
              tolerance: timedelta = timedelta(0)) -> list:
    """The syncs (``SyncModel`` s) whose schedule is due at ``now``, by name.

    Args:
        syncs: the project's syncs.
        states: ``audsync_syncs`` rows by sync name (their ``status``).
        last_starts: :func:`last_slot_starts`.
        tolerance: how early a run may come (:data:`CLI_TOLERANCE` for ``--due``).

    Raises:
        ValueError: naming the sync, for a schedule that does not parse.
    """
    due = []
    for sync in sorted(syncs, key=lambda s: s.name):
        try:
            schedule = parse_schedule(sync.schedule)
        except ValueError as error:
            raise ValueError(f"sync {sync.name!r}: schedule: {error}") from None
        if row_value(states.get(sync.name), "status") in NOT_SCHEDULED:
            continue
        if schedule.is_due(last_starts.get(sync.name), now, tolerance=tolerance):
            due.append(sync)
    return due


# -- freshness: "sync no faster than the audience is evaluated" -------------------------------


def freshness_skip_reason(session, state, tables, sync_name: str) -> str | None:
    """Why a scheduled run of ``sync_name`` would be pointless, or ``None`` to run it.

    A scheduled run (``--due``, or the service's scheduler under ``--no-evaluate``) is
    skipped when ``S`` was not rebuilt since the last successful run (``evaluated_at``, which
    the materialization records when it builds ``S``) and nothing is left to retry (the diff
    views are empty: rejected rows and rows of unknown outcome stay in them). When either
    time is unknown the run goes ahead.
    """
    row = session.fetchone(f"select evaluated_at from {state.syncs} where sync_name = ?", (sync_name,))
    evaluated = row[0] if row else None
    if evaluated is None:
        return None
    last = session.fetchone(
        f"select evaluated_at, started_at from {state.runs} where sync_name = ? and status in (?, ?)"
        " order by started_at desc limit 1",
        (sync_name, "success", "partial_failure"),
    )
    if last is None:
        return None
    seen = last[0] or last[1]
    if seen is None or evaluated > seen:
        return None
    counts, _rows = tables.preview(session, 0)
    if counts.total:
        return None
    return f"audience not re-evaluated since {evaluated:%Y-%m-%d %H:%M:%S} UTC"


def record_skip(session, state, sync, reason: str, trigger: str = "schedule",
                run_id: str | None = None) -> str:
    """Record a skipped run of ``sync`` with ``reason``; return its id (or fill the queued
    row ``run_id``)."""
    from .runner import new_run_id
    from .state import utcnow

    run_id = run_id or new_run_id()
    now = utcnow()
    row = session.fetchone(f"select evaluated_at from {state.syncs} where sync_name = ?", (sync.name,))
    state.start_run(session, {
        "run_id": run_id, "sync_name": sync.name, "trigger": trigger, "status": "skipped",
        "started_at": now, "finished_at": now, "duration_ms": 0, "error_message": reason,
        "destination": sync.destination, "sync_mode": sync.mode, "full_resync": False,
        "evaluated_at": row[0] if row else None,
    })
    return run_id


def rebuild_warning(schedule_text: str | None, runs: list[dict]) -> str | None:
    """A warning when a schedule fires more often than the audience is rebuilt, judged on
    ``runs`` (newest first, with ``started_at`` and ``evaluated_at``), else ``None``."""
    try:
        schedule = parse_schedule(schedule_text)
    except ValueError:
        return None
    if schedule.is_manual:
        return None
    seen = [r for r in runs if row_value(r, "evaluated_at") is not None and row_value(r, "started_at") is not None]
    if len(seen) < 3:
        return None
    builds = sorted({row_value(r, "evaluated_at") for r in seen})
    if len(builds) >= len(seen):
        return None
    start = aware(min(row_value(r, "started_at") for r in seen))
    first = schedule.next_run(start)
    period = schedule.next_run(first) - first if first else None
    rebuild = (builds[-1] - builds[0]) / (len(builds) - 1) if len(builds) > 1 else None
    every = f"every {rebuild}" if rebuild else "once"
    return (f"schedule {schedule.text!r} fires every {period}, but over its last {len(seen)} runs the "
            f"audience was rebuilt {every} ({len(builds)} build(s)): runs that find no new build send "
            "nothing; schedule it no faster than the audience is rebuilt")
