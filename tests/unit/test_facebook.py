"""Meta Custom Audiences connector against the request-checking fake, over loopback HTTP."""

from __future__ import annotations

import hashlib
import logging

import orjson
import pytest
from facebook_business.adobjects.helpers.customaudiencemixin import CustomAudienceMixin

from audsync.delivery.engine import deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import Change, FatalDestinationError
from audsync.destinations.facebook import (
    MAX_ROWS_PER_REQUEST,
    FacebookCustomAudienceConnector,
    regain_access_seconds,
)
from audsync.destinations.registry import get_connector
from tests.fakes.facebook import TOKEN, FakeFacebook, email_hash
from tests.unit._connector_helpers import Harness as ConnectorHarness
from tests.unit._connector_helpers import mirror_runs

SYNC_NAME = "high_value_to_meta"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def fake():
    with FakeFacebook() as server:
        yield server
        assert server.violations == [], server.violations


class Harness(ConnectorHarness):
    """The Meta connector wired as the runner wires it, its waits recorded."""

    connector_class = FacebookCustomAudienceConnector
    destination_name = "meta_hv"
    sync_name = SYNC_NAME


def add(seq, email, first_name="Ann", ltv=10.0, op="add", destination_id=None):
    return Change(seq, op, email, {"EMAIL": email, "FN": first_name, "ltv": ltv}, destination_id)


def bodies(fake, method=None):
    """The JSON bodies of the /users requests the fake received."""
    return [
        orjson.loads(body)
        for m, target, _, body in fake.requests
        if "/users" in target and (method is None or m == method)
    ]


# ----------------------------------------------------------------------------------------
# Operations and bodies
# ----------------------------------------------------------------------------------------


def test_add_update_remove_land(fake):
    fake.seed_members({"old@example.com": {}, "stays@example.com": {}})
    h = Harness(fake)
    assert h.open() is None  # a configured audience: nothing to remember
    batch = [
        add(1, "A@Example.com"),
        add(2, "b@example.com", first_name="Bob"),
        add(3, "stays@example.com", op="update"),
        add(4, "old@example.com", op="remove", destination_id=email_hash("old@example.com")),
    ]
    result = h.send(batch)
    assert result.rejected == [] and result.unmatched == 0
    everyone = ["a@example.com", "b@example.com", "stays@example.com", "old@example.com"]
    assert set(fake.members(everyone)) == {"a@example.com", "b@example.com", "stays@example.com"}
    # Adds and updates are one POST, removals one DELETE, each with its own session.
    (post,) = bodies(fake, "POST")
    (delete,) = bodies(fake, "DELETE")
    assert post["payload"]["schema"] == ["EMAIL", "FN"]
    assert post["payload"]["data"][0] == [sha("a@example.com"), sha("ann")]
    assert post["payload"]["data"][1] == [sha("b@example.com"), sha("bob")]
    assert delete["payload"]["data"] == [[email_hash("old@example.com"), sha("ann")]]
    assert post["session"]["session_id"] != delete["session"]["session_id"]
    assert post["session"]["batch_seq"] == delete["session"]["batch_seq"] == 1
    assert post["session"]["last_batch_flag"] is False
    # The member's id is the hash matched on; removed members get none.
    assert result.destination_ids == {
        "A@Example.com": sha("a@example.com"),
        "b@example.com": sha("b@example.com"),
        "stays@example.com": sha("stays@example.com"),
    }
    # Nothing in clear on the wire, and the token only in the header.
    _, target, headers, raw = [r for r in fake.requests if r[0] != "GET"][0]
    assert b"example.com" not in raw and TOKEN.encode() not in raw and TOKEN not in target
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert target.startswith("/v26.0/") and headers["Content-Type"].startswith("application/json")


def test_bodies_match_the_meta_sdk(fake):
    """Meta's SDK builds the same payload from the same raw rows (the oracle)."""
    h = Harness(fake)
    h.open()
    raw = [
        ("John.Smith@Example.com", "John"),
        (" alice@example.org ", "Alice"),
        ("bob@x.io", "BOB"),
    ]
    h.send([add(i + 1, email, first_name=name) for i, (email, name) in enumerate(raw)])
    (sent,) = bodies(fake)
    expected = CustomAudienceMixin.format_params(
        ["EMAIL", "FN"], [[e, n] for e, n in raw], is_raw=True
    )["payload"]
    assert sent["payload"]["schema"] == expected["schema"]
    assert sent["payload"]["data"] == expected["data"]


