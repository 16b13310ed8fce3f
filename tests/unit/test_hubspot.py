"""The hubspot_list connector against a fake HubSpot API over real HTTP on loopback.

The official ``hubspot-api-client`` SDK (a test dependency only) is the oracle for shapes:
the bodies the connector sends must round-trip through the SDK's request models unchanged,
and the SDK itself, pointed at the fake, must be able to talk to it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from decimal import Decimal
from typing import Any

import pytest

from audsync.delivery.engine import DeliverySettings
from audsync.destinations import registry
from audsync.destinations.base import Change, FatalDestinationError, SyncInfo
from audsync.destinations.hubspot import (
    HubSpotListConnector,
    HubspotListConnector,
    property_value,
)
from tests.fakes.hubspot import FakeHubSpot
from tests.unit._connector_helpers import run

FIELDS = ("email", "firstname", "lifetime_value")


@pytest.fixture
def fake():
    with FakeHubSpot(timeout_s=0.6) as server:
        yield server


def connect(
    fake: FakeHubSpot,
    *,
    state: dict[str, Any] | None = None,
    sync_name: str = "vip_to_hubspot",
    timeout_s: float = 5.0,
    max_retries: int = 4,
    **overrides: Any,
) -> HubspotListConnector:
    """An opened connector on ``fake``, wired as the runner wires it."""
    settings = fake.destination_config(
        rate_limit=1000, timeout_s=timeout_s, max_retries=max_retries, **overrides
    )
    delivery = DeliverySettings.from_settings(HubspotListConnector, settings, destination="crm")
    http = delivery.http_client(secrets=[fake.token], backoff_base_s=0.01, backoff_max_s=0.05)
    info = SyncInfo(
        name=sync_name, mode="mirror", run_id="run-1", identifier="email", fields=FIELDS,
        settings=fake.sync_config(), state=state or {},
    )  # fmt: skip
    connector = HubspotListConnector("crm", settings, info, http)
    http.classify = getattr(connector, "classify", None) or http.classify
    connector.opened = connector.open()
    return connector


def add(seq: int, email: str, name: str = "Ann", ltv: Any = 10, op: str = "add", dest_id=None):
    return Change(
        seq, op, email, {"email": email, "firstname": name, "lifetime_value": ltv}, dest_id
    )


def remove(seq: int, email: str, dest_id: str | None = None) -> Change:
    return Change(seq, "remove", email, {}, dest_id)


# -- every op lands -------------------------------------------------------------------------


def test_registry_serves_this_class_and_limits():
    assert registry.get_connector("hubspot_list") is HubspotListConnector
    assert HubSpotListConnector is HubspotListConnector
    assert HubspotListConnector.max_batch_size == 100
    assert HubspotListConnector.returns_destination_ids
    settings = DeliverySettings.from_settings(HubspotListConnector, {"batch_size": 5000})
    assert settings.batch_size == 100
    assert settings.rate_limit == 10.0


def test_add_upserts_contacts_and_adds_their_ids_to_the_list(fake):
    connector = connect(fake)
    result = run(
        connector, [add(1, "ann@example.com", "Ann", 120.5), add(2, "bob@example.com", "Bob", 7)]
    )
    assert result.rejected == []
    assert result.destination_ids == {
        "ann@example.com": fake.record_id("ann@example.com"),
        "bob@example.com": fake.record_id("bob@example.com"),
    }
    assert fake.members() == {
        "ann@example.com": {
            "email": "ann@example.com",
            "firstname": "Ann",
            "lifetime_value": "120.5",
        },
        "bob@example.com": {"email": "bob@example.com", "firstname": "Bob", "lifetime_value": "7"},
    }
    assert fake.violations == []


def test_update_changes_properties_and_re_adds_idempotently(fake):
    connector = connect(fake)
    first = run(connector, [add(1, "ann@example.com", "Ann", 1)])
    second = run(
        connector,
        [
            add(
                2,
                "ann@example.com",
                "Annie",
                None,
                op="update",
                dest_id=first.destination_ids["ann@example.com"],
            )
        ],
    )
    assert second.rejected == []
    assert second.destination_ids == first.destination_ids
    # None clears the property (HubSpot's empty string), the new name is set.
    assert fake.members() == {
        "ann@example.com": {"email": "ann@example.com", "firstname": "Annie", "lifetime_value": ""}
    }
    assert len(fake.contacts) == 1
    assert fake.violations == []


def test_remove_uses_stored_ids_without_a_lookup(fake):
    connector = connect(fake)
    ids = run(connector, [add(1, "ann@example.com"), add(2, "bob@example.com")]).destination_ids
    calls_before = len(fake.calls)
    result = run(connector, [remove(3, "ann@example.com", ids["ann@example.com"])])
    assert result.rejected == []
    assert list(fake.members()) == ["bob@example.com"]
    new_calls = fake.calls[calls_before:]
    assert [c[1].rsplit("/", 1)[-1] for c in new_calls] == ["add-and-remove"]
    assert new_calls[0][2] == {"recordIdsToAdd": [], "recordIdsToRemove": [ids["ann@example.com"]]}
    # The contact is kept: leaving an audience never deletes a CRM record.
    assert fake.record_id("ann@example.com") == ids["ann@example.com"]


def test_remove_without_an_id_looks_the_contact_up_by_email(fake):
    seeded = fake.seed_members({"old@example.com": {"firstname": "Old"}, "stay@example.com": {}})
    connector = connect(fake)
    result = run(connector, [remove(1, " OLD@example.com "), remove(2, "never@example.com")])
    assert result.rejected == []  # a contact that does not exist is in no list: removed
    assert list(fake.members()) == ["stay@example.com"]
    reads = fake.calls_to("/batch/read")
    assert len(reads) == 1
    assert reads[0][2]["idProperty"] == "email"
    assert sorted(i["id"] for i in reads[0][2]["inputs"]) == [
        "never@example.com",
        "old@example.com",
    ]
    membership = fake.calls_to("add-and-remove")[-1][2]
    assert membership["recordIdsToRemove"] == [seeded["old@example.com"]]
    assert fake.violations == []


def test_a_mixed_batch_adds_updates_and_removes_in_one_membership_call(fake):
    seeded = fake.seed_members({"gone@example.com": {}, "kept@example.com": {}})
    connector = connect(fake)
    result = run(connector, [
        add(1, "new@example.com"),
        add(2, "kept@example.com", "Kept", 3, op="update", dest_id=seeded["kept@example.com"]),
        remove(3, "gone@example.com", seeded["gone@example.com"]),
    ])  # fmt: skip
    assert result.rejected == []
    assert set(fake.members()) == {"new@example.com", "kept@example.com"}
    assert len(fake.calls_to("add-and-remove")) == 1
    assert fake.members()["kept@example.com"]["firstname"] == "Kept"


# -- batching -------------------------------------------------------------------------------


def test_batches_over_the_limit_are_split_by_the_engine(fake):
    connector = connect(fake, batch_size=1000)
    delivery = DeliverySettings.from_settings(HubspotListConnector, connector.settings)
    assert delivery.batch_size == 100
    changes = [add(i, f"user{i}@example.com") for i in range(1, 251)]
    result = run(connector, changes, batch_size=delivery.batch_size, concurrency=4)
    assert result.rejected == []
    assert len(result.destination_ids) == 250
    assert len(fake.members()) == 250
    sizes = sorted(len(c[2]["inputs"]) for c in fake.calls_to("/batch/upsert"))
    assert sizes == [50, 100, 100]
    assert fake.violations == []


def test_the_fake_refuses_an_upsert_over_100_inputs(fake):
    import requests

    body = {
        "inputs": [
            {"idProperty": "email", "id": f"u{i}@x.com", "properties": {}} for i in range(101)
        ]
    }
    answer = requests.post(
        fake.base_url + "/crm/v3/objects/contacts/batch/upsert",
        json=body,
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"
    assert fake.violations and "limit is 100" in fake.violations[0]


def test_concurrent_batches_are_safe(fake):
    connector = connect(fake)
    changes = [add(i, f"c{i}@example.com", f"N{i}", i) for i in range(1, 401)]
    result = run(connector, changes, batch_size=50, concurrency=4)
    assert result.rejected == []
    members = fake.members()
    assert len(members) == 400
    assert members["c77@example.com"]["lifetime_value"] == "77"
    assert len(set(result.destination_ids.values())) == 400
    assert fake.violations == []


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rate_limit", "secondly_limit"])
def test_rate_limits_signalled_in_the_429_body_are_retried(fake, kind):
    connector = connect(fake)
    fake.fail_next(kind, 2, path="/batch/upsert")
    fake.fail_next(kind, 1, path="add-and-remove")
    result = run(connector, [add(1, "ann@example.com")])
    assert result.rejected == []
    assert list(fake.members()) == ["ann@example.com"]
    assert len(fake.calls_to("/batch/upsert")) == 3
    assert len(fake.calls_to("add-and-remove")) == 2
    assert connector.http.retries == 3


def test_the_daily_limit_stops_the_run(fake):
    connector = connect(fake)
    fake.fail_next("daily_limit", path="/batch/upsert")
    with pytest.raises(FatalDestinationError, match="DAILY"):
        run(connector, [add(1, "ann@example.com")])
    assert len(fake.calls_to("/batch/upsert")) == 1  # not retried


def test_server_errors_are_retried(fake):
    connector = connect(fake)
    fake.fail_next("server_error", 2)
    result = run(connector, [add(1, "ann@example.com")])
    assert result.rejected == []
    assert list(fake.members()) == ["ann@example.com"]
    assert connector.http.retries == 2


def test_retries_run_out_into_retryable_row_errors(fake):
    connector = connect(fake, max_retries=1)
    fake.fail_next("server_error", 5)
    result = run(connector, [add(1, "ann@example.com")])
    assert [(e.key, e.retryable) for e in result.rejected] == [("ann@example.com", True)]


def test_a_timeout_is_retried_and_the_repeat_is_harmless(fake):
    connector = connect(fake, timeout_s=0.3)
    fake.fail_next("timeout", path="add-and-remove")  # held past the client's timeout, applied
    result = run(connector, [add(1, "ann@example.com")])
    assert result.rejected == []
    assert list(fake.members()) == ["ann@example.com"]
    assert len(fake.calls_to("add-and-remove")) == 2
    time.sleep(0.4)  # let the held request finish before the fake stops


def test_an_expired_token_is_fatal_and_the_message_has_no_secret(fake, caplog):
    connector = connect(fake)
    fake.fail_next("expired_token")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FatalDestinationError) as caught:
        run(connector, [add(1, "ann@example.com")])
    message = str(caught.value)
    assert "EXPIRED_AUTHENTICATION" in message and "access token" in message
    assert fake.token not in message
    assert fake.token not in caplog.text


def test_a_wrong_token_is_fatal_when_opening(fake):
    settings = fake.destination_config(access_token="pat-na1-wrong")
    http = DeliverySettings.from_settings(HubspotListConnector, settings).http_client(
        secrets=["pat-na1-wrong"]
    )
    info = SyncInfo("s", "mirror", "r", "email", FIELDS)
    connector = HubspotListConnector("crm", settings, info, http)
    http.classify = connector.classify
    with pytest.raises(FatalDestinationError) as caught:
        connector.open()
    assert "pat-na1-wrong" not in str(caught.value)
    assert "pat-na1-wrong" in connector.secret_values()


# -- per-row rejections ----------------------------------------------------------------------


def test_multi_status_errors_fail_only_the_rows_they_name(fake):
    connector = connect(fake)
    fake.reject_keys(["bad1@example.com", "bad2@example.com"])
    result = run(connector, [
        add(1, "ok1@example.com"), add(2, "Bad1@Example.com"), add(3, "ok2@example.com"),
        add(4, "bad2@example.com", op="update"),
    ])  # fmt: skip
    assert sorted((e.key, e.op, e.error_code) for e in result.rejected) == [
        ("Bad1@Example.com", "add", "validation_error"),
        ("bad2@example.com", "update", "validation_error"),
    ]
    assert "invalid" in result.rejected[0].error_message
    assert set(result.destination_ids) == {"ok1@example.com", "ok2@example.com"}
    assert set(fake.members()) == {"ok1@example.com", "ok2@example.com"}


def test_a_whole_batch_400_naming_rows_fails_those_and_sends_the_rest(fake):
    fake.reject_mode = "batch_400"
    connector = connect(fake)
    fake.reject_keys(["bad@example.com"])
    result = run(connector, [add(1, "ok@example.com"), add(2, "bad@example.com")])
    assert [(e.key, e.error_code) for e in result.rejected] == [
        ("bad@example.com", "validation_error")
    ]
    assert set(fake.members()) == {"ok@example.com"}
    assert len(fake.calls_to("/batch/upsert")) == 2


def test_an_unknown_property_fails_the_upserted_rows_but_removals_go_ahead(fake):
    seeded = fake.seed_members(["gone@example.com"])
    connector = connect(fake)
    result = run(connector, [
        Change(1, "add", "ann@example.com", {"no_such_property": "x"}, None),
        remove(2, "gone@example.com", seeded["gone@example.com"]),
    ])  # fmt: skip
    assert [(e.key, e.error_code) for e in result.rejected] == [
        ("ann@example.com", "validation_error")
    ]
    assert "no_such_property" in result.rejected[0].error_message
    assert fake.members() == {}
    assert fake.violations == []


def test_removing_a_deleted_contact_succeeds(fake):
    seeded = fake.seed_members(["gone@example.com"])
    fake.delete_contact("gone@example.com")
    connector = connect(fake)
    result = run(connector, [remove(1, "gone@example.com", seeded["gone@example.com"])])
    assert result.rejected == []


# -- the list --------------------------------------------------------------------------------


def test_create_if_missing_creates_once_then_reuses(fake):
    first = connect(fake, list_id=None, create_if_missing=True, list_name="VIP audience")
    list_id = first.opened["list_id"]
    assert list_id != fake.default_list_id
    created = fake.calls_to("/crm/lists/2026-03")
    assert [c for c in created if c[0] == "POST"] == [
        (
            "POST",
            "/crm/lists/2026-03",
            {"name": "VIP audience", "objectTypeId": "0-1", "processingType": "MANUAL"},
        )
    ]
    run(first, [add(1, "ann@example.com")])
    assert list(fake.members(list_id=list_id)) == ["ann@example.com"]

    # The next run gets its state back: no creation, no lookup by name.
    calls = len(fake.calls)
    second = connect(
        fake,
        state={"list_id": list_id},
        list_id=None,
        create_if_missing=True,
        list_name="VIP audience",
    )
    assert second.opened is None  # nothing new to remember
    assert [c[0] for c in fake.calls[calls:]] == ["GET"]

    # A run that lost the state (died before storing it) finds the list by name.
    third = connect(fake, list_id=None, create_if_missing=True, list_name="VIP audience")
    assert third.opened == {"list_id": list_id}
    assert len([c for c in fake.calls if c[0] == "POST" and c[1] == "/crm/lists/2026-03"]) == 1
    assert fake.violations == []


def test_a_missing_or_dynamic_list_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="no list 999"):
        connect(fake, list_id="999")
    dynamic = fake.add_list("smart list", "DYNAMIC")
    with pytest.raises(FatalDestinationError, match="DYNAMIC"):
        connect(fake, list_id=dynamic)
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        connect(fake, list_id=None)


def test_a_list_deleted_since_the_last_run_is_recreated_only_when_allowed(fake):
    with pytest.raises(FatalDestinationError, match="no longer exists"):
        connect(fake, state={"list_id": "4242"}, list_id=None)
    connector = connect(fake, state={"list_id": "4242"}, list_id=None, create_if_missing=True)
    assert connector.opened["list_id"] in fake.lists


# -- identifiers and values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (" Ann@Example.COM ", "ann@example.com"),
        ("\tJOSÉ@exämple.com\n", "josé@exämple.com"),
        ("a+tag@example.com", "a+tag@example.com"),
        ("no-at-sign", None),
        ("", None),
        ("   ", None),
        ("a@", None),
        ("@example.com", None),
        ("a@b@example.com", None),
        ("a b@example.com", None),
    ],
)
def test_email_keys_edge_cases(fake, raw, expected):
    connector = connect(fake)
    result = connector.send_batch([add(1, raw)])
    if expected is None:
        assert [(e.key, e.error_code) for e in result.rejected] == [(raw, "invalid_email")]
        assert raw not in result.rejected[0].error_message or not raw.strip()
        assert fake.calls_to("/batch/upsert") == []
    else:
        assert result.rejected == [] and list(result.destination_ids) == [raw]
        assert list(fake.members()) == [expected]


def test_keys_are_normalised_and_invalid_ones_never_sent(fake):
    connector = connect(fake)
    result = run(connector, [
        add(1, "  Ann@Example.COM "), add(2, "not-an-email"), add(3, ""),
        remove(4, "also bad@example.com"),
    ])  # fmt: skip
    assert sorted((e.key, e.error_code) for e in result.rejected) == [
        ("", "invalid_email"), ("also bad@example.com", "invalid_email"),
        ("not-an-email", "invalid_email"),
    ]  # fmt: skip
    # Ids are reported under the audience's own key, the contact stored under the normal form.
    assert list(result.destination_ids) == ["  Ann@Example.COM "]
    assert list(fake.members()) == ["ann@example.com"]
    sent = [i["id"] for c in fake.calls_to("/batch/upsert") for i in c[2]["inputs"]]
    assert sent == ["ann@example.com"]
    assert fake.calls_to("/batch/read") == []


def test_two_keys_of_one_contact_share_its_id_and_a_join_beats_a_leave(fake):
    seeded = fake.seed_members(["dup@example.com"])
    connector = connect(fake)
    result = run(connector, [
        add(1, "DUP@example.com"), remove(2, "dup@example.com", seeded["dup@example.com"]),
    ])  # fmt: skip
    assert result.rejected == []
    assert result.destination_ids == {"DUP@example.com": seeded["dup@example.com"]}
    assert list(fake.members()) == ["dup@example.com"]
    assert fake.violations == []


def test_property_values():
    assert property_value(None) == ""
    assert property_value(True) == "true"
    assert property_value(120.5) == "120.5"
    assert property_value(1e20) == "100000000000000000000"
    assert property_value(Decimal("12.340")) == "12.340"
    assert property_value(7) == "7"
    assert property_value(_dt.date(2026, 1, 2)) == "2026-01-02"
    assert property_value(["a", "b"]) == "a;b"
    for bad in (float("nan"), float("inf"), Decimal("NaN"), {"a": 1}):
        with pytest.raises(ValueError):
            property_value(bad)


def test_a_value_with_no_property_form_fails_its_row_only(fake):
    connector = connect(fake)
    result = run(
        connector, [add(1, "ok@example.com", ltv=1.5), add(2, "nan@example.com", ltv=float("nan"))]
    )
    assert [(e.key, e.error_code) for e in result.rejected] == [
        ("nan@example.com", "invalid_value")
    ]
    assert list(fake.members()) == ["ok@example.com"]


def test_a_custom_unique_id_property(fake):
    connector = connect(fake, id_property="customer_id")
    result = run(connector, [Change(1, "add", " C-1 ", {"firstname": "Cy"}, None)])
    assert result.rejected == []
    body = fake.calls_to("/batch/upsert")[0][2]
    assert body["inputs"] == [
        {
            "idProperty": "customer_id",
            "id": "C-1",
            "properties": {"firstname": "Cy", "customer_id": "C-1"},
        }
    ]
    assert next(iter(fake.members().values()))["customer_id"] == "C-1"


# -- the SDK as oracle ----------------------------------------------------------------------


def _sdk_roundtrip(package: Any, model: str, body: Any) -> Any:
    """``body`` parsed into the SDK's model (required fields enforced) and serialised back."""
    configuration = package.Configuration()
    configuration.client_side_validation = True
    client = package.ApiClient(configuration)
    parsed = client._ApiClient__deserialize(body, model)
    return client.sanitize_for_serialization(parsed)


