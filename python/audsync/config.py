"""``destinations.yml``: where each destination is and how to reach it (contract section 7).

The file maps destination names to settings. Like dbt's ``profiles.yml``, every string value
is a Jinja template, rendered in a sandbox with ``env_var``::

    crm_hook:
      type: webhook
      url: https://hooks.example.com/audsync
      secret: "{{ env_var('CRM_HOOK_SECRET') }}"
      timeout_s: "{{ env_var('CRM_HOOK_TIMEOUT', '10') }}"

:func:`load_destinations` stops at the first problem (for ``audsync run``);
:func:`check_destinations` returns every problem (for ``audsync check``). Either way each
problem is a :class:`~audsync.errors.ConfigError` naming the destination and the key, and
never a secret's value: the values of keys a connector declares ``secret`` are registered with
:mod:`audsync.redact` as soon as they are rendered.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from audsync import redact
from audsync.destinations import registry
from audsync.destinations.base import Connector, SyncInfo
from audsync.errors import ConfigError

DEFAULT_FILENAME = "destinations.yml"
ENV_VAR = "AUDSYNC_DESTINATIONS"

_WHERE_ELSE = f"pass --destinations PATH or set {ENV_VAR} to use another file"

# Key names that suggest a secret, for destinations whose connector (and so whose declared
# secret keys) cannot be known: their values are registered for redaction all the same, and
# their template errors are reported without detail.
_SECRET_HINTS = ("secret", "token", "password", "passwd", "key", "credential", "auth")


# -- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationConfig:
    """One destination of ``destinations.yml``, rendered and validated."""

    name: str
    """The destination's name, as syncs refer to it."""
    type: str
    """The destination type (an alias resolved to its registered name)."""
    settings: Mapping[str, Any] = field(repr=False)
    """Every key but ``type``, rendered, numbers coerced, defaults filled in."""
    connector: type[Connector] = field(repr=False)
    """The connector class serving :attr:`type`."""

    def secret_values(self) -> list[str]:
        """The rendered values of the keys the connector declares ``secret=True``."""
        values: list[str] = []
        for key in self.connector.all_config_keys():
            if key.secret:
                values.extend(_leaves(self.settings.get(key.name)))
        return values

    def create_connector(self, sync: SyncInfo, http: Any) -> Connector:
        """A connector instance for one run of ``sync``, making its calls through ``http``."""
        return self.connector(self.name, self.settings, sync, http)

    def __repr__(self) -> str:
        # Settings are left out on purpose: a repr ends up in logs and tracebacks.
        return f"DestinationConfig(name={self.name!r}, type={self.type!r})"


class DestinationsCheck(NamedTuple):
    """What :func:`check_destinations` found."""

    destinations: dict[str, DestinationConfig]
    """The destinations without a problem."""
    errors: list[ConfigError]
    """Every problem found, in file order."""


# -- finding and loading ------------------------------------------------------------------


def find_destinations_file(
    project_dir: str | os.PathLike[str], explicit: str | os.PathLike[str] | None = None
) -> Path:
    """The destinations file to use, which need not exist yet.

    ``explicit`` (``--destinations``) first, else ``$AUDSYNC_DESTINATIONS``, else
    ``<project_dir>/destinations.yml``.
    """
    if explicit:
        return Path(explicit).expanduser()
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path(project_dir).expanduser() / DEFAULT_FILENAME