def test_update_is_an_idempotent_re_add(fake):
    h = Harness(fake)
    h.open()
    h.send([add(1, "a@example.com")])
    h.send([add(2, "a@example.com", first_name="Anna", op="update")])
    assert len(fake.member_rows()) == 1
    assert fake.member_rows()[0]["FN"] == sha("anna")


def test_session_sequence_counts_per_operation_and_differs_per_run(fake):
    h = Harness(fake)
    h.open()
    for seq in range(1, 4):
        h.send([add(seq, f"u{seq}@example.com")])
    h.send([add(9, "u1@example.com", op="remove")])
    sid_add, sid_remove = h.connector._sessions["add"], h.connector._sessions["remove"]
    assert fake.sessions == {sid_add: [1, 2, 3], sid_remove: [1]}
    assert 0 < sid_add < 2**63 and sid_add != sid_remove
    # The run ends: each session gets one request with last_batch_flag true, one row long.
    h.connector.close(True)
    assert fake.sessions == {sid_add: [1, 2, 3, 4], sid_remove: [1, 2]}
    assert sorted(fake.closed_sessions) == sorted([sid_add, sid_remove])
    closing = [b for b in bodies(fake) if b["session"]["last_batch_flag"]]
    assert len(closing) == 2 and all(len(b["payload"]["data"]) == 1 for b in closing)
    assert [b["session"]["last_batch_flag"] for b in bodies(fake)].count(True) == 2
    assert {m for m in fake.members()} == {f"sha256:{sha(f'u{i}@example.com')}" for i in (2, 3)}
    # A retried or resumed run (same run id) never replays a used (session_id, batch_seq).
    again = Harness(fake)
    again.open()
    again.send([add(1, "u9@example.com")])
    assert again.connector._sessions["add"] not in (sid_add, sid_remove)
    assert fake.violations == []


def test_a_failed_run_leaves_its_sessions_open(fake):
    h = Harness(fake)
    h.open()
    h.send([add(1, "a@example.com")])
    h.connector.close(False)
    assert fake.closed_sessions == []


def test_other_key_types_and_unhashed_keys(fake):
    h = Harness(fake, key_type="EXTERN_ID", fields=("EXTERN_ID", "email", "madid"))
    h.open()
    assert h.connector.schema == ["EXTERN_ID", "EMAIL", "MADID"]
    h.send(
        [
            Change(
                1,
                "add",
                "Cust-001",
                {
                    "EXTERN_ID": "Cust-001",
                    "email": "A@x.com",
                    "madid": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
                },
                None,
            )
        ]
    )
    (sent,) = bodies(fake)
    assert sent["payload"]["data"] == [
        ["Cust-001", sha("a@x.com"), "6d92078a-8246-4ba4-ae5b-76104861e7dc"]
    ]


def test_fields_that_are_not_meta_keys_are_ignored_with_a_warning(fake, caplog):
    with caplog.at_level(logging.WARNING, logger="audsync.destinations.facebook"):
        h = Harness(fake)
    assert h.connector.schema == ["EMAIL", "FN"]
    assert "'ltv'" in caplog.text and "not Meta match keys" in caplog.text


# ----------------------------------------------------------------------------------------
# Identifiers
# ----------------------------------------------------------------------------------------


def test_bad_identifiers_fail_alone_and_are_never_sent(fake):
    h = Harness(fake, key_type="PHONE", fields=("PHONE", "FN"))
    h.open()
    batch = [
        Change(1, "add", "+44 7911 123456", {"FN": "Ann"}, None),
        Change(2, "add", "650 555 1234", {"FN": "Bob"}, None),  # no country code
        Change(3, "add", "   ", {"FN": "Cy"}, None),
    ]
    result = h.send(batch)
    assert sorted((r.key, r.error_code, r.retryable) for r in result.rejected) == [
        ("   ", "invalid_phone", False),
        ("650 555 1234", "invalid_phone", False),
    ]
    assert all("650" not in r.error_message for r in result.rejected)
    (sent,) = bodies(fake)
    assert sent["payload"]["data"] == [[sha("447911123456"), sha("ann")]]
    assert set(result.destination_ids) == {"+44 7911 123456"}


