"""The REST API of api.md as an ASGI application: :func:`create_app`.

Routes are thin: they authenticate, find the workspace and call the data layer
(:mod:`.syncs`, :mod:`.runs`), whose dicts they answer as the documented models. Every path
exists twice, ``/api/v1/workspaces/{workspace_id}/...`` and the short ``/api/v1/...`` whose
workspace is ``X-Workspace-ID`` or the token's only one. Two ASGI middlewares come first:
bodies over 1 MB are refused (413) and a token sending more than 200 requests in 10 s is
answered 429 with ``Retry-After``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import threading
import time
from typing import Any, Literal, Optional

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AudsyncError
from ..redact import redact
from . import runs as runs_data
from . import syncs as syncs_data
from .errors import ApiError, BadRequest, Conflict, NotFound, Unauthorized, error_body
from .runs import RunManager
from .scheduler import Scheduler
from .workspaces import Registry, Workspace

logger = logging.getLogger("audsync.serve")

MAX_BODY_BYTES = 1_000_000
RATE_LIMIT = 200
RATE_WINDOW_S = 10.0


# -- the documented models ------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="A machine word: invalid, not_found, run_in_progress, ...")
    message: str = Field(description="What was wrong, naming the field and the value")
    field: Optional[str] = Field(None, description="The field concerned, when there is one")
    run_id: Optional[str] = Field(None, description="The run queued or running, for run_in_progress")


class ErrorBody(BaseModel):
    error: ErrorDetail


class FieldMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_column: str = Field(min_length=1, max_length=200)
    destination_field: str = Field(min_length=1, max_length=200)


SPLIT_GROUP_HELP = ("The split group the sync sends: its id, or '<split>.<group>' of vars.audsync_splits"
                    " (governance.md)")


class SyncCreate(BaseModel):
    """A new sync: written as the model file ``models/audsync_api/<slug>.sql``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="Display name; the slug comes from it")
    audience_id: str = Field(min_length=1, max_length=300, description="An audience's id or model name")
    destination_id: str = Field(min_length=1, max_length=300, description="A destination's id or name")
    description: str = Field("", max_length=5000)
    field_mapping: list[FieldMapping] = Field(min_length=1, max_length=500)
    sync_mode: str = Field("mirror", max_length=50, description="mirror, add, upsert, remove")
    schedule: str = Field("manual", max_length=100, description="manual, 15m, hourly, daily, weekly or cron")
    config: dict[str, Any] = Field(default_factory=dict, description="Destination settings for this sync")
    status: Literal["active", "draft"] = "active"
    identifier: Optional[str] = Field(None, max_length=200, description="The key column (default: the first mapped)")
    split_group_id: Optional[str] = Field(None, max_length=300, description=SPLIT_GROUP_HELP)


class SyncUpdate(BaseModel):
    """The fields to change; the others stay as they are."""

    model_config = ConfigDict(extra="forbid")
    name: Optional[str] = Field(None, min_length=1, max_length=200)
    audience_id: Optional[str] = Field(None, min_length=1, max_length=300)
    destination_id: Optional[str] = Field(None, min_length=1, max_length=300)
    description: Optional[str] = Field(None, max_length=5000)
    field_mapping: Optional[list[FieldMapping]] = Field(None, min_length=1, max_length=500)
    sync_mode: Optional[str] = Field(None, max_length=50)
    schedule: Optional[str] = Field(None, max_length=100)
    config: Optional[dict[str, Any]] = None
    status: Optional[Literal["draft", "active", "paused", "error"]] = None
    identifier: Optional[str] = Field(None, max_length=200)
    split_group_id: Optional[str] = Field(None, max_length=300, description=SPLIT_GROUP_HELP + "; null: none")


class TriggerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    full_resync: bool = False
    force: bool = Field(False, description="Override the guardrails for this run only (recorded on the run)")


class AudienceSync(BaseModel):
    """An audience sync (the seed's object, with audsync's documented extras)."""

    id: str
    workspace_id: str
    audience_id: Optional[str]
    destination_id: Optional[str]
    name: str
    description: str
    field_mapping: list[FieldMapping]
    sync_mode: str
    schedule: str
    config: dict[str, Any]
    status: Literal["draft", "active", "paused", "error"]
    status_error: str
    created_by: str
    created_at: Optional[str]
    updated_at: Optional[str]
    last_synced_at: Optional[str]
    last_run_id: Optional[str]
    split_group_id: Optional[str]
    slug: str = Field(description="The sync model's name")
    managed_by: Literal["api", "project"]
    model_path: str = Field(description="The model file, relative to the project")
    identifier: str
    next_run_at: Optional[str] = Field(description="null for manual, paused and draft syncs")
    evaluated_at: Optional[str] = Field(description="When the audience relation S was last built")
    audience_name: Optional[str]
    destination_name: Optional[str]


