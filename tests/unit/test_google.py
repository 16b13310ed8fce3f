"""Google Customer Match (Data Manager API) connector against the request-checking fake.

Every request body the fake receives is also parsed with the Data Manager API's own message
types (``google-ads-datamanager``), refusing unknown fields: the oracle for the JSON we send.
"""

from __future__ import annotations

import hashlib
import logging
import time

import orjson
import pytest
from google.ads import datamanager_v1 as dm
from google.ads.datamanager_util import Encoding, Formatter

from audsync.delivery.engine import deliver
from audsync.destinations.base import Change, FatalDestinationError
from audsync.destinations.google import (
    MAX_MEMBERS_PER_REQUEST,
    GoogleCustomerMatchConnector,
    member_violations,
    retry_delay_seconds,
)
from audsync.destinations.registry import get_connector
from tests.fakes.google import TOKEN, FakeGoogle, email_hash
from tests.unit._connector_helpers import Harness as ConnectorHarness
from tests.unit._connector_helpers import mirror_runs

SYNC_NAME = "high_value_to_google"
PROTOS = {
    "/v1/audienceMembers:ingest": dm.IngestAudienceMembersRequest,
    "/v1/audienceMembers:remove": dm.RemoveAudienceMembersRequest,
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def proto_check(fake) -> None:
    """Parse every body sent with the API's message types (unknown fields refused)."""
    for method, path, _, body in fake.requests:
        if method == "GET":
            assert not body, path  # a look-up carries no body
            continue
        proto = PROTOS.get(path)
        if proto is None and path.endswith("/userLists"):
            proto = dm.UserList
        assert proto is not None, path
        proto.from_json(body.decode(), ignore_unknown_fields=False)


@pytest.fixture
def fake():
    with FakeGoogle() as server:
        yield server
        assert server.violations == [], server.violations
        proto_check(server)


class Harness(ConnectorHarness):
    """The Google connector wired as the runner wires it, its waits recorded."""

    connector_class = GoogleCustomerMatchConnector
    destination_name = "google_hv"
    sync_name = SYNC_NAME


def change(seq, email, op="add", destination_id=None, **fields):
    return Change(
        seq,
        op,
        email,
        {"email_address": email, "given_name": "Ann", "ltv": 1.0, **fields},
        destination_id,
    )


def bodies(fake, path=None):
    return [
        orjson.loads(b)
        for m, p, _, b in fake.requests
        if m != "GET" and (path is None or p.endswith(path))
    ]


# ----------------------------------------------------------------------------------------
# Operations and bodies
# ----------------------------------------------------------------------------------------


def test_add_update_remove_land(fake):
    fake.seed_members(["old@example.com", "stays@example.com"])
    h = Harness(fake)
    assert h.open() is None
    result = h.send(
        [
            change(1, "A@Example.com"),
            change(2, "b@example.com"),
            change(3, "stays@example.com", op="update"),
            change(4, "old@example.com", op="remove", destination_id=email_hash("old@example.com")),
        ]
    )
    assert result.rejected == [] and result.unmatched == 0
    everyone = ["a@example.com", "b@example.com", "stays@example.com", "old@example.com"]
    assert set(fake.members(everyone)) == {"a@example.com", "b@example.com", "stays@example.com"}
    (ingest,) = bodies(fake, ":ingest")
    (remove,) = bodies(fake, ":remove")
    destination = {
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": fake.customer_id},
        "productDestinationId": fake.user_list_id,
    }
    assert ingest["destinations"] == remove["destinations"] == [destination]
    assert ingest["encoding"] == remove["encoding"] == "HEX"
    assert ingest["termsOfService"] == {"customerMatchTermsOfServiceStatus": "ACCEPTED"}
    assert "termsOfService" not in remove and "consent" not in remove and "consent" not in ingest
    assert ingest["audienceMembers"][0] == {
        "userData": {"userIdentifiers": [{"emailAddress": sha("a@example.com")}]}
    }
    assert remove["audienceMembers"] == [
        {"userData": {"userIdentifiers": [{"emailAddress": email_hash("old@example.com")}]}}
    ]
    assert result.destination_ids == {
        "A@Example.com": sha("a@example.com"),
        "b@example.com": sha("b@example.com"),
        "stays@example.com": sha("stays@example.com"),
    }
    _, _, headers, raw = [r for r in fake.requests if r[0] == "POST"][0]
    assert headers["Authorization"] == f"Bearer {TOKEN}" and TOKEN.encode() not in raw
    assert b"example.com" not in raw


def test_identifiers_match_googles_formatter(fake):
    """Google's helper hashes each identifier the same way (the normalisation oracle)."""
    h = Harness(
        fake,
        fields=(
            "email_address",
            "phone_number",
            "given_name",
            "family_name",
            "region_code",
            "postal_code",
        ),
    )
    h.open()
    row = {
        "email_address": " Dana@Example.com",
        "phone_number": "+1 (650) 555-1234",
        "given_name": " Dana ",
        "family_name": "O'Neil",
        "region_code": "us",
        "postal_code": " 94025 ",
    }
    assert h.send([Change(1, "add", row["email_address"], row, None)]).rejected == []
    identifiers = bodies(fake, ":ingest")[0]["audienceMembers"][0]["userData"]["userIdentifiers"]
    f = Formatter()
    assert identifiers == [
        {"emailAddress": f.process_email_address(row["email_address"], Encoding.HEX)},
        {"phoneNumber": f.process_phone_number(row["phone_number"], Encoding.HEX)},
        {
            "address": {
                "givenName": f.process_given_name(row["given_name"], Encoding.HEX),
                "familyName": f.process_family_name(row["family_name"], Encoding.HEX),
                "regionCode": f.process_region_code(row["region_code"]),
                "postalCode": f.process_postal_code(row["postal_code"]),
            }
        },
    ]


def test_the_address_is_sent_only_with_all_four_parts(fake, caplog):
    with caplog.at_level(logging.WARNING, logger="audsync.destinations.google"):
        h = Harness(fake)  # maps given_name only
    assert "no address is sent" in caplog.text and "'ltv'" in caplog.text
    h.open()
    h.send([change(1, "a@example.com")])
    assert bodies(fake)[0]["audienceMembers"][0]["userData"]["userIdentifiers"] == [
        {"emailAddress": sha("a@example.com")}
    ]


def test_update_is_an_idempotent_re_ingest(fake):
    h = Harness(fake, fields=("email_address", "phone"))
    h.open()
    h.send([change(1, "a@example.com", phone="+44 7911 123456")])
    h.send([change(2, "a@example.com", op="update", phone="+44 7911 123456")])
    assert fake.member_identifiers() == [
        {("emailAddress", sha("a@example.com")), ("phoneNumber", sha("+447911123456"))}
    ]


def test_consent_and_login_account_come_from_settings(fake):
    h = Harness(
        fake,
        ad_user_data_consent="granted",
        ad_personalization_consent="DENIED",
        login_customer_id="999-888-7777",
        customer_id="123-456-7890",
    )  # as the Ads UI shows it
    h.open()
    h.send([change(1, "a@example.com"), change(2, "b@example.com", op="remove")])
    (ingest,) = bodies(fake, ":ingest")
    assert ingest["consent"] == {
        "adUserData": "CONSENT_GRANTED",
        "adPersonalization": "CONSENT_DENIED",
    }
    assert ingest["destinations"][0]["loginAccount"] == {
        "accountType": "GOOGLE_ADS",
        "accountId": "9998887777",
    }
    assert "consent" not in bodies(fake, ":remove")[0]


def test_gmail_rule_is_always_on(fake, caplog):
    util = Formatter()
    for settings in ({}, {"normalize_gmail": False}, {"normalize_gmail": "yes"}):
        harness = Harness(fake, **settings)
        harness.open()
        sent = harness.send([change(1, "John.Smith+ads@gmail.com")]).destination_ids
        # Google's own helper is the oracle: dots and the +suffix go before hashing.
        expected = util.process_email_address("John.Smith+ads@gmail.com", Encoding.HEX)
        assert sent == {"John.Smith+ads@gmail.com": expected} == {
            "John.Smith+ads@gmail.com": sha("johnsmith@gmail.com")
        }
    assert "normalize_gmail is ignored" in caplog.text


# ----------------------------------------------------------------------------------------
# Identifiers and per-row failures
# ----------------------------------------------------------------------------------------


def test_bad_identifiers_fail_alone_and_are_never_sent(fake):
    h = Harness(fake, key_type="PHONE", fields=("phone_number", "email"))
    h.open()
    result = h.send(
        [
            Change(
                1, "add", "+33 6 12 34 56 78", {"email": "bad email"}, None
            ),  # secondary dropped
            Change(2, "add", "06 12 34 56 78", {"email": "x@example.com"}, None),  # no country code
        ]
    )
    assert [(r.key, r.error_code) for r in result.rejected] == [("06 12 34 56 78", "invalid_phone")]
    (ingest,) = bodies(fake, ":ingest")
    assert ingest["audienceMembers"] == [
        {"userData": {"userIdentifiers": [{"phoneNumber": sha("+33612345678")}]}}
    ]


def test_default_country_reads_national_numbers(fake):
    h = Harness(fake, key_type="PHONE", fields=(), default_country="FR")
    h.open()
    assert h.send([Change(1, "add", "06 12 34 56 78", {}, None)]).rejected == []
    assert bodies(fake)[0]["audienceMembers"][0]["userData"]["userIdentifiers"] == [
        {"phoneNumber": sha("+33612345678")}
    ]


def test_members_the_api_names_are_rejected_and_the_rest_sent_again(fake):
    h = Harness(fake)
    h.open()
    fake.reject_keys(["b@example.com", "d@example.com"])
    result = h.send([change(i + 1, f"{c}@example.com") for i, c in enumerate("abcde")])
    assert sorted((r.key, r.error_code, r.retryable) for r in result.rejected) == [
        ("b@example.com", "google_invalid_format", False),
        ("d@example.com", "google_invalid_format", False),
    ]
    assert set(result.destination_ids) == {"a@example.com", "c@example.com", "e@example.com"}
    assert set(fake.members([f"{c}@example.com" for c in "abcde"])) == {
        "a@example.com",
        "c@example.com",
        "e@example.com",
    }
    assert fake.fast_failed == 1 and len(bodies(fake, ":ingest")) == 2
    assert len(bodies(fake, ":ingest")[1]["audienceMembers"]) == 3


def test_a_request_whose_members_all_fail(fake):
    h = Harness(fake)
    h.open()
    fake.reject_keys(["a@example.com"])
    result = h.send([change(1, "a@example.com"), change(2, "z@example.com", op="remove")])
    assert [(r.key, r.op) for r in result.rejected] == [("a@example.com", "add")]
    assert len(bodies(fake, ":ingest")) == 1 and len(bodies(fake, ":remove")) == 1


def test_member_violation_parsing():
    error = {
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "INVALID_ARGUMENT"},
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {
                        "field": "audience_members.audience_members[0].user_data.user_identifiers",
                        "description": "Email is not hex encoded.",
                        "reason": "INVALID_HEX_ENCODING",
                    },
                    {
                        "field": "audience_members.audience_members[7]",
                        "reason": "INVALID_SHA256_FORMAT",
                    },
                ],
            },
        ]
    }
    assert member_violations(error) == {
        0: ("INVALID_HEX_ENCODING", "Email is not hex encoded."),
        7: ("INVALID_SHA256_FORMAT", "invalid sha256 format"),
    }
    error["details"][1]["fieldViolations"].append(
        {"field": "encoding", "reason": "INVALID_ENUM_VALUE"}
    )
    assert member_violations(error) == {}  # the request itself is at fault


