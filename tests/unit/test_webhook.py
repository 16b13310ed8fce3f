"""The webhook connector against the contract-checking fake, on real loopback HTTP."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid
from decimal import Decimal

import orjson
import pytest

from audsync.delivery.http import HttpClient
from audsync.destinations.base import (
    Change,
    FatalDestinationError,
    RequestRejected,
    RetriesExhausted,
    SyncInfo,
)
from audsync.destinations.webhook import WebhookConnector, batch_id
from tests.fakes.webhook_server import FakeWebhook, FakeWebhookProcess

SECRET = "whsec-test-0123"
SYNC = SyncInfo("high_value", "mirror", "run42", "email", ("Customer Value", "tier"))


def fields(seq: int) -> dict:
    """The mapped fields of row ``seq``."""
    return {"Customer Value": seq * 1.5, "tier": "gold"}


def changes(n: int, start: int = 1, op: str = "add") -> list[Change]:
    """``n`` changes with plan positions from ``start``."""
    return [
        Change(seq, op, f"user{seq}@example.com", fields(seq), None)
        for seq in range(start, start + n)
    ]


def connector(url: str, secret: str | None = SECRET, **settings) -> WebhookConnector:
    """A webhook connector for ``url`` with an HttpClient that does not wait between retries."""
    http = HttpClient(max_retries=3, sleep=lambda s: None, timeout_s=5)
    config = {"url": url, **settings}
    if secret:
        config["secret"] = secret
    hook = WebhookConnector("crm_hook", config, SYNC, http)
    http.add_secrets(hook.secret_values())
    return hook


@pytest.fixture
def fake():
    with FakeWebhook(secret=SECRET) as hook:
        yield hook


def test_body_and_headers_follow_the_contract(fake):
    gone = Change(14, "remove", "gone@example.com", {"Customer Value": 2}, None)
    batch = changes(3, start=11) + [gone]
    result = connector(fake.url).send_batch(batch)
    assert result.rejected == []
    headers, raw = fake.last_request
    body = orjson.loads(raw)
    assert set(body) == {"sync", "run_id", "batch_id", "sent_at", "operations"}
    assert body["sync"] == "high_value" and body["run_id"] == "run42"
    assert body["batch_id"] == "run42-11" == batch_id("run42", batch)
    sent_at = dt.datetime.strptime(body["sent_at"], "%Y-%m-%dT%H:%M:%SZ")
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert abs(sent_at - now) < dt.timedelta(minutes=1)
    assert body["operations"][0] == {
        "op": "add",
        "key": "user11@example.com",
        "fields": {"Customer Value": 16.5, "tier": "gold"},
    }
    assert body["operations"][3]["op"] == "remove"
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == "run42-11"
    # The signature is HMAC-SHA256 of "<timestamp>.<raw body>", checked here independently.
    timestamp = headers["X-Audsync-Timestamp"]
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256)
    assert headers["X-Audsync-Signature"] == "sha256=" + expected.hexdigest()
    assert fake.bad_signatures == 0 and fake.violations == []
    assert set(fake.members) == {"user11@example.com", "user12@example.com", "user13@example.com"}


def test_wrong_secret_is_fatal_and_seen_by_the_fake(fake):
    with pytest.raises(FatalDestinationError, match="401"):
        connector(fake.url, secret="not-the-secret").send_batch(changes(2))
    assert fake.bad_signatures == 1
    assert fake.members == {}


def test_unsigned_request_to_a_signing_receiver_fails(fake):
    with pytest.raises(FatalDestinationError):
        connector(fake.url, secret=None).send_batch(changes(1))
    assert fake.bad_signatures == 1


def test_idempotency_key_is_stable_across_retries(fake):
    fake.fail_next(2, 503)
    result = connector(fake.url).send_batch(changes(5, start=101))
    assert result.rejected == []
    assert fake.idempotency_keys == ["run42-101"] * 3
    assert fake.applied_batches == {"run42-101": 1}
    assert fake.bad_signatures == 0  # each retry is signed again, correctly


def test_rejected_rows_in_a_200(fake):
    fake.reject_keys = {"user2@example.com", "user4@example.com"}
    result = connector(fake.url).send_batch(changes(5))
    assert sorted((r.key, r.op, r.error_code, r.retryable) for r in result.rejected) == [
        ("user2@example.com", "add", "rejected", False),
        ("user4@example.com", "add", "rejected", False),
    ]
    assert all(r.error_message == "rejected by the fake" for r in result.rejected)
    assert set(fake.members) == {"user1@example.com", "user3@example.com", "user5@example.com"}


def test_4xx_and_exhausted_retries_raise_for_the_engine(fake):
    hook = connector(fake.url)
    fake.fail_next(1, 400, body="unknown field 'tier'")
    with pytest.raises(RequestRejected) as rejected:
        hook.send_batch(changes(2))
    assert rejected.value.code == "400" and "unknown field 'tier'" in rejected.value.message
    fake.fail_next(4, 500)
    with pytest.raises(RetriesExhausted):
        hook.send_batch(changes(2))


def test_database_values_are_encoded():
    with FakeWebhook() as fake:
        row_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
        fields = {
            "amount": Decimal("1234567890.123456789"),
            "day": dt.date(2026, 11, 22),
            "at": dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.timezone.utc),
            "id": row_id,
            "big": 2**70,
            "none": None,
        }
        batch = [
            Change(1, "add", "a@example.com", fields, None),
            Change(2, "add", "b@example.com", {"blob": b"\x00\x01"}, None),
            Change(3, "add", "c@example.com", {"nan": Decimal("NaN")}, None),
        ]
        result = connector(fake.url, secret=None).send_batch(batch)
        raw = fake.last_request[1]
        members = fake.members
    # The decimal keeps every digit as a JSON number, not a string or a rounded float.
    assert b'"amount":1234567890.123456789' in raw
    assert b'"big":1180591620717411303424' in raw
    assert members["a@example.com"]["day"] == "2026-11-22"
    assert members["a@example.com"]["at"] == "2026-11-22T10:00:00+00:00"
    assert members["a@example.com"]["id"] == str(row_id)
    assert members["a@example.com"]["none"] is None
    assert set(members) == {"a@example.com"}
    by_key = {r.key: r for r in result.rejected}
    assert set(by_key) == {"b@example.com", "c@example.com"}
    assert by_key["b@example.com"].error_code == "invalid_value"
    assert "'blob'" in by_key["b@example.com"].error_message
    assert "bytes" in by_key["b@example.com"].error_message


def test_extra_headers_are_sent_and_masked(fake):
    hook = connector(fake.url, headers={"X-Api-Key": "hdr-secret-77"})
    assert "hdr-secret-77" in hook.secret_values() and SECRET in hook.secret_values()
    hook.send_batch(changes(1))
    assert fake.last_request[0]["X-Api-Key"] == "hdr-secret-77"
    fake.fail_next(1, 400, body="key hdr-secret-77 is not allowed")
    with pytest.raises(RequestRejected) as caught:
        hook.send_batch(changes(1, start=2))
    assert "hdr-secret-77" not in str(caught.value)


def test_base_url_replaces_the_host(fake):
    hook = connector("https://hooks.example.com/hook", base_url=fake.base_url)
    assert hook.send_batch(changes(1)).rejected == []
    assert fake.accepted_requests == 1


def test_bad_url_is_fatal():
    with pytest.raises(FatalDestinationError, match="'url'"):
        connector("ftp://example.com/x?token=abc")


def test_fake_in_another_process(tmp_path):
    state_file = tmp_path / "state.json"
    with FakeWebhookProcess(secret=SECRET, state_file=state_file) as fake:
        hook = connector(fake.url)
        fake.inject(fail={"n": 1, "status": 503}, reject_keys=["user2@example.com"])
        result = hook.send_batch(changes(3))
        state = fake.state()
    assert [r.key for r in result.rejected] == ["user2@example.com"]
    assert state["requests"] == 2 and state["bad_signatures"] == 0 and state["violations"] == []
    assert set(state["members"]) == {"user1@example.com", "user3@example.com"}
    written = orjson.loads(state_file.read_bytes())
    assert written["members"] == state["members"]


def test_the_fake_flags_requests_that_break_the_contract():
    """The fake is only worth trusting if it refuses what the contract forbids."""
    import requests

    good = {
        "sync": "S", "run_id": "r", "batch_id": "r-1", "sent_at": "2026-11-22T10:00:00Z",
        "operations": [{"op": "add", "key": "a", "fields": {}}],
    }  # fmt: skip
    json_headers = {"Content-Type": "application/json", "Idempotency-Key": "r-1"}
    cases = [
        ({"Content-Type": "text/plain", "Idempotency-Key": "r-1"}, good),
        ({"Content-Type": "application/json"}, good),  # no Idempotency-Key
        ({**json_headers, "Idempotency-Key": "r-2"}, good),  # not the batch_id
        (json_headers, {**good, "operations": [{"op": "upsert", "key": "a", "fields": {}}]}),
        (json_headers, {**good, "operations": [{"op": "add", "key": 1, "fields": {}}]}),
        (json_headers, {**good, "operations": [{"op": "add", "key": "a"}]}),
        (json_headers, {**good, "sent_at": "yesterday"}),
        (json_headers, {k: v for k, v in good.items() if k != "run_id"}),
    ]
    with FakeWebhook() as fake:
        for headers, body in cases:
            answer = requests.post(fake.url, data=orjson.dumps(body), headers=headers, timeout=5)
            assert answer.status_code == 400, (headers, body)
        assert requests.get(fake.url, timeout=5).status_code == 400
        assert len(fake.violations) == len(cases) + 1
        assert fake.members == {}
        assert requests.post(fake.url, data=orjson.dumps(good), headers=json_headers, timeout=5).ok
        assert set(fake.members) == {"a"}


# -- answers that cannot be understood (issue 10, point 7) ------------------------------------

UNREADABLE_ANSWERS = {
    "html_from_a_proxy": b"<html><body>Welcome to the captive portal</body></html>",
    "plain_text": b"OK",
    "truncated_json": b'{"rejected": [{"key": "user1@example.com"',
    "json_that_is_not_an_object": b'["user1@example.com"]',
    "rejected_not_a_list": b'{"rejected": "user1@example.com"}',
    "rejected_entry_not_an_object": b'{"rejected": ["user1@example.com"]}',
    "rejected_key_in_another_case": b'{"rejected": [{"key": "USER1@example.com", "error": "x"}]}',
    "rejected_key_not_in_the_batch": b'{"rejected": [{"key": "other@example.com", "error": "x"}]}',
    "rejected_key_not_a_string": b'{"rejected": [{"key": 1, "error": "x"}]}',
    "rejected_error_not_text": b'{"rejected": [{"key": "user1@example.com", "error": {"a": 1}}]}',
}


@pytest.mark.parametrize("answer", sorted(UNREADABLE_ANSWERS))
def test_a_2xx_that_is_not_the_webhook_answer_is_retried_then_fails(fake, answer):
    hook = connector(fake.url)  # max_retries=3: four attempts
    fake.fail_next(4, 200, body=UNREADABLE_ANSWERS[answer])
    with pytest.raises(RetriesExhausted) as failed:
        hook.send_batch(changes(3))
    assert failed.value.code == "unexpected_answer"
    assert "not JSON" in failed.value.message or "rejected" in failed.value.message \
        or "object" in failed.value.message
    assert fake.requests == 4 and fake.members == {}


def test_an_unreadable_2xx_then_a_good_answer_succeeds(fake):
    fake.fail_next(1, 200, body="<html>proxy</html>")
    result = connector(fake.url).send_batch(changes(3))
    assert result.rejected == []
    assert set(fake.members) == {f"user{i}@example.com" for i in (1, 2, 3)}


@pytest.mark.parametrize("body", [b"", b"  \n", b"{}", b'{"rejected": null}', b'{"rejected": []}',
                                  b'{"accepted": 3}'])
def test_answers_that_accept_every_row(fake, body):
    fake.fail_next(1, 200, body=body)
    assert connector(fake.url).send_batch(changes(3)).rejected == []
    assert fake.requests == 1


def test_the_engine_fails_an_unreadable_batch_as_retryable_never_accepted(fake):
    from audsync.delivery.engine import deliver

    hook = connector(fake.url)
    fake.fail_next(4, 200, body="<html>proxy</html>")
    results = []
    deliver(hook, [(0, changes(3))], max_concurrency=1,
            on_result=lambda n, batch, result: results.append(result))
    [result] = results
    assert [(r.error_code, r.retryable) for r in result.rejected] == [("unexpected_answer", True)] * 3


# -- the member listing (audsync verify) ---------------------------------------------------


def test_the_listing_pages_by_cursor_signed(fake, monkeypatch):
    from audsync.destinations import webhook

    fake.list_page_size = 2
    monkeypatch.setattr(webhook, "LIST_PAGE", 3)  # the fake's page size (2) is the smaller
    hook = connector(fake.url, list_url=fake.list_url)
    assert hook.can_list_members and not hook.listed_key_casefold()
    hook.send_batch(changes(5))
    fake.seed_members({"  spaced@example.com ": {}})
    pages = list(hook.list_members())
    assert [len(p) for p in pages] == [2, 2, 2]
    keys = [k for page in pages for k, _ in page]
    assert keys == ["spaced@example.com"] + [f"user{i}@example.com" for i in range(1, 6)]
    assert all(ident and ident.startswith("wh-") for page in pages for _, ident in page)
    assert fake.list_requests == 3 and fake.bad_signatures == 0 and fake.violations == []


def test_the_listing_is_signed_over_an_empty_body(fake):
    hook = connector(fake.url, secret="wrong", list_url=fake.list_url)
    with pytest.raises(FatalDestinationError):
        list(hook.list_members())
    assert fake.bad_signatures == 1


def test_a_webhook_lists_only_with_a_list_url(fake):
    hook = connector(fake.url)
    assert not hook.can_list_members
    assert WebhookConnector.listing_refused({"url": fake.url}) is not None
    assert WebhookConnector.listing_refused({"url": fake.url, "list_url": fake.list_url}) is None
    assert "list_url" in {k.name for k in WebhookConnector.all_config_keys()}
    with pytest.raises(FatalDestinationError, match="list_url"):
        list(hook.list_members())
    with pytest.raises(FatalDestinationError, match="'list_url' must be an http"):
        connector(fake.url, list_url="ftp://x/members")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b'{"next": null}',
        b'{"members": {}, "next": null}',
        b'{"members": [{"id": "1"}], "next": null}',
        b'{"members": ["a@example.com"], "next": null}',
        b'{"members": [{"key": "a@example.com", "id": {}}], "next": null}',
        b'{"members": [{"key": "a@example.com"}]}',
        b'{"members": [], "next": 2}',
    ],
)
def test_a_malformed_listing_is_an_error_naming_the_url(fake, body):
    fake.listing_body = body
    hook = connector(fake.url, list_url=fake.list_url + "?token=hidden")
    with pytest.raises(FatalDestinationError) as raised:
        list(hook.list_members())
    message = str(raised.value)
    assert f"GET {fake.list_url}" in message and "not a member listing" in message
    assert "hidden" not in message


def test_a_cursor_given_twice_stops_the_listing(fake):
    fake.listing_body = b'{"members": [{"key": "a@example.com"}], "next": "same"}'
    hook = connector(fake.url, list_url=fake.list_url)
    with pytest.raises(FatalDestinationError, match="twice"):
        list(hook.list_members())


def test_the_listing_of_the_fake_in_another_process(tmp_path):
    with FakeWebhookProcess(secret=SECRET, list_page_size=1) as process:
        hook = connector(process.url, list_url=process.list_url)
        hook.send_batch(changes(2))
        process.inject(drop_members=["user1@example.com"])
        keys = [k for page in hook.list_members() for k, _ in page]
        assert keys == ["user2@example.com"]
        assert process.state(members=False)["list_requests"] == 1
