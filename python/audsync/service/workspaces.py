"""Workspaces (api.md, Starting it; Auth and workspaces): a dbt project, its target and
destinations, and the API tokens that reach it.

Tokens are kept only as SHA-256 digests and compared in constant time with
:func:`hmac.compare_digest`, against every stored digest so that the time does not say which
one matched. A token never appears in a message, a log line or an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

TOKENS_ENV = "AUDSYNC_API_TOKENS"
TOKEN_ENV = "AUDSYNC_API_TOKEN"
# One process-wide lock around dbt in this process (parse) and dbt subprocesses on the same
# project folders: dbt's in-process runner keeps global state and is not thread-safe, and two
# dbts writing one target/ folder at once corrupt each other's manifest.
DBT_LOCK = threading.RLock()


def digest(token: str) -> str:
    """The hex SHA-256 of a token: the only form in which a token is kept."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def stable_id(kind: str, *parts: str) -> str:
    """``uuid5(NAMESPACE_URL, "audsync:<kind>:" + ":".join(parts))``: ids of api.md."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"audsync:{kind}:" + ":".join(parts)))


@dataclass(frozen=True)
class Token:
    """A named API token, by its digest."""

    name: str
    sha256: str


@dataclass
class Workspace:
    """One workspace: a dbt project with its target, destinations file and tokens.

    The project is read lazily and re-read when its files change (a hand-written sync added,
    an API write); :attr:`write_lock` serialises the workspace's writes (api.md: writes are
    serialised per workspace).
    """

    name: str
    project_dir: Path
    profiles_dir: Path | None = None
    target: str | None = None
    destinations_file: Path | None = None
    tokens: list[Token] = field(default_factory=list)
    id: str = ""
    write_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _project: Any = field(default=None, repr=False)
    _project_key: Any = field(default=None, repr=False)
    _read_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the project ------------------------------------------------------------------------

    def project(self):
        """The dbt project, re-read (and re-parsed by dbt) when its files changed."""
        from ..project import Project, manifest_is_stale

        with self._read_lock:
            current = self._project
            if current is not None:
                yml = yaml.safe_load((current.project_dir / "dbt_project.yml").read_text()) or {}
                manifest = current.project_dir / yml.get("target-path", "target") / "manifest.json"
                try:
                    stale = manifest_is_stale(manifest, current.project_dir, yml, self.target)
                except ValueError:
                    # Half a manifest: a dbt child (a trigger's evaluation) is writing it under
                    # DBT_LOCK. Look again once it is done, rather than answer 500.
                    with DBT_LOCK:
                        stale = manifest_is_stale(manifest, current.project_dir, yml, self.target)
                key = manifest.stat().st_mtime if manifest.exists() else None
                if not stale and key == self._project_key:
                    return current
            with DBT_LOCK:
                project = Project.load(self.project_dir, self.profiles_dir, self.target)
            manifest = project.project_dir / (yaml.safe_load((project.project_dir / "dbt_project.yml").read_text())
                                              or {}).get("target-path", "target") / "manifest.json"
            self._project = project
            self._project_key = manifest.stat().st_mtime if manifest.exists() else None
            return project

    def reload(self):
        """Parse the project now (after a write), raising ConfigError when dbt refuses it.

        Always parses: a deleted model file leaves every other file's time as it was, so
        the manifest's freshness check cannot see it."""
        from ..project import Project, default_profiles_dir, run_dbt_parse

        with self._read_lock:
            self._project = None
            yml = yaml.safe_load((self.project_dir / "dbt_project.yml").read_text()) or {}
            manifest = self.project_dir / yml.get("target-path", "target") / "manifest.json"
            profiles = Path(self.profiles_dir).resolve() if self.profiles_dir else default_profiles_dir(self.project_dir)
            with DBT_LOCK:
                run_dbt_parse(self.project_dir, profiles, self.target, manifest)
                project = Project.load(self.project_dir, self.profiles_dir, self.target)
            self._project = project
            self._project_key = manifest.stat().st_mtime if manifest.exists() else None
            return project

    def destinations(self):
        """The destinations file, read afresh (it may change while the service runs)."""
        from ..config import find_destinations_file, load_destinations

        path = find_destinations_file(self.project().project_dir, self.destinations_file)
        if not path.exists() and self.destinations_file is None:
            return {}  # a project with no destinations yet: nothing to name, not an error
        return load_destinations(path)

    def runner(self, reporter=None):
        """A new runner on its own warehouse connection (close with :meth:`close_runner`)."""
        from ..runner import SyncRunner

        project = self.project()
        return SyncRunner(project, project.open_warehouse(), self.destinations(), reporter)

    def state_runner(self):
        """A runner for reading and writing state only (no destinations needed)."""
        from ..runner import SyncRunner

        project = self.project()
        return SyncRunner(project, project.open_warehouse(), {})

    def missing_state_tables(self) -> list[str]:
        """audsync's state tables the workspace's warehouse does not have yet."""
        runner = self.state_runner()
        try:
            with runner.warehouse.session() as session:
                return list(runner.state.missing_tables(session))
        finally:
            runner.warehouse.close()

    # -- auth -------------------------------------------------------------------------------

    def token_name(self, presented_digest: str) -> str | None:
        """The name of the token with this digest, compared in constant time, or ``None``."""
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.sha256, presented_digest):
                found = token.name
        return found