def test_default_country_reads_national_numbers(fake):
    h = Harness(fake, key_type="PHONE", fields=("PHONE",), default_country="GB")
    h.open()
    result = h.send([Change(1, "add", "07911 123456", {"PHONE": "07911 123456"}, None)])
    assert result.rejected == []
    assert bodies(fake)[0]["payload"]["data"] == [[sha("447911123456")]]


def test_an_unusable_secondary_value_is_sent_blank(fake, caplog):
    h = Harness(fake)
    h.open()
    with caplog.at_level(logging.WARNING, logger="audsync.destinations.facebook"):
        result = h.send(
            [add(1, "a@example.com", first_name="1234"), add(2, "b@example.com", first_name=None)]
        )
    assert result.rejected == []
    assert [row[1] for row in bodies(fake)[0]["payload"]["data"]] == ["", ""]
    assert "'FN'" in caplog.text and "1234" not in caplog.text


def test_prehashed_keys_are_sent_as_they_are(fake):
    h = Harness(fake)
    h.open()
    digest = sha("a@example.com")
    h.send([Change(1, "add", digest.upper(), {"EMAIL": digest.upper(), "FN": None}, None)])
    assert bodies(fake)[0]["payload"]["data"] == [[digest, ""]]
    assert set(fake.members(["a@example.com"])) == {"a@example.com"}


# ----------------------------------------------------------------------------------------
# Destination ids and removal
# ----------------------------------------------------------------------------------------


def test_removal_uses_the_stored_id_even_when_normalisation_changed(fake):
    # Run 1 adds a national number read with default_country GB.
    first = Harness(fake, key_type="PHONE", fields=(), default_country="GB")
    first.open()
    added = first.send([Change(1, "add", "07911 123456", {}, None)])
    stored = added.destination_ids["07911 123456"]
    assert stored == sha("447911123456") and len(fake.member_rows()) == 1
    # Run 2 has no default_country any more: the key alone could not be normalised, but the
    # stored id removes exactly what was added.
    second = Harness(fake, run_id="run-2", key_type="PHONE", fields=())
    second.open()
    result = second.send([Change(1, "remove", "07911 123456", {}, stored)])
    assert result.rejected == [] and fake.member_rows() == []


def test_removal_without_an_id_looks_the_member_up_by_its_key(fake):
    fake.seed_members(["gone@example.com", "kept@example.com"])
    h = Harness(fake)
    h.open()
    result = h.send(
        [
            add(1, " Gone@Example.com ", op="remove", destination_id=None),
            add(2, "kept@example.com", op="remove", destination_id="not-a-hash"),  # unusable id
        ]
    )
    assert result.rejected == [] and result.destination_ids == {}
    assert fake.members(["gone@example.com", "kept@example.com"]) == {}


# ----------------------------------------------------------------------------------------
# Batches and the engine
# ----------------------------------------------------------------------------------------


def test_engine_splits_batches_over_the_limit(fake):
    h = Harness(fake, config={"batch_size": 25_000, "max_concurrency": 2})
    assert h.delivery.batch_size == MAX_ROWS_PER_REQUEST  # capped at Meta's limit
    h.open()
    changes = [add(i + 1, f"user{i}@example.com") for i in range(20_500)]
    size = h.delivery.batch_size
    batches = ((n, changes[i : i + size]) for n, i in enumerate(range(0, len(changes), size)))
    results = []
    stats = deliver(
        h.connector,
        batches,
        max_concurrency=h.delivery.max_concurrency,
        on_result=lambda n, b, r: results.append(r),
    )
    assert stats.rows_sent == 20_500 and stats.rows_rejected == 0
    sizes = sorted(len(b["payload"]["data"]) for b in bodies(fake))
    assert sizes == [500, 10_000, 10_000]
    assert sorted(fake.sessions[h.connector._sessions["add"]]) == [1, 2, 3]
    assert len(fake.members()) == 20_500
    assert sum(len(r.destination_ids) for r in results) == 20_500


