"""HttpClient on real loopback HTTP: retries, Retry-After, failure sorting, rate limit, masking."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
from urllib.parse import quote, quote_plus

import orjson
import pytest
import requests

from audsync.delivery.http import HttpClient, Verdict, parse_retry_after
from audsync.delivery.ratelimit import TokenBucket
from audsync.destinations.base import FatalDestinationError, RequestRejected, RetriesExhausted
from tests.fakes.webhook_server import FakeWebhook


def envelope(batch_id: str = "run-1", keys: tuple[str, ...] = ("a@example.com",)) -> bytes:
    """A body the fake accepts."""
    return orjson.dumps(
        {
            "sync": "S",
            "run_id": "run",
            "batch_id": batch_id,
            "sent_at": "2026-11-22T10:00:00Z",
            "operations": [{"op": "add", "key": k, "fields": {}} for k in keys],
        }
    )


def post(client: HttpClient, url: str, batch_id: str = "run-1", **kwargs):
    headers = {"Content-Type": "application/json", "Idempotency-Key": batch_id}
    headers.update(kwargs.pop("headers", {}))
    return client.request("POST", url, data=envelope(batch_id), headers=headers, **kwargs)


class Sleeps:
    """An injected sleep that records the delays asked for and does not wait."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def fake():
    with FakeWebhook() as hook:
        yield hook


def test_429_retry_after_is_honoured_in_real_time(fake):
    fake.fail_next(1, 429, retry_after=1)
    with HttpClient(max_retries=3) as client:
        started = time.monotonic()
        response = post(client, fake.url)
        waited = time.monotonic() - started
    assert response.status_code == 200
    assert fake.requests == 2
    assert client.retries == 1
    assert 0.95 <= waited < 3.0


