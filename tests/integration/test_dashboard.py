"""The dashboard of ``audsync serve`` in a real browser (issue 15).

Debian's Chromium, headless, driven through chromium-driver with Selenium, against the real
service started as a subprocess on a free loopback port: the example shop on DuckDB, built
once for the module, its webhook sync pointed at a fake webhook that holds the members and can
reject keys. Two workspaces (the second one on the same project, with its own id and token)
show that another workspace's page is a 404. One browser for the module; the tests run in
order and share its session, as a user's visit would. Each page's screenshot is saved under
the module's tmp folder and checked not to be blank.

Set ``AUDSYNC_README_SCREENSHOT=1`` to also write the README's screenshot of the sync page
(``docs/dashboard-sync.png``).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import shutil
import statistics
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
import yaml

from tests.fakes.webhook_server import FakeWebhook
from tests.support.dbt_project import REPO_ROOT, DbtProject
from tests.support.service import ServiceProcess
from tests.support.syncs import valid_members

pytestmark = pytest.mark.slow

TOKEN_A = "shop-dashboard-token-0123456789"
TOKEN_B = "other-dashboard-token-9876543210"
WS_A = "6f0c6a56-4a43-4f44-9a51-0a0000000001"
WS_B = "6f0c6a56-4a43-4f44-9a51-0a0000000002"
WEBHOOK_SYNC = "high_value_to_webhook"
EXAMPLE_SYNCS = ("churn_risk_to_file", "high_value_to_webhook", "recent_buyers_to_file")
VIEWER_TZ = "Asia/Kolkata"  # +05:30: a local time differs from UTC in its minutes too
README_SHOT = REPO_ROOT / "docs" / "dashboard-sync.png"
WAIT_S = 90


def _sync_id(workspace_id: str, name: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:sync:{workspace_id}:{name}"))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook():
    with FakeWebhook(secret="dashboard-secret", path="/audsync") as fake:
        yield fake


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    project = DbtProject.from_example("jaffle_audiences", tmp_path_factory.mktemp("dashboard") / "shop", "duckdb")
    project.dbt("build", "--vars", '{as_of_date: "2026-09-28"}')
    return project


@pytest.fixture(scope="module")
def service(shop, hook, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dashboard-service")
    workspaces = folder / "workspaces.yml"
    entry = {"project_dir": str(shop.root), "profiles_dir": str(shop.root)}
    workspaces.write_text(yaml.safe_dump({"workspaces": [
        {"id": WS_A, "name": "shop", **entry,
         "tokens": [{"name": "ci", "sha256": hashlib.sha256(TOKEN_A.encode()).hexdigest()}]},
        # Another workspace (on the same files, with its own id and token): enough to show that
        # a token of the first never sees it.
        {"id": WS_B, "name": "other", **entry,
         "tokens": [{"name": "ops", "sha256": hashlib.sha256(TOKEN_B.encode()).hexdigest()}]},
    ]}))
    env = {"AUDSYNC_DEMO_WEBHOOK_URL": hook.url, "AUDSYNC_DEMO_WEBHOOK_SECRET": "dashboard-secret"}
    with ServiceProcess(shop, "--workspaces", str(workspaces), "--no-scheduler", "--workers", "1",
                        env=env) as running:
        yield running


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no Chromium here: the dashboard's browser tests need Debian's chromium and "
                    "chromium-driver (`apt-get install -y chromium chromium-driver`, as .ci/run does)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-default-browser-check", "--lang=en-US", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": VIEWER_TZ})
        yield driver
    finally:
        driver.quit()


# -- helpers ------------------------------------------------------------------------------------


def _by(kind: str):
    from selenium.webdriver.common.by import By

    return {"css": By.CSS_SELECTOR, "id": By.ID}[kind]


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    """Poll ``condition(driver)`` until it is truthy; fail naming ``what`` and the page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition(driver)
        except Exception:  # noqa: BLE001 - an element replaced by the page's refresh: try again
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what} on {driver.current_url}:\n{driver.page_source[:4000]}")


def _css(driver, selector: str):
    return driver.find_elements(_by("css"), selector)


def _text(driver) -> str:
    return driver.find_element(_by("css"), "body").text