def test_the_fake_refuses_a_request_over_the_limit(fake):
    """A batch past 10,000 rows gets Meta's error (and the fake records the breach)."""
    h = Harness(fake)
    h.open()
    result = h.send([add(i + 1, f"u{i}@example.com") for i in range(MAX_ROWS_PER_REQUEST + 1)])
    assert len(result.rejected) == MAX_ROWS_PER_REQUEST + 1
    assert {r.error_code for r in result.rejected} == {"meta_100"}
    assert "Too many users" in result.rejected[0].error_message
    assert fake.violations and "Too many users" in fake.violations[0]
    fake.violations.clear()


# ----------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [80003, 17, 4, 613])
def test_rate_limits_in_the_body_are_retried(fake, code):
    h = Harness(fake)
    h.open()
    fake.fail_next("rate_limit", code=code)
    result = h.send([add(1, "a@example.com")])
    assert result.rejected == []
    assert set(fake.members(["a@example.com"])) == {"a@example.com"}
    assert len(bodies(fake)) == 2 and len(h.waits) == 1 and h.waits[0] < 1  # backoff


def test_rate_limit_waits_as_long_as_meta_says(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("rate_limit", regain_minutes=2)
    assert h.send([add(1, "a@example.com")]).rejected == []
    assert h.waits == [120.0]


def test_regain_access_header_parsing():
    header = (
        '{"123": [{"type": "custom_audience", "estimated_time_to_regain_access": 3}],'
        ' "456": [{"type": "ads_management", "estimated_time_to_regain_access": 5}]}'
    )
    assert regain_access_seconds({"X-Business-Use-Case-Usage": header}) == 300.0
    assert (
        regain_access_seconds({"X-Business-Use-Case-Usage": '{"1": [{"call_count": 5}]}'}) is None
    )
    assert regain_access_seconds({"X-Business-Use-Case-Usage": "not json"}) is None
    assert regain_access_seconds({}) is None


def test_server_errors_are_retried(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("server_error", n=2)
    assert h.send([add(1, "a@example.com")]).rejected == []
    assert len(h.waits) == 2 and set(fake.members(["a@example.com"])) == {"a@example.com"}


def test_a_timeout_is_retried(fake):
    h = Harness(fake, timeout_s=0.3)
    h.open()
    fake.fail_next("timeout", seconds=1.0)
    assert h.send([add(1, "a@example.com")]).rejected == []
    assert len(h.waits) == 1 and set(fake.members(["a@example.com"])) == {"a@example.com"}


def test_retries_running_out_fail_the_rows_as_retryable(fake):
    h = Harness(fake, max_retries=2)
    h.open()
    fake.fail_next("server_error", n=3)
    result = h.send([add(1, "a@example.com"), add(2, "b@example.com")])
    assert [(r.key, r.retryable) for r in result.rejected] == [
        ("a@example.com", True),
        ("b@example.com", True),
    ]
    assert result.destination_ids == {}


def test_expired_token_is_fatal_and_the_message_has_no_secret(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("expired_token")
    with pytest.raises(FatalDestinationError) as caught:
        h.send([add(1, "a@example.com")])
    assert "expired" in str(caught.value) and "190" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert len(bodies(fake)) == 1  # not retried


def test_a_wrong_token_is_fatal(fake):
    h = Harness(fake, access_token="EAAwrongToken999")
    # open() checks the audience, so a wrong token stops the run before anything is sent.
    with pytest.raises(FatalDestinationError) as caught:
        h.open()
    assert "EAAwrongToken999" not in str(caught.value) and "190" in str(caught.value)


def test_permission_errors_and_missing_audiences_are_fatal(fake):
    h = Harness(fake)
    h.open()
    fake.fail_next("permission")
    with pytest.raises(FatalDestinationError, match="permission"):
        h.send([add(1, "a@example.com")])
    missing = Harness(fake, audience_id="999")
    with pytest.raises(FatalDestinationError, match="no custom audience 999"):
        missing.open()
    # An audience deleted after open() is fatal on the send.
    gone = Harness(fake, audience_id="999")
    with pytest.raises(FatalDestinationError, match="does not exist"):
        gone.send([add(1, "a@example.com")])


def test_an_invalid_parameter_fails_only_that_requests_rows(fake):
    fake.seed_members(["old@example.com"])
    h = Harness(fake)
    h.open()
    fake.fail_next("invalid_parameter")  # hits the POST of the adds
    result = h.send([add(1, "a@example.com"), add(2, "old@example.com", op="remove")])
    assert [(r.key, r.op, r.error_code, r.retryable) for r in result.rejected] == [
        ("a@example.com", "add", "meta_100", False)
    ]
    assert result.destination_ids == {}
    assert fake.members(["a@example.com", "old@example.com"]) == {}  # the removal went through


def test_invalid_entries_are_counted_as_unmatched(fake):
    h = Harness(fake)
    h.open()
    fake.reject_keys(["b@example.com"])
    result = h.send([add(1, "a@example.com"), add(2, "b@example.com"), add(3, "c@example.com")])
    assert result.unmatched == 1 and result.rejected == []
    assert set(fake.members(["a@example.com", "b@example.com", "c@example.com"])) == {
        "a@example.com",
        "c@example.com",
    }


def test_app_secret_proof_is_sent_and_masked():
    with FakeFacebook(app_secret="app-secret-42") as fake:
        h = Harness(fake)
        h.open()
        assert h.send([add(1, "a@example.com")]).rejected == []
        _, target, _, _ = fake.requests[-1]
        assert "appsecret_proof=" in target
        proof = target.split("appsecret_proof=")[1]
        assert (
            proof in h.connector.secret_values() and "app-secret-42" in h.connector.secret_values()
        )
        assert h.http.mask(f"x {proof} y") == "x *** y"
        # Registered by the connector itself: a client given only the configured secrets
        # (as the runner builds it) masks the proof too.
        bare = HttpClient(secrets=["unrelated"])
        FacebookCustomAudienceConnector("meta_hv", h.settings, h.sync, bare)
        assert proof not in bare.mask(f"x {proof} y")
        assert fake.violations == []


# ----------------------------------------------------------------------------------------
# Creating the audience
# ----------------------------------------------------------------------------------------


def test_create_if_missing_creates_once_and_reuses(fake):
    first = Harness(
        fake, audience_id=None, create_if_missing="true", ad_account_id="act_1234567890"
    )
    state = first.open()
    assert state and state["audience_id"] not in (None, fake.audience_id)
    created = state["audience_id"]
    assert fake.created == [
        {"name": SYNC_NAME, "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"}
    ]
    first.send([add(1, "a@example.com")])
    assert set(fake.members(["a@example.com"], audience_id=created)) == {"a@example.com"}
    # The next run gets the state back and creates nothing.
    second = Harness(fake, run_id="run-2", audience_id=None, create_if_missing=True, state=state)
    assert second.open() is None
    second.send([add(1, "b@example.com")])
    assert len(fake.created) == 1
    assert set(fake.members(["a@example.com", "b@example.com"], audience_id=created)) == {
        "a@example.com",
        "b@example.com",
    }


def test_no_audience_and_no_create_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        Harness(fake, audience_id=None).open()
    with pytest.raises(FatalDestinationError, match="ad_account_id"):
        Harness(fake, audience_id=None, create_if_missing=True, ad_account_id=None).open()
    assert fake.created == []


def test_configuration_errors(fake):
    with pytest.raises(FatalDestinationError, match="key_type"):
        Harness(fake, key_type="FN")
    with pytest.raises(FatalDestinationError, match="access_token"):
        Harness(fake, access_token=None)
    with pytest.raises(FatalDestinationError, match="default_country.*'UK'"):
        Harness(fake, default_country="UK")  # the ISO code is GB


def test_registered_under_its_type():
    assert get_connector("facebook_custom_audience") is FacebookCustomAudienceConnector
    secrets = {k.name for k in FacebookCustomAudienceConnector.config_keys if k.secret}
    assert secrets == {"access_token", "app_secret"}


# ----------------------------------------------------------------------------------------
# The common fake surface, driven as a mode test drives it
# ----------------------------------------------------------------------------------------


def test_mirror_property_over_the_common_surface(fake):
    mirror_runs(fake, Harness, [f"Person{i}@Example.com " for i in range(24)])


def test_a_failed_session_close_does_not_fail_the_run(fake, caplog):
    h = Harness(fake, max_retries=0)
    h.open()
    h.send([add(1, "a@example.com")])
    fake.fail_next("server_error")
    h.connector.close(True)  # no exception: every batch was answered
    assert "closing the add session failed" in caplog.text
