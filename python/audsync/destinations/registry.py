"""Destination types and the connector class behind each.

The registry holds ``"module:Class"`` strings, not classes, so importing it imports no
connector: a connector module (and whatever HTTP or SDK code it pulls in) is loaded only when a
destination of its type is used. Types whose connector is not written yet are reserved here, so
that ``destinations.yml`` can name them and get a clear message instead of "unknown type".
"""

from __future__ import annotations

import importlib
from typing import Any

from audsync.destinations.base import COMMON_KEYS, Connector
from audsync.errors import ConfigError

_BUILTIN: dict[str, str] = {
    "webhook": "audsync.destinations.webhook:WebhookConnector",
    "file": "audsync.destinations.file:FileConnector",
    "facebook_custom_audience": "audsync.destinations.facebook:FacebookCustomAudienceConnector",
    "google_customer_match": "audsync.destinations.google:GoogleCustomerMatchConnector",
    "hubspot_list": "audsync.destinations.hubspot:HubspotListConnector",
    "salesforce_campaign": "audsync.destinations.salesforce:SalesforceCampaignConnector",
    "braze": "audsync.destinations.braze:BrazeConnector",
    "mailchimp": "audsync.destinations.mailchimp:MailchimpConnector",
    "klaviyo_list": "audsync.destinations.klaviyo:KlaviyoListConnector",
}

# Other spellings of a type. The contract's own example (section 7) writes
# ``google_ads_customer_match``; accepting it costs nothing and spares users a failed check.
ALIASES: dict[str, str] = {
    "google_ads_customer_match": "google_customer_match",
}

_registry: dict[str, str | type[Connector]] = dict(_BUILTIN)


def register(type_name: str, connector: str | type[Connector], *, replace: bool = False) -> None:
    """Make ``type_name`` a destination type served by ``connector``.

    Args:
        type_name: the ``type`` written in ``destinations.yml``.
        connector: a :class:`Connector` subclass, or a ``"module:Class"`` path imported when
            the type is first used.
        replace: allow replacing a type already registered (tests, plugins overriding a
            built-in connector).

    Raises:
        ValueError: the type is registered already and ``replace`` is false, or ``connector``
            is neither a Connector subclass nor a ``"module:Class"`` string.
    """
    if type_name in _registry and not replace:
        raise ValueError(f"destination type {type_name!r} is registered already")
    if isinstance(connector, str):
        if connector.count(":") != 1:
            raise ValueError(f"connector path {connector!r} must read 'module:Class'")
    elif not (isinstance(connector, type) and issubclass(connector, Connector)):
        raise ValueError(f"connector for {type_name!r} must be a Connector subclass")
    _registry[type_name] = connector


def unregister(type_name: str) -> None:
    """Remove ``type_name``, restoring the built-in connector if it had one (for tests)."""
    if type_name in _BUILTIN:
        _registry[type_name] = _BUILTIN[type_name]
    else:
        _registry.pop(type_name, None)


def known_types() -> tuple[str, ...]:
    """Every destination type, sorted, including those whose connector is not available yet."""
    return tuple(sorted(_registry))


def resolve_type(type_name: str) -> str | None:
    """The registered type ``type_name`` names (itself or through an alias), else ``None``."""
    canonical = ALIASES.get(type_name, type_name)
    return canonical if canonical in _registry else None


def get_connector(type_name: str) -> type[Connector]:
    """The connector class for ``type_name`` (or an alias), importing its module if needed.

    Raises:
        ConfigError: the type is unknown (the message lists the known ones), or known but its
            connector cannot be imported (not in this version yet, or a missing dependency).
    """
    canonical = resolve_type(type_name)
    if canonical is None:
        raise ConfigError(
            f"unknown destination type {type_name!r}; known types: {', '.join(known_types())}"
        )
    target = _registry[canonical]
    if not isinstance(target, str):
        return target
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ConfigError(
                f"destination type {canonical!r} is reserved but its connector is not"
                f" available in this version of audsync (no module {module_name})"
            ) from exc
        if missing.split(".")[0] == "audsync":
            raise ConfigError(
                f"destination type {canonical!r}: its connector {module_name} failed to"
                f" import (no module {missing})"
            ) from exc
        # The connector exists but needs a package that is not installed: name that package.
        raise ConfigError(
            f"destination type {canonical!r} needs the Python package {missing!r},"
            f" which is not installed"
        ) from exc
    except ImportError as exc:
        raise ConfigError(
            f"destination type {canonical!r}: its connector {module_name} failed to import ({exc})"
        ) from exc
    connector = getattr(module, class_name, None)
    if not (isinstance(connector, type) and issubclass(connector, Connector)):
        raise ConfigError(
            f"destination type {canonical!r}: {module_name} has no Connector class {class_name}"
        )
    return connector


def is_available(type_name: str) -> bool:
    """Whether ``type_name``'s connector can be imported now."""
    try:
        get_connector(type_name)
    except ConfigError:
        return False
    return True


def describe_key(key: Any, common: bool) -> dict[str, Any]:
    """One configuration key as a plain dict (for ``audsync destinations`` and JSON output)."""
    return {
        "name": key.name,
        "required": key.required,
        "secret": key.secret,
        "default": key.default,
        "help": key.help,
        "common": common,
    }


def describe_all() -> list[dict[str, Any]]:
    """Every destination type with its description, limits and keys, sorted by type.

    Each entry has ``type``, ``available`` (False when the connector cannot be imported, with
    the reason in ``error``), ``description``, ``max_batch_size``, ``max_concurrency`` and
    ``keys``: the common keys (``common: True``) then the connector's own, each with
    ``name``, ``required``, ``secret``, ``default`` and ``help``.
    """
    described = []
    for type_name in known_types():
        entry: dict[str, Any] = {"type": type_name, "available": True, "error": None}
        try:
            connector = get_connector(type_name)
        except ConfigError as exc:
            entry.update(
                available=False,
                error=exc.message,
                description="",
                max_batch_size=None,
                max_concurrency=None,
                keys=[describe_key(k, True) for k in COMMON_KEYS],
            )
        else:
            entry.update(
                description=connector.description,
                max_batch_size=connector.max_batch_size,
                max_concurrency=connector.max_concurrency,
                keys=[describe_key(k, True) for k in COMMON_KEYS]
                + [describe_key(k, False) for k in connector.config_keys],
            )
        described.append(entry)
    return described
