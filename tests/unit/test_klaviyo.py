"""The Klaviyo list connector against the fake Klaviyo API, over real loopback HTTP."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from audsync.delivery.engine import DeliverySettings, deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import Change, FatalDestinationError, SyncInfo
from audsync.destinations.klaviyo import (
    DEFAULT_REVISION,
    KlaviyoListConnector,
    email_filter,
    profile_attributes,
)
from audsync.destinations.registry import get_connector
from tests.fakes.klaviyo import FakeKlaviyo
from tests.unit._connector_helpers import mirror_through_the_common_surface

SYNC = SyncInfo("winback", "mirror", "run1", "email", ("email", "first_name", "ltv"))


def connector(fake, sleeps=None, timeout_s=5.0, state=None, opened=True, **overrides):
    """An opened connector on ``fake`` whose client records its waits instead of sleeping."""
    waits = sleeps if sleeps is not None else []
    http = HttpClient(max_retries=3, timeout_s=timeout_s, sleep=waits.append)
    sync = SyncInfo(
        SYNC.name, SYNC.mode, SYNC.run_id, SYNC.identifier, SYNC.fields, state=state or {}
    )
    klaviyo = KlaviyoListConnector("kl", fake.destination_config(**overrides), sync, http)
    http.classify = klaviyo.classify  # as the runner installs it
    http.add_secrets(klaviyo.secret_values())
    if opened:
        klaviyo.open()
    return klaviyo


def change(op, email, seq=1, destination_id=None, **fields):
    return Change(seq, op, email, {"email": email, **fields}, destination_id)


@pytest.fixture
def fake():
    with FakeKlaviyo() as klaviyo:
        yield klaviyo


def test_registry_resolves_the_type():
    assert get_connector("klaviyo_list") is KlaviyoListConnector


def test_add_creates_profiles_joins_the_list_and_returns_ids(fake):
    result = connector(fake).send_batch(
        [
            change("add", "ann@example.com", 1, first_name="Ann", ltv=10.5),
            change("add", "Bob@Example.com ", 2, first_name="Bob", ltv=3),
        ]
    )
    assert result.rejected == []
    assert fake.members() == {
        "ann@example.com": {"email": "ann@example.com", "first_name": "Ann", "ltv": 10.5},
        "bob@example.com": {"email": "bob@example.com", "first_name": "Bob", "ltv": 3},
    }
    assert result.destination_ids == {
        "ann@example.com": fake.profile_id("ann@example.com"),
        "Bob@Example.com ": fake.profile_id("bob@example.com"),
    }
    assert fake.relationship_sizes == [2]
    assert fake.revisions == {DEFAULT_REVISION}
    assert fake.violations == []


def test_an_existing_profile_is_reused_from_the_409_and_updated(fake):
    fake.seed_members({})
    with fake._lock:
        existing = fake._create({"email": "ann@example.com", "first_name": "Old"})
    result = connector(fake).send_batch([change("add", "ann@example.com", first_name="Ann", ltv=2)])
    assert result.rejected == [] and result.destination_ids == {"ann@example.com": existing}
    assert fake.members()["ann@example.com"] == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "ltv": 2,
    }
    assert fake.count("PATCH", f"/api/profiles/{existing}") == 1
    assert len(fake.profiles) == 1 and fake.violations == []


def test_add_is_safe_to_repeat(fake):
    klaviyo = connector(fake)
    batch = [change("add", "ann@example.com", first_name="Ann")]
    first = klaviyo.send_batch(batch)
    second = klaviyo.send_batch(batch)  # delivered again after a crash
    assert first.destination_ids == second.destination_ids
    assert len(fake.profiles) == 1 and set(fake.members()) == {"ann@example.com"}


def test_update_patches_by_id_and_re_adds(fake):
    klaviyo = connector(fake)
    ids = klaviyo.send_batch(
        [change("add", "ann@example.com", first_name="Ann", ltv=1)]
    ).destination_ids
    creates = fake.count("POST", "/api/profiles")
    result = klaviyo.send_batch(
        [change("update", "ann@example.com", 2, ids["ann@example.com"], first_name="Anna", ltv=5)]
    )
    assert result.rejected == [] and result.destination_ids == ids
    assert fake.count("POST", "/api/profiles") == creates  # no create: the id was known
    assert fake.members()["ann@example.com"] == {
        "email": "ann@example.com",
        "first_name": "Anna",
        "ltv": 5,
    }


def test_update_with_a_stale_id_creates_the_profile_again(fake):
    klaviyo = connector(fake)
    old = klaviyo.send_batch([change("add", "ann@example.com", first_name="Ann")]).destination_ids
    fake.delete_profile("ann@example.com")
    result = klaviyo.send_batch(
        [change("update", "ann@example.com", 2, old["ann@example.com"], first_name="Anna")]
    )
    new_id = fake.profile_id("ann@example.com")
    assert result.rejected == [] and new_id != old["ann@example.com"]
    assert result.destination_ids == {"ann@example.com": new_id}
    assert fake.members()["ann@example.com"]["first_name"] == "Anna"


def test_removal_uses_the_stored_id_without_a_lookup(fake):
    klaviyo = connector(fake)
    ids = klaviyo.send_batch(
        [change("add", "ann@example.com", 1), change("add", "bob@example.com", 2)]
    ).destination_ids
    result = klaviyo.send_batch([change("remove", "ann@example.com", 3, ids["ann@example.com"])])
    assert result.rejected == [] and result.destination_ids == {}
    assert set(fake.members()) == {"bob@example.com"}
    assert fake.count("GET", "/api/profiles") == 0
    assert fake.profile_id("ann@example.com") is not None  # the profile itself stays


def test_removal_without_an_id_looks_the_profile_up(fake):
    fake.seed_members({"ann@example.com": {"first_name": "Ann"}, "bob@example.com": {}})
    result = connector(fake).send_batch(
        [change("remove", "Ann@Example.com", 1), change("remove", "nobody@example.com", 2)]
    )
    assert result.rejected == []
    assert set(fake.members()) == {"bob@example.com"}
    assert fake.count("GET", "/api/profiles") == 2
    assert fake.relationship_sizes == [1]  # the unknown address needed no removal
    assert fake.violations == []


def test_a_lookup_with_quotes_in_the_address_is_quoted(fake):
    odd = 'o"neil\\x@example.com'
    fake.seed_members({odd: {}})
    assert connector(fake).send_batch([change("remove", odd)]).rejected == []
    assert fake.members() == {} and fake.violations == []


@pytest.mark.parametrize(
    "email",
    ["ann@example.com", 'o"neil@example.com', "back\\slash@example.com", "ünï@exämple.com"],
)
def test_email_filter_matches_the_sdk_filter_builder(email):
    from klaviyo_api.filter_builder import FilterBuilder

    builder = FilterBuilder()
    builder.equals("email", email)
    theirs = builder.build()
    if email.isascii():
        assert email_filter(email) == theirs
    # The SDK writes non-ASCII as \\u escapes, we write it as is: the same JSON string.
    prefix = "equals(email,"
    assert email_filter(email).startswith(prefix) and theirs.startswith(prefix)
    assert (
        json.loads(email_filter(email)[len(prefix) : -1])
        == json.loads(theirs[len(prefix) : -1])
        == email
    )


def test_per_row_rejections_map_to_their_keys(fake):
    fake.reject_keys(["bob@example.com"])
    result = connector(fake).send_batch(
        [
            change("add", "ann@example.com", 1),
            change("add", "bob@example.com", 2),
            change("add", "cat@example.com", 3),
        ]
    )
    assert [(r.key, r.op, r.error_code, r.retryable) for r in result.rejected] == [
        ("bob@example.com", "add", "invalid", False)
    ]
    assert "Invalid email address" in result.rejected[0].error_message
    assert set(result.destination_ids) == {"ann@example.com", "cat@example.com"}
    assert set(fake.members()) == {"ann@example.com", "cat@example.com"}


def test_invalid_emails_are_rejected_not_sent(fake):
    result = connector(fake).send_batch(
        [change("add", "not-an-email"), change("remove", "x@@y", 2)]
    )
    assert sorted((r.key, r.error_code) for r in result.rejected) == [
        ("not-an-email", "invalid_email"),
        ("x@@y", "invalid_email"),
    ]
    assert fake.count("POST", "/api/profiles") == 0 and fake.count("GET", "/api/profiles") == 0


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        (" Ann@Example.COM ", "ann@example.com"),
        ("Ünï@Exämple.com", "ünï@exämple.com"),
        ("ann@@example.com", None),
        ("ann", None),
    ],
)
def test_email_normalisation_edge_cases(fake, raw, sent):
    result = connector(fake).send_batch([change("add", raw)])
    if sent is None:
        assert [r.error_code for r in result.rejected] == ["invalid_email"]
        assert fake.count("POST", "/api/profiles") == 0
    else:
        assert result.rejected == [] and set(fake.members()) == {sent}
        assert result.destination_ids == {raw: fake.profile_id(sent)}


def test_fields_map_to_attributes_location_and_properties():
    attributes = profile_attributes(
        "ann@example.com",
        {
            "email": "IGNORED",
            "first_name": "Ann",
            "phone_number": "+15005550006",
            "location.city": "Lyon",
            "properties.tier": "gold",
            "ltv": Decimal("1.5"),
        },
    )
    assert attributes == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "phone_number": "+15005550006",
        "location": {"city": "Lyon"},
        "properties": {"tier": "gold", "ltv": Decimal("1.5")},
    }


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_bodies_parse_with_the_official_sdk_models(fake):
    """Every body the connector sent survives a round trip through Klaviyo's own models."""
    from openapi_client.models import (
        ListCreateQuery,
        ListMembersAddQuery,
        ListMembersDeleteQuery,
        ProfileCreateQuery,
        ProfilePartialUpdateQuery,
    )

    klaviyo = connector(fake, list_id=None, create_if_missing=True)
    ids = klaviyo.send_batch(
        [change("add", "ann@example.com", 1, first_name="Ann", ltv=1, **{"location.city": "Lyon"})]
    ).destination_ids
    klaviyo.send_batch([change("update", "ann@example.com", 2, ids["ann@example.com"], ltv=2)])
    klaviyo.send_batch([change("remove", "ann@example.com", 3, ids["ann@example.com"])])

    def model_of(method: str, path: str):  # the fake records paths without a trailing slash
        if path.endswith("/relationships/profiles"):
            return ListMembersAddQuery if method == "POST" else ListMembersDeleteQuery
        if path == "/api/lists" and method == "POST":
            return ListCreateQuery
        if path == "/api/profiles" and method == "POST":
            return ProfileCreateQuery
        assert method == "PATCH" and path.startswith("/api/profiles/"), (method, path)
        return ProfilePartialUpdateQuery

    checked = set()
    for method, path, body in fake.bodies:
        model = model_of(method, path)
        parsed = model.from_dict(body)
        # The models fill nullable attributes with None and enums with Enum members.
        assert _without_nulls(json.loads(parsed.to_json())) == body, (method, path)
        checked.add(model.__name__)
    assert len(checked) == 5 and fake.violations == []


