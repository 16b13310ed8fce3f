"""One list lifecycle for the five connectors that create lists (Meta, Google, HubSpot,
Klaviyo, the Salesforce campaign): no sequence of timeouts and crashes makes a second list.

Against each fake: a create whose answer is lost (the fake creates, then answers too late) is
not sent again, the list is found by name and its id recorded at once through
``SyncInfo.remember``; a run that crashed between the create and the record finds the list by
name on the next run; a remembered list that was deleted is replaced by one found or created;
``create_if_missing`` is parsed the same way everywhere, strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import time

import pytest

from audsync.destinations.base import FatalDestinationError
from audsync.destinations.facebook import FacebookCustomAudienceConnector
from audsync.destinations.google import GoogleCustomerMatchConnector
from audsync.destinations.hubspot import HubspotListConnector
from audsync.destinations.klaviyo import KlaviyoListConnector
from audsync.destinations.salesforce import SalesforceCampaignConnector
from tests.fakes.facebook import FakeFacebook
from tests.fakes.google import FakeGoogle
from tests.fakes.hubspot import FakeHubSpot
from tests.fakes.klaviyo import FakeKlaviyo
from tests.fakes.salesforce import FakeSalesforce
from tests.unit._connector_helpers import Harness


@dataclass
class Case:
    name: str
    fake: Callable[[], Any]
    connector: type
    key: str
    name_key: str
    create_path: str
    count: Callable[[Any], int]
    timeout: dict[str, Any]
    delete: Callable[[Any, str], None]


def _delete_hubspot(fake, list_id):
    with fake._lock:
        fake.lists.pop(list_id, None)


def _delete_klaviyo(fake, list_id):
    with fake._lock:
        fake.lists.pop(list_id, None)


def _delete_salesforce(fake, campaign_id):
    with fake._lock:
        fake.records["Campaign"].pop(campaign_id, None)


CASES = [
    Case("meta", FakeFacebook, FacebookCustomAudienceConnector, "audience_id", "audience_name",
         "customaudiences", lambda f: len(f.audience_ids()), {"seconds": 1.5},
         lambda f, i: f.delete_audience(i)),
    Case("google", FakeGoogle, GoogleCustomerMatchConnector, "user_list_id", "user_list_name",
         "/userLists", lambda f: len(f.user_list_ids()), {"seconds": 1.5},
         lambda f, i: f.delete_user_list(i)),
    Case("hubspot", lambda: FakeHubSpot(timeout_s=1.5), HubspotListConnector, "list_id",
         "list_name", "/crm/lists/", lambda f: len(f.lists), {}, _delete_hubspot),
    Case("klaviyo", FakeKlaviyo, KlaviyoListConnector, "list_id", "list_name", "/api/lists",
         lambda f: len(f.lists), {"delay_s": 1.5}, _delete_klaviyo),
    Case("salesforce", lambda: FakeSalesforce(timeout_s=1.5), SalesforceCampaignConnector,
         "campaign_id", "campaign_name", "sobjects/Campaign",
         lambda f: len(f.records["Campaign"]), {}, _delete_salesforce),
]  # fmt: skip


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    with request.param.fake() as fake:
        yield request.param, fake
        assert fake.violations == [], fake.violations


def settle(fake, timeout_s: float = 5.0) -> None:
    """Wait until the fake has no request in flight (a held create has been applied)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with fake._lock:
            if fake._concurrent == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the fake still has requests in flight")


def harness(case: Case, fake, *, state=None, remembered=None, create="true", timeout_s=5.0):
    class H(Harness):
        connector_class = case.connector
        destination_name = f"{case.name}_dest"
        sync_name = "lifecycle_sync"

    h = H(
        fake,
        state=state,
        timeout_s=timeout_s,
        **{case.key: None, case.name_key: "VIP buyers", "create_if_missing": create},
    )
    if remembered is not None:
        h.connector.sync = replace(h.connector.sync, remember=remembered.append)
    return h


def test_a_create_that_times_out_is_not_sent_again(case):
    case, fake = case
    before = case.count(fake)
    saved: list[dict] = []
    fake.fail_next("timeout", path=case.create_path, method="POST", **case.timeout)
    h = harness(case, fake, remembered=saved, timeout_s=0.5)
    state = h.open()
    settle(fake)
    assert case.count(fake) == before + 1
    list_id = state[case.key]
    # Recorded at once, before open() returned, with the id the vendor made.
    assert saved == [{case.key: list_id}]
    # The next runs reuse it, whatever they remember.
    assert harness(case, fake, state=state).open() is None
    assert harness(case, fake).open() == {case.key: list_id}
    assert case.count(fake) == before + 1


def test_a_crash_between_create_and_record_makes_no_second_list(case):
    case, fake = case
    before = case.count(fake)

    def crash(_state):
        raise KeyboardInterrupt("killed before the id was saved")

    first = harness(case, fake)
    first.connector.sync = replace(first.connector.sync, remember=crash)
    with pytest.raises(KeyboardInterrupt):
        first.open()
    assert case.count(fake) == before + 1
    # The next run has no state: it finds the list by name.
    saved: list[dict] = []
    state = harness(case, fake, remembered=saved).open()
    assert saved == [state] and case.count(fake) == before + 1


def test_a_remembered_list_that_is_gone_is_replaced_once(case):
    case, fake = case
    state = harness(case, fake).open()
    case.delete(fake, state[case.key])
    count = case.count(fake)
    again = harness(case, fake, state=state).open()
    assert again[case.key] != state[case.key]
    assert case.count(fake) == count + 1
    # Without create_if_missing a vanished list stops the run, saying so.
    case.delete(fake, again[case.key])
    with pytest.raises(FatalDestinationError, match="no longer exists"):
        harness(case, fake, state=again, create="no").open()


@pytest.mark.parametrize("value", ["ture", "maybe", "2"])
def test_create_if_missing_is_parsed_strictly_everywhere(case, value):
    case, fake = case
    with pytest.raises(FatalDestinationError, match="must be true or false"):
        harness(case, fake, create=value).open()


@pytest.mark.parametrize("value", [False, "no", "off", "0"])
def test_create_if_missing_off_never_creates(case, value):
    case, fake = case
    before = case.count(fake)
    with pytest.raises(FatalDestinationError, match="create_if_missing"):
        harness(case, fake, create=value).open()
    assert case.count(fake) == before
