"""``audsync verify`` through the real CLI against each listable fake (HubSpot list
memberships, Mailchimp tag members, Klaviyo list profiles, Salesforce campaign members), with
page sizes small enough that the read-back pages: an agreeing destination exits 0; a drift
injected in the fake (a member removed by hand, a member audsync never sent) is found (exit
3, with counts and a sample); ``--repair`` plus a run heals it. The webhook lists its members
when it has a ``list_url`` (the fake's signed, paged listing); without one, like the
destinations that cannot list (Meta, Google), verify exits 2 saying so."""

from __future__ import annotations

import json

import pytest

from audsync.destinations import hubspot, klaviyo, mailchimp
from tests.fakes.facebook import FakeFacebook
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.klaviyo import FakeKlaviyo
from tests.fakes.mailchimp import FakeMailchimp
from tests.fakes.salesforce import FakeSalesforce
from tests.fakes.webhook_server import FakeWebhook
from tests.support.dbt_project import DbtProject
from tests.support.syncs import audsync, run_rows, write_audience, write_destinations, write_sync


def _hubspot_drop(fake, email):
    with fake._lock:
        fake.lists[fake.default_list_id]["members"].pop(fake._by_email[email], None)


def _mailchimp_drop(fake, email):
    from tests.fakes.mailchimp import subscriber_hash

    with fake._lock:
        fake.list_members[subscriber_hash(email)]["tags"].discard(fake.tag)


def _klaviyo_drop(fake, email):
    with fake._lock:
        fake.lists[fake.list_id]["members"].discard(fake._by_email(email))


def _salesforce_drop(fake, email):
    member = fake.member_id(email)
    with fake._lock:
        fake.records["CampaignMember"].pop(member, None)


