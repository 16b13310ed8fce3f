"""The dbt project as the runner sees it: its syncs, its state tables, its warehouse.

Syncs are found in dbt's manifest, the same one ``dbt run`` writes, so a sync's relations,
config and tags are exactly what dbt built. When the manifest is missing, older than the
project's files, does not list the project's model files (one was added, deleted or renamed),
or was parsed for another target, the runner runs ``dbt parse`` itself (dbt's partial parsing
keeps that cheap). A sync whose config is invalid is kept aside in :attr:`Project.invalid`:
commands about it (and ``audsync check``) fail with its error; commands about other syncs work.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import names
from .errors import ConfigError
from .profiles import Credentials, load_credentials
from .warehouse import Relation, Warehouse, open_warehouse

# The values of a sync's ``identifier_normalise``, as macros/sync/config.sql
# ``identifier_normalisations()`` spells them for dbt.
IDENTIFIER_NORMALISATIONS = ("none", "trim", "lower_trim")

# Written beside the manifest when audsync parses, so a later call with another target
# knows the manifest's schemas are not its own.
PARSE_STAMP = "audsync_parse.json"


@dataclass(frozen=True)
class FieldMap:
    """One ``field_mapping`` entry."""

    source_column: str
    destination_field: str


@dataclass(frozen=True)
class SyncModel:
    """A dbt model with the ``audience_sync`` materialization."""

    name: str
    unique_id: str
    relation: Relation
    destination: str
    mode: str
    identifier: str
    mapping: tuple[FieldMap, ...]
    schedule: str
    settings: dict[str, Any]
    description: str = ""
    tags: tuple[str, ...] = ()
    fqn: tuple[str, ...] = ()
    path: str = ""
    identifier_normalise: str = "none"
    """How the destination tells keys apart (``none``, ``trim``, ``lower_trim``): keys that
    are one key once normalised are duplicates, left out of ``S`` and shown in ``S__invalid``."""

    def relation_of(self, part: str) -> Relation:
        """The relation ``S`` (part ``""``) or ``S__<part>`` (``snapshot``, ``plan``, ...)."""
        return self.relation if not part else self.relation.with_suffix(names.SUFFIXES[part])


@dataclass
class Project:
    """A dbt project directory with its profile, manifest and syncs."""

    project_dir: Path
    profiles_dir: Path
    target: str | None
    profile_name: str
    manifest: dict[str, Any]
    credentials: Credentials
    target_name: str
    syncs: dict[str, SyncModel] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    """Syncs whose config is invalid, with the error that names the sync, the key and the value."""
    state_relations: dict[str, Relation] = field(default_factory=dict)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        project_dir: str | os.PathLike | None = None,
        profiles_dir: str | os.PathLike | None = None,
        target: str | None = None,
        parse: bool = True,
    ) -> "Project":
        """Read the project at ``project_dir``, parsing it with dbt when needed."""
        project_dir = Path(project_dir or os.getcwd()).resolve()
        project_file = project_dir / "dbt_project.yml"
        if not project_file.exists():
            raise ConfigError(
                f"no dbt_project.yml in {project_dir}; run audsync from a dbt project or pass --project-dir"
            )
        project_yml = yaml.safe_load(project_file.read_text()) or {}
        profiles = Path(profiles_dir).resolve() if profiles_dir else default_profiles_dir(project_dir)
        manifest_path = project_dir / project_yml.get("target-path", os.environ.get("DBT_TARGET_PATH", "target")) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        if parse and manifest_is_stale(manifest_path, project_dir, project_yml, target, manifest):
            run_dbt_parse(project_dir, profiles, target, manifest_path, project_yml)
            manifest = None
        if not manifest_path.exists():
            raise ConfigError(f"no dbt manifest at {manifest_path}; run `dbt parse` in {project_dir}")
        if manifest is None:
            manifest = json.loads(manifest_path.read_text())
        profile_name = project_yml.get("profile") or project_yml.get("name")
        credentials, target_name = load_credentials(profiles, profile_name, target)
        if parse and not _manifest_matches(manifest, credentials):
            run_dbt_parse(project_dir, profiles, target, manifest_path, project_yml)
            manifest = json.loads(manifest_path.read_text())
        project = cls(
            project_dir=project_dir,
            profiles_dir=profiles,
            target=target,
            profile_name=profile_name,
            manifest=manifest,
            credentials=credentials,
            target_name=target_name,
        )
        project._read_manifest()
        return project

    def _read_manifest(self) -> None:
        for unique_id, node in self.manifest.get("nodes", {}).items():
            if node.get("resource_type") != "model":
                continue
            config = node.get("config", {})
            relation = Relation(node.get("database"), node["schema"], node.get("alias") or node["name"])
            if node.get("package_name") == names.PACKAGE and node["name"] in names.STATE_TABLES:
                self.state_relations[node["name"]] = relation
            if config.get("materialized") != names.MATERIALIZATION or not config.get("enabled", True):
                continue
            try:
                self.syncs[node["name"]] = _sync_model(unique_id, node, relation, config)
            except ConfigError as error:
                # Kept aside: only commands about this sync (and `check`) fail with it.
                self.invalid[node["name"]] = error.message

    # -- the warehouse ----------------------------------------------------------------------

    def open_warehouse(self) -> Warehouse:
        """Connect with the dbt profile's credentials for the chosen target."""
        try:
            return open_warehouse(self.credentials, self.target_name)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def state_relation(self, table: str) -> Relation:
        """The relation of one of the package's state tables."""
        if table not in self.state_relations:
            raise ConfigError(
                f"the audsync package's model {table!r} is not in this project's manifest; add the "
                "package to packages.yml and run `dbt deps`"
            )
        return self.state_relations[table]

    # -- selection --------------------------------------------------------------------------

    def get(self, name: str) -> SyncModel:
        """The sync called ``name``, or a ConfigError: its config's error when it is invalid,
        else one listing the syncs there are."""
        if name in self.invalid:
            raise ConfigError(self.invalid[name], sync=name)
        if name not in self.syncs:
            known = ", ".join(sorted(self.syncs)) or "none"
            raise ConfigError(f"no sync named {name!r} in this project; syncs: {known}")
        return self.syncs[name]

    def select(self, selector: str) -> list[SyncModel]:
        """Syncs matching a dbt-style selector: space-separated terms are a union, commas
        within a term an intersection. Terms: a name (wildcards allowed), ``tag:T``,
        ``path:P``, ``fqn:F``, ``destination:D``, ``mode:M``."""
        chosen: dict[str, SyncModel] = {}
        for term in selector.split():
            matches = None
            for part in term.split(","):
                found = {s.name for s in self.syncs.values() if _matches(s, part)}
                matches = found if matches is None else matches & found
            for name in sorted(matches or ()):
                chosen[name] = self.syncs[name]
            # A name pattern that matches an invalid sync selects it: fail with its error
            # rather than silently leave it out (other terms cannot be matched without config).
            if "," not in term and ":" not in term:
                for name in sorted(self.invalid):
                    if fnmatch.fnmatchcase(name, term):
                        raise ConfigError(self.invalid[name], sync=name)
        return list(chosen.values())


