"""A 2xx that is not the API's answer is an error for the batch, never a success (issue 10,
point 7), for the connectors whose 2xx answers are JSON objects: Braze, Meta and Google. A real
loopback server answers every request as a captive portal or a misconfigured proxy would."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from audsync.delivery.engine import deliver
from audsync.delivery.http import HttpClient, json_object_answer
from audsync.destinations.base import Change, RetriesExhausted, SyncInfo
from audsync.destinations.braze import BrazeConnector
from audsync.destinations.facebook import FacebookCustomAudienceConnector
from audsync.destinations.google import GoogleCustomerMatchConnector

SYNC = SyncInfo("vip", "mirror", "run1", "email", ("email",))


class _Proxy(BaseHTTPRequestHandler):
    body = b"<html><body>Please log in to continue</body></html>"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_DELETE = do_GET = _answer

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def proxy():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def batch() -> list[Change]:
    return [Change(i, "add", f"u{i}@example.com", {"email": f"u{i}@example.com"}, None) for i in (1, 2)]


def client(connector_cls, settings) -> tuple:
    http = HttpClient(max_retries=2, timeout_s=5, sleep=lambda s: None)
    connector = connector_cls("dest", settings, SYNC, http)
    http.classify = connector.classify  # as the runner installs it
    return connector, http


def test_braze_html_200_is_retried_then_fails_never_accepted(proxy):
    braze, _ = client(BrazeConnector, {"api_key": "k", "base_url": base_url(proxy), "rest_endpoint": "iad-01",
                                       "identify_by": "email", "membership": "boolean",
                                       "membership_attribute": "vip"})
    with pytest.raises(RetriesExhausted) as failed:
        braze.send_batch(batch())
    assert failed.value.code == "unexpected_answer" and "Braze" in failed.value.message
    assert proxy.requests == 3


def test_meta_html_200_is_retried_then_fails_as_retryable_rows(proxy):
    meta, _ = client(FacebookCustomAudienceConnector, {"access_token": "t", "audience_id": "123", "base_url": base_url(proxy)})
    results = []
    deliver(meta, [(0, batch())], max_concurrency=1, on_result=lambda n, b, r: results.append(r))
    [result] = results
    assert {(r.error_code, r.retryable) for r in result.rejected} == {("unexpected_answer", True)}
    assert len(result.rejected) == 2 and proxy.requests == 3


def test_google_html_200_is_retried_then_fails_as_retryable_rows(proxy):
    google, _ = client(GoogleCustomerMatchConnector, {"access_token": "t", "customer_id": "1234567890",
                                                      "user_list_id": "42", "base_url": base_url(proxy)})
    results = []
    deliver(google, [(0, batch())], max_concurrency=1, on_result=lambda n, b, r: results.append(r))
    [result] = results
    assert {(r.error_code, r.retryable) for r in result.rejected} == {("unexpected_answer", True)}
    assert proxy.requests == 3


class _Response:
    def __init__(self, status: int, content: bytes):
        self.status_code, self.content, self.encoding, self.reason = status, content, "utf-8", ""


@pytest.mark.parametrize("content,allow_empty,ok", [
    (b'{"a": 1}', False, True), (b"", True, True), (b"", False, False), (b"[]", False, False),
    (b"<html>", False, False), (b'{"a"', False, False),
])
def test_json_object_answer(content, allow_empty, ok):
    verdict = json_object_answer("an object", allow_empty=allow_empty)(_Response(200, content))
    assert (verdict is None) is ok
    if not ok:
        assert verdict.kind == "retry" and verdict.code == "unexpected_answer"
    # Answers that are not 2xx are left to the connector's hook and the default policy.
    assert json_object_answer("an object")(_Response(500, b"<html>")) is None
