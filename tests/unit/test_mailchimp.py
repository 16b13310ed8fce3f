"""The Mailchimp connector against the fake Mailchimp API, over real loopback HTTP."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from audsync.delivery.engine import DeliverySettings, deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import Change, FatalDestinationError, RequestRejected, SyncInfo
from audsync.destinations.mailchimp import (
    MailchimpConnector,
    data_centre,
    subscriber_hash,
)
from audsync.destinations.registry import get_connector
from tests.fakes.mailchimp import TAG, FakeMailchimp
from tests.unit._connector_helpers import mirror_through_the_common_surface

SYNC = SyncInfo("newsletter_vips", "mirror", "run1", "email", ("email_address", "FNAME", "LTV"))


def connector(fake: FakeMailchimp, sleeps: list | None = None, timeout_s: float = 5, **overrides):
    """A connector on ``fake`` whose client records its waits instead of sleeping."""
    waits = sleeps if sleeps is not None else []
    http = HttpClient(max_retries=3, timeout_s=timeout_s, sleep=waits.append)
    chimp = MailchimpConnector("mc", fake.destination_config(**overrides), SYNC, http)
    http.classify = chimp.classify  # as the runner installs it
    http.add_secrets(chimp.secret_values())
    return chimp


def change(op: str, email: str, seq: int = 1, **fields) -> Change:
    return Change(seq, op, email, {"email_address": email, **fields}, None)


def tag_calls(fake: FakeMailchimp) -> list[str]:
    """Per-member tag requests: the slow path, which the connector no longer takes."""
    return [path for method, path in fake.requests if path.endswith("/tags")]


def segment_bodies(fake: FakeMailchimp) -> list[dict]:
    """The bulk tag requests (members_to_add / members_to_remove of the tag's segment)."""
    return fake.segment_bodies


@pytest.fixture
def fake():
    with FakeMailchimp() as chimp:
        yield chimp


def test_registry_resolves_the_type():
    assert get_connector("mailchimp") is MailchimpConnector


def test_open_checks_the_audience(fake):
    assert connector(fake).open() is None
    with pytest.raises(FatalDestinationError, match="not found"):
        connector(fake, list_id="nope").open()


def test_add_update_remove_land_as_the_mode_expects(fake):
    chimp = connector(fake)
    result = chimp.send_batch(
        [
            change("add", "ann@example.com", 1, FNAME="Ann", LTV=10.5),
            change("add", "bob@example.com", 2, FNAME="Bob", LTV=3),
            change("add", "cat@example.com", 3, FNAME="Cat", LTV=0),
        ]
    )
    assert result.rejected == []
    assert fake.members() == {
        "ann@example.com": {"email_address": "ann@example.com", "FNAME": "Ann", "LTV": 10.5},
        "bob@example.com": {"email_address": "bob@example.com", "FNAME": "Bob", "LTV": 3},
        "cat@example.com": {"email_address": "cat@example.com", "FNAME": "Cat", "LTV": 0},
    }
    body = fake.upserts[0]
    assert body["update_existing"] is True
    assert body["members"][0] == {
        "email_address": "ann@example.com",
        "status_if_new": "transactional",  # never "status": consent is not ours to change
        "merge_fields": {"FNAME": "Ann", "LTV": 10.5},
    }
    assert fake.member("ann@example.com")["status"] == "transactional"
    # One request tags all three (the tag's static segment), none per member.
    assert segment_bodies(fake) == [
        {"members_to_add": ["ann@example.com", "bob@example.com", "cat@example.com"],
         "members_to_remove": []}
    ]  # fmt: skip
    assert tag_calls(fake) == []

    result = chimp.send_batch(
        [
            change("update", "bob@example.com", 4, FNAME="Robert", LTV=4),
            change("remove", "cat@example.com", 5, FNAME="Cat", LTV=0),
        ]
    )
    assert result.rejected == []
    assert fake.members() == {
        "ann@example.com": {"email_address": "ann@example.com", "FNAME": "Ann", "LTV": 10.5},
        "bob@example.com": {"email_address": "bob@example.com", "FNAME": "Robert", "LTV": 4},
    }
    # One request tags bob again (idempotent; it heals a tag removed by hand) and untags cat,
    # who stays on the list.
    assert segment_bodies(fake)[1:] == [
        {"members_to_add": ["bob@example.com"], "members_to_remove": ["cat@example.com"]}
    ]
    assert fake.member("cat@example.com")["status"] == "transactional"
    assert fake.violations == []


def test_an_existing_members_status_is_never_changed(fake):
    fake.seed_members({"unsub@example.com": {"FNAME": "U"}})
    with fake._lock:
        fake.list_members[subscriber_hash("unsub@example.com")]["status"] = "unsubscribed"
    connector(fake, status_if_new="subscribed").send_batch(
        [change("add", "unsub@example.com", FNAME="Una")]
    )
    member = fake.member("unsub@example.com")
    assert member["status"] == "unsubscribed" and member["merge_fields"]["FNAME"] == "Una"
    assert TAG in member["tags"]


def test_update_of_a_member_deleted_in_mailchimp_tags_it_again(fake):
    chimp = connector(fake)
    assert chimp.send_batch([change("update", "gone@example.com", FNAME="G")]).rejected == []
    assert set(fake.members()) == {"gone@example.com"}


def test_removing_a_non_member_succeeds(fake):
    result = connector(fake).send_batch([change("remove", "ghost@example.com")])
    assert result.rejected == [] and fake.list_members == {} and fake.violations == []


def test_archive_on_remove(fake):
    chimp = connector(fake, archive_on_remove=True)
    chimp.send_batch([change("add", "ann@example.com", FNAME="Ann")])
    assert chimp.send_batch([change("remove", "ann@example.com", 2)]).rejected == []
    assert fake.member("ann@example.com")["status"] == "archived"
    assert fake.members() == {}
    assert (
        "DELETE",
        f"/3.0/lists/{fake.list_id}/members/{subscriber_hash('ann@example.com')}",
    ) in fake.requests
    # Archived twice, or an unknown member: nothing to do.
    assert chimp.send_batch([change("remove", "ann@example.com", 3)]).rejected == []
    # An archived member can come back.
    assert chimp.send_batch([change("add", "ann@example.com", 4, FNAME="Ann")]).rejected == []
    assert set(fake.members()) == {"ann@example.com"}
    assert fake.violations == []


def test_per_member_errors_in_a_200_map_to_their_rows(fake):
    fake.reject_keys(["bob@example.com"])
    result = connector(fake).send_batch(
        [
            change("add", "ann@example.com", 1),
            change("add", "Bob@Example.com", 2),
            change("add", "cat@example.com", 3),
        ]
    )
    assert [(r.key, r.op, r.error_code, r.retryable) for r in result.rejected] == [
        ("Bob@Example.com", "add", "ERROR_GENERIC", False)
    ]
    assert "permanently deleted" in result.rejected[0].error_message
    assert set(fake.members()) == {"ann@example.com", "cat@example.com"}
    # The rejected member is not tagged.
    assert segment_bodies(fake) == [
        {"members_to_add": ["ann@example.com", "cat@example.com"], "members_to_remove": []}
    ]


def test_invalid_emails_are_rejected_not_sent(fake):
    result = connector(fake).send_batch(
        [change("add", "no-at-sign", 1), change("add", "  Ann@Example.COM ", 2)]
    )
    assert [(r.key, r.error_code) for r in result.rejected] == [("no-at-sign", "invalid_email")]
    assert [m["email_address"] for m in fake.upserts[0]["members"]] == ["ann@example.com"]
    assert fake.violations == []


def test_keys_that_normalise_to_one_address_are_sent_once(fake):
    result = connector(fake).send_batch(
        [
            change("add", "ann@example.com", 1, FNAME="A"),
            change("add", "ANN@example.com", 2, FNAME="B"),
        ]
    )
    assert result.rejected == []
    assert len(fake.upserts[0]["members"]) == 1 and fake.violations == []


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("Ann@Example.com", "ann@example.com"),
        ("\tann@example.com ", "ann@example.com"),
        ("Ünï@Exämple.com", "ünï@exämple.com"),
        ("ann@@example.com", None),
        ("", None),
    ],
)
def test_email_normalisation_edge_cases(fake, raw, sent):
    result = connector(fake).send_batch([change("add", raw)])
    if sent is None:
        assert [r.error_code for r in result.rejected] == ["invalid_email"]
        assert fake.upserts == [] and segment_bodies(fake) == []
    else:
        assert result.rejected == []
        assert fake.upserts[0]["members"][0]["email_address"] == sent
        assert segment_bodies(fake) == [{"members_to_add": [sent], "members_to_remove": []}]


