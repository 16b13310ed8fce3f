"""deliver() and DeliverySettings: bounded concurrency, outcomes, fatal stops, exactly once."""

from __future__ import annotations

import gc
import threading
import time
from typing import Iterator, Sequence

import pytest

from audsync.delivery.engine import DeliverySettings, DeliveryStats, deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import (
    BatchResult,
    Change,
    Connector,
    FatalDestinationError,
    SyncInfo,
)
from audsync.destinations.webhook import WebhookConnector
from tests.fakes.webhook_server import FakeWebhook

SYNC = SyncInfo("S", "mirror", "run7", "email", ("v",))


def plan(rows: int, batch_size: int) -> Iterator[tuple[int, list[Change]]]:
    """Batches of a plan of ``rows`` adds, made lazily as the runner does."""
    for batch_no, start in enumerate(range(1, rows + 1, batch_size), start=1):
        stop = min(start + batch_size, rows + 1)
        yield batch_no, [
            Change(seq, "add", f"k{seq}", {"v": seq}, None) for seq in range(start, stop)
        ]


def webhook(fake: FakeWebhook, **http) -> WebhookConnector:
    """A webhook connector pointed at ``fake``, not waiting between retries."""
    client = HttpClient(sleep=lambda s: None, **{"max_retries": 2, "timeout_s": 10, **http})
    return WebhookConnector("hook", {"url": fake.url}, SYNC, client)


class Recorder:
    """on_result that keeps what it was given and checks it runs on the calling thread."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.results: dict[int, tuple[Sequence[Change], BatchResult]] = {}
        self.order: list[int] = []
        self.wrong_thread = 0

    def __call__(self, batch_no: int, batch: Sequence[Change], result: BatchResult) -> None:
        if threading.get_ident() != self.thread:
            self.wrong_thread += 1
        assert batch_no not in self.results, f"batch {batch_no} reported twice"
        self.results[batch_no] = (batch, result)
        self.order.append(batch_no)


# -- settings ---------------------------------------------------------------------------------


class Limited(Connector):
    type = "limited"
    max_batch_size = 500
    default_batch_size = 200
    max_concurrency = 6
    default_concurrency = 3
    default_rate_limit = 10.0


def test_settings_defaults_and_caps():
    settings = DeliverySettings.from_settings(Limited, {})
    assert settings == DeliverySettings(200, 3, 10.0, 30.0, 5)
    too_much = {"batch_size": 10_000, "max_concurrency": 50, "rate_limit": "2.5", "max_retries": 0}
    capped = DeliverySettings.from_settings(Limited, too_much)
    assert (capped.batch_size, capped.max_concurrency) == (500, 6)
    assert capped.rate_limit == 2.5 and capped.max_retries == 0
    assert DeliverySettings.from_settings(WebhookConnector, {}).batch_size == 10_000
    assert DeliverySettings.from_settings(Limited, {"batch_size": "50"}).batch_size == 50


@pytest.mark.parametrize(
    "key, value",
    [
        ("batch_size", 0),
        ("batch_size", -5),
        ("batch_size", "many"),
        ("batch_size", 2.5),
        ("max_concurrency", 0),
        ("max_concurrency", True),
        ("rate_limit", 0),
        ("rate_limit", "fast"),
        ("timeout_s", -1),
        ("max_retries", -1),
        ("max_retries", [3]),
    ],
)
def test_settings_bad_values_name_key_and_value(key, value):
    with pytest.raises(ValueError) as caught:
        DeliverySettings.from_settings(Limited, {key: value}, destination="crm")
    message = str(caught.value)
    assert key in message and repr(value) in message and "crm" in message


def test_http_client_from_settings():
    settings = DeliverySettings.from_settings(Limited, {"timeout_s": 3, "max_retries": 1})
    with settings.http_client(secrets=["abc123"]) as client:
        assert client.timeout_s == 3 and client.max_retries == 1 and client.rate_limit == 10.0
        assert client.mask("x abc123 y") == "x *** y"


# -- delivery ---------------------------------------------------------------------------------


def test_100k_rows_delivered_exactly_once():
    with FakeWebhook() as fake:
        hook = webhook(fake)
        recorder = Recorder()
        progress: list[int] = []
        stats = deliver(
            hook, plan(100_000, 1_000), max_concurrency=4, on_result=recorder,
            on_progress=progress.append,
        )  # fmt: skip
        members = fake.members
        assert fake.violations == []
        assert fake.duplicate_batches() == {}
        assert fake.rows == 100_000
    assert len(members) == 100_000
    assert members["k1"] == {"v": 1} and members["k100000"] == {"v": 100000}
    assert isinstance(stats, DeliveryStats)
    assert (stats.batches, stats.rows_sent, stats.rows_rejected) == (100, 100_000, 0)
    assert stats.requests == 100 and stats.retries == 0 and stats.seconds > 0
    assert sorted(recorder.results) == list(range(1, 101))
    assert recorder.wrong_thread == 0
    assert progress[-1] == 100_000 and progress == sorted(progress)


def test_max_concurrency_is_respected_and_used():
    with FakeWebhook(latency_s=0.05) as fake:
        deliver(webhook(fake), plan(60, 3), max_concurrency=3, on_result=Recorder())
        assert fake.max_concurrent == 3


def test_batches_are_read_lazily():
    pulled = 0
    reported = 0
    outstanding: list[int] = []

    def source():
        nonlocal pulled
        for item in plan(400, 10):
            pulled += 1
            outstanding.append(pulled - reported)
            yield item

    def on_result(*_):
        nonlocal reported
        reported += 1

    with FakeWebhook(latency_s=0.01) as fake:
        deliver(webhook(fake), source(), max_concurrency=2, on_result=on_result)
    assert reported == 40
    assert max(outstanding) <= 4  # 2 x max_concurrency


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_cyclic_collector_is_paused_while_delivering_and_restored(enabled_before):
    """Delivery allocates a few objects per row; the collector's passes over them cost a third
    of the reading thread's time, and none of them form cycles."""
    seen_while_reading: list[bool] = []

    def source():
        for item in plan(30, 10):
            seen_while_reading.append(gc.isenabled())
            yield item

    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        with FakeWebhook() as fake:
            stats = deliver(webhook(fake), source(), max_concurrency=2, on_result=Recorder())
            assert stats.rows_sent == 30
            assert seen_while_reading == [False, False, False]
            assert gc.isenabled() is enabled_before
            # Restored after a failing delivery too.
            with pytest.raises(RuntimeError, match="plan unreadable"):
                deliver(webhook(fake), _failing_source(), max_concurrency=1, on_result=Recorder())
            assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()