def test_the_official_sdk_is_accepted_by_the_fake(fake):
    """The fake checks what Klaviyo's own client sends, so it is no stricter than the API."""
    from klaviyo_api import KlaviyoAPI

    sdk = KlaviyoAPI(fake.api_key, max_retries=0, test_host=fake.base_url)
    created = sdk.Profiles.create_profile(
        {
            "data": {
                "type": "profile",
                "attributes": {"email": "sdk@example.com", "first_name": "Sdk"},
            }
        }
    )
    profile_id = created.data.id
    found = sdk.Profiles.get_profiles(filter=email_filter("sdk@example.com"))
    assert [p.id for p in found.data] == [profile_id]
    sdk.Lists.add_profiles_to_list(fake.list_id, {"data": [{"type": "profile", "id": profile_id}]})
    assert fake.violations == []
    assert set(fake.members()) == {"sdk@example.com"}


def test_create_if_missing_creates_once_and_reuses(fake):
    first = connector(fake, opened=False, list_id=None, create_if_missing=True)
    state = first.open()
    list_id = state["list_id"]
    assert fake.lists[list_id]["name"] == "winback" and fake.lists_created == 1
    first.send_batch([change("add", "ann@example.com")])
    assert set(fake.members(list_id=list_id)) == {"ann@example.com"}
    # The next run gets the state back and reuses the list.
    again = connector(fake, opened=False, state=state, list_id=None, create_if_missing=True)
    assert again.open() is None  # nothing new to remember
    # State lost (the run died before saving it): found by name, not made twice.
    lost = connector(fake, opened=False, list_id=None, create_if_missing=True)
    assert lost.open() == {"list_id": list_id}
    assert fake.lists_created == 1
    # Deleted in Klaviyo: made again.
    with fake._lock:
        del fake.lists[list_id]
    gone = connector(fake, opened=False, state=state, list_id=None, create_if_missing=True)
    assert gone.open()["list_id"] != list_id and fake.lists_created == 2
    # A configured list_id wins and is only checked.
    assert connector(fake, opened=False).open() is None
    assert fake.violations == []