def load_destinations(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> dict[str, DestinationConfig]:
    """Read, render and validate ``destinations.yml``, by name in file order.

    Args:
        path: the file (see :func:`find_destinations_file`).
        env: the variables ``env_var`` reads (default: the process environment).

    Raises:
        ConfigError: at the first problem, naming the destination and the key.
    """
    problems = _Problems(collect=False)
    return _load(Path(path), problems, env)


def check_destinations(
    path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> DestinationsCheck:
    """Like :func:`load_destinations`, but return every problem instead of raising the first."""
    problems = _Problems(collect=True)
    destinations = _load(Path(path), problems, env)
    return DestinationsCheck(destinations, problems.errors)


class _Problems:
    """Where problems go: raised at once, or collected for ``audsync check``."""

    def __init__(self, collect: bool):
        self.collect = collect
        self.errors: list[ConfigError] = []

    def add(self, error: ConfigError) -> None:
        if not self.collect:
            raise error
        self.errors.append(error)


def _load(
    path: Path, problems: _Problems, env: Mapping[str, str] | None
) -> dict[str, DestinationConfig]:
    """Load every destination of ``path``, reporting problems to ``problems``."""
    try:
        data = _read_yaml(path)
    except ConfigError as exc:
        problems.add(exc)
        return {}
    if data is None:  # an empty file declares no destination
        return {}
    if not isinstance(data, dict):
        problems.add(
            ConfigError(
                f"{path}: expected a mapping of destination names to their settings,"
                f" got {_kind(data)}"
            )
        )
        return {}
    renderer = _Renderer(os.environ if env is None else env)
    loaded: dict[str, DestinationConfig] = {}
    for name, raw in data.items():
        if not isinstance(name, str):
            problems.add(ConfigError(f"{path}: destination name {name!r} must be a string"))
            continue
        destination = _load_one(name, raw, renderer, problems)
        if destination is not None:
            loaded[name] = destination
    return loaded


def _load_one(
    name: str, raw: Any, renderer: _Renderer, problems: _Problems
) -> DestinationConfig | None:
    """Render and validate one destination; ``None`` if it has a problem."""
    if not isinstance(raw, dict):
        problems.add(
            ConfigError(
                f"destination {name!r}: expected a mapping of settings, got {_kind(raw)}",
                destination=name,
            )
        )
        return None
    errors_before = len(problems.errors)

    resolved = _resolve_type(name, raw, renderer, problems)
    if resolved is not None:
        secret_keys = {k.name for k in resolved[1].all_config_keys() if k.secret}
    else:
        # Without a connector the secret keys are unknown: guess from their names, so that
        # a template error in a likely secret is reported without its text.
        secret_keys = {k for k in raw if isinstance(k, str) and _looks_secret(k)}

    # Every key is rendered even when the type is wrong, so that `audsync check` also names
    # the missing environment variables in one pass.
    rendered: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "type":
            continue
        if not isinstance(key, str):
            problems.add(
                ConfigError(f"destination {name!r}: key {key!r} must be text", destination=name)
            )
            continue
        try:
            rendered[key] = renderer.render(value, name, key, secret=key in secret_keys)
        except ConfigError as exc:
            problems.add(exc)
            continue
        if key in secret_keys:
            # Registered before any further check, so that no later message can show it.
            redact.register_secrets(_leaves(rendered[key]))

    if resolved is None:
        return None
    type_name, connector = resolved
    settings = _validate(name, type_name, connector, rendered, problems)
    if len(problems.errors) > errors_before:
        return None
    return DestinationConfig(name, type_name, _with_defaults(connector, settings), connector)


def _resolve_type(
    name: str, raw: dict, renderer: _Renderer, problems: _Problems
) -> tuple[str, type[Connector]] | None:
    """The registered type and connector class of the destination; ``None`` after reporting."""
    if raw.get("type") in (None, ""):
        problems.add(
            _error(name, "type", f"missing; known types: {', '.join(registry.known_types())}")
        )
        return None
    try:
        type_name = renderer.render(raw["type"], name, "type", secret=False)
    except ConfigError as exc:
        problems.add(exc)
        return None
    if not isinstance(type_name, str):
        problems.add(_error(name, "type", f"must be a string, got {_kind(type_name)}"))
        return None
    canonical = registry.resolve_type(type_name)
    if canonical is None:
        known = registry.known_types()
        close = difflib.get_close_matches(type_name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listed = ", ".join(known)
        problems.add(
            _error(name, "type", f"unknown type {type_name!r}{hint}; known types: {listed}")
        )
        return None
    try:
        connector = registry.get_connector(canonical)
    except ConfigError as exc:
        problems.add(_error(name, "type", exc.message))
        return None
    return canonical, connector


# -- validation ---------------------------------------------------------------------------


class _Number(NamedTuple):
    """How a common numeric key is checked."""

    expected: str
    parse: Callable[[Any], int | float]
    accepts: Callable[[int | float], bool]


def _parse_int(value: Any) -> int:
    """An int from an int or a string of digits (env_var renders to text)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(value)
    return int(value)


def _parse_number(value: Any) -> float:
    """A finite number from an int, a float or numeric text."""
    if isinstance(value, bool):
        raise ValueError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


_NUMBERS: dict[str, _Number] = {
    "batch_size": _Number("a positive integer", _parse_int, lambda v: v > 0),
    "max_concurrency": _Number("a positive integer", _parse_int, lambda v: v > 0),
    "rate_limit": _Number("a positive number", _parse_number, lambda v: v > 0),
    "timeout_s": _Number("a positive number", _parse_number, lambda v: v > 0),
    "max_retries": _Number("an integer of 0 or more", _parse_int, lambda v: v >= 0),
    "unreachable_after": _Number("an integer of 0 or more", _parse_int, lambda v: v >= 0),
    "max_total_wait_s": _Number("a number of 0 or more", _parse_number, lambda v: v >= 0),
}


def _validate(
    name: str,
    type_name: str,
    connector: type[Connector],
    rendered: dict[str, Any],
    problems: _Problems,
) -> dict[str, Any]:
    """Check the rendered keys against the connector's; return them with numbers coerced."""
    keys = {k.name: k for k in connector.all_config_keys()}
    settings = dict(rendered)

    for key in rendered:
        if key not in keys:
            known = [k for k in keys if k != "type"]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(
                _error(
                    name,
                    key,
                    f"unknown key for type {type_name!r}{hint}; known keys: {', '.join(known)}",
                )
            )

    for key in keys.values():
        if not key.required or key.name == "type":
            continue
        if rendered.get(key.name) in (None, ""):
            state = "empty" if key.name in rendered else "missing"
            problems.add(
                _error(name, key.name, f"{state}; type {type_name!r} requires it ({key.help})")
            )

    for key_name, rule in _NUMBERS.items():
        value = rendered.get(key_name)
        if value is None or value == "":
            # Null or an empty default means "unset": the connector's default applies.
            settings.pop(key_name, None)
            continue
        try:
            number = rule.parse(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not rule.accepts(number):
            # A secret never reaches here: no connector declares a common key secret. Were
            # one to, the value would still be masked by ConfigError's redaction.
            shown = "its value" if keys[key_name].secret else repr(value)
            problems.add(_error(name, key_name, f"must be {rule.expected}, got {shown}"))
            continue
        settings[key_name] = number
    return settings


def _with_defaults(connector: type[Connector], settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the declared default of every key left unset."""
    filled = dict(settings)
    for key in connector.all_config_keys():
        if key.name != "type" and key.name not in filled and key.default is not None:
            filled[key.name] = key.default
    return filled


# -- rendering ----------------------------------------------------------------------------


class _MissingEnvVar(Exception):
    """``env_var`` was called for an unset variable without a default."""

    def __init__(self, variable: str):
        super().__init__(variable)
        self.variable = variable


class _Renderer:
    """Renders values as Jinja templates with ``env_var``, in a sandbox."""

    def __init__(self, env: Mapping[str, str]):
        self._env = env
        # Immutable sandbox: a destinations file may come from anywhere a variable points, so
        # its templates get no attribute access to Python internals and cannot mutate data.
        # StrictUndefined: a misspelt name is an error, not an empty string.
        self._jinja = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False
        )
        self._jinja.globals["env_var"] = self._env_var

    def _env_var(self, variable: str, default: Any = None) -> Any:
        """dbt's ``env_var``: the variable's value, else the default, else an error."""
        if variable in self._env:
            return self._env[variable]
        if default is not None:
            return default
        raise _MissingEnvVar(variable)

    def render(self, value: Any, destination: str, key: str, *, secret: bool) -> Any:
        """``value`` with every string in it rendered; lists and mappings are walked."""
        if isinstance(value, str):
            return self._render_text(value, destination, key, secret)
        if isinstance(value, list):
            return [self.render(v, destination, key, secret=secret) for v in value]
        if isinstance(value, dict):
            return {k: self.render(v, destination, key, secret=secret) for k, v in value.items()}
        return value

    def _render_text(self, text: str, destination: str, key: str, secret: bool) -> str:
        """One string rendered; problems become a ConfigError naming destination and key."""
        if "{" not in text:  # no template markup: nothing to render
            return text
        try:
            return self._jinja.from_string(text).render()
        except _MissingEnvVar as exc:
            raise _error(
                destination,
                key,
                f"environment variable {exc.variable!r} is not set; set it, or give env_var"
                f" a default: env_var('{exc.variable}', '...')",
            ) from None
        except (TemplateSyntaxError, UndefinedError, SecurityError, TemplateError) as exc:
            # Jinja's messages can quote the template; a secret written in the file in clear
            # would then be printed, so a secret key's error gives only the error's kind.
            detail = type(exc).__name__ if secret else _jinja_detail(exc)
            raise _error(destination, key, f"the value could not be rendered ({detail})") from None
        except Exception as exc:  # a filter or test failing at render time
            detail = type(exc).__name__ if secret else f"{type(exc).__name__}: {exc}"
            raise _error(destination, key, f"the value could not be rendered ({detail})") from None


def _jinja_detail(exc: TemplateError) -> str:
    """A Jinja error's message and line, without the template source."""
    line = getattr(exc, "lineno", None)
    return f"{exc.message}" + (f" at line {line}" if line else "")


# -- reading ------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key written twice in one mapping.

    Plain YAML keeps the last of two equal keys; a destination defined twice would then
    silently lose its first definition.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults`` may repeat
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is defined twice (first at line {first + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """The parsed file; a missing or unreadable file or bad YAML is a ConfigError."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"destinations file {path} {what}; audsync looks for {DEFAULT_FILENAME} beside"
            f" dbt_project.yml: create it there, or {_WHERE_ELSE}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"destinations file {path} cannot be read: {exc}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        # Only the problem and its position: YAML's own message quotes the offending line,
        # which may hold a secret written in clear.
        mark = exc.problem_mark
        position = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{position}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({type(exc).__name__})") from None


# -- helpers ------------------------------------------------------------------------------


def _error(destination: str, key: str, problem: str) -> ConfigError:
    """A ConfigError that names the destination and the key, as every such message does."""
    return ConfigError(
        f"destination {destination!r}, key {key!r}: {problem}", destination=destination, key=key
    )


def _leaves(value: Any) -> list[str]:
    """The non-empty scalar values inside ``value``, as text (a secret may be a mapping)."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [str(value)]


def _looks_secret(key: str) -> bool:
    """Whether a key's name suggests a secret."""
    lowered = key.lower()
    return any(hint in lowered for hint in _SECRET_HINTS)


def _kind(value: Any) -> str:
    """A value's YAML kind, for messages that must not show the value itself."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


# Destination types that match members by a normalised email (lower case, no surrounding
# spaces): two audience keys that differ only so are one member there, and a remove of one
# removes both. `audsync check` warns when a sync to one of them does not declare
# identifier_normalise='lower_trim', under which such keys are duplicates (S__invalid).
NORMALISING_TYPES = frozenset(
    {"facebook_custom_audience", "google_customer_match", "hubspot_list", "mailchimp", "klaviyo_list"}
)


def normalise_warning(sync: Any, destination: DestinationConfig | None) -> str | None:
    """The warning `audsync check` gives for ``sync`` when its destination normalises keys and
    the sync does not say so, else ``None``."""
    if destination is None or destination.type not in NORMALISING_TYPES:
        return None
    if getattr(sync, "identifier_normalise", "none") == "lower_trim":
        return None
    return (
        f"sync {sync.name!r} ({sync.path}): destination {destination.name!r} ({destination.type})"
        " matches members by a normalised key (lower case, no surrounding spaces), so keys that"
        " differ only so are one member there; set identifier_normalise='lower_trim' in the"
        " model's config to list such keys in S__invalid instead of syncing them"
    )
