"""The dashboard's parts that need no browser: signed cookies, sessions and CSRF tokens, the
SVG charts, the CSV cells, the sign-in redirect target, and the templates shipped in the wheel.

The pages themselves are tested in a real browser in tests/integration/test_dashboard.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from audsync.service.dashboard import charts
from audsync.service.dashboard.auth import Sessions
from audsync.service.dashboard.pages import Dashboard, _cell, duration, environment, time_tag

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_signed_cookie_round_trips_and_a_tampered_one_is_refused():
    sessions = Sessions(secret=b"k" * 32)
    signed = sessions.sign("abc")
    assert sessions.unsign(signed) == "abc"
    value, _, mac = signed.rpartition(".")
    assert sessions.unsign(f"abd.{mac}") is None
    assert sessions.unsign(f"{value}.{'0' * len(mac)}") is None
    assert sessions.unsign("abc") is None and sessions.unsign(None) is None and sessions.unsign("") is None
    assert Sessions(secret=b"other" * 8).unsign(signed) is None


def test_sessions_end_expire_and_keep_only_the_token_digest():
    sessions = Sessions(secret=b"k" * 32, ttl_s=60)
    session = sessions.create("d" * 64)
    cookie = sessions.sign(session.id)
    assert sessions.get(cookie) is session and session.token_digest == "d" * 64
    assert "d" * 64 not in cookie
    sessions.end(cookie)
    assert sessions.get(cookie) is None
    short = Sessions(secret=b"k" * 32, ttl_s=0.05)
    cookie = short.sign(short.create("e" * 64).id)
    time.sleep(0.1)
    assert short.get(cookie) is None
    # A cookie for an id the service never made (signed with its key) finds nothing either.
    assert sessions.get(sessions.sign("made-up")) is None


def test_csrf_tokens_are_bound_to_their_session():
    sessions = Sessions(secret=b"k" * 32)
    one, two = sessions.create("a" * 64), sessions.create("b" * 64)
    token = sessions.csrf_for(one.id)
    assert sessions.csrf_ok(one.id, token)
    assert not sessions.csrf_ok(two.id, token)
    assert not sessions.csrf_ok(one.id, "") and not sessions.csrf_ok(one.id, None) and not sessions.csrf_ok(None, token)
    assert token != sessions.sign(one.id).rpartition(".")[2]  # not the cookie's own signature


def test_only_local_paths_are_followed_after_sign_in():
    for target in ("//evil.example/x", "https://evil.example/", "http:/x", "\\\\evil", "", None, "w/x", "/\\evil"):
        assert Dashboard._safe_next(target) == "/", target
    assert Dashboard._safe_next("/w/abc/syncs/s?page=2") == "/w/abc/syncs/s?page=2"


def test_csv_cells_never_start_a_formula():
    assert [_cell(v) for v in ("=1+1", "+1", "-2", "@x", "a@b.c", None, 3, "\tx")] == [
        "'=1+1", "'+1", "'-2", "'@x", "a@b.c", "", "3", "'\tx"]


def test_times_are_time_elements_with_utc_on_hover():
    tag = str(time_tag("2026-12-01T21:14:05.123456Z"))
    assert tag == ('<time datetime="2026-12-01T21:14:05.123456Z" title="2026-12-01 21:14:05 UTC">'
                   "2026-12-01 21:14 UTC</time>")
    assert "never" in str(time_tag(None)) and "not scheduled" in str(time_tag("", "not scheduled"))
    assert str(time_tag('"><script>')).count("<script>") == 0
    assert [duration(v) for v in (None, 850, 4200, 185_000)] == ["–", "850 ms", "4.2 s", "3 min 5 s"]


def _points(values):
    return [charts.Point(f"2026-12-0{i + 1}T10:00:00Z", f"run {i} <b>", v) for i, v in enumerate(values)]


def test_the_charts_draw_one_mark_per_run_scaled_to_round_numbers_and_escape_text():
    runs = _points([{"held": 10, "rows_added": 10, "rows_removed": 0, "rows_updated": 0},
                    {"held": 22, "rows_added": 14, "rows_removed": 2, "rows_updated": 5}])
    line = str(charts.line_chart(runs, "held", "Size"))
    assert line.count("<circle") == 2 and "<path" in line and "22 members" in line
    assert "<b>" not in line and "&lt;b&gt;" in line
    assert ">24<" in line and ">12<" in line  # 22 -> a top of 24 with round quarters
    bars = str(charts.bar_chart(runs, "Changes"))
    assert bars.count("<rect") == 6 and bars.count('class="bar added"') == 2
    assert "in all 24 added, 2 removed, 5 updated" in bars
    assert 'data-datetime="2026-12-01T10:00:00Z"' in bars and 'data-datetime="2026-12-02T10:00:00Z"' in bars
    # The tallest bar reaches 14/16 of the plot (top 16: quarters of 4).
    assert ">16<" in bars
    assert [charts._nice_max(v) for v in (0, 3, 5, 22, 41, 99, 1234)] == [4, 4, 8, 24, 60, 100, 1600]


def test_every_template_renders_from_the_package():
    env = environment()
    folder = Path(env.loader.searchpath[0])
    names = sorted(p.name for p in folder.glob("*.html"))
    assert {"base.html", "syncs.html", "sync.html", "run.html", "signin.html", "error.html"} <= set(names)
    html = env.get_template("error.html").render(title="T <x>", message="M", signed_in=False, workspaces=[])
    assert "T &lt;x&gt;" in html and '/static/app.css' in html and '/static/app.js' in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from elsewhere


def test_the_package_build_ships_the_templates_and_static_files(tmp_path):
    # setuptools' build_py (what a wheel or a non-editable install copies) on a copy of the
    # package, so that the checkout is left alone.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "python", source / "python", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", source / "pyproject.toml")
    shutil.copy(REPO_ROOT / "README.md", source / "README.md")
    done = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                           "--build-lib", str(tmp_path / "lib")], cwd=source, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    built = tmp_path / "lib" / "audsync" / "service" / "dashboard"
    for part in ("templates/base.html", "templates/sync.html", "templates/syncs.html", "templates/run.html",
                 "templates/signin.html", "static/app.css", "static/app.js", "static/favicon.svg"):
        assert (built / part).is_file(), part


def test_the_pages_are_mounted_in_the_service_but_left_out_of_the_openapi_document():
    from audsync.service.app import create_app
    from audsync.service.workspaces import Registry

    app = create_app(Registry([]), scheduler=False, workers=1)
    ids = {"workspace_id": "w", "sync_id": "s", "run_id": "r"}
    assert app.url_path_for("home") == "/" and app.url_path_for("signin") == "/signin"
    assert app.url_path_for("syncs_page", workspace_id="w") == "/w/w/"
    assert app.url_path_for("sync_page", workspace_id="w", sync_id="s") == "/w/w/syncs/s"
    assert app.url_path_for("row_errors_csv", **ids) == "/w/w/syncs/s/runs/r/row-errors.csv"
    assert app.url_path_for("dashboard-static", path="app.js") == "/static/app.js"
    documented = set(app.openapi()["paths"])
    assert documented and all(p.startswith(("/api/", "/healthz")) for p in documented), documented


def test_failed_sign_ins_from_one_address_are_limited():
    from audsync.service.dashboard import pages
    from audsync.service.workspaces import Registry

    dashboard = Dashboard(Registry([]), manager=None)
    for _ in range(pages.SIGNIN_FAILURES - 1):
        assert not dashboard._too_many_failures("10.0.0.1", failed=True)
    assert dashboard._too_many_failures("10.0.0.1", failed=True)
    assert dashboard._too_many_failures("10.0.0.1")
    assert not dashboard._too_many_failures("10.0.0.2")  # another address is not held up