RunStatus = Literal["queued", "running", "success", "partial_failure", "error", "aborted", "skipped", "blocked"]


class Run(BaseModel):
    id: str
    sync_id: str
    workspace_id: str
    status: RunStatus
    trigger: Optional[str]
    started_at: Optional[str]
    finished_at: Optional[str]
    duration_ms: Optional[int]
    planned_adds: Optional[int]
    planned_removes: Optional[int]
    planned_updates: Optional[int]
    rows_added: Optional[int]
    rows_removed: Optional[int]
    rows_updated: Optional[int]
    rows_failed: Optional[int]
    error_message: str
    full_resync: bool
    evaluated_at: Optional[str]


class RowError(BaseModel):
    member_key: str
    op: str
    error_code: str
    error_message: str
    retryable: bool


class RunDetail(Run):
    row_errors: list[RowError]
    row_errors_total: int


class Audience(BaseModel):
    id: str
    name: str
    description: str
    path: str


class Destination(BaseModel):
    id: str
    name: str
    type: str


class Deleted(BaseModel):
    status: Literal["deleted"]


class Health(BaseModel):
    status: Literal["ok"]
    version: str


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "Bad request (a contradicting X-Workspace-ID, an ambiguous workspace)"),
    (401, "Missing or unknown token"),
    (404, "No such workspace, sync or run (a workspace the token does not reach is 404 too)"),
    (409, "Conflict: a run queued or running, a hand-written sync, a refused status change"),
    (413, "Request body over 1 MB"),
    (422, "Invalid body or parameter, naming the field and the value"),
    (429, "More than 200 requests in 10 s for this token; see Retry-After"),
)}