def test_our_bodies_are_the_sdk_models(fake):
    from hubspot.crm import contacts, lists

    fake.seed_members(["old@example.com"])
    connector = connect(fake, list_id=None, create_if_missing=True)
    run(connector, [add(1, "ann@example.com", "Ann", 3.25), remove(2, "old@example.com")])
    checks = {
        "/batch/upsert": (contacts, "BatchInputSimplePublicObjectBatchInputUpsert"),
        "/batch/read": (contacts, "BatchReadInputSimplePublicObjectId"),
        "add-and-remove": (lists, "MembershipChangeRequest"),
    }
    for fragment, (package, model) in checks.items():
        calls = fake.calls_to(fragment)
        assert calls, fragment
        for _, _, body in calls:
            # Equal after the round trip: no key outside the model, every value of its type
            # (property values strings, record ids strings).
            assert _sdk_roundtrip(package, model, body) == body, fragment
    create = [c for c in fake.calls if c[0] == "POST" and c[1] == "/crm/lists/2026-03"]
    assert _sdk_roundtrip(lists, "ListCreateRequest", create[0][2]) == create[0][2]


def test_the_sdk_talks_to_the_fake(fake):
    from hubspot import HubSpot
    from hubspot.crm.contacts import (
        BatchInputSimplePublicObjectBatchInputUpsert,
        SimplePublicObjectBatchInputUpsert,
    )
    from hubspot.crm.lists import ListCreateRequest, MembershipChangeRequest

    client = HubSpot(access_token=fake.token, host=fake.base_url)
    upserted = client.crm.contacts.batch_api.upsert(
        BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                SimplePublicObjectBatchInputUpsert(
                    id_property="email", id="sdk@example.com", properties={"firstname": "Sdk"}
                )
            ]
        )
    )
    record_id = upserted.results[0].id
    assert upserted.results[0].properties["email"] == "sdk@example.com"
    created = client.crm.lists.lists_api.create(
        ListCreateRequest(name="sdk list", object_type_id="0-1", processing_type="MANUAL")
    )
    list_id = created.list.list_id
    changed = client.crm.lists.memberships_api.add_and_remove(
        list_id, MembershipChangeRequest(record_ids_to_add=[record_id], record_ids_to_remove=[])
    )
    assert changed.records_ids_added == [record_id]
    page = client.crm.lists.memberships_api.get_page(list_id)
    assert [r.record_id for r in page.results] == [record_id]
    fetched = client.crm.lists.lists_api.get_by_name(list_name="sdk list", object_type_id="0-1")
    assert fetched.list.list_id == list_id
    assert fake.violations == []

    # The connector then reads what the SDK wrote: one contact, found by email.
    connector = connect(fake, list_id=list_id)
    result = run(connector, [remove(1, "SDK@example.com")])
    assert result.rejected == []
    assert fake.members(list_id=list_id) == {}
