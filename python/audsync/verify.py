"""``audsync verify S``: read a destination's membership back and compare it with the snapshot.

The snapshot ``S__snapshot`` holds what audsync committed as being in the destination. A
member can drift from it outside audsync: removed by hand in the CRM, added by another tool,
lost by the vendor. ``verify`` pages through the destination's membership
(:meth:`Connector.list_members`) and compares it with the snapshot **inside the warehouse**:
each page of read-back keys is inserted into a temporary table, and the two differences are
counted and sampled by SQL, so memory stays bounded whatever the list's size.

* **missing**: committed by audsync (a snapshot row with a hash), absent from the destination;
* **unexpected**: in the destination, in no snapshot row (audsync never sent it, or its row
  is gone).

Keys compare trimmed, and lowercased where the destination's keys are emails
(:meth:`Connector.listed_key_casefold`).

``--repair`` marks every drifted key as unknown, the shared marker of convention 1 (names.py):
a missing key's snapshot row gets a NULL ``_audsync_hash``; an unexpected key gets a snapshot
row with a NULL hash (and the destination's id), under the audience's own spelling of the key
when S has it; both keys go into ``S__candidates``. The next run then sends the truth: in
mirror mode a key in S is added again, a key not in S is removed.

Destinations whose API cannot list members (Meta, Google: hashed audiences; a webhook without
a ``list_url``) say so (exit 2).
A sync in ``remove`` mode has no membership to compare (its snapshot records members removed).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from . import names
from .errors import ConfigError
from .redact import redact, register_secrets

TEMP_TABLE = "audsync_verify_keys"
"""The temporary table of read-back keys (one per warehouse session)."""
VERIFY_RUN_ID = "verify"
"""``_audsync_run_id`` of the snapshot rows ``--repair`` inserts."""


class CannotVerify(ConfigError):
    """The sync's destination (or mode) cannot be read back: exit 2 with the reason."""


@dataclass
class VerifyResult:
    """What a comparison found."""

    sync: str
    destination: str
    listed: int = 0
    """Members the destination listed."""
    committed: int = 0
    """Snapshot rows audsync committed as sent (with a hash)."""
    missing: int = 0
    unexpected: int = 0
    missing_sample: list[str] = field(default_factory=list)
    unexpected_sample: list[str] = field(default_factory=list)
    repaired: int = 0
    """Keys marked unknown by ``--repair``."""

    @property
    def drifted(self) -> bool:
        """Whether the destination and the snapshot disagree."""
        return bool(self.missing or self.unexpected)

    def as_dict(self) -> dict[str, Any]:
        """The result as plain data (``--format json``)."""
        return {
            "sync": self.sync, "destination": self.destination, "listed": self.listed,
            "committed": self.committed, "missing": self.missing, "unexpected": self.unexpected,
            "missing_sample": self.missing_sample, "unexpected_sample": self.unexpected_sample,
            "repaired": self.repaired, "drifted": self.drifted,
        }  # fmt: skip


def verify(runner: Any, sync: Any, *, repair: bool = False, sample: int = 5) -> VerifyResult:
    """Compare ``sync``'s destination membership with its snapshot (and repair the drift).

    Args:
        runner: a :class:`~audsync.runner.SyncRunner` with the project's destinations.
        sync: the sync model.
        repair: mark drifted keys unknown so that the next run sends the truth.
        sample: how many keys of each difference to return.

    Raises:
        CannotVerify: the destination cannot list members, or the sync is in remove mode.
        FatalDestinationError: the destination refused (credentials, a missing list).
        LockHeld: with ``repair``, a run holds the sync's lock.
    """
    from .delivery.engine import DeliverySettings
    from .destinations.base import SyncInfo
    from .state import lock_timeout_s

    destination = runner.destination_of(sync)
    connector_class = destination.connector
    settings = {**destination.settings, **sync.settings}
    refused = connector_class.listing_refused(settings)
    if refused is not None:
        raise CannotVerify(
            f"sync {sync.name!r}: destination {sync.destination!r} ({connector_class.type})"
            f" cannot be verified: {refused}",
            sync=sync.name,
        )
    if sync.mode == "remove":
        raise CannotVerify(
            f"sync {sync.name!r}: a sync in remove mode has no membership to verify (its"
            " snapshot records the members it removed)",
            sync=sync.name,
        )
    register_secrets(destination.secret_values())
    tables = runner.check_ready(sync)
    delivery = DeliverySettings.from_settings(connector_class, settings, destination=destination.name)
    run_id = "verify-" + secrets.token_hex(6)
    with runner.warehouse.session() as session:
        row = runner.state.ensure_sync_row(session, sync.name)
        state = json.loads(row.destination_state) if row.destination_state else {}
    info = SyncInfo(
        name=sync.name, mode=sync.mode, run_id=run_id, identifier=sync.identifier,
        fields=tuple(m.destination_field for m in sync.mapping),
        # Verifying never creates a list: a missing one is an error, not something to make.
        settings={**sync.settings, "create_if_missing": False}, state=state,
        project_dir=str(runner.project.project_dir),
    )  # fmt: skip
    http = delivery.http_client(secrets=destination.secret_values())
    try:
        connector = destination.create_connector(info, http)
        http.add_secrets(connector.secret_values())
        register_secrets(connector.secret_values())
        http.classify = getattr(connector, "classify", None) or http.classify
        connector.open()
        result = VerifyResult(sync.name, sync.destination)
        lock = None
        if repair:
            with runner.warehouse.session() as session:
                lock, _ = runner.state.acquire_lock(session, sync.name, run_id, lock_timeout_s())
        try:
            with runner.warehouse.session() as session:
                _compare(session, runner.warehouse, tables, connector, result, repair, sample)
        finally:
            if lock is not None:
                with runner.warehouse.session() as session:
                    runner.state.release_lock(session, lock, record_run=False)
        connector.close(True)
        return result
    finally:
        http.close()