# ----------------------------------------------------------------------------------------
# Destination ids and removal
# ----------------------------------------------------------------------------------------


def test_removal_uses_the_stored_id_even_when_normalisation_changed(fake):
    first = Harness(fake, fields=())
    first.open()
    added = first.send([Change(1, "add", "J.Doe@example.com", {}, None)])
    stored = added.destination_ids["J.Doe@example.com"]
    assert stored == sha("j.doe@example.com")
    # A later run whose normalisation would give another hash still removes the stored one.
    second = Harness(fake, run_id="run-2", fields=())
    second.open()
    assert second.send([Change(1, "remove", "J.Doe@example.com ", {}, stored)]).rejected == []
    assert fake.member_identifiers() == []


def test_removal_without_an_id_looks_the_member_up_by_its_key(fake):
    fake.seed_members(["gone@example.com", "kept@example.com"])
    h = Harness(fake)
    h.open()
    result = h.send(
        [
            change(1, " GONE@example.com", op="remove"),
            change(2, "kept@example.com", op="remove", destination_id="garbage"),
        ]
    )
    assert result.rejected == [] and result.destination_ids == {}
    assert fake.members(["gone@example.com", "kept@example.com"]) == {}


# ----------------------------------------------------------------------------------------
# Batches, concurrency and the engine
# ----------------------------------------------------------------------------------------