def test_a_missing_list_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="no Klaviyo list"):
        connector(fake, list_id="nope")
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        connector(fake, list_id=None)
    klaviyo = connector(fake)
    with fake._lock:
        fake.lists.clear()
    with pytest.raises(FatalDestinationError, match="not found"):
        klaviyo.send_batch([change("add", "ann@example.com")])


def test_engine_splits_batches_at_1000(fake):
    settings = fake.destination_config(batch_size=5000)
    delivery = DeliverySettings.from_settings(KlaviyoListConnector, settings)
    assert (delivery.batch_size, delivery.rate_limit) == (1000, 10.0)
    klaviyo = connector(fake)
    changes = [change("add", f"user{i}@example.com", i, ltv=i) for i in range(1, 1201)]
    batches = [(n, changes[i : i + 1000]) for n, i in enumerate(range(0, 1200, 1000), 1)]
    ids = {}
    stats = deliver(
        klaviyo,
        batches,
        max_concurrency=2,
        on_result=lambda no, batch, result: ids.update(result.destination_ids),
    )
    assert stats.rows_rejected == 0 and len(ids) == 1200
    assert sorted(fake.relationship_sizes) == [200, 1000]
    assert len(fake.members()) == 1200 and fake.violations == []


def test_the_fake_refuses_more_than_1000_ids(fake):
    klaviyo = connector(fake)
    rows = [(change("add", f"u{i}@example.com", i), f"ID{i}") for i in range(1001)]
    rejected = klaviyo._relationships("POST", rows)
    assert len(rejected) == 1001 and {r.error_code for r in rejected} == {"invalid"}
    assert "maximum is 1000" in rejected[0].error_message
    assert fake.violations


