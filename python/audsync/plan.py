"""A sync's plan: freeze ``S__changes`` under a run id, read it back in order, commit.

* **Freeze** copies what the mode sends into ``S__plan`` with a sequence number, so a
  ``dbt run`` during delivery changes neither what is sent nor what is committed. In
  ``remove`` mode new members are frozen too, marked not to be sent, so they are recorded.
* **Read** streams the plan back in ``seq`` ranges: memory stays bounded whatever its size.
* **Commit** applies, in one transaction, every planned row of an answered batch that the
  destination did not reject to ``S__snapshot``; rejected and unanswered rows stay out, so
  the next run plans them again. It also keeps ``S__candidates`` (the keys over which the
  diff views compare S and the snapshot) true: a key it writes stays a candidate only if
  the snapshot now differs from S, which happens when a ``dbt run`` rebuilt S between the
  freeze and the commit. The freeze leaves a mark in ``S__candidates`` (a null key) that
  such a ``dbt run`` removes, so the commit checks its keys against S only when it must.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

import orjson

from . import names
from .destinations.base import Change, EncodedBatch
from .errors import ConfigError
from .project import SyncModel
from .state import StateStore
from .warehouse import Session, Warehouse


def unknown_marks_id(run_id: str) -> str:
    """The plan run id under which run ``run_id``, having lost its lock, records the keys it
    may have delivered after the run that took over (:meth:`SyncTables.write_marks`)."""
    return run_id + names.UNKNOWN_MARKS_SUFFIX


def is_unknown_marks(plan_run_id: str) -> bool:
    """True for a plan run id of marks (:func:`unknown_marks_id`), not of a run's plan."""
    return plan_run_id.endswith(names.UNKNOWN_MARKS_SUFFIX)


@dataclass(frozen=True)
class PlanCounts:
    """Rows of a plan by op; ``recorded`` are rows committed without being sent."""

    adds: int = 0
    removes: int = 0
    updates: int = 0
    recorded: int = 0

    @property
    def sent(self) -> int:
        return self.adds + self.removes + self.updates

    @property
    def total(self) -> int:
        """Every row of the plan, sent or recorded."""
        return self.sent + self.recorded


@dataclass(frozen=True)
class CommitCounts:
    """What a commit applied to the snapshot."""

    added: int = 0
    removed: int = 0
    updated: int = 0
    recorded: int = 0
    failed: int = 0
    unmatched: int = 0
    unknown: int = 0
    """Rows written as unknown outcomes (a null hash): sent, or perhaps sent, unanswered or
    failed with a retryable error; never counted as added, removed or updated."""

    @property
    def applied(self) -> int:
        """Rows sent and applied to the snapshot."""
        return self.added + self.removed + self.updated

    @property
    def match_rate(self) -> float | None:
        """Rows the destination accepted and matched over rows sent (``(accepted - unmatched) /
        sent``, Meta's ``num_invalid_entries`` being the unmatched); ``None`` when none was sent."""
        sent = self.applied + self.failed
        if sent <= 0:
            return None
        return max(0.0, (self.applied - self.unmatched) / sent)

    def run_columns(self) -> dict[str, int | float | None]:
        """These counts as the columns of the run's row in ``audsync_runs``."""
        return {
            "rows_added": self.added, "rows_removed": self.removed, "rows_updated": self.updated,
            "rows_failed": self.failed, "rows_recorded": self.recorded, "rows_unmatched": self.unmatched,
            "rows_unknown": self.unknown,
            "match_rate": self.match_rate,
        }