@pytest.mark.parametrize("email", ["Urist.McVankab@freddiesjokes.com", "a+b@example.co.uk"])
def test_subscriber_hash_matches_the_mailchimp3_helper(email):
    from mailchimp3.helpers import get_subscriber_hash

    assert subscriber_hash(email) == get_subscriber_hash(email)
    assert subscriber_hash(email) == subscriber_hash(email.upper())


def test_null_fields_clear_merge_values_and_database_values_encode(fake):
    chimp = connector(fake)
    result = chimp.send_batch(
        [
            change("add", "ann@example.com", 1, FNAME=None, LTV=Decimal("12.50")),
            change("add", "bob@example.com", 2, FNAME=b"\x00"),
        ]
    )
    assert [(r.key, r.error_code) for r in result.rejected] == [
        ("bob@example.com", "invalid_value")
    ]
    assert fake.member("ann@example.com")["merge_fields"] == {"FNAME": "", "LTV": 12.5}


def _batches(changes: list[Change], size: int) -> list[tuple[int, list[Change]]]:
    return [(n, changes[i : i + size]) for n, i in enumerate(range(0, len(changes), size), 1)]


def test_engine_splits_batches_at_500(fake):
    settings = fake.destination_config(batch_size=5000)
    delivery = DeliverySettings.from_settings(MailchimpConnector, settings)
    assert delivery.batch_size == 500
    changes = [change("add", f"user{i}@example.com", i, LTV=i) for i in range(1, 1101)]
    stats = deliver(
        connector(fake),
        _batches(changes, delivery.batch_size),
        max_concurrency=delivery.max_concurrency,
        on_result=lambda *args: None,
    )
    assert stats.rows_sent == 1100 and stats.rows_rejected == 0
    assert sorted(len(body["members"]) for body in fake.upserts) == [100, 500, 500]
    assert len(fake.members()) == 1100 and fake.violations == []