def _failing_source():
    raise RuntimeError("plan unreadable")
    yield  # pragma: no cover - makes this a generator


def test_rejected_requests_and_exhausted_retries_become_row_errors():
    with FakeWebhook() as fake:
        fake.fail_next(1, 422, body="field v is not allowed")
        recorder = Recorder()
        stats = deliver(webhook(fake), plan(10, 5), max_concurrency=1, on_result=recorder)
        first = recorder.results[1][1].rejected
        assert [(r.key, r.error_code, r.retryable) for r in first] == [
            (f"k{i}", "422", False) for i in range(1, 6)
        ]
        assert all("field v is not allowed" in r.error_message for r in first)
        assert recorder.results[2][1].rejected == []
        assert (stats.rows_sent, stats.rows_rejected) == (10, 5)

        fake.fail_next(3, 503)  # max_retries=2: three failures exhaust it
        recorder = Recorder()
        stats = deliver(webhook(fake), plan(10, 5), max_concurrency=1, on_result=recorder)
        first = recorder.results[1][1].rejected
        assert [(r.key, r.error_code, r.retryable) for r in first] == [
            (f"k{i}", "503", True) for i in range(1, 6)
        ]
        assert stats.retries == 2 and stats.requests == 4


def test_fatal_stops_and_reports_completed_batches():
    with FakeWebhook(latency_s=0.02) as fake:
        pulled = 0

        def source():
            nonlocal pulled
            for item in plan(1_000, 10):  # 100 batches
                pulled += 1
                yield item

        recorder = Recorder()

        def on_result(batch_no, batch, result):
            recorder(batch_no, batch, result)
            if len(recorder.results) == 5:
                fake.fail_next(1, 401)  # the next request the fake sees is refused

        with pytest.raises(FatalDestinationError, match="401"):
            deliver(webhook(fake), source(), max_concurrency=3, on_result=on_result)
        applied = set(fake.applied_batches)
        members = fake.members
    reported = set(recorder.results)
    assert 5 <= len(reported) < 100
    assert pulled < 100  # stopped taking batches
    # Every batch the fake applied was reported, and nothing else: in-flight ones finished.
    assert applied == {f"run7-{(n - 1) * 10 + 1}" for n in reported}
    assert all(result.rejected == [] for _, result in recorder.results.values())
    assert len(members) == 10 * len(reported)


class Quiet(Connector):
    """A connector that takes every row after a short wait."""

    type = "quiet"

    def send_batch(self, batch):
        time.sleep(0.01)
        return BatchResult()


class Buggy(Quiet):
    """A connector with a bug on its third batch."""

    type = "buggy"

    def send_batch(self, batch):
        if batch[0].seq == 21:
            raise KeyError("oops")
        return super().send_batch(batch)


def test_a_connector_bug_is_raised_not_recorded_as_rejections():
    recorder = Recorder()
    with pytest.raises(KeyError, match="oops"):
        deliver(Buggy("b", {}, SYNC, None), plan(100, 10), max_concurrency=2, on_result=recorder)
    assert 3 not in recorder.results
    assert all(not result.rejected for _, result in recorder.results.values())


def test_an_on_result_failure_stops_delivery():
    calls = 0

    def on_result(*_):
        nonlocal calls
        calls += 1
        raise RuntimeError("warehouse is gone")

    with pytest.raises(RuntimeError, match="warehouse is gone"):
        deliver(Quiet("q", {}, SYNC, None), plan(1000, 10), max_concurrency=2, on_result=on_result)
    assert calls == 1


