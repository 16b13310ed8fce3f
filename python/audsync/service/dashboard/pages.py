"""The dashboard's routes: sign-in, the syncs, a sync, a run, and the sync's actions.

Pages are rendered on the server from the package's Jinja2 templates, with the data layer the
REST API uses (:mod:`..syncs`, :mod:`..runs`, and :mod:`.data`), so a page shows what the API
answers. Authorisation is the API's: a session's token must reach the workspace in the URL,
and a workspace it does not reach is a 404, exactly as one that does not exist. Actions
(trigger, pause, resume) are POST forms with a CSRF token, and call the same functions as the
API's endpoints; the routes are left out of the OpenAPI document.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.staticfiles import StaticFiles

from ... import __version__
from ...errors import AudsyncError
from ...redact import redact
from .. import runs as runs_data
from .. import syncs as syncs_data
from ..errors import ApiError, Conflict, NotFound
from ..workspaces import Registry, Workspace, digest
from . import charts, data
from .auth import PRE_COOKIE, PRE_TTL_S, SESSION_COOKIE, Sessions, new_nonce

HERE = Path(__file__).parent
# Failed sign-ins allowed per client address in a minute before the form answers 429: the
# API's rate limit keys on the bearer header, which a form post does not have.
SIGNIN_FAILURES = 20
SIGNIN_WINDOW_S = 60.0
STATUSES = ("draft", "active", "paused", "error")
ACTIONS = ("trigger", "pause", "resume")
DONE = {
    "trigger": "Run queued. It appears in the history below; this page follows it until it ends.",
    "pause": "Paused. The scheduler skips this sync until you resume it.",
    "resume": "Resumed. The sync runs on its schedule again.",
}
# Pages are the service's own: no framing, no script or style from anywhere else.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Page(Exception):
    """A page to answer instead of the one asked for (an error page, a redirect)."""

    def __init__(self, response: Response):
        self.response = response


def environment() -> Environment:
    """The Jinja2 environment of the dashboard's templates (autoescaped)."""
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["time"] = time_tag
    env.filters["num"] = lambda v: "–" if v is None else f"{int(v):,}"
    env.filters["duration"] = duration
    env.filters["pct"] = lambda v: "–" if v is None else f"{v * 100:.1f}%"
    env.globals["version"] = __version__
    return env


def time_tag(value: str | None, empty: str = "never") -> Markup:
    """``<time>`` with the UTC time as text and on hover; the page's script shows it in the
    viewer's time zone."""
    if not value:
        return Markup('<span class="muted">{}</span>').format(empty)
    text = value.replace("T", " ").replace("Z", "")[:16] + " UTC"
    full = value.replace("T", " ").replace("Z", "")[:19] + " UTC"
    return Markup('<time datetime="{}" title="{}">{}</time>').format(value, full, text)


def duration(ms: int | None) -> str:
    """Milliseconds as ``850 ms``, ``4.2 s``, ``3 min 5 s``."""
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(int(ms / 1000), 60)
    return f"{minutes} min {seconds} s"


def mount(app: FastAPI, registry: Registry, manager) -> None:
    """Add the dashboard's pages and static files to the service's app."""
    Dashboard(registry, manager).mount(app)