def test_concurrency_is_capped_at_mailchimps_10_connections():
    with FakeMailchimp(latency_s=0.02) as fake:
        settings = fake.destination_config(max_concurrency=50)
        delivery = DeliverySettings.from_settings(MailchimpConnector, settings)
        assert delivery.max_concurrency == 10
        changes = [change("add", f"user{i}@example.com", i) for i in range(1, 201)]
        stats = deliver(
            connector(fake),
            _batches(changes, 5),
            max_concurrency=delivery.max_concurrency,
            on_result=lambda *args: None,
        )
        assert stats.rows_rejected == 0 and stats.retries == 0
        assert 5 <= fake.max_concurrent <= 10

        # Past the cap the fake answers as Mailchimp does (429): retried, and rows whose
        # retries ran out (this client does not wait between them) fail as retryable.
        fake.reset()
        rejected = []
        stats = deliver(
            connector(fake),
            _batches(changes, 10),
            max_concurrency=14,
            on_result=lambda no, batch, result: rejected.extend(result.rejected),
        )
        assert fake.max_concurrent > 10 and stats.retries > 0
        assert all(r.retryable and r.error_code == "429" for r in rejected)


def test_the_fake_refuses_more_than_500_members(fake):
    with pytest.raises(RequestRejected) as rejected:
        connector(fake).send_batch([change("add", f"u{i}@example.com", i) for i in range(501)])
    assert rejected.value.code == "invalid_resource" and "maximum is 500" in rejected.value.message
    assert fake.violations and fake.list_members == {}


@pytest.mark.parametrize("kind", ["rate_limit", "server_error"])
def test_rate_limit_and_server_errors_are_retried(fake, kind):
    sleeps: list[float] = []
    fake.fail_next(kind, 2)
    assert connector(fake, sleeps).send_batch([change("add", "ann@example.com")]).rejected == []
    assert len(sleeps) == 2 and set(fake.members()) == {"ann@example.com"}


def test_a_failing_tag_call_is_retried_too(fake):
    fake.fail_next("timeout", delay_s=0.8)  # the upsert's answer is lost
    fake.fail_next("rate_limit")  # and the tag call is refused once
    chimp = connector(fake, timeout_s=0.3)
    assert chimp.send_batch([change("add", "ann@example.com", FNAME="Ann")]).rejected == []
    time.sleep(0.6)
    assert set(fake.members()) == {"ann@example.com"} and len(fake.upserts) == 2


