"""Audience syncs as the API sees them (api.md, Objects; Syncs are still dbt models).

A sync is a dbt model. One made through the API is a file ``models/audsync_api/<slug>.sql``
whose first line is :data:`MARKER`; a hand-written one is any other ``audience_sync`` model and
takes only status changes. The lifecycle (``draft``, ``active``, ``paused``, ``error``), the
display name, ``created_by`` and ``created_at`` live in ``audsync_syncs``.

Every function here takes a :class:`~audsync.service.workspaces.Workspace` and returns plain
dicts shaped as the API's objects, so that the HTTP routes and the dashboard's pages share
them. Writes hold the workspace's write lock; files are written to a temporary name and
renamed, so no reader ever sees half a file.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .. import names
from ..errors import AudsyncError, ConfigError, LockHeld
from ..governance.config import declared_split_groups, split_group_of
from ..schedule import aware, last_slot_starts, next_run_at, parse_schedule, row_value
from ..state import SYNC_COLUMNS, lock_timeout_s, utcnow
from .errors import Conflict, Invalid, NotFound
from .workspaces import Workspace, stable_id

MARKER = "-- audsync:managed: this sync is managed by the audsync API (audsync serve); change it through the API"
MODELS_DIR_VAR = "audsync_api_models_dir"
DEFAULT_MODELS_DIR = "models/audsync_api"
STATUSES = ("draft", "active", "paused", "error")
# PUT may move a sync along these edges only (api.md, Status); `error` is set by runs.
TRANSITIONS = {"draft": {"active"}, "active": {"paused"}, "paused": {"active"}, "error": {"paused", "active"}}
EDITABLE = ("name", "description", "audience_id", "destination_id", "field_mapping", "sync_mode",
            "schedule", "config", "identifier", "split_group_id")
# Fields a PUT may set to null (null clears them); any other null leaves the field as it is.
NULLABLE = ("split_group_id",)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 200


# -- reading ---------------------------------------------------------------------------------


def list_syncs(ws: Workspace) -> list[dict[str, Any]]:
    """Every sync of the workspace, API-made and hand-written, by slug."""
    view = _View(ws)
    return [view.obj(s) for s in sorted(view.project.syncs.values(), key=lambda s: s.name)]


def get_sync(ws: Workspace, sync_id: str) -> dict[str, Any]:
    """One sync by its id (or slug); NotFound otherwise."""
    view = _View(ws)
    return view.obj(view.find(sync_id))


def find_model(ws: Workspace, sync_id: str):
    """The ``SyncModel`` of a sync id (or slug); NotFound otherwise."""
    return _View(ws, with_state=False).find(sync_id)


def sync_id_of(ws: Workspace, name: str) -> str:
    """The id of the sync model ``name`` in ``ws``."""
    return stable_id("sync", ws.id, name)


def split_group_id_of(workspace_id: str, group: str | None) -> str | None:
    """The API's ``split_group_id`` of ``'<split>.<group>'`` (governance.md):
    ``uuid5(NAMESPACE_URL, "audsync:split_group:" + workspace_id + ":" + group)``."""
    return stable_id("split_group", workspace_id, group) if group else None


def list_audiences(ws: Workspace) -> list[dict[str, Any]]:
    """The models a sync may select from: the project's own models that are not syncs."""
    project = ws.project()
    out = []
    for node in _audience_nodes(project):
        out.append({"id": stable_id("audience", ws.id, node["name"]), "name": node["name"],
                    "description": node.get("description") or "", "path": node.get("original_file_path") or ""})
    return sorted(out, key=lambda a: a["name"])


def list_destinations(ws: Workspace) -> list[dict[str, Any]]:
    """The destinations of ``destinations.yml``: id, name and type (never a setting)."""
    destinations = ws.destinations()
    return sorted(
        ({"id": stable_id("destination", ws.id, name), "name": name, "type": config.type}
         for name, config in destinations.items()),
        key=lambda d: d["name"],
    )