def workspace_id(project_dir: Path, profiles_dir: Path | None, target: str | None) -> str:
    """The stable id of a workspace: its dbt project name and resolved target."""
    from ..profiles import load_credentials
    from ..project import default_profiles_dir

    project_dir = Path(project_dir).resolve()
    yml = yaml.safe_load((project_dir / "dbt_project.yml").read_text()) or {}
    profiles = Path(profiles_dir).resolve() if profiles_dir else default_profiles_dir(project_dir)
    _credentials, target_name = load_credentials(profiles, yml.get("profile") or yml.get("name"), target)
    return stable_id("workspace", str(yml.get("name")), target_name)


def env_tokens(env: dict[str, str] | None = None) -> list[Token]:
    """The default workspace's tokens: ``AUDSYNC_API_TOKENS`` (comma-separated) or
    ``AUDSYNC_API_TOKEN``, named ``token1``, ``token2``... (``created_by``)."""
    env = os.environ if env is None else env
    raw = env.get(TOKENS_ENV) or env.get(TOKEN_ENV) or ""
    values = [t.strip() for t in raw.split(",") if t.strip()]
    return [Token(f"token{i}" if len(values) > 1 else "api", digest(v)) for i, v in enumerate(values, 1)]


def default_workspace(project_dir, profiles_dir, target, destinations_file) -> Workspace:
    """The one workspace of the global options, with the environment's tokens."""
    project_dir = Path(project_dir or os.getcwd()).resolve()
    if not (project_dir / "dbt_project.yml").exists():
        raise ConfigError(f"no dbt_project.yml in {project_dir}; pass --project-dir")
    workspace = Workspace(
        name=yaml.safe_load((project_dir / "dbt_project.yml").read_text()).get("name", "default"),
        project_dir=project_dir, profiles_dir=Path(profiles_dir) if profiles_dir else None,
        target=target, destinations_file=Path(destinations_file) if destinations_file else None,
        tokens=env_tokens(),
    )
    workspace.id = workspace_id(project_dir, workspace.profiles_dir, target)
    return workspace


def load_workspaces(path: Path) -> list[Workspace]:
    """Read ``workspaces.yml`` (rendered with ``env_var()`` like profiles); ConfigError naming
    the entry and key for anything wrong. Tokens given in clear are hashed at once."""
    from ..config import _Renderer  # one env_var renderer for every file audsync reads

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--workspaces {path}: cannot be read ({type(error).__name__})") from None
    entries = document.get("workspaces") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--workspaces {path}: expected a key 'workspaces' with a list of workspaces")
    renderer = _Renderer(os.environ)
    workspaces: list[Workspace] = []
    for n, entry in enumerate(entries):
        where = f"--workspaces {path}: workspace {n + 1}"
        if not isinstance(entry, dict) or not entry.get("project_dir"):
            raise ConfigError(f"{where}: key 'project_dir' is required")
        unknown = set(entry) - {"id", "name", "project_dir", "target", "profiles_dir", "destinations", "tokens"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected id, name, "
                              "project_dir, target, profiles_dir, destinations, tokens")

        def value(key: str, secret: bool = False, source: dict = entry):
            raw = source.get(key)
            return None if raw is None else renderer.render(raw, f"workspace {n + 1}", key, secret=secret)

        base = path.parent
        project_dir = (base / str(value("project_dir"))).resolve()
        profiles_dir = value("profiles_dir")
        destinations = value("destinations")
        tokens: list[Token] = []
        for t, item in enumerate(entry.get("tokens") or []):
            if not isinstance(item, dict) or not item.get("name") or not (item.get("sha256") or item.get("token")):
                raise ConfigError(f"{where}: token {t + 1}: expected 'name' and 'sha256' (or 'token')")
            if item.get("sha256"):
                hexdigest = str(value("sha256", source=item)).strip().lower()
                if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
                    raise ConfigError(f"{where}: token {item['name']!r}: 'sha256' is not 64 hex digits")
            else:
                hexdigest = digest(str(value("token", secret=True, source=item)))
            tokens.append(Token(str(item["name"]), hexdigest))
        if not (project_dir / "dbt_project.yml").exists():
            raise ConfigError(f"{where}: project_dir {project_dir} has no dbt_project.yml")
        workspace = Workspace(
            name=str(entry.get("name") or project_dir.name), project_dir=project_dir,
            profiles_dir=(base / str(profiles_dir)).resolve() if profiles_dir else None,
            target=value("target"), destinations_file=(base / str(destinations)).resolve() if destinations else None,
            tokens=tokens,
        )
        workspace.id = str(entry["id"]) if entry.get("id") else workspace_id(project_dir, workspace.profiles_dir, workspace.target)
        workspaces.append(workspace)
    ids = [w.id for w in workspaces]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--workspaces {path}: two workspaces have the same id; give each an 'id'")
    return workspaces


class Registry:
    """The service's workspaces, and which of them a token reaches."""

    def __init__(self, workspaces: list[Workspace]):
        self.workspaces = {w.id: w for w in workspaces}

    def has_tokens(self) -> bool:
        return any(w.tokens for w in self.workspaces.values())

    def authenticate(self, token: str) -> list[tuple[Workspace, str]]:
        """The workspaces this token reaches, with the token's name in each (may be empty)."""
        presented = digest(token)
        reached = []
        for workspace in self.workspaces.values():
            name = workspace.token_name(presented)
            if name is not None:
                reached.append((workspace, name))
        return reached
