"""Small helpers shared by the governance tests."""

from __future__ import annotations

from typing import Any


def add_config(project, sync: str, extra_sql: str = "", **keys: Any) -> None:
    """Add config keys (and trailing SQL such as a ``-- depends_on`` line) to a sync model
    written by ``tests.support.syncs.write_sync``."""
    path = project.root / "models" / f"{sync}.sql"
    text = path.read_text()
    extra = "".join(f", {k}={v!r}" for k, v in keys.items())
    text = text.replace(") }}\n", extra + ") }}\n" + (extra_sql + "\n" if extra_sql else ""), 1)
    path.write_text(text)
