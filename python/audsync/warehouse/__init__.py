"""Warehouses the runner reaches, opened with the dbt profile's credentials."""

from __future__ import annotations

from typing import Any

from .base import Relation, Session, Warehouse

__all__ = ["Relation", "Session", "Warehouse", "open_warehouse", "SUPPORTED"]

SUPPORTED = {
    "duckdb": "audsync.warehouse.duckdb:DuckDBWarehouse",
    "postgres": "audsync.warehouse.postgres:PostgresWarehouse",
    "spark": "audsync.warehouse.spark:SparkWarehouse",
}


def open_warehouse(credentials: Any, target_name: str) -> Warehouse:
    """The :class:`Warehouse` for a dbt credentials object; ``ValueError`` when unsupported."""
    import importlib

    adapter_type = credentials.type
    if adapter_type not in SUPPORTED:
        raise ValueError(
            f"the dbt target {target_name!r} is a {adapter_type!r} warehouse; the audsync runner "
            f"supports {', '.join(sorted(SUPPORTED))} so far"
        )
    module_name, class_name = SUPPORTED[adapter_type].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(credentials, target_name)
