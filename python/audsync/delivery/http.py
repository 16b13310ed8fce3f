"""The request policy every connector's HTTP calls go through.

A connector builds its request and calls :meth:`HttpClient.request`; the client applies what
the contract asks of every destination (section 5.3 and 7) once, here:

* a rate limit shared by every thread of the run (:class:`~audsync.delivery.ratelimit.TokenBucket`);
* one ``requests.Session`` per thread, so that connections are reused without sharing a
  session across threads (``requests`` does not promise that is safe);
* failures sorted by what happens next (as the Singer SDK's ``validate_response`` does):
  timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff and jitter,
  or after the ``Retry-After`` the answer gives; 401 and 403 stop the run
  (:class:`FatalDestinationError`); any other 4xx fails the batch's rows
  (:class:`RequestRejected`). A connector refines this with a ``classify`` hook returning a
  :class:`Verdict` (Meta's rate limits arrive as a 400, HubSpot's daily limit as a 429 that no
  wait will cure);
* every message that leaves (exceptions, log lines) has each secret replaced by ``***``, in
  plain and URL-encoded form. Request headers are never logged.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import logging
import math
import random
import re
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import orjson
import requests
from requests.adapters import HTTPAdapter

from audsync import redact as _redact
from audsync.delivery.ratelimit import TokenBucket
from audsync.destinations.base import (
    DestinationUnreachable,
    FatalDestinationError,
    RequestRejected,
    RetriesExhausted,
)

logger = logging.getLogger("audsync.delivery")

# How much of an answer's text goes into an error message (and so into audsync_row_errors).
ANSWER_TEXT_LIMIT = 500

# A ``Retry-After`` (or a connector's own delay) longer than this is cut to it. A run holds its
# sync's lock while it waits, and the windows APIs ask for are seconds to a minute or two; an
# answer asking for longer (a daily quota) is better served by failing the batch as retryable
# once ``max_retries`` runs out, so the next scheduled run plans it again, than by a run that
# sleeps for hours. Five minutes also stays well inside the lock's takeover timeout heartbeat.
RETRY_AFTER_CAP_S = 300.0

# The circuit breaker: this many requests in a row that got no answer at all (connection
# refused, a DNS failure, a timeout), with no answer between them, and the destination is taken
# to be down: the run stops instead of retrying every batch (a closed port took four minutes
# for 79 batches, a black-holed host about an hour). Five is one batch's worth of attempts
# under the default retries, and few enough that a run against a closed port ends in seconds.
UNREACHABLE_AFTER = 5

# The longest time a run spends, in total, waiting for what answers asked (Retry-After, a
# connector's retryDelay): each wait is honoured (up to RETRY_AFTER_CAP_S), but a run that has
# already waited this long fails the batch as retryable instead of waiting again, so a
# destination that keeps asking for minutes cannot hold the sync's lock for hours.
MAX_TOTAL_WAIT_S = 900.0

# Codes of failures that got no HTTP answer: what the circuit breaker counts.
TRANSPORT_FAILURES = frozenset({"timeout", "connection_error"})

# Waits at least this long are reported to ``on_wait`` (the progress output shows them).
REPORTED_WAIT_S = 1.0

# The error code of a 2xx answer a connector cannot understand (see :func:`unexpected_answer`).
UNEXPECTED_ANSWER = "unexpected_answer"

# Loggers of urllib3 that write request lines, URLs included, at DEBUG: the query string of a
# URL may carry a token (Meta's ``access_token``), so a masking filter is put on each.
_URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry")


# ----------------------------------------------------------------------------------------
# Verdicts: how a connector sorts an answer
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What to do with one answer; returned by a connector's ``classify`` hook.

    Build one with :meth:`ok`, :meth:`retry`, :meth:`fatal` or :meth:`reject`. A hook returns
    ``None`` to leave an answer to the default policy.
    """

    kind: str
    """``ok``, ``retry``, ``fatal`` or ``reject``."""
    after_s: float | None = None
    """For ``retry``: seconds to wait first (Google's ``retryDelay``), else backoff applies."""
    code: str | None = None
    """For ``reject`` (and optionally ``retry``): the error code given to the batch's rows."""
    message: str | None = None
    """Why, in words: the error message of the rows or of the run."""

    OK = "ok"
    RETRY = "retry"
    FATAL = "fatal"
    REJECT = "reject"

    @classmethod
    def ok(cls) -> "Verdict":
        """The answer is a success: return it to the connector."""
        return cls(cls.OK)

    @classmethod
    def retry(
        cls, after_s: float | None = None, *, code: str | None = None, message: str | None = None
    ) -> "Verdict":
        """A transient failure: send the request again after ``after_s`` (or backoff)."""
        return cls(cls.RETRY, after_s=after_s, code=code, message=message)

    @classmethod
    def fatal(cls, message: str) -> "Verdict":
        """The destination cannot be used for this run: raise :class:`FatalDestinationError`."""
        return cls(cls.FATAL, message=message)

    @classmethod
    def reject(cls, code: str, message: str) -> "Verdict":
        """The request is refused for good: raise :class:`RequestRejected` with ``code``."""
        return cls(cls.REJECT, code=code, message=message)


