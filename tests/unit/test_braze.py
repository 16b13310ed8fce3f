"""The Braze connector against the fake Braze API, over real loopback HTTP."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from audsync.delivery.engine import DeliverySettings, deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import (
    Change,
    FatalDestinationError,
    RequestRejected,
    SyncInfo,
)
from audsync.destinations.braze import BrazeConnector, retry_after
from audsync.destinations.registry import get_connector
from tests.fakes.braze import MEMBERSHIP_ATTRIBUTE, MEMBERSHIP_VALUE, FakeBraze
from tests.unit._connector_helpers import mirror_through_the_common_surface

SYNC = SyncInfo("vip_users", "mirror", "run1", "email", ("email", "first_name", "ltv"))


def connector(fake: FakeBraze, sleeps: list | None = None, timeout_s: float = 5, **overrides):
    """A connector on ``fake`` whose client records its waits instead of sleeping."""
    waits = sleeps if sleeps is not None else []
    http = HttpClient(max_retries=3, timeout_s=timeout_s, sleep=waits.append)
    braze = BrazeConnector("braze_prod", fake.destination_config(**overrides), SYNC, http)
    http.classify = braze.classify  # as the runner installs it
    http.add_secrets(braze.secret_values())
    return braze


def add(key: str, seq: int = 1, **fields) -> Change:
    return Change(seq, "add", key, {"email": key, **fields}, None)


@pytest.fixture
def fake():
    with FakeBraze() as braze:
        yield braze


def test_registry_resolves_the_type():
    assert get_connector("braze") is BrazeConnector


def test_add_update_remove_land_as_the_mode_expects(fake):
    braze = connector(fake)
    result = braze.send_batch(
        [
            add("ann@example.com", 1, first_name="Ann", ltv=10.5),
            add("bob@example.com", 2, first_name="Bob", ltv=3),
            add("cat@example.com", 3, first_name="Cat", ltv=0),
        ]
    )
    assert result.rejected == []
    assert fake.members() == {
        "ann@example.com": {"email": "ann@example.com", "first_name": "Ann", "ltv": 10.5},
        "bob@example.com": {"email": "bob@example.com", "first_name": "Bob", "ltv": 3},
        "cat@example.com": {"email": "cat@example.com", "first_name": "Cat", "ltv": 0},
    }
    result = braze.send_batch(
        [
            Change(
                4,
                "update",
                "bob@example.com",
                {"email": "bob@example.com", "first_name": "Robert", "ltv": 4},
                None,
            ),
            Change(
                5,
                "remove",
                "cat@example.com",
                {"email": "cat@example.com", "first_name": "Cat", "ltv": 0},
                None,
            ),
        ]
    )
    assert result.rejected == []
    members = fake.members()
    assert set(members) == {"ann@example.com", "bob@example.com"}
    assert members["bob@example.com"]["first_name"] == "Robert"
    # Leaving the audience removes the value only: the profile and its attributes stay.
    cat = fake.user("cat@example.com")
    assert cat is not None and cat[MEMBERSHIP_ATTRIBUTE] == [] and cat["first_name"] == "Cat"
    update, remove = fake.bodies[-1]["attributes"]
    assert update == {"email": "bob@example.com", "first_name": "Robert", "ltv": 4}
    assert remove == {
        "email": "cat@example.com",
        MEMBERSHIP_ATTRIBUTE: {"remove": [MEMBERSHIP_VALUE]},
        "_update_existing_only": True,
    }
    assert fake.violations == []


def test_add_is_safe_to_repeat_and_shares_the_array_with_other_syncs(fake):
    fake.seed_members({})
    braze = connector(fake)
    other = connector(fake, membership_value="another_sync")
    batch = [add("ann@example.com", first_name="Ann", ltv=1)]
    braze.send_batch(batch)
    braze.send_batch(batch)  # delivered again after a crash
    other.send_batch(batch)
    assert fake.user("ann@example.com")[MEMBERSHIP_ATTRIBUTE] == [MEMBERSHIP_VALUE, "another_sync"]
    braze.send_batch([Change(2, "remove", "ann@example.com", {}, None)])
    assert fake.user("ann@example.com")[MEMBERSHIP_ATTRIBUTE] == ["another_sync"]
    assert fake.violations == []


def test_removing_an_unknown_user_creates_no_profile(fake):
    result = connector(fake).send_batch([Change(1, "remove", "ghost@example.com", {}, None)])
    assert result.rejected == []
    assert fake.users == [] and fake.violations == []


def test_membership_value_defaults_to_the_sync_name(fake):
    settings = fake.destination_config()
    del settings["membership_value"], settings["membership_attribute"]
    braze = BrazeConnector("b", settings, SYNC, HttpClient(max_retries=0))
    braze.send_batch([add("ann@example.com")])
    assert fake.bodies[0]["attributes"][0]["audsync_audiences"] == {"add": ["vip_users"]}


def test_boolean_membership():
    with FakeBraze(membership="boolean", membership_attribute="in_vip") as fake:
        braze = connector(fake)
        braze.send_batch([add("ann@example.com", first_name="Ann"), add("bob@example.com", 2)])
        braze.send_batch([Change(3, "remove", "bob@example.com", {}, None)])
        assert set(fake.members()) == {"ann@example.com"}
        assert fake.user("bob@example.com")["in_vip"] is False
        assert fake.bodies[0]["attributes"][0]["in_vip"] is True
        assert fake.violations == []


def test_identify_by_external_id_sends_the_key_as_is():
    with FakeBraze(identify_by="external_id") as fake:
        braze = connector(fake, identify_by="external_id")
        change = Change(
            1, "add", "User-42", {"email": " Ann@Example.com ", "first_name": "Ann"}, None
        )
        assert connector(fake, identify_by="external_id").send_batch([change]).rejected == []
        obj = fake.bodies[0]["attributes"][0]
        # Case kept for the id; the email attribute normalised.
        assert obj["external_id"] == "User-42" and obj["email"] == "ann@example.com"
        assert set(fake.members()) == {"User-42"}
        assert braze.send_batch([Change(2, "add", "  ", {}, None)]).rejected[0].error_code == (
            "invalid_external_id"
        )
        assert fake.violations == []


def test_invalid_emails_are_rejected_not_sent(fake):
    result = connector(fake).send_batch(
        [add("no-at-sign", 1), add(" Mixed@Example.COM ", 2), add("two@@example.com", 3)]
    )
    assert sorted((r.key, r.error_code) for r in result.rejected) == [
        ("no-at-sign", "invalid_email"),
        ("two@@example.com", "invalid_email"),
    ]
    assert [o["email"] for o in fake.bodies[0]["attributes"]] == ["mixed@example.com"]
    # A batch with nothing valid sends nothing.
    before = len(fake.requests)
    assert len(connector(fake).send_batch([add("bad", 9)]).rejected) == 1
    assert len(fake.requests) == before


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("  Ann@Example.COM\t", "ann@example.com"),
        ("a.b+tag@sub.example.co.uk", "a.b+tag@sub.example.co.uk"),
        ("Ünï@Exämple.com", "ünï@exämple.com"),
        ("ann example@example.com", None),
        ("@example.com", None),
        ("   ", None),
    ],
)
def test_email_normalisation_edge_cases(fake, raw, sent):
    result = connector(fake).send_batch([add(raw)])
    if sent is None:
        assert [r.error_code for r in result.rejected] == ["invalid_email"]
        assert raw.strip() not in result.rejected[0].error_message or not raw.strip()
        assert fake.bodies == []
    else:
        assert result.rejected == [] and fake.bodies[0]["attributes"][0]["email"] == sent


def test_per_object_errors_map_to_their_rows(fake):
    fake.reject_keys(["bob@example.com", "dan@example.com"])
    result = connector(fake).send_batch(
        [
            add("ann@example.com", 1),
            add("bob@example.com", 2),
            add("cat@example.com", 3),
            add("dan@example.com", 4),
        ]
    )
    assert sorted((r.key, r.op, r.error_code, r.retryable) for r in result.rejected) == [
        ("bob@example.com", "add", "rejected", False),
        ("dan@example.com", "add", "rejected", False),
    ]
    assert all("Invalid 'email'" in r.error_message for r in result.rejected)
    assert set(fake.members()) == {"ann@example.com", "cat@example.com"}


def test_engine_splits_batches_at_75(fake):
    settings = fake.destination_config(batch_size=500, max_concurrency=3)
    delivery = DeliverySettings.from_settings(BrazeConnector, settings)
    assert delivery.batch_size == 75
    braze = connector(fake)
    changes = [add(f"user{i}@example.com", i, ltv=i) for i in range(1, 201)]
    batches = [
        (n, changes[i : i + delivery.batch_size])
        for n, i in enumerate(range(0, len(changes), delivery.batch_size), 1)
    ]
    results = []
    stats = deliver(
        braze,
        batches,
        max_concurrency=delivery.max_concurrency,
        on_result=lambda no, batch, result: results.append(result),
    )
    assert stats.rows_sent == 200 and stats.rows_rejected == 0
    assert sorted(fake.batch_sizes) == [50, 75, 75]
    assert len(fake.members()) == 200
    assert fake.violations == []


def test_the_fake_refuses_more_than_75_objects(fake):
    with pytest.raises(RequestRejected) as rejected:
        connector(fake).send_batch([add(f"u{i}@example.com", i) for i in range(76)])
    assert rejected.value.code == "400" and "maximum is 75" in rejected.value.message
    assert fake.violations and fake.users == []


def test_rate_limit_is_retried_after_the_asked_delay(fake):
    sleeps: list[float] = []
    fake.fail_next("rate_limit", 2)
    result = connector(fake, sleeps).send_batch([add("ann@example.com")])
    assert result.rejected == []
    assert sleeps == [1.0, 1.0]  # X-Ratelimit-Retry-After: 1
    assert set(fake.members()) == {"ann@example.com"}


def test_retry_after_headers_in_order_of_preference():
    reset = str(int(time.time()) + 20)
    assert retry_after({"X-Ratelimit-Retry-After": "3", "Retry-After": "9"}) == 3
    assert retry_after({"Retry-After": "9", "X-RateLimit-Reset": reset}) == 9
    assert 18 <= retry_after({"X-RateLimit-Reset": reset}) <= 20
    assert retry_after({}) is None


def test_server_errors_are_retried(fake):
    sleeps: list[float] = []
    fake.fail_next("server_error", 2)
    assert connector(fake, sleeps).send_batch([add("ann@example.com")]).rejected == []
    assert len(sleeps) == 2 and set(fake.members()) == {"ann@example.com"}


def test_timeout_is_retried_and_the_repeat_is_harmless(fake):
    fake.fail_next("timeout", delay_s=0.8)
    braze = connector(fake, timeout_s=0.3)
    assert braze.send_batch([add("ann@example.com")]).rejected == []
    time.sleep(0.6)  # let the slow first attempt land too
    assert fake.user("ann@example.com")[MEMBERSHIP_ATTRIBUTE] == [MEMBERSHIP_VALUE]
    assert len(fake.bodies) == 2


def test_expired_key_is_fatal_and_the_message_hides_it(fake):
    fake.fail_next("expired_token")
    with pytest.raises(FatalDestinationError) as fatal:
        connector(fake).send_batch([add("ann@example.com")])
    message = str(fatal.value)
    assert "401" in message and "Invalid API key" in message
    assert fake.api_key not in message and "***" in message  # Braze echoes the key
    assert fake.users == []


def test_database_values_are_encoded(fake):
    import datetime as dt

    braze = connector(fake)
    result = braze.send_batch(
        [
            add("ann@example.com", 1, ltv=Decimal("12.50"), since=dt.date(2024, 1, 2)),
            add("bob@example.com", 2, blob=b"\x00"),
        ]
    )
    assert [(r.key, r.error_code) for r in result.rejected] == [
        ("bob@example.com", "invalid_value")
    ]
    assert fake.user("ann@example.com")["ltv"] == 12.5
    assert fake.user("ann@example.com")["since"] == "2024-01-02"


def test_configuration_errors_are_fatal_and_clear(fake):
    settings = fake.destination_config()
    del settings["base_url"]
    with pytest.raises(FatalDestinationError, match="rest_endpoint"):
        BrazeConnector("b", settings, SYNC, HttpClient())
    braze = BrazeConnector("b", {**settings, "rest_endpoint": "iad-01"}, SYNC, HttpClient())
    assert braze._track_url == "https://rest.iad-01.braze.com/users/track"
    with pytest.raises(FatalDestinationError, match="identify_by"):
        BrazeConnector(
            "b", {**settings, "base_url": fake.base_url, "identify_by": "phone"}, SYNC, HttpClient()
        )
    with pytest.raises(FatalDestinationError, match="membership_attribute"):
        BrazeConnector(
            "b",
            {**settings, "base_url": fake.base_url, "membership_attribute": "external_id"},
            SYNC,
            HttpClient(),
        )


def test_generic_surface(fake):
    fake.seed_members({"old@example.com": {"first_name": "Old"}})
    assert fake.members(["OLD@example.com", "nobody@example.com"]) == {
        "OLD@example.com": {"email": "old@example.com", "first_name": "Old"}
    }
    braze = connector(fake)
    braze.send_batch([Change(1, "remove", "old@example.com", {}, None)])
    assert fake.members() == {}
    assert {m["destination_field"] for m in fake.field_mapping()} == {"email", "first_name", "ltv"}
    assert fake.sync_config() == {}


def test_generic_surface_holds_a_mirrored_audience(fake):
    """Drive the connector as the runner would, through the fake's generic surface only."""
    mirror_through_the_common_surface(fake)