def test_engine_splits_batches_over_the_limit_within_ten_requests_at_once():
    with FakeGoogle(latency_s=0.05) as fake:
        h = Harness(fake, fields=(), config={"batch_size": 50_000, "max_concurrency": 64})
        assert h.delivery.batch_size == MAX_MEMBERS_PER_REQUEST
        assert h.delivery.max_concurrency == 10
        h.open()
        changes = [Change(i + 1, "add", f"user{i}@example.com", {}, None) for i in range(25_000)]
        size = h.delivery.batch_size
        batches = ((n, changes[i : i + size]) for n, i in enumerate(range(0, len(changes), size)))
        stats = deliver(
            h.connector,
            batches,
            max_concurrency=h.delivery.max_concurrency,
            on_result=lambda *a: None,
        )
        assert stats.rows_sent == 25_000 and stats.rows_rejected == 0
        assert sorted(len(b["audienceMembers"]) for b in bodies(fake)) == [5_000, 10_000, 10_000]
        assert len(fake.members()) == 25_000
        assert fake.violations == [] and fake.max_concurrent <= 10


def test_small_batches_run_concurrently_but_never_past_ten():
    with FakeGoogle(latency_s=0.1) as fake:
        h = Harness(fake, fields=(), config={"batch_size": 1, "max_concurrency": 10})
        h.open()
        batches = ((i, [Change(i + 1, "add", f"u{i}@example.com", {}, None)]) for i in range(30))
        deliver(h.connector, batches, max_concurrency=10, on_result=lambda *a: None)
        assert 2 <= fake.max_concurrent <= 10 and fake.violations == []
        assert len(fake.members()) == 30