Classify = Callable[[requests.Response], "Verdict | None"]
"""A connector's hook: sort an answer, or ``None`` for the default policy."""

Sign = Callable[[Any], Mapping[str, str]]
"""Headers computed from the body before each attempt (a signature with a fresh timestamp)."""


def default_verdict(response: requests.Response) -> Verdict:
    """The policy of the contract for an answer no connector hook has sorted."""
    status = response.status_code
    if 200 <= status < 300:
        return Verdict.ok()
    if status in (408, 429) or status >= 500:
        return Verdict.retry()
    if status in (401, 403):
        return Verdict.fatal(f"{status} {response.reason or ''}".strip())
    return Verdict.reject(str(status), answer_text(response) or str(response.reason or status))


def unexpected_answer(response: requests.Response, expected: str) -> Verdict:
    """The verdict on a 2xx whose body is not the answer the API gives (``expected``, in words).

    A proxy's HTML page, a truncated body or a shape the connector cannot read says nothing
    about what the destination did, so it is never a success: it is retried like a 5xx and,
    once retries run out, the batch's rows fail as retryable (code ``unexpected_answer``).
    Connectors return it from a ``classify`` hook.
    """
    text = answer_text(response, limit=200) or "an empty body"
    return Verdict.retry(
        code=UNEXPECTED_ANSWER,
        message=f"{response.status_code} answer that is not {expected}: {text}",
    )