def _compare(
    session: Any, warehouse: Any, tables: Any, connector: Any, result: VerifyResult,
    repair: bool, sample: int,
) -> None:  # fmt: skip
    """Load the read-back keys into a temporary table and compare them with the snapshot."""
    n = names
    temp = warehouse.quote(TEMP_TABLE)
    session.execute(f"drop table if exists {temp}")
    session.execute(f"create temporary table {temp} (k varchar, d varchar)")
    for page in connector.list_members():
        # One page at a time (at most a few hundred keys): memory stays bounded.
        session.executemany(f"insert into {temp} (k, d) values (?, ?)", page)
        result.listed += len(page)

    def norm(column: str) -> str:
        return f"lower(trim({column}))" if connector.listed_key_casefold() else f"trim({column})"

    snapshot = tables.snapshot
    missing = (
        f"select s.{n.KEY} as k from {snapshot} as s where s.{n.HASH} is not null"
        f" and not exists (select 1 from {temp} as t where t.k = {norm('s.' + n.KEY)})"
    )
    # A key the destination lists twice (two records with one email) counts once.
    unexpected = (
        f"select t.k as k, min(t.d) as d from {temp} as t"
        f" where not exists (select 1 from {snapshot} as s where {norm('s.' + n.KEY)} = t.k)"
        f" group by t.k"
    )
    result.committed = int(session.scalar(f"select count(*) from {snapshot} where {n.HASH} is not null"))
    result.missing = int(session.scalar(f"select count(*) from ({missing}) as m"))
    result.unexpected = int(session.scalar(f"select count(*) from ({unexpected}) as u"))
    if sample:
        result.missing_sample = [
            redact(str(r[0])) for r in session.fetchall(f"select k from ({missing}) as m order by k limit {int(sample)}")
        ]
        result.unexpected_sample = [
            redact(str(r[0])) for r in session.fetchall(f"select k from ({unexpected}) as u order by k limit {int(sample)}")
        ]
    if not repair or not result.drifted:
        return
    from .state import utcnow

    now = utcnow()
    candidates = tables.candidates
    membership = tables.membership
    # Unexpected keys, in S's own spelling when S has the member (so the next run compares
    # the right key), else as the destination gives it.
    session.execute(f"drop table if exists {warehouse.quote(TEMP_TABLE + '_drift')}")
    drift = warehouse.quote(TEMP_TABLE + "_drift")
    session.execute(f"create temporary table {drift} (k varchar, d varchar, unexpected boolean)")
    session.execute(
        f"insert into {drift} (k, d, unexpected)"
        f" select coalesce((select min(m.{n.KEY}) from {membership} as m where {norm('m.' + n.KEY)} = u.k), u.k),"
        f" u.d, true from ({unexpected}) as u"
    )
    session.execute(f"insert into {drift} (k, d, unexpected) select m.k, null, false from ({missing}) as m")
    session.execute(
        f"update {snapshot} set {n.HASH} = null"
        f" where {n.HASH} is not null and {n.KEY} in (select k from {drift} where not unexpected)"
    )
    session.execute(
        f"insert into {snapshot} ({n.KEY}, {n.HASH}, {n.DESTINATION_ID}, {n.SYNCED_AT}, {n.RUN_ID})"
        f" select k, null, d, ?, ? from {drift} where unexpected"
        f" and k not in (select {n.KEY} from {snapshot} where {n.KEY} is not null)",
        (now, VERIFY_RUN_ID),
    )
    session.execute(
        f"insert into {candidates} ({n.KEY}) select distinct k from {drift}"
        f" where k not in (select {n.KEY} from {candidates} where {n.KEY} is not null)"
    )
    result.repaired = int(session.scalar(f"select count(*) from {drift}"))
    session.execute(f"drop table if exists {drift}")
    session.execute(f"drop table if exists {temp}")
