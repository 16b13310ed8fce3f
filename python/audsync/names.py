"""Names shared by the dbt package and the runner.

Every relation suffix, system column and mode is spelled here once for Python and once in
``macros/_names.sql`` for dbt; ``tests/integration/test_names.py`` holds the two together.
"""

from __future__ import annotations

# System columns of a sync's relations.
KEY = "_audsync_key"
HASH = "_audsync_hash"
# A snapshot row whose HASH is NULL is an *unknown outcome* (team convention 1): a row sent,
# or perhaps sent, whose answer was lost (a kill, a timeout or 5xx after the retries, a stop,
# a fenced run), or a key `audsync verify --repair` found drifted. Its key is kept in
# S__candidates, and the diff views send the current truth for it: mirror adds it (key in S)
# or removes it (not in S); add and upsert add it (S's values, else its own); remove mode
# removes it. It never counts as held by the destination.
OP = "_audsync_op"
SYNCED_AT = "_audsync_synced_at"
RUN_ID = "_audsync_run_id"
DESTINATION_ID = "_audsync_destination_id"
# Plan-only columns: the position of a row in its run's plan, and whether it is sent
# (``remove`` mode records new members in the snapshot without sending them).
SEQ = "_audsync_seq"
SEND = "_audsync_send"
REASON = "_audsync_reason"
# The plan rows a run that lost its lock writes, after its last requests ended, for the keys of
# the batches it had sent or started and no flush recorded (they may have reached the
# destination after the run that took over): run id ``<run id>`` + this suffix. The next
# holder of the lock marks those keys unknown (runner: ``recover_unfinished``). Runner-only:
# no dbt macro reads it.
UNKNOWN_MARKS_SUFFIX = "~unknown"

# Relations built for a sync model ``S``: ``S`` itself plus ``S + suffix``.
SUFFIXES = {
    "snapshot": "__snapshot",
    "plan": "__plan",
    "candidates": "__candidates",
    "adds": "__adds",
    "removes": "__removes",
    "updates": "__updates",
    "changes": "__changes",
    "invalid": "__invalid",
}

# Relations the governance features build beside them (``audsync_names().governance_suffixes``,
# built by macros/governance/relations.sql): views, but for the append-only history table.
GOVERNANCE_SUFFIXES = {
    "excluded": "__excluded",
    "split": "__split",
    "history": "__history",
}

# Warehouses without UPDATE and DELETE (Spark's own Parquet tables) change a table T by
# writing its new content to ``T + next`` and swapping the names: T becomes ``T + old``, the
# new table becomes T, the old one is dropped (macros/spark/rewrite.sql, warehouse/spark.py).
REWRITE_SUFFIXES = {
    "next": "__audsync_next",
    "old": "__audsync_old",
}

# Ops carried by ``S__changes`` and the plan.
OPS = ("add", "remove", "update")

# Sync modes and what each sends (contract section 4).
MODES = ("mirror", "add", "upsert", "remove")
MODE_ALIASES = {"additive": "add", "subtractive": "remove"}
MODE_SENDS = {
    "mirror": frozenset({"add", "remove", "update"}),
    "add": frozenset({"add"}),
    "upsert": frozenset({"add", "update"}),
    "remove": frozenset({"remove"}),
}

# State tables (contract section 6), dbt models of this package.
RUNS_TABLE = "audsync_runs"
ROW_ERRORS_TABLE = "audsync_row_errors"
SYNCS_TABLE = "audsync_syncs"
BATCHES_TABLE = "audsync_batches"
DELIVERED_IDS_TABLE = "audsync_delivered_ids"
STATE_TABLES = (RUNS_TABLE, ROW_ERRORS_TABLE, SYNCS_TABLE, BATCHES_TABLE, DELIVERED_IDS_TABLE)

MATERIALIZATION = "audience_sync"
PACKAGE = "audsync"


def normalise_mode(mode: str) -> str:
    """Return the canonical mode for ``mode`` or its alias; raise ``ValueError`` if unknown."""
    canonical = MODE_ALIASES.get(mode, mode)
    if canonical not in MODES:
        expected = ", ".join(MODES + tuple(MODE_ALIASES))
        raise ValueError(f"unknown sync_mode {mode!r}; expected one of {expected}")
    return canonical
