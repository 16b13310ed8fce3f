"""The dbt profile's credentials, read the way dbt reads them, without importing dbt.

Importing dbt's config machinery costs about 100 MB and 1.5 s, which every ``audsync`` call
would pay to learn a host and a password. This module reads ``profiles.yml`` and renders it
as dbt does: every string is a Jinja template with ``env_var('NAME')``,
``env_var('NAME', 'default')`` and the filters ``as_text``, ``as_number``, ``as_bool`` and
``as_native``; keys take dbt-postgres's aliases (``dbname``, ``pass``). It supports the
adapters the runner supports; :mod:`audsync.project` still runs dbt itself to parse a project.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from .errors import ConfigError

# dbt-postgres's aliases (PostgresCredentials._ALIASES).
POSTGRES_ALIASES = {"dbname": "database", "pass": "password"}


@dataclass
class Credentials:
    """What the runner needs of a dbt target. ``type`` is the adapter; the rest as dbt names it."""

    type: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"].get(name)
        except KeyError:  # during unpickling, before values exists
            raise AttributeError(name) from None

    def __repr__(self) -> str:  # never the password
        return f"Credentials(type={self.type!r})"


class _MissingVariable(Exception):
    def __init__(self, name: str):
        self.name = name


def _env_var(name: str, default: Any = None) -> Any:
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return default
    raise _MissingVariable(name)


def _as_native(value: Any) -> Any:
    try:
        return ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        return value


def _as_bool(value: Any) -> Any:
    native = _as_native(value)
    if isinstance(native, str) and native.lower() in ("true", "false"):
        return native.lower() == "true"
    return native


class _Renderer:
    """Renders profile values like dbt's ProfileRenderer (the subset profiles use)."""

    def __init__(self) -> None:
        self.env = SandboxedEnvironment(undefined=StrictUndefined)
        self.env.globals["env_var"] = _env_var
        self.env.filters.update({
            "as_text": lambda v: "" if v is None else str(v),
            "as_number": lambda v: _as_native(v),
            "as_bool": _as_bool,
            "as_native": _as_native,
        })

    def render(self, value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {k: self.render(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v, where) for v in value]
        if not isinstance(value, str) or "{" not in value:
            return value
        try:
            rendered = self.env.from_string(value).render()
        except _MissingVariable as missing:
            raise ConfigError(
                f"{where}: env_var('{missing.name}') is not set and has no default"
            ) from None
        except TemplateError as error:
            # The template may hold a secret in plain text: name the key, not the text.
            raise ConfigError(f"{where}: cannot render the value ({type(error).__name__})") from None
        # Rendering gives text; numeric keys (port, timeouts) are cast where they are read.
        return rendered


def load_credentials(profiles_dir: Path, profile_name: str, target: str | None) -> tuple[Credentials, str]:
    """The credentials of ``profile_name``'s target (its default when ``target`` is None)."""
    profiles_file = Path(profiles_dir) / "profiles.yml"
    if not profiles_file.exists():
        raise ConfigError(f"no profiles.yml in {profiles_dir}; pass --profiles-dir or set DBT_PROFILES_DIR")
    try:
        raw = yaml.safe_load(profiles_file.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{profiles_file} is not valid YAML") from None
    if profile_name not in raw or not isinstance(raw[profile_name], dict):
        raise ConfigError(f"profile {profile_name!r} (from dbt_project.yml) is not in {profiles_file}")
    renderer = _Renderer()
    profile = raw[profile_name]
    target_name = target or renderer.render(profile.get("target", "default"), f"profile {profile_name!r}, target")
    outputs = profile.get("outputs") or {}
    if target_name not in outputs:
        raise ConfigError(
            f"target {target_name!r} is not in profile {profile_name!r} of {profiles_file}; "
            f"targets: {', '.join(sorted(outputs)) or 'none'}"
        )
    where = f"profile {profile_name!r}, target {target_name!r}"
    values = renderer.render(dict(outputs[target_name]), where)
    adapter_type = values.pop("type", None)
    if not adapter_type:
        raise ConfigError(f"{where}: the key 'type' is missing")
    if adapter_type == "postgres":
        values = _postgres(values, where)
    elif adapter_type == "duckdb":
        values = _duckdb(values)
    elif adapter_type == "spark":
        # dbt-spark's rules live beside the session they serve.
        from .warehouse.spark import normalise_credentials

        values = normalise_credentials(values, where)
    return Credentials(adapter_type, values), target_name


def _postgres(values: dict[str, Any], where: str) -> dict[str, Any]:
    for alias, name in POSTGRES_ALIASES.items():
        if alias in values:
            values[name] = values.pop(alias)
    for key in ("host", "user", "database", "schema"):
        if not values.get(key):
            raise ConfigError(f"{where}: the key '{key}' is missing")
    for key in ("port", "connect_timeout", "keepalives_idle"):
        if values.get(key) not in (None, ""):
            try:
                values[key] = int(values[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: the key '{key}' is {values[key]!r}; expected a number") from None
    values.setdefault("port", 5432)
    values.setdefault("password", "")
    return values


def _duckdb(values: dict[str, Any]) -> dict[str, Any]:
    values.setdefault("path", ":memory:")
    values.setdefault("schema", "main")
    if not values.get("database"):
        # dbt-duckdb names the catalog after the file's stem.
        path = str(values["path"])
        values["database"] = "memory" if path in (":memory:", "") else Path(path).stem
    return values