def test_the_fake_refuses_a_request_over_the_limit(fake):
    h = Harness(fake, fields=())
    h.open()
    result = h.send(
        [
            Change(i + 1, "add", f"u{i}@example.com", {}, None)
            for i in range(MAX_MEMBERS_PER_REQUEST + 1)
        ]
    )
    assert len(result.rejected) == MAX_MEMBERS_PER_REQUEST + 1
    assert {r.error_code for r in result.rejected} == {"google_too_many_audience_members"}
    assert fake.violations and "at most 10000" in fake.violations[0]
    fake.violations.clear()


# ----------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------


def test_resource_exhausted_waits_for_the_retry_delay(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("rate_limit", retry_delay_s=7)
    assert h.send([change(1, "a@example.com")]).rejected == []
    assert h.waits == [7.0] and set(fake.members(["a@example.com"])) == {"a@example.com"}


def test_retry_delay_parsing():
    info = {
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.500s"}]
    }
    assert retry_delay_seconds(info) == 1.5
    info["details"][0]["retryDelay"] = {"seconds": 3, "nanos": 500_000_000}
    assert retry_delay_seconds(info) == 3.5
    assert retry_delay_seconds({"details": []}) is None


def test_server_errors_and_timeouts_are_retried(fake):
    h = Harness(fake, timeout_s=0.3)
    h.open()
    fake.fail_next("server_error")
    fake.fail_next("timeout", seconds=1.0)
    assert h.send([change(1, "a@example.com")]).rejected == []
    assert len(h.waits) == 2 and set(fake.members(["a@example.com"])) == {"a@example.com"}


def test_retries_running_out_fail_the_rows_as_retryable(fake):
    h = Harness(fake, max_retries=1)
    h.open()
    fake.fail_next("server_error", n=2)
    result = h.send([change(1, "a@example.com")])
    assert [(r.key, r.retryable) for r in result.rejected] == [("a@example.com", True)]


def test_expired_token_is_fatal_and_the_message_has_no_secret(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("expired_token")
    with pytest.raises(FatalDestinationError) as caught:
        h.send([change(1, "a@example.com")])
    assert "UNAUTHENTICATED" in str(caught.value) and TOKEN not in str(caught.value)
    # A static token is not refreshed: one POST, not retried.
    assert [m for m, *_ in fake.requests] == ["GET", "POST"]


def test_permission_and_missing_list_are_fatal(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("permission")
    with pytest.raises(FatalDestinationError, match="PERMISSION_DENIED"):
        h.send([change(1, "a@example.com")])
    with pytest.raises(FatalDestinationError, match="no user list 42"):
        Harness(fake, user_list_id="42").open()
    # A list deleted after open() is fatal on the send.
    with pytest.raises(FatalDestinationError, match="INVALID_USER_LIST_ID"):
        Harness(fake, user_list_id="42").send([change(1, "a@example.com")])


# ----------------------------------------------------------------------------------------
# Creating the list, configuration
# ----------------------------------------------------------------------------------------


def test_create_if_missing_creates_once_and_reuses(fake):
    first = Harness(
        fake, user_list_id=None, create_if_missing=True, user_list_description="from audsync"
    )
    state = first.open()
    assert state and state["user_list_id"] not in (None, fake.user_list_id)
    created = state["user_list_id"]
    assert fake.created == [
        {
            "displayName": SYNC_NAME,
            "description": "from audsync",
            "ingestedUserListInfo": {
                "uploadKeyTypes": ["CONTACT_ID"],
                "contactIdInfo": {"dataSourceType": "DATA_SOURCE_TYPE_FIRST_PARTY"},
            },
        }
    ]
    first.send([change(1, "a@example.com")])
    second = Harness(fake, run_id="run-2", user_list_id=None, create_if_missing="true", state=state)
    assert second.open() is None
    second.send([change(1, "b@example.com")])
    assert len(fake.created) == 1
    assert set(fake.members(["a@example.com", "b@example.com"], user_list_id=created)) == {
        "a@example.com",
        "b@example.com",
    }


def test_no_list_and_no_create_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        Harness(fake, user_list_id=None).open()
    assert fake.created == []


def test_configuration_errors(fake):
    with pytest.raises(FatalDestinationError, match="key_type"):
        Harness(fake, key_type="ADDRESS")
    with pytest.raises(FatalDestinationError, match="customer_id"):
        Harness(fake, customer_id="acme")
    with pytest.raises(FatalDestinationError, match="default_country.*'UK'"):
        Harness(fake, default_country="UK")
    with pytest.raises(FatalDestinationError, match="ad_user_data_consent"):
        Harness(fake, ad_user_data_consent="maybe")


def test_registered_under_its_type_and_the_contracts_alias():
    assert get_connector("google_customer_match") is GoogleCustomerMatchConnector
    assert get_connector("google_ads_customer_match") is GoogleCustomerMatchConnector
    keys = {k.name: k for k in GoogleCustomerMatchConnector.config_keys}
    # The contract's example (section 7) loads: customer_id, user_list_id, developer_token.
    assert {"customer_id", "user_list_id", "developer_token", "access_token"} <= set(keys)
    assert {k for k, v in keys.items() if v.secret} == {
        "access_token", "developer_token", "client_secret", "refresh_token", "service_account_json"
    }


# ----------------------------------------------------------------------------------------
# The common fake surface, driven as a mode test drives it
# ----------------------------------------------------------------------------------------


def test_mirror_property_over_the_common_surface(fake):
    mirror_runs(fake, Harness, [f"Person{i}@Example.com " for i in range(24)])


# ----------------------------------------------------------------------------------------
# Asynchronous processing: requestStatus:retrieve
# ----------------------------------------------------------------------------------------


def test_rows_failed_in_processing_become_late_row_errors(fake):
    fake.fail_processing(["nc1@example.com", "nc2@example.com"])
    h = Harness(fake, fields=())
    h.open()
    failing = [Change(i + 1, "add", f"nc{i + 1}@example.com", {}, None) for i in range(2)]
    fine = [Change(3, "add", "ok@example.com", {}, None), Change(4, "add", "ok2@example.com", {}, None)]
    assert h.send(failing).rejected == [] and h.send(fine).rejected == []  # accepted at first
    late = h.connector.late_row_errors()
    assert sorted((e.key, e.op, e.error_code) for e in late) == [
        ("nc1@example.com", "add", "google_no_consent"),
        ("nc2@example.com", "add", "google_no_consent"),
    ]
    assert "PROCESSING_ERROR_REASON_NO_CONSENT" in late[0].error_message
    assert fake.status_polls >= 4  # each request was PROCESSING once, then final
    assert fake.members(["ok@example.com", "nc1@example.com"]) == {"ok@example.com": {}}
    # Polled once per run: nothing left to poll.
    assert h.connector.late_row_errors() == []


def test_status_polling_is_bounded_and_can_be_off(fake):
    fake.processing_polls = 1000  # never done
    h = Harness(fake, fields=(), request_status_timeout_s=1)
    h.open()
    h.send([Change(1, "add", "a@example.com", {}, None)])
    started = time.monotonic()
    assert h.connector.late_row_errors() == []
    assert time.monotonic() - started < 3
    off = Harness(fake, fields=(), request_status_timeout_s=0)
    off.open()
    off.send([Change(1, "add", "b@example.com", {}, None)])
    polls = fake.status_polls
    assert off.connector.late_row_errors() == [] and fake.status_polls == polls


def test_a_long_run_is_polled_in_the_background(fake, monkeypatch):
    from audsync.destinations import google

    monkeypatch.setattr(google, "BACKGROUND_POLL_S", 0.2)
    monkeypatch.setattr(google, "BACKGROUND_AFTER_REQUESTS", 3)
    fake.fail_processing(["bad@example.com"])
    h = Harness(fake, fields=())
    h.open()
    h.send([Change(1, "add", "bad@example.com", {}, None)])
    for i in range(4):
        h.send([Change(i + 2, "add", f"ok{i}@example.com", {}, None)])
    deadline = time.monotonic() + 5
    # Each request answers PROCESSING once, then its result: two rounds of the poller.
    while time.monotonic() < deadline and fake.status_polls < 10:
        time.sleep(0.05)
    time.sleep(0.1)
    with h.connector._pending_lock:
        assert h.connector._pending == [] and fake.status_polls >= 10
    late = h.connector.late_row_errors()
    assert [(e.key, e.error_code) for e in late] == [("bad@example.com", "google_no_consent")]
    assert not h.connector._poller.is_alive()