def test_a_refused_id_fails_only_its_row(fake):
    klaviyo = connector(fake)
    ann = klaviyo.send_batch([change("add", "ann@example.com")]).destination_ids["ann@example.com"]
    with fake._lock:
        fake.lists[fake.list_id]["members"].clear()
    rows = [
        (change("update", "gone@example.com", 1), "01GONE"),
        (change("update", "ann@example.com", 2), ann),
    ]
    # Klaviyo refuses the request, pointing at /data/0/id; the rest is sent again.
    rejected = klaviyo._relationships("POST", rows)
    assert [(r.key, r.error_code) for r in rejected] == [("gone@example.com", "invalid")]
    assert "does not exist" in rejected[0].error_message
    assert set(fake.members()) == {"ann@example.com"}
    assert fake.count("POST", f"/api/lists/{fake.list_id}/relationships") == 3


def test_rate_limit_is_retried_after_retry_after(fake):
    sleeps: list[float] = []
    klaviyo = connector(fake, sleeps)
    fake.fail_next("rate_limit", 2)
    assert klaviyo.send_batch([change("add", "ann@example.com")]).rejected == []
    assert sleeps == [1.0, 1.0]
    assert set(fake.members()) == {"ann@example.com"}


def test_server_errors_are_retried(fake):
    sleeps: list[float] = []
    klaviyo = connector(fake, sleeps)
    fake.fail_next("server_error", 2)
    assert klaviyo.send_batch([change("add", "ann@example.com")]).rejected == []
    assert len(sleeps) == 2 and set(fake.members()) == {"ann@example.com"}


