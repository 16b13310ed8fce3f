"""Schedule parsing and when a sync is due."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from audsync.schedule import Schedule, parse_schedule

UTC = timezone.utc


def at(*args: int) -> datetime:
    """A UTC datetime."""
    return datetime(*args, tzinfo=UTC)


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [None, "", "manual", "MANUAL", "  manual  "])
def test_manual_forms(text):
    schedule = parse_schedule(text)
    assert schedule.kind == "manual" and schedule.is_manual
    assert str(schedule) == "manual"


@pytest.mark.parametrize(
    ("text", "interval"),
    [
        ("15m", timedelta(minutes=15)),
        ("hourly", timedelta(hours=1)),
        ("Daily", timedelta(days=1)),
        (" weekly ", timedelta(days=7)),
    ],
)
def test_intervals(text, interval):
    schedule = parse_schedule(text)
    assert schedule.kind == "interval" and schedule.interval == interval
    assert schedule.text == text.strip().lower()


def test_cron_is_normalised():
    schedule = parse_schedule("0  */4 *   * *")
    assert schedule.kind == "cron" and schedule.cron == "0 */4 * * *"
    assert schedule.interval is None


@pytest.mark.parametrize(
    "text",
    [
        "0 0 * * * *",  # six fields (seconds)
        "* * * *",  # four fields
        "@daily",  # croniter keyword, not a contract form
        "every day",
        "2h",
        "61 * * * *",  # minute out of range
        "a b c d e",
        "0 0 31 2 *",  # valid syntax, never fires
    ],
)
def test_rejected_forms_name_value_and_accepted_forms(text):
    with pytest.raises(ValueError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "manual, 15m, hourly, daily, weekly, or a five-field cron expression" in message


def test_non_string_rejected():
    with pytest.raises(ValueError, match="invalid schedule 15: not a string"):
        parse_schedule(15)  # type: ignore[arg-type]


# -- is_due: manual and never run ---------------------------------------------------------


def test_manual_is_never_due():
    manual = parse_schedule("manual")
    assert manual.is_due(None, at(2026, 1, 1)) is False
    assert manual.is_due(at(2000, 1, 1), at(2026, 1, 1)) is False
    assert manual.next_run(at(2026, 1, 1)) is None


@pytest.mark.parametrize("text", ["15m", "hourly", "daily", "weekly", "0 9 * * 1"])
def test_never_run_is_due(text):
    assert parse_schedule(text).is_due(None, at(2026, 1, 1)) is True


# -- is_due: intervals --------------------------------------------------------------------


def test_interval_due_exactly_at_the_boundary():
    schedule = parse_schedule("15m")
    last = at(2026, 1, 1, 10, 0)
    assert schedule.is_due(last, last + timedelta(minutes=15)) is True
    assert schedule.is_due(last, last + timedelta(minutes=15) - timedelta(microseconds=1)) is False


def test_weekly_interval():
    schedule = parse_schedule("weekly")
    last = at(2026, 1, 5, 9, 0)
    assert schedule.is_due(last, last + timedelta(days=6, hours=23, minutes=59)) is False
    assert schedule.is_due(last, last + timedelta(days=7)) is True
    assert schedule.next_run(last) == at(2026, 1, 12, 9, 0)


def test_daily_interval_counts_from_last_start_not_midnight():
    schedule = parse_schedule("daily")
    last = at(2026, 1, 1, 18, 30)
    assert schedule.is_due(last, at(2026, 1, 2, 18, 29)) is False
    assert schedule.is_due(last, at(2026, 1, 2, 18, 30)) is True


def test_tolerance_lets_a_slightly_early_call_run():
    schedule = parse_schedule("15m")
    last = at(2026, 1, 1, 10, 0, 3)
    now = at(2026, 1, 1, 10, 15, 0)
    assert schedule.is_due(last, now) is False
    assert schedule.is_due(last, now, tolerance=timedelta(minutes=1)) is True


def test_clock_behind_last_start_is_not_due():
    schedule = parse_schedule("hourly")
    assert schedule.is_due(at(2026, 1, 1, 12), at(2026, 1, 1, 11)) is False


# -- is_due: cron -------------------------------------------------------------------------


def test_cron_fire_time_at_now_is_due():
    schedule = parse_schedule("0 */4 * * *")
    last = at(2026, 1, 1, 4, 0)
    assert schedule.is_due(last, at(2026, 1, 1, 7, 59, 59)) is False
    assert schedule.is_due(last, at(2026, 1, 1, 8, 0)) is True


def test_cron_fire_time_at_last_start_does_not_count_again():
    schedule = parse_schedule("0 */4 * * *")
    last = at(2026, 1, 1, 4, 0)
    assert schedule.is_due(last, last) is False
    assert schedule.is_due(last, at(2026, 1, 1, 4, 0, 30)) is False


def test_cron_start_just_before_a_fire_time():
    schedule = parse_schedule("0 */4 * * *")
    last = at(2026, 1, 1, 3, 59, 59, 999999)
    assert schedule.is_due(last, at(2026, 1, 1, 4, 0)) is True
    assert schedule.next_run(last) == at(2026, 1, 1, 4, 0)


def test_cron_missed_fire_times_make_it_due_once():
    schedule = parse_schedule("*/15 * * * *")
    # The orchestrator was down for hours: one run catches up, the sync is not due twice.
    assert schedule.is_due(at(2026, 1, 1, 0, 0), at(2026, 1, 1, 5, 7)) is True
    assert schedule.is_due(at(2026, 1, 1, 5, 7), at(2026, 1, 1, 5, 14)) is False


def test_weekly_cron():
    schedule = parse_schedule("0 9 * * 1")  # Mondays 09:00 UTC; 2026-01-05 is a Monday
    last = at(2026, 1, 5, 9, 0, 5)
    assert schedule.next_run(last) == at(2026, 1, 12, 9, 0)
    assert schedule.is_due(last, at(2026, 1, 12, 8, 59, 59)) is False
    assert schedule.is_due(last, at(2026, 1, 12, 9, 0)) is True


def test_cron_evaluated_in_utc_whatever_the_input_offset():
    schedule = parse_schedule("0 9 * * *")
    paris = timezone(timedelta(hours=1))
    last = datetime(2026, 1, 1, 10, 30, tzinfo=paris)  # 09:30 UTC, after today's fire time
    following = schedule.next_run(last)
    assert following == at(2026, 1, 2, 9, 0)
    assert following.utcoffset() == timedelta(0)


def test_naive_datetimes_refused():
    schedule = parse_schedule("hourly")
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.is_due(None, datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        schedule.is_due(datetime(2026, 1, 1), at(2026, 1, 2))


def test_schedule_is_a_value():
    assert parse_schedule("hourly") == parse_schedule("HOURLY")
    assert isinstance(parse_schedule("hourly"), Schedule)
    assert parse_schedule("hourly") != parse_schedule("daily")
