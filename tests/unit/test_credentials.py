"""Credentials that refresh (audsync.destinations.auth) against the fakes' token endpoints.

Google: a service account's JSON key (the JWT grant, checked by the fake with the public half
of a key pair made here) and an OAuth refresh token; Salesforce: the refresh-token flow and the
JWT bearer flow. Each sync runs longer than its tokens live (a token ends after a few requests,
or after a second) and must succeed; a 401 costs one refresh and no row; concurrent senders
share one refresh; every token obtained is masked.
"""

from __future__ import annotations

import json

import pytest

from audsync import redact
from audsync.destinations.base import Change, FatalDestinationError
from audsync.destinations.google import GoogleCustomerMatchConnector
from audsync.destinations.salesforce import SalesforceCampaignConnector
from tests.fakes._oauth import JWT_GRANT, new_key_pair
from tests.fakes.google import FakeGoogle
from tests.fakes.salesforce import FakeSalesforce
from tests.unit._connector_helpers import Harness, run


@pytest.fixture(scope="module")
def key_pair():
    return new_key_pair()


class GoogleHarness(Harness):
    connector_class = GoogleCustomerMatchConnector
    destination_name = "google_sa"
    sync_name = "to_google"


class SalesforceHarness(Harness):
    connector_class = SalesforceCampaignConnector
    destination_name = "sf_oauth"
    sync_name = "to_salesforce"


def adds(n: int, prefix: str = "m") -> list[Change]:
    return [Change(i + 1, "add", f"{prefix}{i}@example.com", {}, None) for i in range(n)]


@pytest.fixture
def google():
    with FakeGoogle() as server:
        yield server
        assert server.violations == [], server.violations


@pytest.fixture
def salesforce():
    with FakeSalesforce() as server:
        yield server
        assert server.violations == [], server.violations


def google_service_account(fake, private_key, **extra):
    return GoogleHarness(
        fake,
        access_token=None,
        service_account_json=json.dumps(fake.service_account_key(private_key)),
        fields=(),
        **extra,
    )


# -- Google ------------------------------------------------------------------------------


def test_google_service_account_outlives_its_tokens(google, key_pair):
    private, public = key_pair
    issuer = google.use_oauth(public_key=public, max_uses=3)
    harness = google_service_account(google, private)
    harness.open()
    result = run(harness.connector, adds(20), batch_size=1, concurrency=1)
    assert result.rejected == []
    assert len(google.members([f"m{i}@example.com" for i in range(20)])) == 20
    # 20 requests, 3 a token: the connector refreshed on 401 (or before) and lost nothing.
    assert issuer.issued() >= 7 and issuer.grants == [JWT_GRANT] * issuer.issued()
    assert issuer.refused == []


def test_google_refresh_token_outlives_a_short_lifetime(google):
    issuer = google.use_oauth(lifetime_s=1.0)
    google.latency_s = 0.1
    harness = GoogleHarness(
        google,
        access_token=None,
        client_id=issuer.client_id,
        client_secret=issuer.client_secret,
        refresh_token=issuer.refresh_token,
        token_url=google.base_url + "/token",
        fields=(),
    )
    harness.open()
    result = run(harness.connector, adds(22), batch_size=1, concurrency=1)  # about 2.2 s
    assert result.rejected == []
    assert issuer.issued() >= 2 and set(issuer.grants) == {"refresh_token"}


def test_google_401_refreshes_once_and_keeps_the_batch(google, key_pair):
    private, public = key_pair
    issuer = google.use_oauth(public_key=public)
    harness = google_service_account(google, private)
    harness.open()
    google.fail_next("expired_token", path=":ingest")
    result = harness.send(adds(3))
    assert result.rejected == [] and len(result.destination_ids) == 3
    assert issuer.issued() == 2
    # A second 401 right after a refresh is fatal, not an endless loop.
    google.fail_next("expired_token", n=2, path=":ingest")
    with pytest.raises(FatalDestinationError, match="invalid or expired"):
        harness.send(adds(1, "z"))
    assert issuer.issued() == 3


def test_google_concurrent_401s_share_one_refresh(google, key_pair):
    private, public = key_pair
    issuer = google.use_oauth(public_key=public)
    google.latency_s = 0.2  # the four first requests are in flight together, on one token
    harness = google_service_account(google, private)
    harness.open()
    google.fail_next("expired_token", n=4, path=":ingest")
    result = run(harness.connector, adds(8), batch_size=2, concurrency=4)
    assert result.rejected == []
    assert issuer.issued() == 2


