"""A sync's governance settings as the runner reads them: from dbt's manifest (the model's
config, which dbt_project.yml's ``+max_removals_pct: ...`` also reaches) over the project's
``vars`` (``audsync_guardrails``), with governance.md's defaults.

dbt validated every key when it built the sync (``macros/governance/config.sql``); the
runner checks the types again so that a hand-edited manifest cannot make it guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "max_removals_pct": 50,
    "guard_min_rows": 100,
    "max_removals": None,
    "max_changes_pct": None,
    "allow_empty": False,
}


@dataclass(frozen=True)
class Guardrails:
    """The limits a run's frozen plan is checked against before anything is sent."""

    max_removals_pct: float | None = 50
    guard_min_rows: int = 100
    max_removals: int | None = None
    max_changes_pct: float | None = None
    allow_empty: bool = False


def node_config(project, sync) -> dict[str, Any]:
    """The sync model's config in the manifest."""
    node = project.manifest.get("nodes", {}).get(sync.unique_id) or {}
    return dict(node.get("config") or {})


def project_vars(project) -> dict[str, Any]:
    """The top-level ``vars`` of the project's dbt_project.yml."""
    path = project.project_dir / "dbt_project.yml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    found = data.get("vars") or {}
    return found if isinstance(found, dict) else {}


def guardrails_of(project, sync) -> Guardrails:
    """The guardrails of ``sync``: its config, else vars.audsync_guardrails, else defaults."""
    config = node_config(project, sync)
    defaults = project_vars(project).get("audsync_guardrails") or {}
    values: dict[str, Any] = {}
    for key, fallback in DEFAULTS.items():
        value = config.get(key, defaults.get(key, fallback) if isinstance(defaults, dict) else fallback)
        if key == "allow_empty":
            if not isinstance(value, bool):
                raise _error(sync, key, value, "true or false")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise _error(sync, key, value, "a number, 0 or more")
        values[key] = value
    if values["guard_min_rows"] is None:
        values["guard_min_rows"] = 0
    return Guardrails(**values)


def split_group_of(project, sync) -> str | None:
    """The ``split.group`` the sync sends, or None."""
    value = node_config(project, sync).get("split_group")
    return value if isinstance(value, str) and value else None


def declared_split_groups(project) -> list[str]:
    """Every ``'<split>.<group>'`` of ``vars.audsync_splits``, in declaration order (what a
    sync's ``split_group`` may name; dbt checks the splits themselves when it builds a sync)."""
    splits = project_vars(project).get("audsync_splits") or {}
    out: list[str] = []
    for split, spec in (splits.items() if isinstance(splits, dict) else ()):
        groups = spec.get("groups") if isinstance(spec, dict) else None
        for group in groups if isinstance(groups, list) else ():
            if isinstance(group, dict) and isinstance(group.get("name"), str):
                out.append(f"{split}.{group['name']}")
    return out


def _error(sync, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(
        f"sync {sync.name!r} ({sync.path}): config key {key!r} is {value!r}; expected {expected}",
        sync=sync.name, key=key,
    )
