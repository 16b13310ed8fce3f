"""The salesforce_campaign connector against a fake Salesforce org over real HTTP on loopback.

``simple-salesforce`` (a test dependency only) is the oracle: its SOQL quoting must equal
ours, and the client itself, pointed at the fake, must parse the fake's answers and errors.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from audsync.delivery.engine import DeliverySettings
from audsync.destinations import registry
from audsync.destinations.base import BatchResult, Change, FatalDestinationError, SyncInfo
from audsync.destinations.salesforce import (
    QUERY_URL_BUDGET,
    SalesforceCampaignConnector,
    api_version,
    soql_quote,
)
from tests.fakes.salesforce import KEY_FIELD, FakeSalesforce, SoqlError, parse_soql
from tests.unit._connector_helpers import run

FIELDS = ("Email", "LastName", "LTV__c")
UPSERT = {"upsert_contacts": True, "contact_match_field": KEY_FIELD}


@pytest.fixture
def fake():
    with FakeSalesforce(timeout_s=0.6) as server:
        yield server


def connect(
    fake: FakeSalesforce,
    *,
    state: dict[str, Any] | None = None,
    sync_config: dict[str, Any] | None = None,
    sync_name: str = "vip_to_salesforce",
    timeout_s: float = 5.0,
    max_retries: int = 4,
    **overrides: Any,
) -> SalesforceCampaignConnector:
    """An opened connector on ``fake``, wired as the runner wires it."""
    settings = fake.destination_config(timeout_s=timeout_s, max_retries=max_retries, **overrides)
    config = dict(sync_config or {})
    delivery = DeliverySettings.from_settings(
        SalesforceCampaignConnector, {**settings, **config}, destination="crm"
    )
    http = delivery.http_client(secrets=[fake.token], backoff_base_s=0.01, backoff_max_s=0.05)
    info = SyncInfo(
        name=sync_name, mode="mirror", run_id="run-1", identifier="email", fields=FIELDS,
        settings=config, state=state or {},
    )  # fmt: skip
    connector = SalesforceCampaignConnector("crm", settings, info, http)
    http.classify = getattr(connector, "classify", None) or http.classify
    connector.opened = connector.open()
    return connector


def add(seq: int, key: str, last: str = "Doe", ltv: Any = 10, op: str = "add", dest_id=None):
    return Change(seq, op, key, {"Email": key.strip(), "LastName": last, "LTV__c": ltv}, dest_id)


def remove(seq: int, key: str, dest_id: str | None = None) -> Change:
    return Change(seq, "remove", key, {}, dest_id)


def errors(result: BatchResult) -> list[tuple[str, str, str]]:
    return sorted((e.key, e.op, e.error_code) for e in result.rejected)


# -- every op lands -------------------------------------------------------------------------


def test_registry_serves_this_class_and_limits():
    assert registry.get_connector("salesforce_campaign") is SalesforceCampaignConnector
    assert SalesforceCampaignConnector.max_batch_size == 200
    assert SalesforceCampaignConnector.returns_destination_ids
    settings = DeliverySettings.from_settings(SalesforceCampaignConnector, {"batch_size": 10_000})
    assert settings.batch_size == 200


def test_add_finds_contacts_by_email_and_creates_members(fake):
    ann = fake.add_contact("Ann@Example.com", LastName="A")
    bob = fake.add_contact("bob@example.com", LastName="B")
    connector = connect(fake)
    result = run(connector, [add(1, "ann@example.com"), add(2, " BOB@example.com")])
    assert result.rejected == []
    assert result.destination_ids == {
        "ann@example.com": fake.member_id("ann@example.com"),
        " BOB@example.com": fake.member_id("bob@example.com"),
    }
    members = fake.records["CampaignMember"].values()
    assert sorted(m["ContactId"] for m in members) == sorted([ann, bob])
    created = fake.calls_to("/composite/sobjects", "POST")[0][2]
    assert created["allOrNone"] is False
    assert created["records"][0] == {
        "attributes": {"type": "CampaignMember"},
        "CampaignId": fake.default_campaign_id,
        "ContactId": ann,
    }
    assert fake.queries[0] == (
        "SELECT Id, Email FROM Contact WHERE Email IN ('ann@example.com', 'bob@example.com')"
    )
    assert fake.violations == []


def test_a_member_without_a_contact_fails_alone(fake):
    fake.add_contact("known@example.com", LastName="K")
    connector = connect(fake)
    result = run(connector, [add(1, "known@example.com"), add(2, "stranger@example.com")])
    assert errors(result) == [("stranger@example.com", "add", "contact_not_found")]
    assert list(result.destination_ids) == ["known@example.com"]
    assert fake.calls_to("sobjects/Contact", "PATCH") == []


def test_duplicate_contacts_resolve_to_the_same_one_every_time(fake):
    first = fake.add_contact("twin@example.com", LastName="1")
    fake.add_contact("TWIN@example.com", LastName="2")
    connector = connect(fake)
    result = run(connector, [add(1, "twin@example.com")])
    assert result.rejected == []
    member = fake.records["CampaignMember"][result.destination_ids["twin@example.com"]]
    assert member["ContactId"] == first  # the smallest id


def test_upsert_contacts_sets_fields_and_creates_missing_contacts(fake):
    fake.add_contact("old@example.com", LastName="Before", LTV__c=1)
    connector = connect(fake, sync_config=UPSERT)
    result = run(
        connector, [add(1, "new@example.com", "New", 12.5), add(2, "OLD@example.com", "After", 2)]
    )
    assert result.rejected == []
    assert fake.members() == {
        "new@example.com": {"Email": "new@example.com", "LastName": "New", "LTV__c": 12.5},
        "old@example.com": {"Email": "OLD@example.com", "LastName": "After", "LTV__c": 2},
    }
    (call,) = fake.calls_to(f"composite/sobjects/Contact/{KEY_FIELD}", "PATCH")
    assert call[2]["allOrNone"] is False
    assert call[2]["records"][0] == {
        "attributes": {"type": "Contact"}, "Email": "new@example.com", "LastName": "New",
        "LTV__c": 12.5, KEY_FIELD: "new@example.com",
    }  # fmt: skip
    assert fake.queries == []  # no lookup: the upsert returns the contact ids
    assert len(fake.records["Contact"]) == 2
    assert fake.violations == []


def test_upsert_errors_fail_their_rows(fake):
    connector = connect(fake, sync_config=UPSERT)
    result = run(connector, [add(1, "ok@example.com"), add(2, "nolast@example.com", last=None)])
    assert errors(result) == [("nolast@example.com", "add", "REQUIRED_FIELD_MISSING")]
    assert "LastName" in result.rejected[0].error_message
    assert set(fake.members()) == {"ok@example.com"}


def test_an_update_re_adds_and_a_duplicate_member_counts_as_success(fake):
    connector = connect(fake, sync_config=UPSERT)
    first = run(connector, [add(1, "ann@example.com", "Ann", 1)])
    member_id = first.destination_ids["ann@example.com"]
    second = run(connector, [add(2, "ann@example.com", "Annie", 2, op="update", dest_id=member_id)])
    assert second.rejected == []
    assert second.destination_ids == {"ann@example.com": member_id}  # found after DUPLICATE_VALUE
    assert fake.members()["ann@example.com"]["LastName"] == "Annie"
    assert len(fake.records["CampaignMember"]) == 1
    lookup = fake.queries[-1]
    assert lookup.startswith("SELECT Id, ContactId FROM CampaignMember WHERE CampaignId = ")


def test_remove_deletes_stored_member_ids_without_a_lookup(fake):
    members = fake.seed_members(["gone@example.com", "stay@example.com"])
    connector = connect(fake)
    result = run(connector, [remove(1, "gone@example.com", members["gone@example.com"])])
    assert result.rejected == []
    assert set(fake.members()) == {"stay@example.com"}
    assert fake.queries == []
    (call,) = fake.calls_to("/composite/sobjects", "DELETE")
    query = parse_qs(urlsplit(call[1]).query)
    assert query == {"ids": [members["gone@example.com"]], "allOrNone": ["false"]}
    assert len(fake.records["Contact"]) == 2  # contacts are never deleted


def test_remove_without_an_id_looks_up_contact_then_member(fake):
    fake.seed_members(["gone@example.com", "stay@example.com"])
    fake.add_contact("notmember@example.com", LastName="N")
    connector = connect(fake)
    result = run(connector, [
        remove(1, " Gone@Example.com"), remove(2, "nobody@example.com"),
        remove(3, "notmember@example.com"),
    ])  # fmt: skip
    assert result.rejected == []
    assert set(fake.members()) == {"stay@example.com"}
    assert len(fake.queries) == 2
    assert fake.violations == []


def test_deleting_an_already_deleted_member_succeeds(fake):
    members = fake.seed_members(["gone@example.com"])
    connector = connect(fake)
    assert (
        run(connector, [remove(1, "gone@example.com", members["gone@example.com"])]).rejected == []
    )
    # At-least-once: the same batch again.
    assert (
        run(connector, [remove(1, "gone@example.com", members["gone@example.com"])]).rejected == []
    )


def test_two_keys_of_one_contact_and_a_join_beats_a_leave(fake):
    members = fake.seed_members(["dup@example.com"])
    connector = connect(fake)
    result = run(
        connector,
        [add(1, "DUP@example.com"), remove(2, "dup@example.com", members["dup@example.com"])],
    )
    assert result.rejected == []
    assert result.destination_ids == {"DUP@example.com": members["dup@example.com"]}
    assert set(fake.members()) == {"dup@example.com"}


# -- batching and queries --------------------------------------------------------------------


def test_batches_over_the_limit_are_split_by_the_engine(fake):
    connector = connect(fake, sync_config=UPSERT, batch_size=5000)
    delivery = DeliverySettings.from_settings(SalesforceCampaignConnector, connector.settings)
    assert delivery.batch_size == 200
    changes = [add(i, f"user{i}@example.com") for i in range(1, 451)]
    result = run(connector, changes, batch_size=delivery.batch_size, concurrency=3)
    assert result.rejected == []
    assert len(fake.members()) == 450
    sizes = sorted(len(c[2]["records"]) for c in fake.calls_to("/composite/sobjects", "POST"))
    assert sizes == [50, 200, 200]
    ids = [m for m in result.destination_ids.values()]
    deleted = run(connector, [remove(i, f"user{i}@example.com", ids[i - 1]) for i in range(1, 451)])
    assert deleted.rejected == []
    assert fake.members() == {}
    assert all(
        len(parse_qs(urlsplit(c[1]).query)["ids"][0].split(",")) <= 200
        for c in fake.calls_to("/composite/sobjects", "DELETE")
    )
    assert fake.violations == []


def test_the_fake_refuses_collections_over_200(fake):
    body = {"allOrNone": False, "records": [{"attributes": {"type": "CampaignMember"}}] * 201}
    answer = requests.post(
        f"{fake.base_url}/services/data/v66.0/composite/sobjects",
        json=body,
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert answer.status_code == 400
    assert answer.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    ids = ",".join(f"00v{i:012d}AAA" for i in range(201))
    answer = requests.delete(
        f"{fake.base_url}/services/data/v66.0/composite/sobjects?ids={ids}&allOrNone=false",
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert answer.status_code == 400 and answer.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


TRICKY = [
    "o'brien@example.com",
    "back\\slash@example.com",
    'quo"te@example.com',
    "100%_sure@example.com",
    "nobody')or(email!='@example.com",
]


def test_values_are_escaped_in_soql_and_match_simple_salesforce(fake):
    from simple_salesforce.format import format_soql, quote_soql_value

    for value in [*TRICKY, "tab\there@x.com", "new\nline@x.com"]:
        assert soql_quote(value) == quote_soql_value(value)
    for email in TRICKY:
        fake.add_contact(email, LastName="T")
    fake.add_contact("victim@example.com", LastName="V")
    connector = connect(fake)
    result = run(connector, [add(i, email) for i, email in enumerate(TRICKY, 1)])
    assert result.rejected == []
    assert set(fake.members()) == set(TRICKY)  # and not the victim: no injection
    assert fake.queries[0] == format_soql(
        "SELECT Id, Email FROM Contact WHERE Email IN {}", TRICKY
    ).replace("','", "', '")
    assert fake.violations == []


def test_the_fake_parses_soql_and_rejects_malformed_queries(fake):
    assert parse_soql("SELECT Id FROM Contact WHERE Email IN ('a\\'b@x.com') LIMIT 1") == {
        "fields": ["Id"], "object": "Contact", "where": [("Email", ["a'b@x.com"])], "limit": 1,
    }  # fmt: skip
    for bad in [
        "SELECT Id FROM Contact WHERE Email IN (a@x.com)",  # unquoted
        "SELECT Id FROM Contact WHERE Email = 'a'b@x.com'",  # unescaped quote
        "SELECT Id FROM Contact WHERE Email = 'a\\qb'",  # bad escape
        "SELECT Id FROM Contact WHERE Email = 'open",
        "SELECT Id FROM Contact WHERE Email = 'a' OR Id = 'b'",
    ]:
        with pytest.raises(SoqlError):
            parse_soql(bad)
    answer = requests.get(
        f"{fake.base_url}/services/data/v66.0/query",
        params={"q": "SELECT Id FROM Contact WHERE Email IN (a@x.com)"},
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert answer.status_code == 400 and answer.json()[0]["errorCode"] == "MALFORMED_QUERY"
    answer = requests.get(
        f"{fake.base_url}/services/data/v66.0/query",
        params={"q": "SELECT Id, Nope__c FROM Contact"},
        headers={"Authorization": f"Bearer {fake.token}"},
        timeout=5,
    )
    assert answer.status_code == 400 and answer.json()[0]["errorCode"] == "INVALID_FIELD"
    assert len(fake.violations) == 2


def test_long_in_lists_are_cut_to_keep_urls_short(fake):
    emails = [f"{'x' * 60}.{i}@a-rather-long-domain-name.example.com" for i in range(200)]
    for email in emails:
        fake.add_contact(email, LastName="L")
    connector = connect(fake)
    result = run(connector, [add(i, e) for i, e in enumerate(emails, 1)])
    assert result.rejected == []
    queries = [c[1] for c in fake.calls_to("/query", "GET")]
    contact_queries = [q for q in queries if "FROM+Contact" in q or "FROM%20Contact" in q]
    assert len(contact_queries) > 1
    assert all(len(urlsplit(q).query) <= QUERY_URL_BUDGET for q in queries)
    assert len(fake.members()) == 200


def test_query_pages_are_followed(fake):
    fake.page_size = 3
    for i in range(8):
        fake.add_contact(f"p{i}@example.com", LastName="P")
    connector = connect(fake)
    result = run(connector, [add(i, f"p{i}@example.com") for i in range(8)])
    assert result.rejected == []
    assert len(fake.members()) == 8
    assert len([c for c in fake.calls if "/query/01gFAKE" in c[1]]) == 2


# -- failures -------------------------------------------------------------------------------


def test_an_expired_session_is_fatal_and_the_message_has_no_secret(fake, caplog):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake)
    fake.fail_next("expired_token")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FatalDestinationError) as caught:
        run(connector, [add(1, "ann@example.com")])
    assert "INVALID_SESSION_ID" in str(caught.value)
    assert fake.token not in str(caught.value)
    assert fake.token not in caplog.text
    assert fake.token in connector.secret_values()


def test_the_daily_request_limit_is_fatal(fake):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake)
    fake.fail_next("rate_limit")
    with pytest.raises(FatalDestinationError, match="REQUEST_LIMIT_EXCEEDED"):
        run(connector, [add(1, "ann@example.com")])
    assert len(fake.queries) == 0 and len(fake.calls_to("/query")) == 1  # not retried


@pytest.mark.parametrize("kind", ["server_error", "lock_row", "concurrent_limit"])
def test_transient_answers_are_retried(fake, kind):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake)
    fake.fail_next(kind, 2, path="/composite/sobjects")
    result = run(connector, [add(1, "ann@example.com")])
    assert result.rejected == []
    assert set(fake.members()) == {"ann@example.com"}
    assert connector.http.retries == 2


def test_locked_records_inside_a_collection_answer_are_sent_again(fake):
    members = fake.seed_members(["gone@example.com"])
    connector = connect(fake, sync_config=UPSERT)
    fake.fail_next("lock_records", 1, path="/composite/sobjects/Contact")
    fake.fail_next("lock_records", 1, path="/composite/sobjects", method="DELETE")
    result = run(
        connector,
        [add(1, "ann@example.com"), remove(2, "gone@example.com", members["gone@example.com"])],
    )
    assert result.rejected == []
    assert set(fake.members()) == {"ann@example.com"}
    assert len(fake.calls_to("/composite/sobjects/Contact", "PATCH")) == 2
    assert len(fake.calls_to("/composite/sobjects", "DELETE")) == 2


def test_a_lock_that_never_clears_fails_its_rows_as_retryable(fake):
    connector = connect(fake, sync_config=UPSERT)
    fake.fail_next("lock_records", 10, path="/composite/sobjects/Contact")
    result = run(connector, [add(1, "ann@example.com")])
    assert [(e.key, e.error_code, e.retryable) for e in result.rejected] == [
        ("ann@example.com", "UNABLE_TO_LOCK_ROW", True)
    ]


def test_a_timed_out_create_repeated_is_a_duplicate_and_succeeds(fake):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake, timeout_s=0.3)
    fake.fail_next("timeout", path="/composite/sobjects")  # applied, but the answer is lost
    result = run(connector, [add(1, "ann@example.com")])
    assert result.rejected == []
    assert result.destination_ids == {"ann@example.com": fake.member_id("ann@example.com")}
    assert len(fake.records["CampaignMember"]) == 1
    time.sleep(0.4)


# -- per-row rejections ----------------------------------------------------------------------


def test_per_record_errors_map_to_their_keys(fake):
    members = fake.seed_members(["leave-ok@example.com", "leave-bad@example.com"])
    fake.add_contact("join-bad@example.com", LastName="J")
    fake.add_contact("join-ok@example.com", LastName="J")
    connector = connect(fake)
    fake.reject_keys(["join-bad@example.com", "leave-bad@example.com"])
    result = run(connector, [
        add(1, "join-ok@example.com"), add(2, "JOIN-BAD@example.com"),
        remove(3, "leave-ok@example.com", members["leave-ok@example.com"]),
        remove(4, "leave-bad@example.com", members["leave-bad@example.com"]),
    ])  # fmt: skip
    assert errors(result) == [
        ("JOIN-BAD@example.com", "add", "FIELD_CUSTOM_VALIDATION_EXCEPTION"),
        ("leave-bad@example.com", "remove", "DELETE_FAILED"),
    ]
    assert set(fake.members()) == {"join-ok@example.com", "leave-bad@example.com"}

    connector = connect(fake, sync_config=UPSERT)
    result = run(connector, [add(5, "new-ok@example.com"), add(6, "join-bad@example.com")])
    assert errors(result) == [("join-bad@example.com", "add", "FIELD_CUSTOM_VALIDATION_EXCEPTION")]


# -- the campaign ----------------------------------------------------------------------------


def test_create_if_missing_creates_once_then_reuses(fake):
    first = connect(fake, campaign_id=None, create_if_missing=True, campaign_name="VIP 2026")
    campaign = first.opened["campaign_id"]
    assert fake.records["Campaign"][campaign]["Name"] == "VIP 2026"
    assert fake.calls_to("sobjects/Campaign", "POST")[0][2] == {
        "Name": "VIP 2026",
        "IsActive": True,
    }
    fake.add_contact("ann@example.com", LastName="A")
    run(first, [add(1, "ann@example.com")])
    assert set(fake.members(campaign_id=campaign)) == {"ann@example.com"}

    second = connect(
        fake, state={"campaign_id": campaign}, campaign_id=None, create_if_missing=True
    )
    assert second.opened is None  # remembered: nothing new to save
    third = connect(fake, campaign_id=None, create_if_missing=True, campaign_name="VIP 2026")
    assert third.opened == {"campaign_id": campaign}  # found by name
    assert len(fake.calls_to("sobjects/Campaign", "POST")) == 1
    assert len(fake.records["Campaign"]) == 2
    assert fake.violations == []


def test_a_missing_campaign_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="no campaign"):
        connect(fake, campaign_id="701000000000999AAA")
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        connect(fake, campaign_id=None)
    with pytest.raises(FatalDestinationError, match="no longer exists"):
        connect(fake, campaign_id=None, state={"campaign_id": "701000000000999AAA"})
    with pytest.raises(FatalDestinationError, match="not a Salesforce id"):
        connect(fake, campaign_id="x' OR Id != '")


# -- identifiers and configuration -----------------------------------------------------------


def test_invalid_keys_are_never_sent(fake):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake)
    result = run(
        connector, [add(1, " ANN@example.com "), add(2, "nope"), remove(3, "a b@example.com")]
    )
    assert errors(result) == [
        ("a b@example.com", "remove", "invalid_email"),
        ("nope", "add", "invalid_email"),
    ]
    assert all("nope" not in q for q in fake.queries)
    assert list(result.destination_ids) == [" ANN@example.com "]


def test_text_identifiers_on_an_external_id_field(fake):
    fake.add_contact("c@example.com", key="CUST-001", LastName="C")
    connector = connect(
        fake, sync_config={"contact_match_field": KEY_FIELD, "identifier_type": "text"}
    )
    result = run(connector, [Change(1, "add", " CUST-001 ", {}, None)])
    assert result.rejected == []
    assert (
        fake.queries[0] == f"SELECT Id, {KEY_FIELD} FROM Contact WHERE {KEY_FIELD} IN ('CUST-001')"
    )


def test_member_status_is_set_when_configured(fake):
    fake.add_contact("ann@example.com", LastName="A")
    connector = connect(fake, member_status="Responded")
    run(connector, [add(1, "ann@example.com")])
    (member,) = fake.records["CampaignMember"].values()
    assert member["Status"] == "Responded"


def test_configuration_is_checked(fake):
    with pytest.raises(FatalDestinationError, match="External ID"):
        connect(fake, sync_config={"upsert_contacts": True})
    with pytest.raises(FatalDestinationError, match="field API name"):
        connect(fake, contact_match_field="Email) OR (Id")
    with pytest.raises(FatalDestinationError, match="api_version"):
        connect(fake, api_version="latest")
    assert api_version("62") == "v62.0" and api_version("v61.0") == "v61.0"
    assert api_version(62.0) == "v62.0"


def test_another_api_version_is_used_in_every_path():
    with FakeSalesforce(api_version="v60.0") as other:
        other.add_contact("ann@example.com", LastName="A")
        connector = connect(other, api_version="60.0")
        assert run(connector, [add(1, "ann@example.com")]).rejected == []
        assert all(c[1].startswith("/services/data/v60.0/") for c in other.calls)
        assert other.violations == []


# -- simple-salesforce as oracle -------------------------------------------------------------


def test_simple_salesforce_talks_to_the_fake(fake):
    from simple_salesforce import Salesforce
    from simple_salesforce.exceptions import SalesforceExpiredSession, SalesforceMalformedRequest
    from simple_salesforce.format import format_soql

    contact = fake.add_contact("o'brien@example.com", LastName="O")
    sf = Salesforce(instance_url=fake.base_url, session_id=fake.token, version="62.0")
    # The client builds https:// URLs; the fake speaks plain HTTP on loopback.
    sf.base_url = f"{fake.base_url}/services/data/v66.0/"
    found = sf.query(
        format_soql("SELECT Id, Email FROM Contact WHERE Email IN {}", ["o'brien@example.com"])
    )
    assert [r["Id"] for r in found["records"]] == [contact]
    assert found["records"][0]["attributes"]["type"] == "Contact"
    assert sf.api_usage["api-usage"].used >= 1  # Sforce-Limit-Info parsed
    created = sf.restful(
        "composite/sobjects",
        method="POST",
        json={"allOrNone": False, "records": [{"attributes": {"type": "CampaignMember"},
              "CampaignId": fake.default_campaign_id, "ContactId": contact}]},
    )  # fmt: skip
    assert created[0]["success"] is True
    again = sf.restful(
        "composite/sobjects",
        method="POST",
        json={"allOrNone": False, "records": [{"attributes": {"type": "CampaignMember"},
              "CampaignId": fake.default_campaign_id, "ContactId": contact}]},
    )  # fmt: skip
    assert again[0]["errors"][0]["statusCode"] == "DUPLICATE_VALUE"
    with pytest.raises(SalesforceMalformedRequest) as caught:
        sf.query("SELECT Id FROM Contact WHERE Email = o'brien@example.com")
    assert caught.value.content[0]["errorCode"] == "MALFORMED_QUERY"
    fake.fail_next("expired_token")
    with pytest.raises(SalesforceExpiredSession):
        sf.query("SELECT Id FROM Contact")

    # The connector then removes the member the client made, by lookup.
    fake.violations.clear()
    connector = connect(fake)
    assert run(connector, [remove(1, "O'Brien@example.com")]).rejected == []
    assert fake.members() == {}
    assert fake.violations == []


# -- members made of Leads ------------------------------------------------------------------


def test_members_by_lead_found_or_upserted(fake):
    lead = fake.add_record("Lead", Email="lee@example.com", LastName="Lee", Company="Acme")
    found = connect(fake, sync_config={"member_type": "lead"})
    result = found.send_batch([add(1, "Lee@Example.com")])
    assert result.rejected == []
    (member,) = [m for m in fake.records["CampaignMember"].values() if m.get("LeadId")]
    assert member["LeadId"] == lead and "ContactId" not in member
    assert result.destination_ids == {"Lee@Example.com": member["Id"]}
    # A key with no lead fails alone, naming the Lead.
    missing = found.send_batch([add(1, "nobody@example.com")])
    assert errors(missing) == [("nobody@example.com", "add", "contact_not_found")]
    assert "no Lead has Email" in missing.rejected[0].error_message
    # Upserted by an external id field, with the Lead's required Company mapped.
    upserting = connect(
        fake,
        sync_config={"member_type": "Lead", "upsert_contacts": True, "contact_match_field": KEY_FIELD},
    )
    change = Change(1, "add", "new@example.com", {"LastName": "New", "Company": "Beta"}, None)
    assert upserting.send_batch([change]).rejected == []
    assert "new@example.com" in fake.members(["new@example.com"])
    assert any(c[1].endswith(f"/composite/sobjects/Lead/{KEY_FIELD}") for c in fake.calls)
    # Removal deletes the Lead's member, never the Lead.
    assert found.send_batch([remove(1, "lee@example.com", member["Id"])]).rejected == []
    assert member["Id"] not in fake.records["CampaignMember"] and lead in fake.records["Lead"]
    with pytest.raises(FatalDestinationError, match="member_type must be Contact or Lead"):
        connect(fake, sync_config={"member_type": "Account"})