class Dashboard:
    """The pages over one registry of workspaces and the service's run manager."""

    def __init__(self, registry: Registry, manager, sessions: Sessions | None = None):
        self.registry = registry
        self.manager = manager
        self.sessions = sessions or Sessions()
        self.env = environment()
        self._failures: dict[str, collections.deque] = {}
        self._failures_lock = threading.Lock()

    def _too_many_failures(self, client: str, failed: bool = False) -> bool:
        """Whether ``client`` failed to sign in too often lately (recording a failure first)."""
        now = time.monotonic()
        with self._failures_lock:
            if len(self._failures) > 10_000:  # bounded memory: forget idle clients
                self._failures = {k: v for k, v in self._failures.items() if v and v[-1] > now - SIGNIN_WINDOW_S}
            times = self._failures.setdefault(client, collections.deque())
            while times and times[0] <= now - SIGNIN_WINDOW_S:
                times.popleft()
            if failed:
                times.append(now)
            return len(times) >= SIGNIN_FAILURES

    # -- plumbing -----------------------------------------------------------------------------

    def mount(self, app: FastAPI) -> None:
        app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="dashboard-static")
        app.include_router(self.router())

    def render(self, request: Request, template: str, http_status: int = 200, **context: Any) -> HTMLResponse:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        context.setdefault("signed_in", session is not None)
        context.setdefault("csrf", self.sessions.csrf_for(session.id) if session else "")
        context.setdefault("workspaces", self._reached(session) if session else [])
        html = self.env.get_template(template).render(request=request, **context)
        return HTMLResponse(html, status_code=http_status, headers=SECURITY_HEADERS)

    def error_page(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return self.render(request, "error.html", http_status=status, title=title, message=message)

    def _reached(self, session) -> list[tuple[Workspace, str]]:
        """The workspaces the session's token reaches now (re-checked on every request)."""
        reached = []
        for ws in self.registry.workspaces.values():
            name = ws.token_name(session.token_digest)
            if name is not None:
                reached.append((ws, name))
        return reached

    def _signed_in(self, request: Request):
        """The session, or a redirect to the sign-in page that comes back here."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None or not self._reached(session):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse("/signin?" + urllib.parse.urlencode({"next": target}), status_code=303)
            if session is not None:  # its token no longer reaches anything
                self.sessions.end(request.cookies.get(SESSION_COOKIE))
                response.delete_cookie(SESSION_COOKIE, path="/")
            raise _Page(response)
        return session

    def _workspace(self, request: Request, workspace_id: str) -> tuple[Workspace, str]:
        session = self._signed_in(request)
        for ws, name in self._reached(session):
            if ws.id == workspace_id:
                return ws, name
        # As the API: another workspace's page is exactly a missing one.
        raise _Page(self.error_page(request, 404, "Not found", "There is no such page in your workspaces."))

    async def _form(self, request: Request, bound_to: str | None) -> dict[str, str]:
        """The POSTed form, after the cross-site checks (403 when they fail)."""
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = urllib.parse.urlsplit(origin).netloc
            if host != request.headers.get("host"):
                raise _Page(self.error_page(request, 403, "Refused", "This form was sent from another site."))
        body = (await request.body())[:100_000].decode("utf-8", "replace")
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body, keep_blank_values=True).items()}
        if not self.sessions.csrf_ok(bound_to, form.get("csrf")):
            raise _Page(self.error_page(request, 403, "Refused",
                                        "This form has expired or was not sent from this dashboard. "
                                        "Go back, reload the page and try again."))
        return form

    def _guard(self, request: Request, work: Callable[[], Response]) -> Response:
        try:
            return work()
        except _Page as page:
            return page.response
        except NotFound:
            return self.error_page(request, 404, "Not found", "There is no such page in your workspaces.")
        except ApiError as error:
            return self.error_page(request, error.status, "Refused", error.message)
        except AudsyncError as error:
            return self.error_page(request, 409, "The workspace is not ready", redact(error.message))

    async def _guard_async(self, request: Request, work) -> Response:
        try:
            return await work()
        except _Page as page:
            return page.response

    # -- routes -------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        router = APIRouter(include_in_schema=False)
        run_sync = anyio.to_thread.run_sync

        @router.get("/", response_class=HTMLResponse)
        def home(request: Request):
            return self._guard(request, lambda: self.home(request))

        @router.get("/signin", response_class=HTMLResponse)
        def signin_form(request: Request, next: str = "/"):
            return self.signin_page(request, next)

        @router.post("/signin", response_class=HTMLResponse)
        async def signin(request: Request):
            return await self._guard_async(request, lambda: self.signin(request))

        @router.post("/signout")
        async def signout(request: Request):
            return await self._guard_async(request, lambda: self.signout(request))

        @router.get("/w/{workspace_id}/", response_class=HTMLResponse)
        def syncs_page(request: Request, workspace_id: str, status: str = "", q: str = ""):
            return self._guard(request, lambda: self.syncs_page(request, workspace_id, status, q))

        @router.get("/w/{workspace_id}", response_class=HTMLResponse)
        def syncs_page_bare(workspace_id: str):
            return RedirectResponse(f"/w/{urllib.parse.quote(workspace_id)}/", status_code=308)

        @router.get("/w/{workspace_id}/syncs/{sync_id}", response_class=HTMLResponse)
        def sync_page(request: Request, workspace_id: str, sync_id: str, page: str = "1", done: str = ""):
            return self._guard(request, lambda: self.sync_page(request, workspace_id, sync_id, page, done))

        @router.post("/w/{workspace_id}/syncs/{sync_id}/{action}", response_class=HTMLResponse)
        async def sync_action(request: Request, workspace_id: str, sync_id: str, action: str):
            async def work():
                session = self._signed_in(request)
                await self._form(request, session.id)
                return await run_sync(lambda: self._guard(
                    request, lambda: self.sync_action(request, workspace_id, sync_id, action)))
            return await self._guard_async(request, work)

        @router.get("/w/{workspace_id}/syncs/{sync_id}/runs/{run_id}", response_class=HTMLResponse)
        def run_page(request: Request, workspace_id: str, sync_id: str, run_id: str):
            return self._guard(request, lambda: self.run_page(request, workspace_id, sync_id, run_id))

        @router.get("/w/{workspace_id}/syncs/{sync_id}/runs/{run_id}/row-errors.csv")
        def row_errors_csv(request: Request, workspace_id: str, sync_id: str, run_id: str):
            return self._guard(request, lambda: self.row_errors_csv(request, workspace_id, sync_id, run_id))

        return router

    # -- sign-in ------------------------------------------------------------------------------

    @staticmethod
    def _safe_next(value: str | None) -> str:
        """Only a path of this site (no scheme, no other host) is followed after sign-in."""
        if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
            return "/"
        return value

    def signin_page(self, request: Request, next: str = "/", error: str = "", status: int = 200) -> Response:
        nonce = self.sessions.unsign(request.cookies.get(PRE_COOKIE)) or new_nonce()
        response = self.render(request, "signin.html", http_status=status, next=self._safe_next(next), error=error,
                               signin_csrf=self.sessions.csrf_for("pre:" + nonce), signed_in=False)
        response.set_cookie(PRE_COOKIE, self.sessions.sign(nonce), max_age=PRE_TTL_S, httponly=True,
                            samesite="lax", secure=request.url.scheme == "https", path="/")
        return response

    async def signin(self, request: Request) -> Response:
        nonce = self.sessions.unsign(request.cookies.get(PRE_COOKIE))
        form = await self._form(request, "pre:" + nonce if nonce else None)
        token = (form.get("token") or "").strip()
        next_path = self._safe_next(form.get("next"))
        client = request.client.host if request.client else "?"
        if self._too_many_failures(client):
            response = self.signin_page(request, next_path, status=429, error=(
                "Too many failed sign-ins from this address; try again in a minute."))
            response.headers["Retry-After"] = str(int(SIGNIN_WINDOW_S))
            return response
        if not token or not self.registry.authenticate(token):
            self._too_many_failures(client, failed=True)
            return self.signin_page(request, next_path, status=401, error=(
                "This token is not known to this service. Use an API token of your workspace."
                if token else "Enter an API token."))
        session = self.sessions.create(digest(token))
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(SESSION_COOKIE, self.sessions.sign(session.id), max_age=int(self.sessions.ttl_s),
                            httponly=True, samesite="lax", secure=request.url.scheme == "https", path="/")
        response.delete_cookie(PRE_COOKIE, path="/")
        return response

    async def signout(self, request: Request) -> Response:
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            await self._form(request, session.id)
            self.sessions.end(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def home(self, request: Request) -> Response:
        session = self._signed_in(request)
        reached = self._reached(session)
        if len(reached) == 1:
            return RedirectResponse(f"/w/{reached[0][0].id}/", status_code=303)
        return self.render(request, "workspaces.html", reached=reached)

    # -- the syncs ----------------------------------------------------------------------------

    def syncs_page(self, request: Request, workspace_id: str, status: str, q: str) -> Response:
        ws, token_name = self._workspace(request, workspace_id)
        syncs = syncs_data.list_syncs(ws)
        latest = data.latest_runs(ws)
        for sync in syncs:
            entry = latest.get(sync["slug"]) or {}
            sync["last_run"] = entry.get("last")
            sync["active_run"] = entry.get("active")
        by_status = {s: sum(1 for x in syncs if x["status"] == s) for s in STATUSES}
        status = status if status in STATUSES else ""
        needle = q.strip().lower()[:200]
        shown = [s for s in syncs if (not status or s["status"] == status) and (not needle or needle in " ".join(
            str(s.get(k) or "") for k in ("name", "slug", "audience_name", "destination_name", "sync_mode",
                                          "schedule", "description")).lower())]
        return self.render(request, "syncs.html", ws=ws, token_name=token_name, syncs=shown, total=len(syncs),
                           by_status=by_status, status=status, q=q[:200], statuses=STATUSES)

    def _sync(self, ws: Workspace, sync_id: str) -> tuple[dict[str, Any], Any]:
        obj = syncs_data.get_sync(ws, sync_id)
        return obj, syncs_data.find_model(ws, obj["id"])

    def sync_page(self, request: Request, workspace_id: str, sync_id: str, page: int | str, done: str,
                  notice_error: str = "", status: int = 200) -> Response:
        ws, _ = self._workspace(request, workspace_id)
        obj, model = self._sync(ws, sync_id)
        page = max(1, min(int(page) if str(page).isdigit() else 1, 1_000_000))
        detail = data.detail(ws, model, data.PAGE_SIZE, (page - 1) * data.PAGE_SIZE)
        pages = max(1, math.ceil(detail.total / data.PAGE_SIZE))
        busy = self.manager.busy_run(ws, model.name)
        destination_type = self._destination_type(ws, model.destination)
        for run in detail.runs + detail.chart:
            run["match"] = data.match_rate(run, destination_type)
        config = self._configuration(ws, model)
        points = [charts.Point(r["started_at"] or "", (r["started_at"] or "")[:16].replace("T", " ") + " UTC",
                               {"held": r.get("held_after"), "rows_added": r.get("rows_added"),
                                "rows_removed": r.get("rows_removed"), "rows_updated": r.get("rows_updated")})
                  for r in detail.chart]
        context = dict(
            ws=ws, sync=obj, model=model, detail=detail, page=page, pages=pages, busy=busy,
            destination_type=destination_type, config=config,
            size_chart=charts.line_chart(points, "held", "Members synced after each run") if points else None,
            changes_chart=charts.bar_chart(points, "Members added, removed and updated per run") if points else None,
            show_match=any(r.get("match") is not None for r in detail.runs),
            last_match=detail.chart[-1].get("match") if detail.chart else None,
            done=DONE.get(done, ""), notice_error=notice_error,
            can_act=obj["status"] != "draft" and not busy,
        )
        return self.render(request, "sync.html", http_status=status, **context)

    def _destination_type(self, ws: Workspace, name: str) -> str | None:
        try:
            config = ws.destinations().get(name)
        except AudsyncError:
            return None
        return getattr(config, "type", None)

    def _configuration(self, ws: Workspace, model) -> dict[str, Any]:
        """What the page shows of the sync's model config beyond the API object: its split
        group and exclusions when it has them (governance), and its destination settings."""
        node = ws.project().manifest.get("nodes", {}).get(model.unique_id, {})
        config = node.get("config") or {}
        exclusions = config.get("exclude") or model.settings.get("exclude") or []
        if isinstance(exclusions, (str, dict)):
            exclusions = [exclusions]
        split = config.get("split_group") or model.settings.get("split_group")
        settings = {k: redact(str(v)) for k, v in model.settings.items() if k not in ("exclude", "split_group")}
        return {"exclusions": [e.get("model", str(e)) if isinstance(e, dict) else str(e) for e in exclusions],
                "split_group": split, "settings": settings, "tags": list(model.tags)}

    def sync_action(self, request: Request, workspace_id: str, sync_id: str, action: str) -> Response:
        ws, _ = self._workspace(request, workspace_id)
        if action not in ACTIONS:
            raise NotFound(f"no action {action!r}")
        obj, model = self._sync(ws, sync_id)
        try:
            if obj["status"] == "draft":
                raise Conflict(f"{obj['name']} is a draft: activate it through the API first "
                               "(PUT status 'active')", code="sync_draft")
            if action == "trigger":
                if obj["status"] == "paused":
                    raise Conflict(f"{obj['name']} is paused: resume it first", code="sync_paused")
                self.manager.trigger(ws, model, obj["id"], trigger="manual")
            else:
                busy = self.manager.busy_run(ws, model.name)
                if busy:
                    raise Conflict(f"run {busy} of {obj['name']} is queued or running; wait for it to end",
                                   code="run_in_progress")
                syncs_data.update_sync(ws, obj["id"], {"status": "paused" if action == "pause" else "active"})
        except ApiError as error:
            # The page again, with the reason on it: the same answer as the API's status code.
            return self.sync_page(request, workspace_id, obj["id"], 1, "", notice_error=error.message,
                                  status=error.status)
        return RedirectResponse(f"/w/{ws.id}/syncs/{obj['id']}?done={action}", status_code=303)

    # -- a run --------------------------------------------------------------------------------

    def run_page(self, request: Request, workspace_id: str, sync_id: str, run_id: str) -> Response:
        ws, _ = self._workspace(request, workspace_id)
        obj, model = self._sync(ws, sync_id)
        run = runs_data.get_run(ws, model, obj["id"], run_id)
        extras = data.run_extras(ws, model, run_id) or {}
        run["rows_recorded"] = extras.get("rows_recorded")
        run["rows_unmatched"] = extras.get("rows_unmatched")
        run["match"] = data.match_rate({**extras, **run}, self._destination_type(ws, model.destination))
        ops = [("add", run["planned_adds"], run["rows_added"]),
               ("remove", run["planned_removes"], run["rows_removed"]),
               ("update", run["planned_updates"], run["rows_updated"])]
        return self.render(request, "run.html", ws=ws, sync=obj, run=run, ops=ops,
                           active=run["status"] in data.ACTIVE_STATUSES)

    def row_errors_csv(self, request: Request, workspace_id: str, sync_id: str, run_id: str) -> Response:
        ws, _ = self._workspace(request, workspace_id)
        obj, model = self._sync(ws, sync_id)
        runs_data.get_run(ws, model, obj["id"], run_id)  # NotFound for another sync's run

        def rows():
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            columns = ("member_key", "op", "error_code", "error_message", "retryable", "recorded_at")
            writer.writerow(columns)
            yield buffer.getvalue()
            for error in data.row_errors(ws, model, run_id):
                buffer.seek(0)
                buffer.truncate()
                writer.writerow([_cell(error[c]) for c in columns])
                yield buffer.getvalue()

        filename = f"{model.name}__{run_id}__row_errors.csv"
        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8", headers={
            **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{filename}"'})


def _cell(value: Any) -> str:
    """A CSV cell that a spreadsheet will not run as a formula."""
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


__all__ = ["Dashboard", "environment", "mount"]