def _sync_model(unique_id: str, node: dict[str, Any], relation: Relation, config: dict[str, Any]) -> SyncModel:
    """The sync of a manifest node, or a ConfigError naming the sync, the key and the value."""
    where = f"sync {node['name']!r} ({node.get('original_file_path')})"
    try:
        mode = names.normalise_mode(config.get("sync_mode", "mirror"))
    except ValueError as error:
        raise ConfigError(f"{where}: {error}", sync=node["name"], key="sync_mode") from None
    normalise = config.get("identifier_normalise") or "none"
    if normalise not in IDENTIFIER_NORMALISATIONS:
        raise ConfigError(
            f"{where}: config key 'identifier_normalise' is {normalise!r}; expected one of"
            f" {', '.join(IDENTIFIER_NORMALISATIONS)}",
            sync=node["name"], key="identifier_normalise",
        )
    raw_mapping = config.get("field_mapping") or []
    if not isinstance(raw_mapping, list):
        raise ConfigError(
            f"{where}: config key 'field_mapping' is a {type(raw_mapping).__name__}; expected a list"
            " of {source_column, destination_field}",
            sync=node["name"], key="field_mapping",
        )
    mapping = tuple(
        FieldMap(item["source_column"], item["destination_field"])
        for item in raw_mapping
        if isinstance(item, dict) and "source_column" in item and "destination_field" in item
    )
    return SyncModel(
        name=node["name"],
        unique_id=unique_id,
        relation=relation,
        destination=config.get("destination") or "",
        mode=mode,
        identifier=config.get("identifier") or "",
        mapping=mapping,
        schedule=config.get("schedule") or "manual",
        settings=dict(config.get("config") or {}),
        description=node.get("description") or "",
        tags=tuple(node.get("tags") or config.get("tags") or ()),
        fqn=tuple(node.get("fqn") or ()),
        path=node.get("original_file_path") or "",
        identifier_normalise=normalise,
    )