def test_expired_key_is_fatal_and_the_message_hides_it(fake):
    fake.fail_next("expired_token")
    with pytest.raises(FatalDestinationError) as fatal:
        connector(fake).send_batch([change("add", "ann@example.com")])
    assert "401" in str(fatal.value) and "API Key Invalid" in str(fatal.value)
    assert fake.api_key not in str(fatal.value)
    assert fake.list_members == {}


def test_wrong_key_is_fatal(fake):
    with pytest.raises(FatalDestinationError, match="401"):
        connector(fake, api_key="ffffffffffffffffffffffffffffffff-us21").send_batch(
            [change("add", "ann@example.com")]
        )


def test_key_without_a_data_centre_is_fatal_without_quoting_it(fake):
    settings = fake.destination_config(api_key="plainkey0123456789")
    del settings["base_url"]
    with pytest.raises(FatalDestinationError) as fatal:
        MailchimpConnector("mc", settings, SYNC, HttpClient())
    assert "plainkey0123456789" not in str(fatal.value) and "data centre" in str(fatal.value)
    assert data_centre("abc-us21") == "us21" and data_centre("abc") is None
    settings["api_key"] = "abc-us7"
    assert (
        MailchimpConnector("mc", settings, SYNC, HttpClient())._base
        == "https://us7.api.mailchimp.com"
    )


def test_settings_are_checked(fake):
    with pytest.raises(FatalDestinationError, match="status_if_new"):
        connector(fake, status_if_new="yes please")
    with pytest.raises(FatalDestinationError, match="list_id"):
        connector(fake, list_id=None)
    # The tag defaults to the sync's name; create_if_missing is accepted and does nothing.
    chimp = connector(fake, tag=None, create_if_missing=True)
    assert chimp.open() is None
    chimp.send_batch([change("add", "ann@example.com")])
    assert fake.member("ann@example.com")["tags"] == {"newsletter_vips"}


def test_the_official_sdk_is_accepted_by_the_fake(fake):
    """The fake checks what Mailchimp's own client sends, so it is no stricter than the API."""
    import mailchimp_marketing

    client = mailchimp_marketing.Client({"api_key": fake.api_key})
    client.api_client.host = fake.base_url + "/3.0"
    answer = client.lists.batch_list_members(
        fake.list_id,
        {
            "members": [
                {
                    "email_address": "sdk@example.com",
                    "status_if_new": "transactional",
                    "merge_fields": {"FNAME": "Sdk"},
                }
            ],
            "update_existing": True,
        },
    )
    assert answer["total_created"] == 1
    client.lists.update_list_member_tags(
        fake.list_id,
        subscriber_hash("sdk@example.com"),
        {"tags": [{"name": TAG, "status": "active"}]},
    )
    assert fake.violations == []
    assert fake.members(["SDK@example.com"]) == {
        "SDK@example.com": {"email_address": "sdk@example.com", "FNAME": "Sdk"}
    }


def test_generic_surface_holds_a_mirrored_audience(fake):
    """Drive the connector as the runner would, through the fake's generic surface only."""
    mirror_through_the_common_surface(fake)


def test_an_audience_deleted_mid_run_is_fatal(fake):
    chimp = connector(fake)
    chimp.open()
    fake.list_id = "deleted00"  # the fake no longer knows the connector's audience
    with pytest.raises(FatalDestinationError, match="not found"):
        chimp.send_batch([change("add", "ann@example.com")])


def test_tags_go_in_bulk_through_the_tags_segment(fake):
    chimp = connector(fake)
    chimp.open()
    segment = fake.segment_id()
    assert segment is not None  # created by open(): the tag did not exist
    changes = [change("add", f"m{i}@example.com", i + 1) for i in range(450)]
    assert chimp.send_batch(changes).rejected == []
    assert fake.segment_calls == 1 and tag_calls(fake) == []
    assert len(fake.members()) == 450
    # A leaver that is no member of the audience has nothing to remove; a second connector
    # finds the same segment by name instead of creating another.
    again = connector(fake)
    again.open()
    result = again.send_batch(
        [change("remove", "m0@example.com", 1), change("remove", "stranger@example.com", 2)]
    )
    assert result.rejected == [] and fake.segment_id() == segment
    assert len(fake.segments) == 1 and len(fake.members()) == 449
    assert fake.violations == []