CASES = {
    "hubspot": (FakeHubSpot, _hubspot_drop),
    "mailchimp": (FakeMailchimp, _mailchimp_drop),
    "klaviyo": (FakeKlaviyo, _klaviyo_drop),
    "salesforce": (FakeSalesforce, _salesforce_drop),
}


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of 2 or 3 members, so that 8 members take several pages."""
    monkeypatch.setattr(hubspot, "MEMBERSHIP_PAGE", 3)
    monkeypatch.setattr(mailchimp, "SEGMENT_PAGE", 3)
    monkeypatch.setattr(klaviyo, "PROFILES_PAGE", 2)


def verify_json(project, *args, expect):
    result = audsync(project, "verify", "s", "--format", "json", *args, expect=expect)
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_verify_finds_drift_and_repair_heals_it(tmp_path, small_pages, name):
    drift_and_heal(DbtProject(tmp_path / "proj", "duckdb"), name)


@pytest.mark.slow
def test_verify_compares_inside_every_warehouse(dbt_project_factory, small_pages):
    """The temporary table and the comparison's SQL on each warehouse (HubSpot's read-back)."""
    drift_and_heal(dbt_project_factory(), "hubspot")


def drift_and_heal(project, name):
    fake_class, drop = CASES[name]
    with fake_class() as fake:
        write_destinations(project, {"dest": fake.destination_config()})
        write_sync(project, "s", destination="dest", mapping=fake.field_mapping(),
                   config=fake.sync_config() or None)
        rows = [(f"v{i}@example.com", "Ann", float(i)) for i in range(8)]
        # One key in another case: compared as the destination stores it.
        rows[0] = ("V0@Example.com", "Ann", 0.0)
        write_audience(project, rows)
        project.dbt("run")
        audsync(project, "run", "--select", "s")
        agreed = verify_json(project, expect=0)
        assert (agreed["listed"], agreed["missing"], agreed["unexpected"]) == (8, 0, 0)

        drop(fake, "v3@example.com")
        fake.seed_members({"stranger@example.com": {}})
        drift = verify_json(project, expect=3)
        assert (drift["missing"], drift["unexpected"]) == (1, 1)
        assert drift["missing_sample"] == ["v3@example.com"]
        assert drift["unexpected_sample"] == ["stranger@example.com"]

        repaired = verify_json(project, "--repair", expect=3)
        assert repaired["repaired"] == 2
        audsync(project, "run", "--select", "s")
        assert run_rows(project, "s")[-1]["status"] == "success"
        healed = verify_json(project, expect=0)
        assert (healed["listed"], healed["missing"], healed["unexpected"]) == (8, 0, 0)
        wanted = {r[0].lower() for r in rows}
        assert {k.lower() for k in fake.members(sorted(wanted | {"stranger@example.com"}))} == wanted
        assert fake.violations == []


def test_verify_says_when_a_destination_cannot_list(tmp_path):
    project = DbtProject(tmp_path / "proj", "duckdb")
    with FakeFacebook() as fake:
        write_destinations(project, {"dest": fake.destination_config()})
        write_sync(project, "s", destination="dest", mapping=fake.field_mapping())
        write_audience(project, [("a@example.com", "Ann", 1.0)])
        project.dbt("run")
        result = audsync(project, "verify", "s", expect=2)
        assert "cannot be verified" in result.output and "does not list" in result.output


@pytest.mark.slow
def test_webhook_with_a_list_url_is_verified_and_repaired(tmp_path):
    """A signed webhook with a listing URL: pages of 3 members, a drift (one member removed
    by hand in the receiver, one added) found with both counts, healed by --repair and a run."""
    project = DbtProject(tmp_path / "proj", "duckdb")
    with FakeWebhook(secret="whsec-verify", list_page_size=3) as fake:
        write_destinations(project, {"dest": {"type": "webhook", "url": fake.url,
                                              "secret": "whsec-verify", "list_url": fake.list_url}})
        write_sync(project, "s", destination="dest")
        rows = [(f"v{i}@example.com", "Ann", float(i)) for i in range(8)]
        # A key in another case: the webhook keeps keys as sent, and compares them so.
        rows[0] = ("V0@Example.com", "Ann", 0.0)
        write_audience(project, rows)
        project.dbt("run")
        audsync(project, "run", "--select", "s")
        agreed = verify_json(project, expect=0)
        assert (agreed["listed"], agreed["missing"], agreed["unexpected"]) == (8, 0, 0)
        assert fake.list_requests == 3  # 8 members, 3 a page

        fake.drop_members(["v3@example.com"])
        fake.seed_members({"stranger@example.com": {}})
        drift = audsync(project, "verify", "s", expect=3)
        assert "missing from the destination: 1" in drift.output
        assert "in the destination, never sent: 1" in drift.output
        drift = verify_json(project, expect=3)
        assert (drift["missing"], drift["unexpected"]) == (1, 1)
        assert drift["missing_sample"] == ["v3@example.com"]
        assert drift["unexpected_sample"] == ["stranger@example.com"]

        repaired = verify_json(project, "--repair", expect=3)
        assert repaired["repaired"] == 2
        audsync(project, "run", "--select", "s")
        assert run_rows(project, "s")[-1]["status"] == "success"
        healed = verify_json(project, expect=0)
        assert (healed["listed"], healed["missing"], healed["unexpected"]) == (8, 0, 0)
        assert set(fake.members) == {r[0] for r in rows}
        assert fake.violations == [] and fake.bad_signatures == 0


def test_webhook_without_a_list_url_cannot_be_verified(tmp_path):
    project = DbtProject(tmp_path / "proj", "duckdb")
    with FakeWebhook() as fake:
        write_destinations(project, {"dest": {"type": "webhook", "url": fake.url}})
        write_sync(project, "s", destination="dest")
        write_audience(project, [("a@example.com", "Ann", 1.0)])
        project.dbt("run")
        result = audsync(project, "verify", "s", expect=2)
        assert "cannot be verified" in result.output and "list_url" in result.output
        assert fake.list_requests == 0