def _matches(sync: SyncModel, part: str) -> bool:
    method, _, value = part.partition(":") if ":" in part else ("name", "", part)
    if method == "name":
        return fnmatch.fnmatchcase(sync.name, value)
    if method == "tag":
        return any(fnmatch.fnmatchcase(tag, value) for tag in sync.tags)
    if method == "path":
        return sync.path == value or sync.path.startswith(value.rstrip("/") + "/") or fnmatch.fnmatchcase(sync.path, value)
    if method == "fqn":
        return fnmatch.fnmatchcase(".".join(sync.fqn), value) or ".".join(sync.fqn).startswith(value + ".")
    if method == "destination":
        return fnmatch.fnmatchcase(sync.destination, value)
    if method == "mode":
        return sync.mode == names.MODE_ALIASES.get(value, value)
    raise ConfigError(
        f"unknown selector method {method!r} in {part!r}; expected a name, tag:, path:, fqn:, destination: or mode:"
    )


# -- dbt's files ------------------------------------------------------------------------------


def default_profiles_dir(project_dir: Path) -> Path:
    """dbt's own order: DBT_PROFILES_DIR, the project directory, then ~/.dbt."""
    if os.environ.get("DBT_PROFILES_DIR"):
        return Path(os.environ["DBT_PROFILES_DIR"]).resolve()
    if (project_dir / "profiles.yml").exists():
        return project_dir
    return Path.home() / ".dbt"


def _project_files(project_dir: Path, project_yml: dict) -> Iterable[Path]:
    yield project_dir / "dbt_project.yml"
    for name in ("packages.yml", "dependencies.yml", "selectors.yml"):
        yield project_dir / name
    for key, default in (("model-paths", ["models"]), ("macro-paths", ["macros"]),
                         ("seed-paths", ["seeds"]), ("snapshot-paths", ["snapshots"])):
        for folder in project_yml.get(key, default):
            root = project_dir / folder
            if root.is_dir():
                for dirpath, _dirs, files in os.walk(root):
                    for f in files:
                        yield Path(dirpath) / f


def _model_paths(project_yml: dict) -> list[str]:
    return list(project_yml.get("model-paths", ["models"]))