class Gated(Connector):
    """A connector whose requests wait for ``release``; ``started`` is set once ``expected``
    batches are being sent (events, not sleeps: the test holds on a loaded machine)."""

    type = "gated"

    def __init__(self, expected: int) -> None:
        super().__init__("g", {}, SYNC, None)
        self.expected = expected
        self.count = 0
        self.lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()

    def send_batch(self, batch):
        with self.lock:
            self.count += 1
            if self.count == self.expected:
                self.started.set()
        assert self.release.wait(30), "the test never released the requests"
        return BatchResult()


def test_a_failing_plan_reader_is_raised_after_in_flight_batches():
    recorder = Recorder()
    connector = Gated(expected=3)

    def source():
        yield from plan(30, 10)
        # The read fails while all three batches are on the wire (none merely queued, which
        # the engine would drop as never sent); they are answered only as it fails.
        assert connector.started.wait(30), "the three batches were never all sent"
        connector.release.set()
        raise OSError("lost the warehouse connection")

    with pytest.raises(OSError, match="lost the warehouse"):
        deliver(connector, source(), max_concurrency=4, on_result=recorder)
    assert sorted(recorder.results) == [1, 2, 3]


# -- the circuit breaker (issue 10, point 8) --------------------------------------------------


def _closed_port_url() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/hook"


@pytest.mark.parametrize("max_retries", [0, 2, 5])
def test_a_dead_destination_stops_the_run_with_one_error_not_one_per_row(max_retries):
    from audsync.destinations.base import DestinationUnreachable

    client = HttpClient(max_retries=max_retries, backoff_base_s=0.01, timeout_s=2)
    hook = WebhookConnector("hook", {"url": _closed_port_url()}, SYNC, client)
    recorder = Recorder()
    started = time.monotonic()
    with pytest.raises(DestinationUnreachable) as stopped:
        deliver(hook, plan(790, 10), max_concurrency=2, on_result=recorder)
    assert time.monotonic() - started < 10
    assert str(stopped.value).startswith("destination unreachable: ")
    # No batch is reported as 79 batches of failed rows: one error, for the run.
    assert recorder.results == {}
    # Nothing further was sent once the breaker opened: at most one attempt per thread more.
    assert client.requests <= 5 + 2


def test_answered_batches_are_reported_before_the_breaker_stops_the_run():
    from audsync.destinations.base import DestinationUnreachable

    fake = FakeWebhook().start()
    stopped = threading.Event()
    recorder = Recorder()

    def on_result(batch_no, batch, result):
        recorder(batch_no, batch, result)
        if not stopped.is_set():
            stopped.set()
            hook._url = _closed_port_url()  # the destination goes away after the first answer

    client = HttpClient(max_retries=3, backoff_base_s=0.01, timeout_s=2)
    hook = WebhookConnector("hook", {"url": fake.url}, SYNC, client)
    try:
        with pytest.raises(DestinationUnreachable):
            deliver(hook, plan(200, 10), max_concurrency=1, on_result=on_result)
    finally:
        fake.stop()
    assert 1 <= len(recorder.results) < 20
    assert all(result.rejected == [] for _, result in recorder.results.values())
    reported = {c.key for batch, _ in recorder.results.values() for c in batch}
    assert reported == set(fake.members)


def test_batches_without_an_answer_are_reported_once_the_destination_answers_again():
    """A batch whose retries ran out on timeouts is held back, then reported when another
    batch is answered: the breaker did not open, so its rows fail as retryable as before."""
    fake = FakeWebhook().start()
    try:
        # The first batch's two attempts time out; the timeout is well above a loaded machine's
        # answer time (0.3 s timed out the other batches' ordinary answers under load).
        fake.delay_next(2, 3.0)
        client = HttpClient(max_retries=1, timeout_s=1.5, sleep=lambda s: None, unreachable_after=5)
        hook = WebhookConnector("hook", {"url": fake.url}, SYNC, client)
        recorder = Recorder()
        deliver(hook, plan(30, 10), max_concurrency=1, on_result=recorder)
        assert sorted(recorder.results) == [1, 2, 3]
        codes = {c.error_code for c in recorder.results[1][1].rejected}
        assert codes == {"timeout"} and recorder.order[0] == 1
    finally:
        fake.stop()


def test_settings_of_the_breaker_and_the_wait_limit():
    settings = DeliverySettings.from_settings(WebhookConnector, {"unreachable_after": "3", "max_total_wait_s": 60})
    assert (settings.unreachable_after, settings.max_total_wait_s) == (3, 60.0)
    client = settings.http_client()
    assert (client.unreachable_after, client.max_total_wait_s) == (3, 60.0)
    defaults = DeliverySettings.from_settings(WebhookConnector, {})
    assert (defaults.unreachable_after, defaults.max_total_wait_s) == (5, 900.0)
    with pytest.raises(ValueError, match="unreachable_after"):
        DeliverySettings.from_settings(WebhookConnector, {"unreachable_after": -1})