def test_google_tokens_are_masked(google, key_pair):
    private, public = key_pair
    issuer = google.use_oauth(public_key=public)
    harness = google_service_account(google, private)
    harness.open()
    harness.send(adds(1))
    token = harness.connector._auth.source.token()
    assert token.startswith("fake-at-") and issuer.issued() == 1
    assert harness.http.mask(f"sent {token}") == "sent ***"
    assert redact.redact(f"sent {token}") == f"sent {redact.MASK}"
    # The private key is a secret too (it may come from a file).
    assert private in harness.connector.secret_values()
    assert harness.settings["service_account_json"] in harness.connector.secret_values()


def test_google_refused_credentials_are_fatal_without_the_secret(google, key_pair):
    issuer = google.use_oauth()
    harness = GoogleHarness(
        google,
        access_token=None,
        client_id=issuer.client_id,
        client_secret=issuer.client_secret,
        refresh_token="revoked-refresh-token-999",
        token_url=google.base_url + "/token",
        fields=(),
    )
    with pytest.raises(FatalDestinationError) as caught:
        harness.open()  # the list's check needs the first token
    assert "invalid_grant" in str(caught.value)
    assert "revoked-refresh-token-999" not in str(caught.value)
    # A JWT signed by another key is refused by the fake's signature check.
    other_private, _ = new_key_pair()
    _, public = new_key_pair()
    google.use_oauth(public_key=public)
    bad = google_service_account(google, other_private)
    with pytest.raises(FatalDestinationError, match="invalid_grant"):
        bad.open()
    assert "InvalidSignatureError" in google.oauth.refused[0]


def test_google_needs_some_credentials(google):
    with pytest.raises(FatalDestinationError, match="no credentials"):
        GoogleHarness(google, access_token=None)


# -- Salesforce --------------------------------------------------------------------------


def test_salesforce_refresh_token_flow_outlives_its_sessions(salesforce):
    issuer = salesforce.use_oauth(max_uses=4)
    harness = SalesforceHarness(
        salesforce,
        access_token=None,
        instance_url=None,
        client_id=issuer.client_id,
        client_secret=issuer.client_secret,
        refresh_token=issuer.refresh_token,
        token_url=salesforce.base_url + "/services/oauth2/token",
    )
    harness.open()
    changes = [Change(i + 1, "add", f"s{i}@example.com", {"LastName": f"L{i}"}, None) for i in range(12)]
    result = run(harness.connector, changes, batch_size=2, concurrency=1)
    assert result.rejected == []
    assert set(salesforce.members([c.key for c in changes])) == {c.key for c in changes}
    assert issuer.issued() >= 3 and set(issuer.grants) == {"refresh_token"}
    assert salesforce.oauth.expired_uses >= 1  # sessions did end mid-run


def test_salesforce_jwt_bearer_flow(salesforce, key_pair, tmp_path):
    private, public = key_pair
    issuer = salesforce.use_oauth(public_key=public, lifetime_s=1.0)
    salesforce_key = tmp_path / "server.key"
    salesforce_key.write_text(private)
    harness = SalesforceHarness(
        salesforce,
        access_token=None,
        client_id=issuer.client_id,
        username="sync@example.com",
        private_key_file=str(salesforce_key),
        login_url=salesforce.base_url,
        token_lifetime_s=0.6,
    )
    harness.open()
    changes = [Change(i + 1, "add", f"j{i}@example.com", {"LastName": "J"}, None) for i in range(6)]
    import time

    for change in changes:  # spread over ~1.5 s: longer than a session lives
        assert harness.send([change]).rejected == []
        time.sleep(0.25)
    assert issuer.refused == [] and issuer.issued() >= 2
    assert set(issuer.grants) == {JWT_GRANT}
    assert private in harness.connector.secret_values()


def test_salesforce_static_token_401_stays_fatal(salesforce):
    harness = SalesforceHarness(salesforce)
    harness.open()
    salesforce.fail_next("expired_token")
    with pytest.raises(FatalDestinationError, match="INVALID_SESSION_ID"):
        harness.send([Change(1, "add", "a@example.com", {"LastName": "A"}, None)])