def _shot(driver, folder: Path, name: str, full_page: bool = False) -> Path:
    """Save the page as PNG and check that it is not blank (pixel variance of its greys)."""
    path = folder / f"{name}.png"
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        width = driver.execute_script("return window.innerWidth")
        driver.set_window_size(max(width, 1280), min(int(height) + 140, 4000))
    driver.save_screenshot(str(path))
    _assert_not_blank(path)
    return path


def _assert_not_blank(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        grey = image.convert("L").resize((160, 120))
        pixels = list(grey.tobytes())
    spread = statistics.pstdev(pixels)
    distinct = len(set(pixels))
    assert spread > 8 and distinct > 20, f"{path} looks blank (stdev {spread:.1f}, {distinct} grey levels)"


def _sign_in(driver, base_url: str, token: str) -> None:
    driver.get(base_url + "/signin")
    field = driver.find_element(_by("id"), "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(_by("css"), "form[action='/signin'] button[type=submit]").click()


def _sync_page(service, ws: str = WS_A, name: str = WEBHOOK_SYNC) -> str:
    return f"{service.base_url}/w/{ws}/syncs/{_sync_id(ws, name)}"


def _latest_row(driver):
    rows = _css(driver, "#runs-table tbody tr")
    return rows[0] if rows else None


def _wait_run_ended(driver, count: int) -> dict:
    """Wait (the page refreshes itself) until the history has ``count`` runs and the newest ended."""
    def ended(d):
        rows = _css(d, "#runs-table tbody tr")
        if len(rows) != count or rows[0].get_attribute("data-status") in ("queued", "running"):
            return None
        if _css(d, "#busy") or d.find_element(_by("id"), "main").get_attribute("data-poll"):
            return None
        return rows[0]
    row = _wait(driver, ended, f"run {count} to end")
    counts = {cls: row.find_element(_by("css"), f".c-{cls}").text for cls in ("add", "remove", "update")}
    fail = row.find_elements(_by("css"), ".c-fail, .c-zero")[0].text
    return {"status": row.get_attribute("data-status"), "run_id": row.get_attribute("data-run-id"),
            "added": int(counts["add"].lstrip("+").replace(",", "")),
            "removed": int(counts["remove"].lstrip("−").replace(",", "")),
            "updated": int(counts["update"].lstrip("~").replace(",", "")),
            "failed": int(fail.lstrip("✕").replace(",", ""))}


def _session_cookie(driver) -> dict[str, str]:
    return {c["name"]: c["value"] for c in driver.get_cookies()}


# -- tests --------------------------------------------------------------------------------------


def test_a_wrong_token_is_refused(service, browser, shots):
    browser.get(service.base_url + "/")
    _wait(browser, lambda d: "/signin" in d.current_url, "the redirect to sign-in")
    _shot(browser, shots, "signin")
    _sign_in(browser, service.base_url, "not-a-token-of-this-service")
    alert = _wait(browser, lambda d: _css(d, ".notice-error"), "the refusal")
    assert "not known" in alert[0].text
    assert "/signin" in browser.current_url
    assert "audsync_session" not in _session_cookie(browser)
    with requests.Session() as client:
        form = client.get(service.base_url + "/signin", timeout=30).text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        answer = client.post(service.base_url + "/signin", data={"csrf": csrf, "token": TOKEN_A[:-1]}, timeout=30,
                             allow_redirects=False)
        assert answer.status_code == 401 and "audsync_session" not in answer.cookies
    # The API's rule for pages too: without a session, a page is a redirect to sign-in.
    answer = requests.get(_sync_page(service), allow_redirects=False, timeout=30)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/signin?next=")


@pytest.mark.ci
def test_sign_in_shows_the_syncs_of_the_example_project(service, browser, shots):
    _sign_in(browser, service.base_url, TOKEN_A)
    _wait(browser, lambda d: _css(d, "#syncs-table"), "the syncs page")
    assert browser.current_url == f"{service.base_url}/w/{WS_A}/"
    cookie = next(c for c in browser.get_cookies() if c["name"] == "audsync_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Lax"
    assert TOKEN_A not in cookie["value"] and hashlib.sha256(TOKEN_A.encode()).hexdigest() not in cookie["value"]
    rows = _css(browser, "#syncs-table tbody tr")
    names = sorted(r.find_element(_by("css"), ".sync-link").text for r in rows)
    assert names == sorted(EXAMPLE_SYNCS)
    webhook_row = next(r for r in rows if WEBHOOK_SYNC in r.text)
    assert "upsert" in webhook_row.text and "high_value_customers" in webhook_row.text
    assert "demo_webhook" in webhook_row.text and "no runs yet" in webhook_row.text
    assert webhook_row.find_element(_by("css"), ".badge.s-active").text.lower() == "active"
    _shot(browser, shots, "syncs")

    # The filter applies as one types (the script), and the same URL filters without it.
    search = browser.find_element(_by("id"), "q")
    search.send_keys("webhook")
    _wait(browser, lambda d: [r for r in _css(d, "#syncs-table tbody tr") if r.is_displayed()].__len__() == 1,
          "the filter to leave one sync")
    assert "q=webhook" in browser.current_url
    answer = requests.get(f"{service.base_url}/w/{WS_A}/?q=file&status=active",
                          cookies=_session_cookie(browser), timeout=30)
    assert answer.status_code == 200
    assert "churn_risk_to_file" in answer.text and WEBHOOK_SYNC not in answer.text
    answer = requests.get(f"{service.base_url}/w/{WS_A}/?status=paused", cookies=_session_cookie(browser), timeout=30)
    assert "No sync matches" in answer.text


@pytest.mark.ci
def test_a_triggered_run_appears_with_what_the_destination_received(service, browser, hook, shots):
    browser.get(f"{service.base_url}/w/{WS_A}/")
    browser.find_element(_by("css"), f"a.sync-link[href$='{_sync_id(WS_A, WEBHOOK_SYNC)}']").click()
    _wait(browser, lambda d: _css(d, "#btn-trigger"), "the sync page")
    assert "No runs yet: trigger the first one" in _text(browser)
    configuration = browser.find_element(_by("id"), "configuration").text
    assert "models/syncs/high_value_to_webhook.sql" in configuration
    assert "lifetime_value" in configuration and "Customer Value" in configuration and "hourly" in configuration

    browser.find_element(_by("id"), "btn-trigger").click()
    # While the run is queued or running the buttons are disabled and the page follows it.
    busy = _wait(browser, lambda d: _css(d, "#busy"), "the run to show as queued or running", 30)
    assert "queued or running" in busy[0].text
    assert browser.find_element(_by("id"), "btn-trigger").get_attribute("disabled") is not None
    assert browser.find_element(_by("id"), "btn-pause").get_attribute("disabled") is not None
    run = _wait_run_ended(browser, 1)
    held = hook.snapshot()["members"]
    assert run["status"] == "success", _text(browser)
    assert run["added"] == len(held) > 0 and hook.ops.get("add") == run["added"]
    assert (run["removed"], run["updated"], run["failed"]) == (0, 0, 0)
    assert _css(browser, ".badge.s-success")
    # The size chart and the changes chart are drawn, with a tooltip per run.
    assert len(_css(browser, "svg.chart circle.dot")) == 1
    assert len(_css(browser, "svg.chart rect.bar.added")) == 1
    stat = browser.find_element(_by("css"), ".stats .stat:nth-child(2) .stat-value").text
    assert int(stat.replace(",", "")) == len(held)

    # Times are shown in the viewer's time zone, with UTC on hover.
    stamp = browser.find_element(_by("css"), "#runs-table time")
    utc = dt.datetime.fromisoformat(stamp.get_attribute("datetime").replace("Z", "+00:00"))
    local = utc.astimezone(ZoneInfo(VIEWER_TZ))
    assert local.strftime("%I:%M") in stamp.text and "UTC" not in stamp.text, stamp.text
    assert stamp.get_attribute("title").endswith(" UTC") and utc.strftime("%H:%M") in stamp.get_attribute("title")
    _shot(browser, shots, "sync-detail")

    # The run's own page: planned and applied per op, trigger, duration.
    stamp.click()
    _wait(browser, lambda d: _css(d, "#counts"), "the run page")
    adds = browser.find_element(_by("css"), "#counts tr[data-op=add]").text.split()
    assert adds == ["add", f"{run['added']:,}", f"{run['added']:,}"]
    assert "trigger: manual" in _text(browser)
    assert "No row errors" in _text(browser)
    _shot(browser, shots, "run-detail")


def test_pause_and_resume(service, browser, shots):
    browser.get(_sync_page(service))
    browser.find_element(_by("id"), "btn-pause").click()
    _wait(browser, lambda d: _css(d, "#btn-resume"), "the paused page")
    assert browser.find_element(_by("css"), "h1 .badge").text.lower() == "paused"
    assert browser.find_element(_by("id"), "btn-trigger").get_attribute("disabled") is not None
    assert "Paused." in browser.find_element(_by("id"), "done").text
    api = requests.get(f"{service.base_url}/api/v1/audience-syncs/{_sync_id(WS_A, WEBHOOK_SYNC)}",
                       headers={"Authorization": f"Bearer {TOKEN_A}", "X-Workspace-ID": WS_A}, timeout=30)
    assert api.json()["status"] == "paused" and api.json()["next_run_at"] is None
    _shot(browser, shots, "sync-paused")
    browser.get(f"{service.base_url}/w/{WS_A}/?status=paused")
    assert [r.find_element(_by("css"), ".sync-link").text for r in _css(browser, "#syncs-table tbody tr")] == [WEBHOOK_SYNC]

    browser.get(_sync_page(service))
    browser.find_element(_by("id"), "btn-resume").click()
    _wait(browser, lambda d: _css(d, "#btn-pause"), "the resumed page")
    assert browser.find_element(_by("css"), "h1 .badge").text.lower() == "active"
    assert browser.find_element(_by("id"), "btn-trigger").get_attribute("disabled") is None
    api = requests.get(f"{service.base_url}/api/v1/audience-syncs/{_sync_id(WS_A, WEBHOOK_SYNC)}",
                       headers={"Authorization": f"Bearer {TOKEN_A}", "X-Workspace-ID": WS_A}, timeout=30)
    assert api.json()["status"] == "active"


def test_a_paused_sync_refuses_a_trigger_and_a_draft_has_its_buttons_disabled(service, browser, shots):
    headers = {"Authorization": f"Bearer {TOKEN_A}", "X-Workspace-ID": WS_A}
    api = f"{service.base_url}/api/v1/audience-syncs"
    assert requests.put(f"{api}/{_sync_id(WS_A, WEBHOOK_SYNC)}", json={"status": "paused"}, headers=headers,
                        timeout=60).status_code == 200
    try:
        browser.get(_sync_page(service))
        csrf = browser.find_element(_by("css"), "#actions input[name=csrf]").get_attribute("value")
        # A trigger sent anyway (the button is disabled) is refused as the API refuses it: 409.
        answer = requests.post(_sync_page(service) + "/trigger", data={"csrf": csrf}, timeout=60,
                               cookies=_session_cookie(browser), allow_redirects=False)
        assert answer.status_code == 409 and "is paused: resume it first" in answer.text
    finally:
        assert requests.put(f"{api}/{_sync_id(WS_A, WEBHOOK_SYNC)}", json={"status": "active"}, headers=headers,
                            timeout=60).status_code == 200

    created = requests.post(api, headers=headers, timeout=120, json={
        "name": "VIP draft", "audience_id": "high_value_customers", "destination_id": "demo_file",
        "status": "draft", "field_mapping": [{"source_column": "email", "destination_field": "email"}]})
    assert created.status_code == 201, created.text
    draft = created.json()
    browser.get(f"{service.base_url}/w/{WS_A}/syncs/{draft['id']}")
    assert browser.find_element(_by("css"), "h1 .badge").text.lower() == "draft"
    for button in ("btn-trigger", "btn-pause"):
        assert browser.find_element(_by("id"), button).get_attribute("disabled") is not None, button
    assert "This sync is a draft" in _text(browser) and "No runs yet: trigger the first one" in _text(browser)
    configuration = browser.find_element(_by("id"), "configuration").text
    assert f"models/audsync_api/{draft['slug']}.sql" in configuration and "managed by the API" in configuration
    _shot(browser, shots, "sync-draft")
    browser.get(f"{service.base_url}/w/{WS_A}/?status=draft")
    assert [r.find_element(_by("css"), ".sync-link").text for r in _css(browser, "#syncs-table tbody tr")] == [
        "VIP draft"]
    assert requests.delete(f"{api}/{draft['id']}", headers=headers, timeout=120).status_code == 200


def test_row_errors_of_a_run_with_rejections_download_as_csv(service, browser, hook, shop, downloads, shots):
    # Day 2 of the shop: new high-value customers enter; the destination rejects two of them.
    # The sync's own relation S is what is sent: its audience less the do_not_contact list.
    shop.dbt("run", "--vars", '{as_of_date: "2026-10-12"}', "--select", "customer_stats", "high_value_customers",
             WEBHOOK_SYNC)
    audience = valid_members(shop.query(f"select _audsync_key from {shop.relation(WEBHOOK_SYNC)}"))
    entering = sorted(set(audience) - set(hook.snapshot()["members"]))
    assert len(entering) >= 3, entering
    rejected = entering[:2]
    hook.reject_keys = set(rejected)

    browser.get(_sync_page(service))
    browser.find_element(_by("id"), "btn-trigger").click()
    run = _wait_run_ended(browser, 2)
    assert run["failed"] == 2 and run["added"] == len(entering) - 2, run
    section = browser.find_element(_by("id"), "row-errors").text
    assert "2 rows rejected" in section
    for key in rejected:
        assert key in section
    assert "rejected by the fake" in section and "rejected" in [c.text for c in _css(browser, "#row-errors code")]

    for old in downloads.glob("*"):
        old.unlink()
    browser.find_element(_by("id"), "csv-link").click()
    csv_file = _wait(browser, lambda d: next((p for p in downloads.glob("*.csv")), None), "the CSV download", 30)
    _wait(browser, lambda d: not list(downloads.glob("*.crdownload")), "the download to finish", 30)
    rows = list(csv.DictReader(io.StringIO(csv_file.read_text())))
    assert sorted(r["member_key"] for r in rows) == rejected
    assert {(r["op"], r["error_code"], r["retryable"]) for r in rows} == {("add", "rejected", "False")}
    assert csv_file.name == f"{WEBHOOK_SYNC}__{run['run_id']}__row_errors.csv"

    if os.environ.get("AUDSYNC_README_SCREENSHOT") == "1":
        # The README's picture: the sync page with a run that had rejections.
        browser.get(_sync_page(service))
        _wait(browser, lambda d: _css(d, "time.local"), "local times")
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_shot(browser, shots, "readme-sync-detail", full_page=True), README_SHOT)
        browser.set_window_size(1280, 900)
        browser.get(_sync_page(service))

    # The destination refuses the credentials: the run fails, and the sync is in error with
    # the reason, on its page and in the list.
    hook.reject_keys = set()
    hook.fail_next(1, 401, body="invalid signature")
    browser.find_element(_by("id"), "btn-trigger").click()
    failed = _wait_run_ended(browser, 3)
    assert failed["status"] == "error"
    assert browser.find_element(_by("css"), "h1 .badge").text.lower() == "error"
    reason = browser.find_element(_by("css"), ".notice-error").text
    assert "The last run failed" in reason and "401" in reason, reason
    browser.get(f"{service.base_url}/w/{WS_A}/")
    row = next(r for r in _css(browser, "#syncs-table tbody tr") if WEBHOOK_SYNC in r.text)
    assert row.get_attribute("data-status") == "error" and "401" in row.find_element(_by("css"), ".error-text").text
    _shot(browser, shots, "syncs-with-error")

    # Accepted at last: the next run sends the two again, the sync is active again, and the
    # last run has no errors.
    browser.get(_sync_page(service))
    browser.find_element(_by("id"), "btn-trigger").click()
    fourth = _wait_run_ended(browser, 4)
    assert fourth["status"] == "success" and fourth["added"] == 2 and set(rejected) <= set(hook.snapshot()["members"])
    assert browser.find_element(_by("css"), "h1 .badge").text.lower() == "active"
    assert len(_css(browser, "svg.chart circle.dot")) == 4
    assert "had no row errors" in browser.find_element(_by("id"), "row-errors").text
    browser.get(f"{service.base_url}/w/{WS_A}/syncs/{_sync_id(WS_A, WEBHOOK_SYNC)}/runs/{run['run_id']}")
    text = _text(browser)
    assert "2 rows rejected" in text and all(k in text for k in rejected)
    _shot(browser, shots, "run-with-errors")


def test_another_workspace_is_a_404_and_forms_need_their_csrf_token(service, browser, shots):
    other_page = f"{service.base_url}/w/{WS_B}/syncs/{_sync_id(WS_B, WEBHOOK_SYNC)}"
    browser.get(other_page)
    assert "There is no such page in your workspaces" in _text(browser)
    cookies = _session_cookie(browser)
    for url in (f"{service.base_url}/w/{WS_B}/", other_page,
                f"{service.base_url}/w/00000000-0000-0000-0000-000000000000/",
                f"{service.base_url}/w/{WS_A}/syncs/{_sync_id(WS_B, WEBHOOK_SYNC)}"):
        assert requests.get(url, cookies=cookies, timeout=30, allow_redirects=False).status_code == 404, url
    answer = requests.post(other_page + "/trigger", cookies=cookies, timeout=30, allow_redirects=False,
                           data={"csrf": "x"})
    assert answer.status_code in (403, 404)
    _shot(browser, shots, "not-found")

    # The other workspace's own token does see it (the 404 is about the token, not the page).
    with requests.Session() as other:
        form = other.get(service.base_url + "/signin", timeout=30).text
        csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        signed = other.post(service.base_url + "/signin", data={"csrf": csrf, "token": TOKEN_B, "next": "/"},
                            timeout=30)
        assert signed.status_code == 200 and signed.url == f"{service.base_url}/w/{WS_B}/"
        assert other.get(other_page, timeout=30).status_code == 200
        assert other.get(_sync_page(service), timeout=30).status_code == 404

    # An action without the session's CSRF token (a cross-site form) changes nothing.
    for data in ({}, {"csrf": "forged"}):
        answer = requests.post(_sync_page(service) + "/pause", cookies=cookies, data=data, timeout=30,
                               allow_redirects=False)
        assert answer.status_code == 403, answer.text[:500]
    browser.get(_sync_page(service))
    csrf = browser.find_element(_by("css"), "#actions input[name=csrf]").get_attribute("value")
    answer = requests.post(_sync_page(service) + "/pause", cookies=cookies, data={"csrf": csrf}, timeout=30,
                           headers={"Origin": "http://evil.example"}, allow_redirects=False)
    assert answer.status_code == 403
    api = requests.get(f"{service.base_url}/api/v1/audience-syncs/{_sync_id(WS_A, WEBHOOK_SYNC)}",
                       headers={"Authorization": f"Bearer {TOKEN_A}", "X-Workspace-ID": WS_A}, timeout=30)
    assert api.json()["status"] == "active"


def test_phone_width_and_sign_out(service, browser, shots):
    browser.set_window_size(390, 844)
    try:
        for name, url in (("syncs-phone", f"{service.base_url}/w/{WS_A}/"), ("sync-detail-phone", _sync_page(service))):
            browser.get(url)
            _wait(browser, lambda d: _css(d, "time.local"), "local times")
            overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 1, f"{name}: the page is {overflow}px wider than a phone"
            cut = browser.execute_script(
                "return Array.from(document.querySelectorAll('.table-wrap, .card, .stat'))"
                ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className + ' in #' +"
                " ((e.closest('section') || {}).id || '?') + ': ' + Array.from(e.querySelectorAll('*'))"
                ".filter(c => c.getBoundingClientRect().right > e.getBoundingClientRect().right + 1)"
                ".slice(0, 2).map(c => c.tagName + ' ' + c.textContent.slice(0, 80)).join(' | '))")
            assert cut == [], f"{name}: content wider than its box at a phone's width: {cut}"
            _shot(browser, shots, name)
    finally:
        browser.set_window_size(1280, 900)
    browser.find_element(_by("css"), "form.signout button").click()
    _wait(browser, lambda d: "/signin" in d.current_url, "the sign-in page after signing out")
    assert "audsync_session" not in _session_cookie(browser)
    browser.get(_sync_page(service))
    assert "/signin" in browser.current_url


@pytest.mark.ci
def test_the_readme_screenshot_is_there_and_not_blank():
    assert README_SHOT.exists(), f"{README_SHOT} is missing: run this module with AUDSYNC_README_SCREENSHOT=1"
    _assert_not_blank(README_SHOT)
    assert README_SHOT.relative_to(REPO_ROOT).as_posix() in (REPO_ROOT / "README.md").read_text()
