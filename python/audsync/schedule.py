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