class SyncTables:
    """The relations of one sync in one warehouse, with the SQL that moves rows between them."""

    def __init__(self, warehouse: Warehouse, sync: SyncModel, state: StateStore):
        self.warehouse = warehouse
        self.sync = sync
        self.state = state
        q = warehouse.relation_sql
        self.membership = q(sync.relation_of(""))
        self.snapshot = q(sync.relation_of("snapshot"))
        self.plan = q(sync.relation_of("plan"))
        self.candidates = q(sync.relation_of("candidates"))
        self.changes = q(sync.relation_of("changes"))
        self.adds = q(sync.relation_of("adds"))
        self.removes = q(sync.relation_of("removes"))
        self.columns: list[str] = []
        """The mapped source columns as ``S`` spells them."""

    # -- readiness --------------------------------------------------------------------------

    def resolve(self, session: Session) -> None:
        """Check the sync's relations exist and match its mapping; learn their column names."""
        rebuild = f"run `dbt run --select {self.sync.name}` to build them"
        have = session.columns(self.sync.relation_of(""))
        if have is None:
            raise ConfigError(f"sync {self.sync.name!r}: {self.sync.relation} does not exist yet; {rebuild}")
        by_lower = {c.lower(): c for c in have}
        columns: list[str] = []
        for item in self.sync.mapping:
            actual = by_lower.get(item.source_column.lower())
            if actual is None:
                raise ConfigError(
                    f"sync {self.sync.name!r}: {self.sync.relation} has no column {item.source_column!r} "
                    f"that field_mapping names; its relations are older than its config: {rebuild}"
                )
            if actual not in columns:
                columns.append(actual)
        for part in ("snapshot", "plan", "candidates"):
            relation = self.sync.relation_of(part)
            present = session.columns(relation)
            if present is None:
                raise ConfigError(f"sync {self.sync.name!r}: {relation} does not exist yet; {rebuild}")
            if part == "candidates":
                continue
            missing = {c.lower() for c in columns} - {c.lower() for c in present}
            if missing:
                raise ConfigError(
                    f"sync {self.sync.name!r}: {relation} lacks column(s) {', '.join(sorted(missing))}; {rebuild}"
                )
        self.columns = columns

    def _cols(self, alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        return "".join(f", {prefix}{self.warehouse.quote(c)}" for c in self.columns)

    # -- freeze -----------------------------------------------------------------------------

    def freeze(self, session: Session, run_id: str, full_resync: bool = False) -> PlanCounts:
        """Copy this run's changes into the plan; return the counts by op."""
        n = names
        sends = n.MODE_SENDS[self.sync.mode]
        cols = self._cols()
        key, hsh, dest = n.KEY, n.HASH, n.DESTINATION_ID
        # First, so that a `dbt run` that rebuilds S after this point also removes the mark
        # (on PostgreSQL its truncate waits for this transaction).
        session.execute(f"insert into {self.candidates} ({key}) values (null)")
        sources = []
        if full_resync and "add" in sends:
            # Every member again, as an add, keeping the ids the destination gave.
            sources.append(
                f"select 'add' as op, true as send, m.{key}{self._cols('m')}, m.{hsh},"
                f" s.{dest} from {self.membership} as m"
                f" left join {self.snapshot} as s on s.{key} = m.{key}"
            )
            if "remove" in sends:
                sources.append(f"select 'remove' as op, true as send, {key}{cols}, {hsh}, {dest} from {self.removes}")
            else:
                # add and upsert: S__adds also holds the unknown rows whose key left S.
                sources.append(
                    f"select 'add' as op, true as send, a.{key}{self._cols('a')}, a.{hsh}, a.{dest}"
                    f" from {self.adds} as a where not exists"
                    f" (select 1 from {self.membership} as m where m.{key} = a.{key})"
                )
        else:
            sources.append(f"select {n.OP} as op, true as send, {key}{cols}, {hsh}, {dest} from {self.changes}")
        if "add" not in sends:
            # remove mode: new members are recorded, not sent, so they are removed once they leave.
            sources.append(f"select 'add' as op, false as send, {key}{cols}, {hsh}, {dest} from {self.adds}")
        union = "\n union all \n".join(sources)
        # Numbered in no order: a sort of the whole plan would cost more than mixed batches
        # do (connectors split a batch by op when their API needs it).
        with self.warehouse.row_numbers(session) as row_number:
            session.execute(
                f"insert into {self.plan} ({n.RUN_ID}, {n.SEQ}, {n.OP}, {n.SEND}, {key}{cols}, {hsh}, {dest})"
                f" select ?, {row_number}, op, send, {key}{cols}, {hsh}, {dest}"
                f" from ({union}) as changes",
                (run_id,),
            )
        self.warehouse.refresh_statistics(session, self.sync.relation_of("plan"))
        return self.plan_counts(session, run_id)

    def plan_counts(self, session: Session, run_id: str) -> PlanCounts:
        rows = session.fetchall(
            f"select {names.OP}, {names.SEND}, count(*) from {self.plan}"
            f" where {names.RUN_ID} = ? group by {names.OP}, {names.SEND}",
            (run_id,),
        )
        return _counts(rows)

    def plan_size(self, session: Session, run_id: str) -> int:
        return int(session.scalar(
            f"select coalesce(max({names.SEQ}), 0) from {self.plan} where {names.RUN_ID} = ?", (run_id,)
        ))

    def plan_run_ids(self, session: Session) -> set[str]:
        """The runs whose plan rows are still in ``S__plan`` (uncommitted)."""
        rows = session.fetchall(f"select distinct {names.RUN_ID} from {self.plan}")
        return {r[0] for r in rows}

    def drop_unsent(self, session: Session, run_id: str, in_flight: list[tuple[int, int]]) -> int:
        """Remove from run ``run_id``'s plan the sent rows of batches that were never started:
        rows outside every answered batch and outside the ``in_flight`` seq ranges (started,
        unanswered). The commit then writes only what may have arrived as unknown."""
        n = names
        keep = "".join(f" and not ({n.SEQ} between ? and ?)" for _ in in_flight)
        params: list[Any] = [run_id, run_id]
        for first, last in in_flight:
            params += [first, last]
        return session.execute_count(
            f"delete from {self.plan} where {n.RUN_ID} = ? and {n.SEND}"
            f" and {n.SEQ} not in (select p.{n.SEQ} from {self.plan} as p inner join {self.state.batches} as b"
            f"   on b.run_id = p.{n.RUN_ID} and p.{n.SEQ} between b.first_seq and b.last_seq"
            f"   where p.{n.RUN_ID} = ?)"
            f"{keep}",
            params,
        )

    # -- read -------------------------------------------------------------------------------

    def read(self, session: Session, run_id: str, after_seq: int, upto_seq: int) -> list[tuple]:
        """Plan rows ``after_seq < seq <= upto_seq`` in order: seq, op, send, key, columns..., id."""
        n = names
        return session.fetchall(
            f"select {n.SEQ}, {n.OP}, {n.SEND}, {n.KEY}{self._cols()}, {n.DESTINATION_ID}"
            f" from {self.plan} where {n.RUN_ID} = ? and {n.SEQ} > ? and {n.SEQ} <= ? order by {n.SEQ}",
            (run_id, after_seq, upto_seq),
        )

    def to_changes(self, rows: list[tuple]) -> tuple[list[Change], int]:
        """Plan rows as :class:`Change` objects (fields by destination name), and the number
        of rows not to be sent."""
        position = {c: 4 + i for i, c in enumerate(self.columns)}
        by_lower = {c.lower(): c for c in self.columns}
        field_positions = [
            (m.destination_field, position[by_lower[m.source_column.lower()]]) for m in self.sync.mapping
        ]
        id_position = 4 + len(self.columns)
        # tuple.__new__ skips Change's argument handling: about half the cost per row, in
        # the loop that runs once per member sent.
        make = tuple.__new__
        changes = []
        unsent = 0
        for row in rows:
            if not row[2]:
                unsent += 1
                continue
            changes.append(make(Change, (
                row[0], row[1], row[3], {f: row[p] for f, p in field_positions}, row[id_position]
            )))
        return changes, unsent

    def _field_positions(self) -> dict[str, int]:
        """Destination field -> index in :attr:`columns`, in mapping order (a field mapped
        twice takes its last column, as a dict of the fields does)."""
        index = {c.lower(): i for i, c in enumerate(self.columns)}
        positions: dict[str, int] = {}
        for m in self.sync.mapping:
            positions[m.destination_field] = index[m.source_column.lower()]
        return positions

    def encoded_reader(self, session: Session) -> "EncodedReader | None":
        """A reader of the plan as :class:`EncodedBatch` es, when the warehouse can encode
        every mapped column's type (else None: the rows are read as :class:`Change` s)."""
        if not self.warehouse.encodes_batches:
            return None
        types = {c.lower(): t for c, t in self.warehouse.column_types(session, self.sync.relation_of("plan")).items()}
        positions = self._field_positions()
        values = []
        for position in positions.values():
            column = self.columns[position]
            data_type = types.get(column.lower())
            if data_type is None:
                return None
            values.append((self.warehouse.quote(column), data_type))
        sql = self.warehouse.encoded_batches_sql(self.plan, values)
        return EncodedReader(sql, list(positions)) if sql else None

    # -- commit -----------------------------------------------------------------------------

    def _accepted(self, every_batch_answered: bool) -> str:
        """The plan rows of run ``?`` to commit (two ``?``, both the run id).

        When every batch was answered, that is the plan less its rejected rows; otherwise
        (an abandoned run, a fatal answer) only rows of answered batches count.
        """
        n = names
        cols = self._cols("p")
        select = f"p.{n.OP}, p.{n.SEND}, p.{n.KEY}{cols}, p.{n.HASH}, p.{n.DESTINATION_ID}"
        if every_batch_answered:
            return (
                f"select {select} from {self.plan} as p where p.{n.RUN_ID} = ?"
                f" and not exists (select 1 from {self.state.errors} as e"
                f"                 where e.run_id = ? and e.member_key = p.{n.KEY})"
            )
        return (
            f"select {select} from {self.plan} as p"
            f" inner join {self.state.batches} as b"
            f"   on b.run_id = p.{n.RUN_ID} and p.{n.SEQ} between b.first_seq and b.last_seq"
            f" where p.{n.RUN_ID} = ? and p.{n.SEND}"
            f"   and not exists (select 1 from {self.state.errors} as e"
            f"                   where e.run_id = p.{n.RUN_ID} and e.member_key = p.{n.KEY})"
            f" union all"
            f" select {select} from {self.plan} as p where p.{n.RUN_ID} = ? and not p.{n.SEND}"
        )

    def _unknown(self, every_batch_answered: bool) -> str:
        """The plan rows of run ``?`` whose outcome is not known (two ``?``, both the run id).

        Rows the destination failed with a retryable error (a timeout, 5xx or 429 after the
        retries: it may have applied them) and, unless every batch was answered (an abandoned,
        stopped, fenced or failed run), every sent row outside the answered batches: the
        runner does not record which batches were on the wire, so all of them count as
        perhaps applied. A row rejected for good (not retryable) is known not applied.
        """
        n = names
        cols = self._cols("p")
        select = f"p.{n.OP}, p.{n.SEND}, p.{n.KEY}{cols}, p.{n.HASH}, p.{n.DESTINATION_ID}"
        retryable = (
            f"exists (select 1 from {self.state.errors} as e"
            f"        where e.run_id = p.{n.RUN_ID} and e.member_key = p.{n.KEY} and e.retryable)"
        )
        if every_batch_answered:
            return (
                f"select {select} from {self.plan} as p"
                f" where p.{n.RUN_ID} = ? and p.{n.RUN_ID} = ? and p.{n.SEND} and {retryable}"
            )
        return (
            f"select {select} from {self.plan} as p"
            f" where p.{n.RUN_ID} = ? and p.{n.SEND}"
            f" and (not exists (select 1 from {self.state.batches} as b"
            f"                  where b.run_id = ? and p.{n.SEQ} between b.first_seq and b.last_seq)"
            f"      or {retryable})"
        )

    def commit(
        self, session: Session, run_id: str, synced_at: dt.datetime, every_batch_answered: bool = False,
        full_resync: bool = False,
    ) -> CommitCounts:
        """Apply run ``run_id``'s accepted rows to the snapshot, write its unknown rows, and
        drop its plan and delivery records.

        ``every_batch_answered``: the run ended normally, so every planned row was answered;
        ``full_resync``: the plan was frozen with ``--full-resync`` (every member of S).
        Unknown rows (see :meth:`_unknown`) go to the snapshot with a null hash (a planned
        remove: the snapshot row it would have removed, its hash set to null) and their keys
        to ``S__candidates``, so the diff views send the current truth for them next time.
        """
        n = names
        accepted = self._accepted(every_batch_answered)
        unknown = self._unknown(every_batch_answered)
        counts = _counts(session.fetchall(
            f"select {n.OP}, {n.SEND}, count(*) from ({accepted}) as a group by {n.OP}, {n.SEND}",
            (run_id, run_id),
        ))
        unknown_count = int(session.scalar(f"select count(*) from ({unknown}) as u", (run_id, run_id)))
        cols = self._cols()
        session.execute(
            f"delete from {self.snapshot} where {n.KEY} in (select {n.KEY} from ({accepted}) as a)",
            (run_id, run_id),
        )
        session.execute(
            f"insert into {self.snapshot} ({n.KEY}{cols}, {n.HASH}, {n.DESTINATION_ID}, {n.SYNCED_AT}, {n.RUN_ID})"
            f" select a.{n.KEY}{self._cols('a')}, a.{n.HASH}, coalesce(i.destination_id, a.{n.DESTINATION_ID}), ?, ?"
            f" from ({accepted}) as a"
            f" left join {self.state.ids} as i on i.run_id = ? and i.member_key = a.{n.KEY}"
            f" where a.{n.OP} <> 'remove'",
            (synced_at, run_id, run_id, run_id, run_id),
        )
        if unknown_count:
            self._write_unknown(session, run_id, unknown, synced_at)
        self._keep_candidates(session, run_id, accepted, every_batch_answered, full_resync)
        if unknown_count:
            # Whatever the candidates held before, an unknown key must be compared next time.
            session.execute(
                f"insert into {self.candidates} ({n.KEY})"
                f" select u.{n.KEY} from ({unknown}) as u"
                f" where not exists (select 1 from {self.candidates} as c where c.{n.KEY} = u.{n.KEY})",
                (run_id, run_id),
            )
        failed, unmatched = session.fetchone(
            f"select coalesce(sum(rows_rejected), 0), coalesce(sum(rows_unmatched), 0)"
            f" from {self.state.batches} where run_id = ?",
            (run_id,),
        )
        session.execute(f"delete from {self.plan} where {n.RUN_ID} = ?", (run_id,))
        self.state.forget_delivery(session, run_id)
        if counts.total or unknown_count:
            # A commit that applied nothing left the snapshot as it was (ANALYZE of 10M rows on
            # PostgreSQL: 0.2 s of every run with nothing to send).
            self.warehouse.refresh_statistics(session, self.sync.relation_of("snapshot"))
        self.warehouse.refresh_statistics(session, self.sync.relation_of("candidates"))
        return CommitCounts(
            added=counts.adds, removed=counts.removes, updated=counts.updates,
            recorded=counts.recorded, failed=int(failed), unmatched=int(unmatched), unknown=unknown_count,
        )

    def _write_unknown(self, session: Session, run_id: str, unknown: str, synced_at: dt.datetime) -> None:
        """Write the unknown rows of ``run_id`` to the snapshot with a null hash."""
        n = names
        cols = self._cols()
        # A planned add or update: the planned values, as the destination may now hold them.
        session.execute(
            f"delete from {self.snapshot} where {n.KEY} in"
            f" (select {n.KEY} from ({unknown}) as u where u.{n.OP} <> 'remove')",
            (run_id, run_id),
        )
        session.execute(
            f"insert into {self.snapshot} ({n.KEY}{cols}, {n.HASH}, {n.DESTINATION_ID}, {n.SYNCED_AT}, {n.RUN_ID})"
            f" select u.{n.KEY}{self._cols('u')}, null, coalesce(i.destination_id, u.{n.DESTINATION_ID}), ?, ?"
            f" from ({unknown}) as u"
            f" left join {self.state.ids} as i on i.run_id = ? and i.member_key = u.{n.KEY}"
            f" where u.{n.OP} <> 'remove'",
            (synced_at, run_id, run_id, run_id, run_id),
        )
        # A planned remove: the row it would have removed, no longer known to be held.
        session.execute(
            f"update {self.snapshot} set {n.HASH} = null where {n.KEY} in"
            f" (select {n.KEY} from ({unknown}) as u where u.{n.OP} = 'remove')",
            (run_id, run_id),
        )

    # -- marks of a fenced run ----------------------------------------------------------------

    def write_marks(self, session: Session, marks_id: str, changes: Sequence[Change]) -> int:
        """Record the keys of ``changes`` as *marks* under the run id ``marks_id``
        (:func:`unknown_marks_id`): plan rows with the change's op and values (mapped back to
        the source columns) and a null hash, which the next holder of the sync's lock applies
        (:meth:`apply_marks`, from ``recover_unfinished``). No lock is needed: no run reads
        another's plan rows, and only a lock holder applies them. Marks already under
        ``marks_id`` are replaced (a retried write). Returns the number of keys."""
        n = names
        by_lower = {c.lower(): c for c in self.columns}
        field_of: dict[str, str] = {}
        for item in self.sync.mapping:
            field_of.setdefault(by_lower[item.source_column.lower()], item.destination_field)
        latest: dict[str, Change] = {}
        for change in changes:
            latest[change.key] = change
        session.execute(f"delete from {self.plan} where {n.RUN_ID} = ?", (marks_id,))
        session.executemany(
            f"insert into {self.plan} ({n.RUN_ID}, {n.SEQ}, {n.OP}, {n.SEND}, {n.KEY}{self._cols()},"
            f" {n.HASH}, {n.DESTINATION_ID}) values ({', '.join('?' for _ in range(len(self.columns) + 7))})",
            [
                (marks_id, seq, change.op, True, key,
                 *(change.fields.get(field_of[c]) if c in field_of else None for c in self.columns),
                 None, change.destination_id)
                for seq, (key, change) in enumerate(latest.items(), start=1)
            ],
        )
        return len(latest)

    def apply_marks(self, session: Session, marks_id: str, synced_at: dt.datetime) -> int:
        """Apply the marks under ``marks_id`` in the caller's fenced transaction, then drop
        them: each key becomes *unknown* (convention 1). A snapshot row keeps its values (the
        newest known truth: a run may have committed the key since the marked batch was
        planned) and loses its hash; a key without one gets the mark's values and a null
        hash, unless the mark is a remove (the destination then holds nothing the snapshot
        could claim). Every key goes to ``S__candidates``. Returns the number of keys."""
        n = names
        marks = f"select {n.KEY} from {self.plan} where {n.RUN_ID} = ?"
        count = int(session.scalar(f"select count(*) from {self.plan} where {n.RUN_ID} = ?", (marks_id,)))
        session.execute(f"update {self.snapshot} set {n.HASH} = null where {n.KEY} in ({marks})", (marks_id,))
        session.execute(
            f"insert into {self.snapshot} ({n.KEY}{self._cols()}, {n.HASH}, {n.DESTINATION_ID}, {n.SYNCED_AT}, {n.RUN_ID})"
            f" select p.{n.KEY}{self._cols('p')}, null, p.{n.DESTINATION_ID}, ?, p.{n.RUN_ID}"
            f" from {self.plan} as p where p.{n.RUN_ID} = ? and p.{n.OP} <> 'remove'"
            f" and not exists (select 1 from {self.snapshot} as s where s.{n.KEY} = p.{n.KEY})",
            (synced_at, marks_id),
        )
        session.execute(
            f"insert into {self.candidates} ({n.KEY})"
            f" select p.{n.KEY} from {self.plan} as p where p.{n.RUN_ID} = ?"
            f" and not exists (select 1 from {self.candidates} as c where c.{n.KEY} = p.{n.KEY})",
            (marks_id,),
        )
        session.execute(f"delete from {self.plan} where {n.RUN_ID} = ?", (marks_id,))
        return count

    def _keep_candidates(
        self, session: Session, run_id: str, accepted: str, every_batch_answered: bool, full_resync: bool,
    ) -> None:
        """Leave in ``S__candidates`` the keys the commit wrote only where the snapshot now
        differs from S: rejected and unsent keys, and, when a `dbt run` rebuilt S since the
        freeze, keys whose values changed in S meanwhile.

        The freeze marked the table with a null key; a `dbt run` that rebuilds S empties the
        table, so a mark still there means S is the one the plan was frozen from. (A null
        key matches no member in the diff views' ``key in (...)``.) Removing the mark comes
        first: on PostgreSQL it waits for a `dbt run` that is refilling the table, and then
        sees its outcome.
        """
        n = names
        marked = session.execute_count(f"delete from {self.candidates} where {n.KEY} is null") > 0
        if (marked and every_batch_answered and not full_resync
                and self.plan_counts(session, run_id).total == int(session.scalar(f"select count(*) from {self.candidates}"))):
            # The plan holds every candidate (it was frozen from them, and only this commit
            # removes any): the candidates left are the rejected keys. No join of the
            # plan's keys with the candidates, which at 10M members needs more memory than
            # DuckDB's limit.
            session.execute(f"delete from {self.candidates}")
            session.execute(
                f"insert into {self.candidates} ({n.KEY})"
                f" select p.{n.KEY} from {self.plan} as p where p.{n.RUN_ID} = ?"
                f" and exists (select 1 from {self.state.errors} as e"
                f"             where e.run_id = ? and e.member_key = p.{n.KEY})",
                (run_id, run_id),
            )
            return
        session.execute(
            f"delete from {self.candidates} where {n.KEY} in (select {n.KEY} from ({accepted}) as a)",
            (run_id, run_id),
        )
        if not marked:
            session.execute(
                f"insert into {self.candidates} ({n.KEY})"
                f" select a.{n.KEY} from ({accepted}) as a"
                f" left join {self.membership} as m on m.{n.KEY} = a.{n.KEY}"
                f" where case when a.{n.OP} = 'remove' then m.{n.KEY} is not null"
                f"            else m.{n.KEY} is null or m.{n.HASH} <> a.{n.HASH} end",
                (run_id, run_id),
            )

    # -- inspection -------------------------------------------------------------------------

    def preview(self, session: Session, sample: int = 5) -> tuple[PlanCounts, list[dict[str, Any]]]:
        """What the next run would send: counts by op and a few rows, from ``S__changes``."""
        n = names
        rows = session.fetchall(f"select {n.OP}, true, count(*) from {self.changes} group by {n.OP}")
        counts = _counts(rows)
        if "add" not in n.MODE_SENDS[self.sync.mode]:
            recorded = int(session.scalar(f"select count(*) from {self.adds}"))
            counts = PlanCounts(counts.adds, counts.removes, counts.updates, recorded)
        sample_rows = session.fetchall(
            f"select {n.OP}, {n.KEY}{self._cols()} from {self.changes} order by {n.OP}, {n.KEY} limit ?",
            (int(sample),),
        )
        by_lower = {c.lower(): i + 2 for i, c in enumerate(self.columns)}
        out = []
        for row in sample_rows:
            fields = {m.destination_field: row[by_lower[m.source_column.lower()]] for m in self.sync.mapping}
            out.append({"op": row[0], "key": row[1], "fields": fields})
        return counts, out

    def snapshot_size(self, session: Session) -> int:
        return int(session.scalar(f"select count(*) from {self.snapshot}"))

    def reset(self, session: Session) -> int:
        """Forget the snapshot (and any uncommitted plans); return the rows forgotten.

        Every member of S now differs from the (empty) snapshot, so every key of S becomes a
        candidate.
        """
        forgotten = self.snapshot_size(session)
        session.execute(f"delete from {self.snapshot}")
        session.execute(f"delete from {self.plan}")
        session.execute(f"delete from {self.candidates}")
        session.execute(f"insert into {self.candidates} ({names.KEY}) select {names.KEY} from {self.membership}")
        self.warehouse.refresh_statistics(session, self.sync.relation_of("candidates"))
        return forgotten


class EncodedReader:
    """Reads a plan's sent rows as batches the warehouse encoded (see
    :meth:`audsync.warehouse.Warehouse.encoded_batches_sql`)."""

    def __init__(self, sql: str, fields: list[str]):
        self.sql = sql
        self.fields = fields

    def read(self, session: Session, run_id: str, after_seq: int, upto_seq: int, batch_size: int) -> list[EncodedBatch]:
        """The sent rows ``after_seq < seq <= upto_seq`` in batches of ``batch_size``, in order."""
        rows = session.fetchall(self.sql, (*self.fields, int(batch_size), run_id, after_seq, upto_seq))
        batches = []
        for first_seq, last_seq, size, operations, first, last, seqs, ids in rows:
            first_op, last_op = orjson.loads(first), orjson.loads(last)
            batches.append(EncodedBatch(
                bytes(operations), int(size),
                Change(int(first_seq), first_op["op"], first_op["key"], first_op["fields"], ids[0] if ids else None),
                Change(int(last_seq), last_op["op"], last_op["key"], last_op["fields"], ids[-1] if ids else None),
                seqs, ids,
            ))
        return batches


def _counts(rows: list[tuple]) -> PlanCounts:
    adds = removes = updates = recorded = 0
    for op, send, count in rows:
        count = int(count)
        if not send:
            recorded += count
        elif op == "add":
            adds += count
        elif op == "remove":
            removes += count
        elif op == "update":
            updates += count
    return PlanCounts(adds, removes, updates, recorded)