def test_timeout_is_retried_and_the_repeat_is_harmless(fake):
    klaviyo = connector(fake, timeout_s=0.3)
    fake.fail_next("timeout", delay_s=0.8)  # the profile create's answer is lost
    result = klaviyo.send_batch([change("add", "ann@example.com", first_name="Ann")])
    time.sleep(0.6)
    assert result.rejected == [] and len(fake.profiles) == 1
    assert result.destination_ids == {"ann@example.com": fake.profile_id("ann@example.com")}
    assert set(fake.members()) == {"ann@example.com"}


def test_expired_key_is_fatal_and_the_message_hides_it(fake):
    klaviyo = connector(fake)
    fake.fail_next("expired_token")
    with pytest.raises(FatalDestinationError) as fatal:
        klaviyo.send_batch([change("add", "ann@example.com")])
    assert "401" in str(fatal.value) and "authentication" in str(fatal.value).lower()
    assert fake.api_key not in str(fatal.value)
    with pytest.raises(FatalDestinationError, match="401"):
        connector(fake, api_key="pk_wrong")


def test_revision_is_a_setting(fake):
    klaviyo = connector(fake, revision="2025-01-15")
    klaviyo.send_batch([change("add", "ann@example.com")])
    assert fake.revisions == {"2025-01-15"}
    with pytest.raises(FatalDestinationError, match="revision"):
        connector(fake, opened=False, revision="latest")


def test_database_values_are_encoded(fake):
    import datetime as dt

    result = connector(fake).send_batch(
        [
            change("add", "ann@example.com", 1, ltv=Decimal("12.50"), since=dt.date(2024, 1, 2)),
            change("add", "bob@example.com", 2, blob=b"\x00"),
        ]
    )
    assert [(r.key, r.error_code) for r in result.rejected] == [
        ("bob@example.com", "invalid_value")
    ]
    assert fake.members()["ann@example.com"]["ltv"] == 12.5
    assert fake.members()["ann@example.com"]["since"] == "2024-01-02"


def test_null_fields_clear_values_and_a_new_profile_is_created_without_them(fake):
    klaviyo = connector(fake)
    ids = klaviyo.send_batch(
        [change("add", "ann@example.com", first_name=None, ltv=None)]
    ).destination_ids
    created = [b for m, p, b in fake.bodies if (m, p) == ("POST", "/api/profiles")]
    assert created[0]["data"]["attributes"] == {"email": "ann@example.com"}
    pid = ids["ann@example.com"]
    klaviyo.send_batch([change("update", "ann@example.com", 2, pid, first_name="Ann", ltv=3)])
    assert fake.members()["ann@example.com"] == {
        "email": "ann@example.com",
        "first_name": "Ann",
        "ltv": 3,
    }
    klaviyo.send_batch([change("update", "ann@example.com", 3, pid, first_name=None, ltv=None)])
    assert fake.members()["ann@example.com"] == {"email": "ann@example.com"}
    assert fake.violations == []


def test_generic_surface_holds_a_mirrored_audience(fake):
    """Drive the connector as the runner would, through the fake's generic surface only."""
    mirror_through_the_common_surface(fake)