# -- middlewares ------------------------------------------------------------------------------


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    import json

    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before the app reads them."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = error_body("payload_too_large", f"the request body is over {self.limit} bytes")
        if length is not None:
            try:
                if int(length) > self.limit:
                    return await _send_json(send, 413, too_large)
            except ValueError:
                return await _send_json(send, 400, error_body("bad_request", "Content-Length is not a number"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_json(send, 413, too_large)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class RateLimit:
    """At most ``limit`` requests in ``window_s`` seconds per bearer token (by its digest)."""

    def __init__(self, app, limit: int = RATE_LIMIT, window_s: float = RATE_WINDOW_S):
        self.app = app
        self.limit = limit
        self.window_s = window_s
        self.seen: dict[str, collections.deque] = {}
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization")
        if auth:
            key = hashlib.sha256(auth).hexdigest()
            now = time.monotonic()
            with self.lock:
                times = self.seen.setdefault(key, collections.deque())
                while times and times[0] <= now - self.window_s:
                    times.popleft()
                if len(times) >= self.limit:
                    wait = max(1, math.ceil(times[0] + self.window_s - now))
                    body = error_body("rate_limited", f"more than {self.limit} requests in "
                                      f"{self.window_s:g} s for this token; retry after {wait} s")
                    return await _send_json(send, 429, body, [(b"retry-after", str(wait).encode())])
                times.append(now)
                if len(self.seen) > 10_000:  # forget idle tokens: bounded memory
                    for k in [k for k, v in self.seen.items() if not v or v[-1] <= now - self.window_s]:
                        del self.seen[k]
        return await self.app(scope, receive, send)


# -- the service --------------------------------------------------------------------------------


class Service:
    """What the routes share: the workspaces, the run manager, the scheduler."""

    def __init__(self, registry: Registry, manager: RunManager, scheduler: Scheduler | None,
                 drain_s: float = 60.0):
        self.registry = registry
        self.manager = manager
        self.scheduler = scheduler
        self.drain_s = drain_s

    def stop(self) -> None:
        """Stop the scheduler, then drain the workers (runs end ``aborted``)."""
        if self.scheduler is not None:
            self.scheduler.stop()
        self.manager.shutdown(self.drain_s)


def create_app(
    registry: Registry,
    *,
    workers: int = 2,
    evaluate: bool = True,
    scheduler: bool = True,
    tick_s: float = 30.0,
    rate_limit: int = RATE_LIMIT,
    drain_s: float = 60.0,
) -> FastAPI:
    """The ASGI application of ``audsync serve`` for ``registry``'s workspaces."""
    manager = RunManager(workers=workers, evaluate=evaluate)
    service = Service(registry, manager, Scheduler(registry, manager, tick_s) if scheduler else None, drain_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if service.scheduler is not None:
            service.scheduler.start()
        yield
        import anyio

        await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(
        title="audsync", version=__version__, lifespan=lifespan,
        description="The audience-sync REST API of audsync (api.md): syncs are dbt models, runs are "
                    "audsync runs on the same lock and tables as the command line.",
    )
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description="An API token of the workspace")

    def token(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)):
        if credentials is None or not credentials.credentials:
            raise Unauthorized("missing bearer token: send the header Authorization: Bearer <token>")
        reached = registry.authenticate(credentials.credentials)
        if not reached:
            raise Unauthorized("the bearer token is not known")
        return reached

    def by_path(workspace_id: str = Path(..., max_length=200), x_workspace_id: Optional[str] = Header(None, max_length=200),
                reached=Depends(token)) -> tuple[Workspace, str]:
        if x_workspace_id is not None and x_workspace_id != workspace_id:
            raise BadRequest(f"X-Workspace-ID {x_workspace_id!r} contradicts the path's workspace {workspace_id!r}",
                             field="X-Workspace-ID")
        for ws, name in reached:
            if ws.id == workspace_id:
                return ws, name
        raise NotFound(f"no workspace {workspace_id!r}", field="workspace_id")

    def by_header(x_workspace_id: Optional[str] = Header(None, max_length=200), reached=Depends(token)):
        if x_workspace_id is not None:
            for ws, name in reached:
                if ws.id == x_workspace_id:
                    return ws, name
            raise NotFound(f"no workspace {x_workspace_id!r}", field="X-Workspace-ID")
        if len(reached) != 1:
            raise BadRequest("this token reaches several workspaces: send X-Workspace-ID or use "
                             "/api/v1/workspaces/{workspace_id}/...", field="X-Workspace-ID")
        return reached[0]

    for prefix, resolve, suffix in (("/api/v1/workspaces/{workspace_id}", by_path, ""),
                                    ("/api/v1", by_header, "_short")):
        app.include_router(_router(resolve, suffix, manager), prefix=prefix)

    # dashboard (issue 15, dashboard branch): the pages at / on the same registry and run pool.
    from .dashboard import mount as mount_dashboard

    mount_dashboard(app, registry, manager)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz():
        """Liveness, without auth (for probes)."""
        return {"status": "ok", "version": __version__}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(AudsyncError)
    async def audsync_error(request: Request, error: AudsyncError):
        # The project or warehouse refused (a broken model file, a warehouse that is down):
        # the client's request is fine, the workspace is not ready for it.
        return JSONResponse(error_body("not_ready", error.message), status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        value = first.get("input")
        shown = redact(repr(value))[:120] if value is not None and first.get("type") != "missing" else "missing"
        message = f"{where}: {first.get('msg', 'invalid')} (got {shown})"
        if len(problems) > 1:
            message += f"; and {len(problems) - 1} more problem(s)"
        status = 422
        return JSONResponse(error_body("invalid", message, field=where), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        headers = getattr(error, "headers", None)
        return JSONResponse(error_body(codes.get(error.status_code, "error"), message),
                            status_code=error.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        # The traceback goes to the log (its handler's filter masks secrets in it), never to
        # the answer.
        logger.error("unexpected error on %s %s: %s", request.method, request.url.path,
                     redact(f"{type(error).__name__}: {error}"), exc_info=error)
        return JSONResponse(error_body("internal", "an unexpected error; see the service's log"), status_code=500)

    app.add_middleware(RateLimit, limit=rate_limit)
    app.add_middleware(BodyLimit)
    return app


def _router(resolve, suffix: str, manager: RunManager) -> APIRouter:
    """The endpoints of api.md over one way of naming the workspace."""
    router = APIRouter(responses=ERRORS, tags=["audience-syncs"])

    def model_of(ws: Workspace, sync_id: str):
        return syncs_data.find_model(ws, sync_id)

    @router.get("/audience-syncs", response_model=list[AudienceSync], operation_id="list_syncs" + suffix)
    def list_syncs(ctx=Depends(resolve)):
        """Every sync of the workspace, API-made and hand-written."""
        return syncs_data.list_syncs(ctx[0])

    @router.post("/audience-syncs", response_model=AudienceSync, status_code=201, operation_id="create_sync" + suffix)
    def create_sync(body: SyncCreate, ctx=Depends(resolve)):
        """Create a sync: a model file, parsed by dbt before the answer."""
        ws, token_name = ctx
        data = body.model_dump()
        data["field_mapping"] = [m.model_dump() for m in body.field_mapping]
        return syncs_data.create_sync(ws, data, token_name)

    @router.get("/audience-syncs/{sync_id}", response_model=AudienceSync, operation_id="get_sync" + suffix)
    def get_sync(sync_id: str = Path(..., max_length=300), ctx=Depends(resolve)):
        """One sync."""
        return syncs_data.get_sync(ctx[0], sync_id)

    @router.put("/audience-syncs/{sync_id}", response_model=AudienceSync, operation_id="update_sync" + suffix)
    def update_sync(body: SyncUpdate, sync_id: str = Path(..., max_length=300), ctx=Depends(resolve)):
        """Change the fields given; an edit never starts a run."""
        data = body.model_dump(exclude_unset=True)
        if body.field_mapping is not None:
            data["field_mapping"] = [m.model_dump() for m in body.field_mapping]
        return syncs_data.update_sync(ctx[0], sync_id, data)

    @router.delete("/audience-syncs/{sync_id}", response_model=Deleted, operation_id="delete_sync" + suffix)
    def delete_sync(sync_id: str = Path(..., max_length=300), ctx=Depends(resolve)):
        """Delete a sync: its file, relations and state rows; the destination keeps its members."""
        ws = ctx[0]
        sync = model_of(ws, sync_id)
        syncs_data.delete_sync(ws, sync_id, busy_run=manager.busy_run(ws, sync.name))
        return {"status": "deleted"}

    @router.post("/audience-syncs/{sync_id}/trigger", response_model=Run, status_code=201,
                 operation_id="trigger_sync" + suffix)
    def trigger_sync(sync_id: str = Path(..., max_length=300), body: Optional[TriggerBody] = Body(None),
                     ctx=Depends(resolve)):
        """Start a run now (in the background); 201 with the queued run."""
        ws = ctx[0]
        current = syncs_data.get_sync(ws, sync_id)
        if current["status"] == "draft":
            raise Conflict(f"sync {current['slug']!r} is a draft: activate it first (PUT status 'active')",
                           code="sync_draft", field="status")
        if current["status"] == "paused":
            raise Conflict(f"sync {current['slug']!r} is paused: resume it first (PUT status 'active')",
                           code="sync_paused", field="status")
        sync = model_of(ws, sync_id)
        return manager.trigger(ws, sync, current["id"], trigger="api",
                               full_resync=bool(body and body.full_resync), force=bool(body and body.force))

    @router.get("/audience-syncs/{sync_id}/runs", response_model=list[Run], operation_id="list_runs" + suffix)
    def list_runs(request: Request, sync_id: str = Path(..., max_length=300),
                  limit: int = Query(20, ge=1, le=100), offset: int = Query(0, ge=0, le=1_000_000_000),
                  ctx=Depends(resolve)):
        """Runs, newest first; the header X-Total-Count says how many there are."""
        ws = ctx[0]
        sync = model_of(ws, sync_id)
        items, total = runs_data.list_runs(ws, sync, syncs_data.sync_id_of(ws, sync.name), limit, offset)
        return JSONResponse([Run(**i).model_dump() for i in items], headers={"X-Total-Count": str(total)})

    @router.get("/audience-syncs/{sync_id}/runs/{run_id}", response_model=RunDetail, operation_id="get_run" + suffix)
    def get_run(sync_id: str = Path(..., max_length=300), run_id: str = Path(..., max_length=300),
                ctx=Depends(resolve)):
        """One run with its first 100 row errors."""
        ws = ctx[0]
        sync = model_of(ws, sync_id)
        return runs_data.get_run(ws, sync, syncs_data.sync_id_of(ws, sync.name), run_id)

    @router.get("/audiences", response_model=list[Audience], operation_id="list_audiences" + suffix,
                tags=["catalogue"])
    def list_audiences(ctx=Depends(resolve)):
        """What audience_id may name: the project's models that are not syncs."""
        return syncs_data.list_audiences(ctx[0])

    @router.get("/destinations", response_model=list[Destination], operation_id="list_destinations" + suffix,
                tags=["catalogue"])
    def list_destinations(ctx=Depends(resolve)):
        """What destination_id may name: id, name and type (never a setting)."""
        return syncs_data.list_destinations(ctx[0])

    return router