class _View:
    """One consistent read of a workspace: project, state rows, destinations' names."""

    def __init__(self, ws: Workspace, with_state: bool = True):
        self.ws = ws
        self.project = ws.project()
        self.states: dict[str, dict[str, Any]] = {}
        self.starts: dict[str, dt.datetime] = {}
        self.now = dt.datetime.now(dt.timezone.utc)
        if with_state:
            runner = ws.state_runner()
            try:
                with runner.warehouse.session() as session:
                    if not runner.state.missing_tables(session):
                        self.states = {name: {c: row_value(row, c) for c in SYNC_COLUMNS}
                                       for name, row in runner.state.all_sync_rows(session).items()}
                        self.starts = last_slot_starts(session, runner.state)
            finally:
                runner.warehouse.close()

    def find(self, sync_id: str):
        for sync in self.project.syncs.values():
            if sync_id in (sync_id_of(self.ws, sync.name), sync.name):
                return sync
        raise NotFound(f"no audience sync with id {sync_id!r} in this workspace", field="sync_id")

    def obj(self, sync) -> dict[str, Any]:
        ws, project = self.ws, self.project
        node = project.manifest["nodes"].get(sync.unique_id, {})
        state = self.states.get(sync.name) or {}
        audience = _audience_of(project, node)
        status = state.get("status") or "active"
        path = sync.path
        managed = _is_managed(project.project_dir / path) if path else False
        return {
            "id": sync_id_of(ws, sync.name),
            "workspace_id": ws.id,
            "audience_id": stable_id("audience", ws.id, audience) if audience else None,
            "destination_id": stable_id("destination", ws.id, sync.destination) if sync.destination else None,
            "name": state.get("display_name") or sync.name,
            "description": sync.description or "",
            "field_mapping": [{"source_column": m.source_column, "destination_field": m.destination_field}
                              for m in sync.mapping],
            "sync_mode": sync.mode,
            "schedule": sync.schedule,
            "config": dict(sync.settings),
            "status": status,
            "status_error": (state.get("status_error") or "") if status == "error" else "",
            "created_by": state.get("created_by") or ("project" if not managed else ""),
            "created_at": _iso(state.get("created_at")),
            "updated_at": _iso(state.get("updated_at")),
            "last_synced_at": _iso(state.get("last_synced_at")),
            "last_run_id": state.get("last_run_id"),
            "split_group_id": split_group_id_of(ws.id, split_group_of(project, sync)),
            "slug": sync.name,
            "managed_by": "api" if managed else "project",
            "model_path": path,
            "identifier": sync.identifier,
            "next_run_at": _iso(next_run_at(sync.schedule, status, self.starts.get(sync.name), self.now)),
            "evaluated_at": _iso(state.get("evaluated_at")),
            "audience_name": audience,
            "destination_name": sync.destination or None,
        }


def _iso(moment: dt.datetime | None) -> str | None:
    moment = aware(moment) if isinstance(moment, dt.datetime) else moment
    return moment.isoformat().replace("+00:00", "Z") if isinstance(moment, dt.datetime) else moment


def _audience_nodes(project) -> list[dict[str, Any]]:
    root = project.manifest.get("metadata", {}).get("project_name")
    out = []
    for node in project.manifest.get("nodes", {}).values():
        if node.get("resource_type") != "model" or node.get("package_name") == names.PACKAGE:
            continue
        if root and node.get("package_name") != root:
            continue
        if (node.get("config") or {}).get("materialized") == names.MATERIALIZATION:
            continue
        out.append(node)
    return out


def _audience_of(project, node: dict[str, Any]) -> str | None:
    """The model a sync selects from: the first model it depends on."""
    for dep in (node.get("depends_on") or {}).get("nodes") or []:
        if dep.startswith("model."):
            return project.manifest["nodes"].get(dep, {}).get("name") or dep.rsplit(".", 1)[-1]
    return None