def files_digest(project_dir: Path, project_yml: dict) -> str:
    """A digest of the project's files, their paths, sizes and modification times: it changes
    when a file is added, deleted, renamed or edited, which the newest mtime alone misses."""
    digest = hashlib.sha256()
    entries = []
    for path in _project_files(project_dir, project_yml):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        entries.append(f"{path.relative_to(project_dir).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def _model_files_on_disk(project_dir: Path, project_yml: dict) -> set[str]:
    """The project's model files (``.sql``, ``.py``), as dbt's ``original_file_path``."""
    found: set[str] = set()
    for folder in _model_paths(project_yml):
        root = project_dir / folder
        if root.is_dir():
            for dirpath, _dirs, files in os.walk(root):
                for name in files:
                    if name.endswith((".sql", ".py")):
                        found.add((Path(dirpath) / name).relative_to(project_dir).as_posix())
    return found


def _model_files_in(manifest: dict, project_name: str | None) -> set[str]:
    """The root project's model files the manifest knows, enabled or disabled."""
    nodes = list(manifest.get("nodes", {}).values())
    for disabled in (manifest.get("disabled") or {}).values():
        nodes.extend(disabled if isinstance(disabled, list) else [disabled])
    return {
        Path(node["original_file_path"]).as_posix()
        for node in nodes
        if isinstance(node, dict) and node.get("resource_type") == "model"
        and node.get("original_file_path")
        and (project_name is None or node.get("package_name") == project_name)
    }


def manifest_is_stale(
    manifest_path: Path,
    project_dir: Path,
    project_yml: dict,
    target: str | None,
    manifest: dict | None = None,
) -> bool:
    """True when the manifest is missing, older than a project file, does not match the
    project's files (one added, deleted or renamed), or is for another target.

    ``manifest`` is the manifest's content when the caller has read it already.
    """
    if not manifest_path.exists():
        return True
    built = manifest_path.stat().st_mtime
    for path in _project_files(project_dir, project_yml):
        try:
            if path.stat().st_mtime > built:
                return True
        except FileNotFoundError:
            continue
    stamp_path = manifest_path.parent / PARSE_STAMP
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else None
    ours = stamp is not None and stamp.get("manifest_mtime") == built
    if ours and stamp.get("files") is not None and stamp["files"] != files_digest(project_dir, project_yml):
        # audsync parsed it, and a file has been added, deleted, renamed or edited since.
        return True
    # Whoever parsed it (dbt run writes the manifest too): every model file on disk is in the
    # manifest and every model of the manifest still has its file.
    if manifest is None:
        manifest = json.loads(manifest_path.read_text())
    if _model_files_in(manifest, project_yml.get("name")) != _model_files_on_disk(project_dir, project_yml):
        return True
    if target is not None:
        # A manifest dbt wrote itself does not say its target: trust it only for the default.
        return not ours or stamp.get("target") != target
    return ours and stamp.get("target") is not None


def _manifest_matches(manifest: dict, credentials: Credentials) -> bool:
    """False when the manifest was parsed for a warehouse other than the target's: another
    adapter type, or (the usual case of dev and prod targets) another database."""
    if manifest.get("metadata", {}).get("adapter_type") not in (None, credentials.type):
        return False
    databases = {
        (node.get("database") or "").lower()
        for node in manifest.get("nodes", {}).values()
        if node.get("package_name") == names.PACKAGE and node.get("resource_type") == "model"
    }
    expected = (getattr(credentials, "database", None) or "").lower()
    return not databases or not expected or databases == {expected}


def run_dbt_parse(
    project_dir: Path, profiles_dir: Path, target: str | None, manifest_path: Path,
    project_yml: dict | None = None,
) -> None:
    """Run ``dbt parse`` in-process, as the user would (partial parsing on, so only changed
    files are parsed again), and stamp the manifest's target and the project's files."""
    from dbt.cli.main import dbtRunner

    args = ["parse", "--project-dir", str(project_dir), "--profiles-dir", str(profiles_dir), "--quiet"]
    if target:
        args += ["--target", target]
    result = dbtRunner().invoke(args)
    if not result.success:
        detail = f": {result.exception}" if result.exception else ""
        raise ConfigError(f"`dbt {' '.join(args)}` failed{detail}; fix the project and try again")
    if manifest_path.exists():
        stamp = {"target": target, "manifest_mtime": manifest_path.stat().st_mtime}
        if project_yml is not None:
            stamp["files"] = files_digest(project_dir, project_yml)
        (manifest_path.parent / PARSE_STAMP).write_text(json.dumps(stamp))