def json_object_answer(expected: str, *, allow_empty: bool = False) -> Classify:
    """A per-request ``classify`` hook for an API whose 2xx answers are JSON objects: a 2xx
    whose body is not one (a proxy's HTML page, a truncated body) is :func:`unexpected_answer`.

    It returns ``None`` for everything else, so the connector's own hook and the default policy
    still sort the answer.

    Args:
        expected: the answer expected, in words, for the error message.
        allow_empty: an empty 2xx body (a 204) is a success too.
    """

    def classify(response: requests.Response) -> Verdict | None:
        if not 200 <= response.status_code < 300:
            return None
        content = response.content
        if not content or not content.strip():
            return None if allow_empty else unexpected_answer(response, expected)
        try:
            document = orjson.loads(content)
        except orjson.JSONDecodeError:
            return unexpected_answer(response, expected)
        return None if isinstance(document, dict) else unexpected_answer(response, expected)

    return classify


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def answer_text(response: requests.Response, limit: int = ANSWER_TEXT_LIMIT) -> str:
    """The start of an answer's body as text, whitespace collapsed, cut to ``limit`` characters."""
    # Slice the bytes first: an error page can be megabytes, and only its start is kept.
    raw = response.content[: limit * 4] if response.content else b""
    text = " ".join(raw.decode(response.encoding or "utf-8", errors="replace").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_retry_after(value: str | None, *, now: _dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # HTTP dates are GMT by definition
            when = when.replace(tzinfo=_dt.timezone.utc)
        now = now or _dt.datetime.now(_dt.timezone.utc)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _decimal_default(value: Any) -> Any:
    # A database NUMERIC arrives as Decimal: keep it a JSON number with all its digits
    # (float() would round 0.1 + big scales). NaN and infinities have no JSON form.
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"Decimal {value} has no JSON form")
        return orjson.Fragment(str(value).encode())
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """JSON bytes of ``value``, fast, for the values databases return.

    ``Decimal`` becomes a JSON number with every digit; ``date``, ``datetime`` and ``time``
    become ISO 8601 strings; ``UUID`` its canonical string; numpy scalars and arrays numbers and
    lists. Anything else (``bytes``, a ``set``, an integer beyond 64 bits) raises ``TypeError``.
    """
    return orjson.dumps(value, default=_decimal_default, option=orjson.OPT_SERIALIZE_NUMPY)


def strip_query(url: str) -> str:
    """``url`` without its query string and fragment, for messages (a query may hold a token)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# ----------------------------------------------------------------------------------------
# Secret masking
# ----------------------------------------------------------------------------------------


class SecretMasker:
    """Replace every known secret in a text by ``***``, in plain and URL-encoded forms.

    Args:
        secrets: the values to mask; empty values are ignored.
    """

    def __init__(self, secrets: Iterable[Any] = ()):
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[Any]) -> None:
        """Mask these values too (a token obtained during the run)."""
        with self._lock:
            for secret in secrets:
                if secret is None:
                    continue
                text = str(secret)
                if text:
                    # A secret in a query string or a form body is URL-encoded on the wire,
                    # and urllib3 logs the encoded form.
                    self._secrets.update(
                        {text, quote(text, safe=""), quote(text), quote_plus(text)}
                    )
            if self._secrets:
                # Longest first, so that a secret containing another is masked whole.
                ordered = sorted(self._secrets, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def mask(self, text: Any) -> str:
        """``text`` as a string with every secret replaced by ``***``."""
        text = str(text)
        pattern = self._pattern
        return pattern.sub("***", text) if pattern is not None else text


class _MaskingFilter(logging.Filter):
    """A logging filter that masks secrets in a record's message (for urllib3's DEBUG lines)."""

    def __init__(self, mask: Callable[[Any], str]):
        super().__init__()
        self.mask = mask

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


# ----------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------


class _Failure(Exception):
    """A transient failure of one attempt (internal): its code, message and asked delay."""

    def __init__(self, code: str, message: str, after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.after_s = after_s


class HttpClient:
    """Send HTTP requests under a run's policy: rate limit, retries, failure sorting, masking.

    One client serves every thread of a run. Counters :attr:`requests` (attempts sent) and
    :attr:`retries` feed the run's statistics.

    Args:
        timeout_s: seconds to wait to connect and between bytes of an answer.
        max_retries: retries of a transient failure after the first attempt (0: none).
        rate_limit: requests a second across all threads, retries included; ``None``: no limit.
        secrets: values masked in every message that leaves; see :meth:`add_secrets`.
        classify: the connector's hook to sort answers before the default policy.
        backoff_base_s: first backoff delay; it doubles each retry.
        backoff_max_s: longest backoff delay.
        retry_after_cap_s: longest wait an answer (or a ``Verdict``) can ask for.
        sleep: how to wait between attempts (injectable for tests; the rate limiter always
            uses real time). The default wait ends early when the circuit breaker opens.
        user_agent: the ``User-Agent`` header.
        unreachable_after: requests in a row with no answer (connection refused, DNS failure,
            timeout) after which the circuit breaker opens: that request and every later one
            raise :class:`DestinationUnreachable` without sending (0: never).
        max_total_wait_s: the most the run waits in total for what answers ask
            (``Retry-After``); past it a batch that is asked to wait fails as retryable.
        on_wait: called as ``on_wait(seconds, reason)`` before a wait of a second or more
            (the runner's progress output shows it); called from the sending thread.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        rate_limit: float | None = None,
        secrets: Iterable[Any] = (),
        classify: Classify | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_cap_s: float = RETRY_AFTER_CAP_S,
        sleep: Callable[[float], None] | None = None,
        user_agent: str = "audsync",
        unreachable_after: int = UNREACHABLE_AFTER,
        max_total_wait_s: float = MAX_TOTAL_WAIT_S,
        on_wait: Callable[[float, str], None] | None = None,
    ):
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.rate_limit = rate_limit
        self.classify = classify
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.retry_after_cap_s = float(retry_after_cap_s)
        self.user_agent = user_agent
        self._sleep = sleep
        self.unreachable_after = int(unreachable_after)
        self.max_total_wait_s = float(max_total_wait_s)
        self.on_wait = on_wait
        self.waited_s = 0.0
        """Seconds waited so far for what answers asked (counted against the total limit)."""
        self._unanswered = 0
        self._unreachable: str | None = None
        self.breaker_opened = threading.Event()
        """Set when the circuit breaker opens; an injected ``sleep`` may wait on it too, so a
        backoff in progress ends as soon as nothing more will be sent."""
        self._limiter = TokenBucket(rate_limit) if rate_limit else None
        self.masker = SecretMasker(secrets)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []
        self.requests = 0
        self.retries = 0
        self._log_filter = _MaskingFilter(self.mask)
        for name in _URLLIB3_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    # -- public -----------------------------------------------------------------------

    def add_secrets(self, secrets: Iterable[Any]) -> None:
        """Mask these values too, from now on (a token obtained during the run)."""
        self.masker.add(secrets)

    def mask(self, text: Any) -> str:
        """``text`` with every known secret replaced by ``***``.

        The client's own secrets are masked first; then those registered for the whole process
        with :mod:`audsync.redact` (every secret of ``destinations.yml``), as a second net.
        """
        return _redact.redact(self.masker.mask(text))

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        auth: Any = None,
        classify: Classify | None = None,
        sign: Sign | None = None,
    ) -> requests.Response:
        """Send one request under the policy; return the accepted answer.

        Args:
            method: the HTTP method.
            url: the full URL.
            json: a value sent as a JSON body (encoded by :func:`dumps`).
            data: a body sent as is (bytes, or a dict sent as a form); it is sent again on a
                retry, so not a generator or a file.
            headers: request headers; never logged.
            params: query parameters.
            auth: a ``requests`` auth (a tuple for Basic).
            classify: a hook for this request only, asked before the client's own.
            sign: called with the body before each attempt; its headers are added (so a
                signature carries a fresh timestamp on a retry).

        Raises:
            FatalDestinationError: 401, 403, a bad URL or TLS failure, or a ``fatal`` verdict.
            RequestRejected: another 4xx, or a ``reject`` verdict.
            RetriesExhausted: a transient failure outlasted ``max_retries``.
        """
        send_headers = dict(headers or {})
        if json is not None:
            data = dumps(json)
            if not any(k.lower() == "content-type" for k in send_headers):
                send_headers["Content-Type"] = "application/json"
        where = f"{method} {strip_query(url)}"
        attempt = 0
        while True:
            try:
                return self._attempt(
                    method, url, where, data, send_headers, params, auth, classify, sign
                )
            except _Failure as failure:
                if attempt >= self.max_retries:
                    message = self.mask(
                        f"{where} failed {attempt + 1} time(s), last with {failure.code}:"
                        f" {failure.message}"
                    )
                    logger.warning("%s", message)
                    # ``from None``: the chained requests exception would print the raw URL.
                    raise RetriesExhausted(failure.code, message) from None
                delay = self._delay(attempt, failure.after_s)
                if failure.after_s is not None:
                    self._charge_wait(where, failure, delay, attempt)
                attempt += 1
                with self._lock:
                    self.retries += 1
                logger.info(
                    "%s",
                    self.mask(
                        f"{where}: {failure.code} {failure.message}; retry {attempt} of"
                        f" {self.max_retries} in {delay:.2f}s"
                    ),
                )
                if delay > 0:
                    if self.on_wait is not None and delay >= REPORTED_WAIT_S:
                        reason = "Retry-After" if failure.after_s is not None else "backoff"
                        self.on_wait(delay, self.mask(f"{where}: {failure.code} ({reason})"))
                    self._wait(delay)

    @property
    def unreachable(self) -> bool:
        """True once the circuit breaker has opened: nothing more is sent."""
        return self.breaker_opened.is_set()

    def close(self) -> None:
        """Close every thread's session and remove the log filters."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        for name in _URLLIB3_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _wait(self, seconds: float) -> None:
        """Wait before a retry; the default wait ends as soon as the circuit breaker opens
        (the retry then raises at once), so a stopping run is not held by a backoff."""
        if self._sleep is not None:
            if not self.breaker_opened.is_set():
                self._sleep(seconds)
        else:
            self.breaker_opened.wait(seconds)

    def _charge_wait(self, where: str, failure: "_Failure", delay: float, attempt: int) -> None:
        """Count a wait an answer asked for against the run's total; past it, fail the batch."""
        with self._lock:
            if self.waited_s + delay > self.max_total_wait_s:
                waited = self.waited_s
            else:
                self.waited_s += delay
                return
        message = self.mask(
            f"{where} failed {attempt + 1} time(s), last with {failure.code}: {failure.message};"
            f" the answer asks to wait {delay:.0f}s and the run has already waited {waited:.0f}s"
            f" of its {self.max_total_wait_s:.0f}s limit (max_total_wait_s)"
        )
        logger.warning("%s", message)
        raise RetriesExhausted("wait_limit", message)

    def _check_breaker(self) -> None:
        """Raise :class:`DestinationUnreachable` once the circuit breaker is open."""
        if self.breaker_opened.is_set():
            raise DestinationUnreachable(f"destination unreachable: {self._unreachable}")

    def _no_answer(self, where: str, code: str, message: str) -> "_Failure":
        """Count a request that got no answer; open the breaker at the bound, else retry."""
        text = self.mask(f"{where}: {code}: {message}")
        with self._lock:
            self._unanswered += 1
            trip = 0 < self.unreachable_after <= self._unanswered and not self.breaker_opened.is_set()
            if trip:
                self._unreachable = (
                    f"{text} ({self._unanswered} requests in a row got no answer)"
                )
                self.breaker_opened.set()
        if trip:
            logger.warning("destination unreachable: %s", self._unreachable)
        self._check_breaker()
        return _Failure(code, message)

    def _answered(self) -> None:
        """Any HTTP answer, whatever its status, shows the destination is reachable."""
        if self._unanswered:
            with self._lock:
                self._unanswered = 0

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            # One thread sends one request at a time: a small pool is enough, and no urllib3
            # retries: the retries are ours, with our backoff and logging.
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _attempt(
        self,
        method: str,
        url: str,
        where: str,
        data: Any,
        headers: dict[str, str],
        params: Any,
        auth: Any,
        classify: Classify | None,
        sign: Sign | None,
    ) -> requests.Response:
        """One attempt: a response to return, or an exception (``_Failure`` to retry)."""
        self._check_breaker()
        if self._limiter is not None:
            self._limiter.acquire()
            self._check_breaker()
        if sign is not None:
            headers = {**headers, **sign(data)}
        with self._lock:
            self.requests += 1
        try:
            response = self._session().request(
                method,
                url,
                data=data,
                headers=headers,
                params=params,
                auth=auth,
                timeout=self.timeout_s,
            )
        except requests.Timeout as exc:
            raise self._no_answer(
                where, "timeout", f"no answer within {self.timeout_s:g}s ({exc})"
            ) from None
        except requests.exceptions.SSLError as exc:
            # A certificate problem does not heal by itself: stop rather than retry.
            raise FatalDestinationError(self.mask(f"{where}: TLS error: {exc}")) from None
        except (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            raise self._no_answer(where, "connection_error", str(exc)) from None
        except requests.RequestException as exc:
            # A malformed URL or header, too many redirects: configuration, not the network.
            raise FatalDestinationError(self.mask(f"{where}: {exc}")) from None

        self._answered()
        verdict = None
        if classify is not None:
            verdict = classify(response)
        if verdict is None and self.classify is not None:
            verdict = self.classify(response)
        if verdict is None:
            verdict = default_verdict(response)

        kind = verdict.kind
        if kind == Verdict.OK:
            return response
        status = response.status_code
        if kind == Verdict.RETRY:
            after_s = verdict.after_s
            if after_s is None:
                after_s = parse_retry_after(response.headers.get("Retry-After"))
            raise _Failure(
                verdict.code or str(status),
                verdict.message or answer_text(response) or str(response.reason or status),
                after_s,
            )
        if kind == Verdict.FATAL:
            text = answer_text(response)
            message = f"{where}: {verdict.message or status}"
            if text and text not in message:
                message += f": {text}"
            raise FatalDestinationError(self.mask(message))
        if kind == Verdict.REJECT:
            raise RequestRejected(
                self.mask(verdict.code or str(status)),
                self.mask(verdict.message or answer_text(response) or str(status)),
            )
        raise ValueError(f"unknown verdict kind {kind!r} from a classify hook")

    def _delay(self, attempt: int, after_s: float | None) -> float:
        """Seconds before retry number ``attempt + 1``: what the answer asked, else backoff."""
        if after_s is not None:
            return min(max(0.0, float(after_s)), self.retry_after_cap_s)
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        # "Equal jitter": half the delay fixed, half random, so threads that failed together
        # do not come back together, and no retry comes back immediately.
        return ceiling / 2 + random.uniform(0, ceiling / 2)