def _is_managed(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\n") == MARKER
    except OSError:
        return False


# -- validating and writing ---------------------------------------------------------------------


def _resolve_audience(ws: Workspace, project, value: Any) -> dict[str, Any]:
    for node in _audience_nodes(project):
        if value in (node["name"], stable_id("audience", ws.id, node["name"])):
            return node
    known = ", ".join(sorted(n["name"] for n in _audience_nodes(project))) or "none"
    raise Invalid(f"audience_id {value!r} is neither the id nor the name of a model of this project; "
                  f"models: {known}", field="audience_id")


def _resolve_destination(ws: Workspace, value: Any) -> str:
    try:
        destinations = ws.destinations()
    except AudsyncError as error:
        raise Invalid(f"destinations.yml cannot be read: {error.message}", field="destination_id") from None
    for name in destinations:
        if value in (name, stable_id("destination", ws.id, name)):
            return name
    known = ", ".join(sorted(destinations)) or "none"
    raise Invalid(f"destination_id {value!r} is neither the id nor the name of a destination in "
                  f"destinations.yml; destinations: {known}", field="destination_id")


def _audience_columns(ws: Workspace, project, node: dict[str, Any]) -> list[str]:
    from ..warehouse import Relation

    relation = Relation(node.get("database"), node["schema"], node.get("alias") or node["name"])
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            columns = session.columns(relation)
    finally:
        runner.warehouse.close()
    if columns is None:
        columns = list((node.get("columns") or {}).keys()) or None
    if columns is None:
        raise Invalid(f"audience_id {node['name']!r}: the model is not built yet, so its columns are unknown; "
                      f"run `dbt run --select {node['name']}` first", field="audience_id")
    return columns


def _validated(ws: Workspace, project, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of a managed sync, checked field by field (Invalid names the field)."""
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise Invalid(f"name {name!r}: expected a non-empty text of at most {MAX_NAME} characters", field="name")
    if spec.get("audience_id") is None:
        raise Invalid("audience_id is required: the id or name of the model to sync", field="audience_id")
    if spec.get("destination_id") is None:
        raise Invalid("destination_id is required: the id or name of a destination", field="destination_id")
    audience = _resolve_audience(ws, project, spec["audience_id"])
    destination = _resolve_destination(ws, spec["destination_id"])
    try:
        mode = names.normalise_mode(spec.get("sync_mode") or "mirror")
    except ValueError as error:
        raise Invalid(f"sync_mode: {error}", field="sync_mode") from None
    try:
        schedule = parse_schedule(spec.get("schedule") or "manual").text
    except ValueError as error:
        raise Invalid(f"schedule: {error}", field="schedule") from None
    columns = _audience_columns(ws, project, audience)
    by_lower = {c.lower(): c for c in columns}
    mapping = spec.get("field_mapping") or []
    if not mapping:
        raise Invalid("field_mapping is empty: map at least the identifier column", field="field_mapping")
    cleaned, seen = [], set()
    for i, item in enumerate(mapping):
        source, target = item.get("source_column"), item.get("destination_field")
        where = f"field_mapping[{i}]"
        if not isinstance(source, str) or source.lower() not in by_lower:
            raise Invalid(f"{where}.source_column {source!r} is not a column of {audience['name']!r}; "
                          f"expected one of: {', '.join(columns)}", field=f"{where}.source_column")
        if not IDENTIFIER.match(by_lower[source.lower()]):
            raise Invalid(f"{where}.source_column {source!r}: only plain column names can be synced",
                          field=f"{where}.source_column")
        if not isinstance(target, str) or not target.strip() or target in seen:
            raise Invalid(f"{where}.destination_field {target!r}: expected a non-empty name used once",
                          field=f"{where}.destination_field")
        seen.add(target)
        cleaned.append({"source_column": by_lower[source.lower()], "destination_field": target})
    identifier = spec.get("identifier") or cleaned[0]["source_column"]
    if not isinstance(identifier, str) or identifier.lower() not in {m["source_column"].lower() for m in cleaned}:
        raise Invalid(f"identifier {identifier!r}: expected one of the mapped source columns "
                      f"({', '.join(m['source_column'] for m in cleaned)})", field="identifier")
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise Invalid(f"config {config!r}: expected an object of destination settings", field="config")
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise Invalid(f"description {description!r}: expected a text", field="description")
    if re.search(r"\{[{%#]|[}%#]\}", description):
        # dbt renders descriptions as Jinja: markup in one would run at every parse.
        raise Invalid(f"description {description[:80]!r}: Jinja markup ({{{{ }}}}, {{% %}}, {{# #}}) is not "
                      "allowed in a description", field="description")
    return {"name": name.strip(), "description": description, "audience": audience["name"],
            "destination": destination, "mode": mode, "schedule": schedule, "mapping": cleaned,
            "identifier": by_lower[identifier.lower()], "config": config,
            "split_group": _resolve_split_group(ws, project, spec.get("split_group_id"))}


def _resolve_split_group(ws: Workspace, project, value: Any) -> str | None:
    """``'<split>.<group>'`` of a ``split_group_id`` (its id or that name), None for null."""
    if value is None:
        return None
    groups = declared_split_groups(project)
    for group in groups:
        if value in (group, split_group_id_of(ws.id, group)):
            return group
    raise Invalid(f"split_group_id {value!r} is neither the id nor the '<split>.<group>' name of a group of "
                  f"vars.audsync_splits; groups: {', '.join(groups) or 'none declared'}", field="split_group_id")


# Characters a text may not hold in a model file: quotes and backslashes would end or escape
# the literal (and dbt's static parser does not read Jinja's escapes), braces, `%` and `#`
# would open Jinja markup. Everything else is written as is.
UNSAFE = re.compile(r"['\\{}%#\x00-\x1f\x7f]")


def _literal(value: Any, field: str) -> str:
    """``value`` as a Jinja literal for the model file; Invalid naming ``field`` for a text
    that could not be written safely."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise Invalid(f"{field} {value!r}: expected a finite number", field=field)
        return repr(value)
    if isinstance(value, str):
        if UNSAFE.search(value):
            raise Invalid(f"{field} {value!r}: quotes, backslashes, braces, '%', '#' and control characters "
                          "cannot be written into a model file", field=field)
        return f"'{value}'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v, f"{field}[{i}]") for i, v in enumerate(value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(str(k), field)}: {_literal(v, f'{field}.{k}')}" for k, v in value.items()) + "}"
    raise Invalid(f"{field} {value!r}: expected text, numbers, booleans, lists or objects", field=field)


def render_model(spec: dict[str, Any]) -> str:
    """The model file of a managed sync (its description goes in :func:`render_properties`)."""
    mapping = ",\n".join(
        f"        {{'source_column': {_literal(m['source_column'], f'field_mapping[{i}].source_column')}, "
        f"'destination_field': {_literal(m['destination_field'], f'field_mapping[{i}].destination_field')}}}"
        for i, m in enumerate(spec["mapping"]))
    columns = ", ".join(dict.fromkeys(m["source_column"] for m in spec["mapping"]))
    return (
        f"{MARKER}\n"
        "{{ config(\n"
        "    materialized  = 'audience_sync',\n"
        f"    destination   = {_literal(spec['destination'], 'destination_id')},\n"
        f"    sync_mode     = {_literal(spec['mode'], 'sync_mode')},\n"
        f"    identifier    = {_literal(spec['identifier'], 'identifier')},\n"
        f"    field_mapping = [\n{mapping},\n    ],\n"
        f"    schedule      = {_literal(spec['schedule'], 'schedule')},\n"
        f"    config        = {_literal(spec['config'], 'config')},\n"
        + (f"    split_group   = {_literal(spec['split_group'], 'split_group_id')},\n" if spec.get("split_group") else "")
        + ") }}\n"
        f"select {columns} from {{{{ ref({_literal(spec['audience'], 'audience_id')}) }}}}\n"
    )


def render_properties(slug: str, spec: dict[str, Any]) -> str:
    """The model's properties file: its description (any text, YAML-encoded)."""
    document = {"version": 2, "models": [{"name": slug, "description": spec["description"]}]}
    return f"# {MARKER[3:]}\n" + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


def _models_dir(project) -> Path:
    yml = yaml.safe_load((project.project_dir / "dbt_project.yml").read_text()) or {}
    folder = (yml.get("vars") or {}).get(MODELS_DIR_VAR) or DEFAULT_MODELS_DIR
    return project.project_dir / str(folder)


def slugify(name: str) -> str:
    """A model name from a display name: lower case, ``_`` for anything else."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:60] or "sync"
    return slug if slug[0].isalpha() else "sync_" + slug


def _unique_slug(project, folder: Path, name: str) -> str:
    taken = {n.get("name") for n in project.manifest.get("nodes", {}).values()}
    taken |= {p.stem for p in folder.glob("*.sql")} if folder.exists() else set()
    base = slugify(name)
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}_{n}", n + 1
    return slug


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parse_or_restore(ws: Workspace, path: Path, previous: str | None, slug: str,
                      properties: Path, previous_properties: str | None = None):
    """Parse the project with the new files; on failure put back the previous ones (or remove
    them), parse again, and answer 422 with dbt's reason."""
    try:
        project = ws.reload()
        if slug not in project.syncs:
            raise ConfigError(f"dbt did not find the sync model {slug!r} after parsing")
        return project
    except AudsyncError as error:
        for file, text in ((path, previous), (properties, previous_properties)):
            if text is None:
                file.unlink(missing_ok=True)
            else:
                atomic_write(file, text)
        try:
            ws.reload()
        except AudsyncError:
            pass
        raise Invalid(f"the sync was refused by dbt: {error.message}", field="body") from None


def create_sync(ws: Workspace, body: dict[str, Any], created_by: str) -> dict[str, Any]:
    """Create a managed sync from an API body; return its object (201)."""
    status = body.get("status") or "active"
    if status not in ("active", "draft"):
        raise Invalid(f"status {status!r}: a new sync is 'active' or 'draft'", field="status")
    with ws.write_lock:
        project = ws.project()
        _require_state(ws)
        spec = _validated(ws, project, body)
        folder = _models_dir(project)
        slug = _unique_slug(project, folder, spec["name"])
        path = folder / f"{slug}.sql"
        model_text = render_model(spec)
        properties = path.with_suffix(".yml")
        atomic_write(properties, render_properties(slug, spec))
        atomic_write(path, model_text)
        _parse_or_restore(ws, path, None, slug, properties)
        now = utcnow()
        _write_state(ws, slug, sync_id=sync_id_of(ws, slug), display_name=spec["name"], created_by=created_by,
                     created_at=now, status=status, status_error=None, updated_at=now)
        return get_sync(ws, slug)


def update_sync(ws: Workspace, sync_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Apply the fields given (partial PUT); return the object. An edit never starts a run."""
    with ws.write_lock:
        current = get_sync(ws, sync_id)
        changes = {k: v for k, v in body.items() if (v is not None or k in NULLABLE) and _differs(current, k, v)}
        new_status = changes.pop("status", None)
        if new_status is not None:
            allowed = TRANSITIONS.get(current["status"], set())
            if new_status not in STATUSES:
                raise Invalid(f"status {new_status!r}: expected one of {', '.join(STATUSES)}", field="status")
            if new_status not in allowed:
                raise Conflict(f"status: a sync cannot go from {current['status']!r} to {new_status!r}; from "
                               f"{current['status']!r} it may go to {', '.join(sorted(allowed)) or 'nothing'}",
                               code="invalid_transition", field="status")
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise Invalid(f"field(s) {', '.join(sorted(unknown))} cannot be changed", field=sorted(unknown)[0])
        if changes and current["managed_by"] != "api":
            raise Conflict(
                f"sync {current['slug']!r} is hand-written in {current['model_path']}: edit that file to change "
                f"{', '.join(sorted(changes))}; the API changes only its status", code="managed_by_project",
                field=sorted(changes)[0])
        if changes:
            project = ws.project()
            spec = {
                "name": current["name"], "description": current["description"],
                "audience_id": current["audience_name"], "destination_id": current["destination_name"],
                "field_mapping": current["field_mapping"], "sync_mode": current["sync_mode"],
                "schedule": current["schedule"], "config": current["config"], "identifier": current["identifier"],
                "split_group_id": current["split_group_id"],
                **changes,
            }
            if "field_mapping" in changes and "identifier" not in changes:
                spec["identifier"] = None if current["identifier"] not in {
                    m.get("source_column") for m in changes["field_mapping"]} else current["identifier"]
            spec = _validated(ws, project, spec)
            path = project.project_dir / current["model_path"]
            properties = path.with_suffix(".yml")
            previous = path.read_text()
            previous_properties = properties.read_text() if properties.exists() else None
            model_text = render_model(spec)
            atomic_write(properties, render_properties(current["slug"], spec))
            atomic_write(path, model_text)
            _parse_or_restore(ws, path, previous, current["slug"], properties, previous_properties)
            _write_state(ws, current["slug"], display_name=spec["name"], updated_at=utcnow())
        if new_status is not None:
            values: dict[str, Any] = {"status": new_status, "updated_at": utcnow()}
            if new_status != "error":
                values["status_error"] = None
            _write_state(ws, current["slug"], **values)
        return get_sync(ws, current["slug"])


def _differs(current: dict[str, Any], key: str, value: Any) -> bool:
    if key == "audience_id":
        return value not in (current["audience_id"], current["audience_name"])
    if key == "destination_id":
        return value not in (current["destination_id"], current["destination_name"])
    if key == "split_group_id":
        given = value if value is None else split_group_id_of(current["workspace_id"], value)
        return value != current["split_group_id"] and given != current["split_group_id"]
    if key == "sync_mode":
        try:
            return names.normalise_mode(value) != current["sync_mode"]
        except ValueError:
            return True
    return current.get(key) != value


def delete_sync(ws: Workspace, sync_id: str, busy_run: str | None = None) -> None:
    """Delete a managed sync: its file, its relations and its state rows. The destination's
    members stay. ``busy_run``: a run of it that is queued or running (409)."""
    from ..runner import new_run_id

    with ws.write_lock:
        current = get_sync(ws, sync_id)
        if current["managed_by"] != "api":
            raise Conflict(f"sync {current['slug']!r} is hand-written in {current['model_path']}: delete that "
                           "file to delete it", code="managed_by_project")
        if busy_run:
            raise Conflict(f"sync {current['slug']!r} has run {busy_run} queued or running; wait for it to end",
                           code="run_in_progress", extra={"run_id": busy_run})
        sync = ws.project().syncs[current["slug"]]
        runner = ws.state_runner()
        token = "delete-" + new_run_id()
        try:
            with runner.warehouse.session() as session:
                try:
                    runner.state.acquire_lock(session, sync.name, token, lock_timeout_s())
                except LockHeld as error:
                    raise Conflict(error.message, code="run_in_progress") from None
            path = ws.project().project_dir / current["model_path"]
            path.unlink(missing_ok=True)
            path.with_suffix(".yml").unlink(missing_ok=True)
            with runner.warehouse.session() as session:
                q = runner.warehouse.relation_sql
                for part in ("adds", "removes", "updates", "changes", "invalid"):
                    session.execute(f"drop view if exists {q(sync.relation_of(part))}")
                for part in ("", "snapshot", "plan", "candidates"):
                    session.execute(f"drop table if exists {q(sync.relation_of(part))}")
                # The governance relations, where the sync has them.
                for part, suffix in names.GOVERNANCE_SUFFIXES.items():
                    kind = "table" if part == "history" else "view"
                    session.execute(f"drop {kind} if exists {q(sync.relation.with_suffix(suffix))}")
                state = runner.state
                for table in (state.runs, state.errors, state.batches, state.ids, state.syncs):
                    session.execute(f"delete from {table} where sync_name = ?", (sync.name,))
        finally:
            runner.warehouse.close()
        try:
            ws.reload()
        except AudsyncError:
            pass


# -- state rows -------------------------------------------------------------------------------


def _require_state(ws: Workspace) -> None:
    missing = ws.missing_state_tables()
    if missing:
        raise Conflict(f"audsync's state tables {', '.join(missing)} are not built yet; run `dbt run` "
                       "(or restart `audsync serve`, which builds them)", code="not_ready")


def _write_state(ws: Workspace, sync_name: str, **values: Any) -> None:
    """Set columns of the sync's ``audsync_syncs`` row (made when missing)."""
    runner = ws.state_runner()
    try:
        with runner.warehouse.session() as session:
            runner.state.ensure_sync_row(session, sync_name)
            sets = ", ".join(f"{c} = ?" for c in values)
            session.execute(f"update {runner.state.syncs} set {sets} where sync_name = ?",
                            (*values.values(), sync_name))
    finally:
        runner.warehouse.close()