def test_retry_after_http_date_and_cap(fake):
    sleeps = Sleeps()
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    fake.fail_next(1, 503, retry_after=when.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    fake.fail_next(1, 429, retry_after=86_400)  # a daily quota: capped
    with HttpClient(max_retries=3, sleep=sleeps) as client:
        assert post(client, fake.url).status_code == 200
    assert 25 <= sleeps.calls[0] <= 31
    assert sleeps.calls[1] == 300.0


def test_5xx_retried_then_success_with_backoff(fake):
    sleeps = Sleeps()
    fake.fail_next(1, 500)
    fake.fail_next(1, 503)
    fake.fail_next(1, 408)
    with HttpClient(max_retries=5, backoff_base_s=0.5, backoff_max_s=30, sleep=sleeps) as client:
        response = post(client, fake.url)
    assert response.status_code == 200
    assert fake.requests == 4
    assert fake.accepted_requests == 1
    assert client.requests == 4 and client.retries == 3
    # Exponential with jitter: each delay within [ceiling / 2, ceiling].
    for attempt, delay in enumerate(sleeps.calls):
        ceiling = 0.5 * 2**attempt
        assert ceiling / 2 <= delay <= ceiling


def test_timeout_retried(fake):
    fake.delay_next(1, 1.0)
    with HttpClient(timeout_s=0.3, max_retries=2, sleep=Sleeps()) as client:
        response = post(client, fake.url)
    assert response.status_code == 200
    assert client.retries == 1
    assert fake.requests == 2


def test_connection_refused_exhausts_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with HttpClient(max_retries=2, sleep=Sleeps()) as client:
        with pytest.raises(RetriesExhausted) as caught:
            post(client, f"http://127.0.0.1:{port}/hook")
    assert caught.value.code == "connection_error"
    assert client.requests == 3


def test_4xx_rejects_with_the_answers_text(fake):
    fake.fail_next(1, 422, body='{"error": "field Customer Value must be a number"}')
    with HttpClient(max_retries=5, sleep=Sleeps()) as client:
        with pytest.raises(RequestRejected) as caught:
            post(client, fake.url)
    assert caught.value.code == "422"
    assert "field Customer Value must be a number" in caught.value.message
    assert fake.requests == 1  # not retried


def test_long_answer_text_is_truncated(fake):
    fake.fail_next(1, 400, body="x" * 5000)
    with HttpClient(sleep=Sleeps()) as client:
        with pytest.raises(RequestRejected) as caught:
            post(client, fake.url)
    assert 100 < len(caught.value.message) <= 500


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_fatal_and_not_retried(fake, status):
    fake.fail_next(1, status, body='{"error": "bad token"}')
    with HttpClient(max_retries=5, sleep=Sleeps()) as client:
        with pytest.raises(FatalDestinationError) as caught:
            post(client, fake.url)
    assert str(status) in str(caught.value)
    assert "bad token" in str(caught.value)
    assert fake.requests == 1


def test_retries_exhausted(fake):
    fake.fail_next(10, 500, body="upstream down")
    with HttpClient(max_retries=2, sleep=Sleeps()) as client:
        with pytest.raises(RetriesExhausted) as caught:
            post(client, fake.url)
    assert caught.value.code == "500"
    assert "upstream down" in caught.value.message
    assert fake.requests == 3


def test_classify_hook_sorts_answers(fake):
    """Meta's rate limit arrives as a 400 (retry); HubSpot's DAILY 429 is fatal."""

    def classify(response: requests.Response) -> Verdict | None:
        body = response.json() if response.content else {}
        if response.status_code == 400 and body.get("error", {}).get("code") in (4, 17, 80003):
            return Verdict.retry(after_s=0.25, code="rate_limited")
        if response.status_code == 429 and body.get("policyName") == "DAILY":
            return Verdict.fatal("daily limit reached")
        return None

    sleeps = Sleeps()
    fake.fail_next(1, 400, body='{"error": {"code": 17, "message": "User request limit"}}')
    with HttpClient(max_retries=3, classify=classify, sleep=sleeps) as client:
        assert post(client, fake.url).status_code == 200
        assert sleeps.calls == [0.25]
        fake.fail_next(1, 429, body='{"policyName": "DAILY"}')
        with pytest.raises(FatalDestinationError, match="daily limit reached"):
            post(client, fake.url, batch_id="run-2")
        # A per-request hook comes first: this 404 is a success for it.
        fake.fail_next(1, 404)
        response = post(
            client, fake.url, batch_id="run-3", classify=lambda r: Verdict.ok()
        )
        assert response.status_code == 404


def test_rate_limit_is_respected_across_threads():
    rate, threads, each = 20.0, 4, 8
    with FakeWebhook() as fake, HttpClient(rate_limit=rate) as client:
        # The time the shared limiter gives each request (its clock reading plus the wait it
        # imposes): what the limit promises. Arrival times at the fake, and even wake-up
        # times, add the machine's scheduling jitter: on a loaded machine requests granted
        # 50 ms apart arrive bunched.
        limiter, granted, reading = client._limiter, [], threading.local()
        clock, acquire = limiter._clock, limiter.acquire

        def recording_clock() -> float:
            reading.now = clock()
            return reading.now

        def recording_acquire() -> float:
            wait = acquire()
            granted.append(reading.now + wait)
            return wait

        limiter._clock, limiter.acquire = recording_clock, recording_acquire

        def worker(n: int) -> None:
            for i in range(each):
                post(client, fake.url, batch_id=f"run-{n}-{i}")

        started = time.monotonic()
        pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        elapsed = time.monotonic() - started
        arrivals = len(fake.request_times)
    total = threads * each
    assert arrivals == total and len(granted) == total
    assert elapsed >= (total - 1) / rate * 0.95
    # At most rate + 1 grants in any one-second window (the +1: both window ends).
    times = sorted(granted)
    busiest = max(sum(1 for t in times[i:] if t - start < 1.0) for i, start in enumerate(times))
    assert busiest <= rate + 1


def test_token_bucket_spacing():
    now = [0.0]
    waits: list[float] = []
    bucket = TokenBucket(10, clock=lambda: now[0], sleep=waits.append)
    for _ in range(4):
        bucket.acquire()
    assert waits == pytest.approx([0.1, 0.2, 0.3])


def test_parse_retry_after():
    now = dt.datetime(2026, 11, 22, 10, 0, 0, tzinfo=dt.timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Sun, 22 Nov 2026 10:00:42 GMT", now=now) == 42.0
    assert parse_retry_after("Sun, 22 Nov 2026 09:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


def test_secrets_never_leave_in_errors_or_logs(fake, caplog):
    secret = "tok/en+Sec=ret&42"  # changes when URL-encoded
    header_secret = "hdr-SECRET-value-99"
    forms = {secret, quote(secret, safe=""), quote_plus(secret), header_secret}
    caplog.set_level(logging.DEBUG)  # urllib3 logs request lines, query strings included
    messages: list[str] = []
    with HttpClient(max_retries=1, secrets=[secret, header_secret], sleep=Sleeps()) as client:
        url = fake.url + "?" + "token=" + quote(secret, safe="")
        headers = {"Authorization": f"Bearer {header_secret}"}
        # The answer echoes both secrets back, as some APIs do in their errors.
        fake.fail_next(1, 400, body=f"bad token {secret} for {header_secret}")
        with pytest.raises(RequestRejected) as rejected:
            post(client, url, headers=headers)
        messages.append(str(rejected.value))
        fake.fail_next(2, 503, body=f"try later {quote(secret, safe='')}")
        with pytest.raises(RetriesExhausted) as exhausted:
            post(client, url, batch_id="run-2", headers=headers)
        messages.append(str(exhausted.value))
        fake.fail_next(1, 401, body=f"who is {header_secret}")
        with pytest.raises(FatalDestinationError) as fatal:
            post(client, url, batch_id="run-3", headers=headers)
        messages.append(str(fatal.value))
        fake.delay_next(2, 0.5)
        client.timeout_s = 0.1
        with pytest.raises(RetriesExhausted) as timed_out:
            post(client, url, batch_id="run-4", headers=headers)
        messages.append(str(timed_out.value))
    logged = [record.getMessage() for record in caplog.records]
    assert any("urllib3" in record.name for record in caplog.records)  # the filter was tested
    assert any("***" in m for m in messages)
    for text in messages + logged:
        for form in forms:
            assert form not in text, f"secret leaked in: {text}"
    assert any("retry 1 of 1" in m for m in logged)


# -- the circuit breaker and the run's total wait (issue 10, point 8) ------------------------


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def black_hole():
    """A server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_a_closed_port_opens_the_breaker_after_five_requests_and_nothing_more_is_sent():
    from audsync.destinations.base import DestinationUnreachable

    url = closed_port_url()
    with HttpClient(max_retries=20, backoff_base_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(DestinationUnreachable) as opened:
            post(client, url)
        assert time.monotonic() - started < 5
        assert client.requests == 5 and client.unreachable
        message = str(opened.value)
        assert message.startswith("destination unreachable: POST " + url)
        assert "connection_error" in message and "5 requests in a row" in message
        # Open: a later request raises at once without sending.
        with pytest.raises(DestinationUnreachable):
            post(client, url, batch_id="run-2")
        assert client.requests == 5
    assert isinstance(opened.value, FatalDestinationError)


def test_a_server_that_never_answers_opens_the_breaker_on_timeouts(black_hole):
    from audsync.destinations.base import DestinationUnreachable

    with HttpClient(max_retries=20, timeout_s=0.2, backoff_base_s=0.01) as client:
        started = time.monotonic()
        with pytest.raises(DestinationUnreachable) as opened:
            post(client, black_hole)
        assert time.monotonic() - started < 5
        assert client.requests == 5
        assert "timeout" in str(opened.value)


def test_an_answer_between_failures_keeps_the_breaker_closed(fake):
    url = closed_port_url()
    with HttpClient(max_retries=0, unreachable_after=3) as client:
        for _ in range(3):
            for _ in range(2):
                with pytest.raises(RetriesExhausted):
                    post(client, url)
            post(client, fake.url)  # an answer: the count starts again
        assert not client.unreachable
        with pytest.raises(RetriesExhausted):
            post(client, url)


def test_the_breaker_can_be_turned_off():
    with HttpClient(max_retries=7, backoff_base_s=0.001, unreachable_after=0) as client:
        with pytest.raises(RetriesExhausted):
            post(client, closed_port_url())
        assert client.requests == 8 and not client.unreachable


def test_a_wait_in_progress_ends_when_the_breaker_opens():
    """A thread in a long backoff wakes as soon as another thread opens the breaker."""
    from audsync.destinations.base import DestinationUnreachable

    url = closed_port_url()
    with HttpClient(max_retries=5, backoff_base_s=60, backoff_max_s=60, unreachable_after=2) as client:
        outcome: list[BaseException] = []

        def sender() -> None:
            try:
                post(client, url)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcome.append(exc)

        waiting = threading.Thread(target=sender)
        waiting.start()
        time.sleep(0.3)  # the first thread failed once and now waits 30 s or more
        started = time.monotonic()
        with pytest.raises(DestinationUnreachable):
            post(client, url, batch_id="run-2")
        waiting.join(timeout=5)
        assert not waiting.is_alive() and time.monotonic() - started < 5
        assert isinstance(outcome[0], DestinationUnreachable)


def test_retry_after_waits_are_bounded_by_the_run_total_and_reported(fake):
    sleeps = Sleeps()
    waits: list[tuple[float, str]] = []
    with HttpClient(max_retries=5, sleep=sleeps, max_total_wait_s=100,
                    on_wait=lambda s, why: waits.append((s, why))) as client:
        fake.fail_next(1, 429, retry_after=60)
        post(client, fake.url)  # honoured: 60 of 100 s
        assert sleeps.calls == [60] and client.waited_s == 60
        assert waits and waits[0][0] == 60 and "429" in waits[0][1] and "Retry-After" in waits[0][1]
        fake.fail_next(1, 429, retry_after=60)
        with pytest.raises(RetriesExhausted) as limited:
            post(client, fake.url, batch_id="run-2")
        assert limited.value.code == "wait_limit"
        assert "max_total_wait_s" in limited.value.message and "60s" in limited.value.message
        assert sleeps.calls == [60]  # the second wait was never started
