"""Membership history (governance.md): ``S__history``, append-only, written in the commit's
own transaction so it never disagrees with the snapshot.

The rows come from the snapshot the commit leaves, not from the delivery records: before
the commit the plan's rows are set aside in a temporary table; after it, a planned add,
update or recorded row is history when the snapshot now holds it from this run with its
planned (non-null) hash, and a planned remove when the snapshot no longer holds the key.
So a rejected row (the snapshot keeps its old row, or none) and a row whose outcome is
unknown (committed with a NULL ``_audsync_hash``) are never history.

For a sync that sends one group of a split, the other groups' members are logged as they
enter (``add``) and leave (``remove``) the holdout, with their group in
``_audsync_split_group`` and no hash: what experiments need to measure the holdout.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .. import names

HISTORY_SUFFIX = names.GOVERNANCE_SUFFIXES["history"]
SPLIT_SUFFIX = names.GOVERNANCE_SUFFIXES["split"]
COMMITTED_AT = "_audsync_committed_at"
SPLIT_GROUP = "_audsync_split_group"
HISTORY_COLUMNS = (names.KEY, names.OP, names.HASH, names.RUN_ID, COMMITTED_AT, SPLIT_GROUP)


def _pending_name(run_id: str) -> str:
    """A temporary table per run: two syncs committing at once in one process (the
    service) may share a DuckDB connection's temporary schema."""
    return "audsync_history_pending_" + "".join(c if c.isalnum() else "_" for c in run_id).lower()


def history_relation(sync):
    return sync.relation.with_suffix(HISTORY_SUFFIX)


def before_commit(session, tables, run_id: str) -> str | None:
    """Set this run's plan aside for :func:`after_commit`; return the temporary table, or
    None when the sync has no ``S__history`` yet (its next `dbt run` creates it)."""
    if session.columns(history_relation(tables.sync)) is None:
        return None
    n = names
    pending = tables.warehouse.quote(_pending_name(run_id))
    session.execute(f"drop table if exists {pending}")
    session.execute(
        f"create temporary table {pending} as"
        f" select {n.KEY}, {n.OP}, {n.SEND}, {n.HASH} from {tables.plan} where {n.RUN_ID} = ?",
        (run_id,),
    )
    return pending


def after_commit(session, tables, run_id: str, pending: str | None, split_group: str | None,
                 committed_at: dt.datetime) -> int:
    """Append what the commit applied (``pending``: what :func:`before_commit` returned);
    return the rows appended."""
    if not pending:
        return 0
    n = names
    history = tables.warehouse.relation_sql(history_relation(tables.sync))
    cols = ", ".join(HISTORY_COLUMNS)
    # One left join (the snapshot holds a key at most once), not a subquery per branch of a
    # case: DuckDB runs those as two mark joins over the whole snapshot (perf, issue 16).
    appended = session.execute_count(
        f"insert into {history} ({cols})"
        f" select p.{n.KEY}, case when not p.{n.SEND} then 'recorded' else p.{n.OP} end, p.{n.HASH}, ?, ?, ?"
        f" from {pending} as p left join {tables.snapshot} as s on s.{n.KEY} = p.{n.KEY}"
        f" where case when p.{n.OP} = 'remove' then s.{n.KEY} is null"
        f"   else s.{n.RUN_ID} = ? and s.{n.HASH} is not null and s.{n.HASH} = p.{n.HASH} end",
        (run_id, committed_at, split_group, run_id),
    )
    session.execute(f"drop table if exists {pending}")
    if split_group:
        appended += _log_holdout(session, tables, history, run_id, split_group, committed_at)
    return appended


def _log_holdout(session, tables, history: str, run_id: str, split_group: str, committed_at: dt.datetime) -> int:
    """Log the members of the split's other groups that entered or left them since the last
    log (from ``S__split``, which lists every member with its group)."""
    split_relation = tables.sync.relation.with_suffix(SPLIT_SUFFIX)
    if session.columns(split_relation) is None:
        return 0
    n = names
    split = tables.warehouse.relation_sql(split_relation)
    # The held-out state each key was last logged in: its latest row of another group.
    latest = (
        f"select h.{n.KEY}, h.{n.OP}, h.{SPLIT_GROUP} from {history} as h"
        f" where h.{SPLIT_GROUP} is not null and h.{SPLIT_GROUP} <> ?"
        f" and not exists (select 1 from {history} as later"
        f"   where later.{n.KEY} = h.{n.KEY} and later.{SPLIT_GROUP} is not null and later.{SPLIT_GROUP} <> ?"
        f"   and later.{COMMITTED_AT} > h.{COMMITTED_AT})"
    )
    split_name = split_group.split(".", 1)[0]
    current = (
        f"select x.{n.KEY}, cast(? as varchar(1000)) || '.' || x.split_group as {SPLIT_GROUP}"
        f" from {split} as x where x.split_group <> ?"
    )
    own = split_group.split(".", 1)[1]
    entered = session.execute_count(
        f"insert into {history} ({', '.join(HISTORY_COLUMNS)})"
        f" select c.{n.KEY}, 'add', null, ?, ?, c.{SPLIT_GROUP} from ({current}) as c"
        f" where not exists (select 1 from ({latest}) as l where l.{n.KEY} = c.{n.KEY}"
        f"                   and l.{n.OP} = 'add' and l.{SPLIT_GROUP} = c.{SPLIT_GROUP})",
        (run_id, committed_at, split_name, own, split_group, split_group),
    )
    left = session.execute_count(
        f"insert into {history} ({', '.join(HISTORY_COLUMNS)})"
        f" select l.{n.KEY}, 'remove', null, ?, ?, l.{SPLIT_GROUP} from ({latest}) as l"
        f" where l.{n.OP} = 'add' and not exists (select 1 from ({current}) as c"
        f"   where c.{n.KEY} = l.{n.KEY} and c.{SPLIT_GROUP} = l.{SPLIT_GROUP})",
        (run_id, committed_at, split_group, split_group, split_name, own),
    )
    return entered + left


def read(session, warehouse, sync, key: str | None = None, since: dt.datetime | None = None,
         limit: int = 1000) -> list[dict[str, Any]]:
    """History rows of ``sync``, newest first, for one key and/or since a time."""
    relation = history_relation(sync)
    if session.columns(relation) is None:
        return []
    where, params = [], []
    if key is not None:
        where.append(f"{names.KEY} = ?")
        params.append(key)
    if since is not None:
        where.append(f"{COMMITTED_AT} >= ?")
        params.append(since)
    sql = (f"select {', '.join(HISTORY_COLUMNS)} from {warehouse.relation_sql(relation)}"
           + (f" where {' and '.join(where)}" if where else "")
           + f" order by {COMMITTED_AT} desc, {names.KEY} limit ?")
    rows = session.fetchall(sql, (*params, int(limit)))
    return [dict(zip(("key", "op", "hash", "run_id", "committed_at", "split_group"), r)) for r in rows]
