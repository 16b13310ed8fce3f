"""Helpers the connector tests share: wiring a connector as the runner does, and driving it
through the engine or through a fake's common surface (``destination_config``,
``field_mapping``, ``sync_config``, ``members``), as the mode tests do."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, ClassVar

from audsync.delivery.engine import DeliverySettings, deliver
from audsync.delivery.http import HttpClient
from audsync.destinations.base import BatchResult, Change, Connector, SyncInfo
from audsync.destinations.registry import get_connector


class Harness:
    """A connector wired as the runner wires it, with an HttpClient that records its waits.

    A subclass names the connector (``connector_class``), the destination and the sync.
    """

    connector_class: ClassVar[type[Connector]]
    destination_name: ClassVar[str]
    sync_name: ClassVar[str]

    def __init__(
        self,
        fake: Any,
        *,
        run_id: str = "run-1",
        state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        fields: Sequence[str] | None = None,
        max_retries: int = 3,
        timeout_s: float = 5.0,
        **destination: Any,
    ):
        self.settings = fake.destination_config(**destination)
        merged = {**self.settings, **fake.sync_config(), **(config or {})}
        if fields is None:
            fields = tuple(m["destination_field"] for m in fake.field_mapping())
        self.sync = SyncInfo(
            self.sync_name, "mirror", run_id, "email", tuple(fields), merged, state or {}
        )
        self.waits: list[float] = []
        self.delivery = DeliverySettings.from_settings(
            self.connector_class,
            {**merged, "max_retries": max_retries, "timeout_s": timeout_s},
        )
        self.http = self.delivery.http_client(sleep=self.waits.append, backoff_base_s=0.01)
        self.connector = self.connector_class(
            self.destination_name, self.settings, self.sync, self.http
        )
        self.http.add_secrets(self.connector.secret_values())
        self.http.classify = self.connector.classify  # as the runner installs it

    def open(self) -> Any:
        """Open the connector, as the runner does before the first batch."""
        return self.connector.open()

    def send(self, batch: list[Change]) -> BatchResult:
        """Send one batch."""
        return self.connector.send_batch(batch)


def run(
    connector: Connector,
    changes: list[Change],
    batch_size: int | None = None,
    concurrency: int = 2,
) -> BatchResult:
    """Deliver ``changes`` through the engine in batches of ``batch_size`` (default: the
    connector's most); return every batch's outcome merged."""
    size = batch_size or type(connector).max_batch_size
    merged = BatchResult()
    batches = [(n, changes[i : i + size]) for n, i in enumerate(range(0, len(changes), size))]

    def on_result(_no: int, _batch: Any, result: BatchResult) -> None:
        merged.rejected.extend(result.rejected)
        merged.destination_ids.update(result.destination_ids)

    deliver(connector, batches, max_concurrency=concurrency, on_result=on_result)
    return merged


def mirror_runs(
    fake: Any, harness: type[Harness], pool: list[str], runs: int = 4, seed: int = 7
) -> None:
    """Mirror-mode runs over random audiences through ``field_mapping`` and ``members`` only:
    after each run the destination holds exactly the audience."""
    rng = random.Random(seed)
    mapping = fake.field_mapping()
    snapshot: dict[str, str | None] = {}  # key -> destination id, as the snapshot keeps them
    for run_no in range(runs):
        audience = set(rng.sample(pool, len(pool) // 2))
        values = {e: {"email": e, "first_name": f"N{run_no}", "ltv": run_no * 1.5} for e in pool}

        def fields(email, values=values):
            return {m["destination_field"]: values[email][m["source_column"]] for m in mapping}

        changes = [Change(0, "add", e, fields(e), None) for e in sorted(audience - set(snapshot))]
        changes += [
            Change(0, "update", e, fields(e), snapshot[e]) for e in sorted(audience & set(snapshot))
        ]
        changes += [
            Change(0, "remove", e, fields(e), snapshot[e]) for e in sorted(set(snapshot) - audience)
        ]
        changes = [c._replace(seq=i + 1) for i, c in enumerate(changes)]
        h = harness(fake, run_id=f"run-{run_no}", config=fake.sync_config(), state={})
        h.open()
        result = h.send(changes)
        assert result.rejected == []
        for c in changes:
            if c.op == "remove":
                snapshot.pop(c.key)
            else:
                snapshot[c.key] = result.destination_ids.get(c.key, snapshot.get(c.key))
        assert set(fake.members(pool)) == audience, f"run {run_no}"


def mirror_through_the_common_surface(fake: Any) -> None:
    """Drive the connector of ``fake.destination_config()`` as the runner would, through the
    fake's common surface only, over four runs of random audiences with fields; after each the
    fake holds the audience, fields included, and saw no violation."""
    config = fake.destination_config()
    mapping = fake.field_mapping()
    sync = SyncInfo(
        "generic", "mirror", "r1", "email",
        tuple(m["destination_field"] for m in mapping), settings=fake.sync_config(),
    )  # fmt: skip
    http = HttpClient(max_retries=0)
    live = get_connector(config["type"])("generic", config, sync, http)
    http.classify = live.classify
    live.open()

    def fields_of(row: dict) -> dict:
        return {m["destination_field"]: row[m["source_column"]] for m in mapping}

    rng = random.Random(7)
    snapshot: dict[str, tuple[dict, str | None]] = {}  # key -> (fields, destination id)
    everyone = [f"u{i}@example.com" for i in range(12)]
    for _run in range(4):
        audience = {
            key: fields_of({"email": key, "first_name": rng.choice(["Ann", "", "zoë"]),
                            "ltv": float(rng.randint(0, 9))})
            for key in rng.sample(everyone, rng.randint(0, 10))
        }  # fmt: skip
        batch = []
        for key, fields in audience.items():
            if key not in snapshot:
                batch.append(Change(len(batch) + 1, "add", key, fields, None))
            elif snapshot[key][0] != fields:
                batch.append(Change(len(batch) + 1, "update", key, fields, snapshot[key][1]))
        for key in sorted(set(snapshot) - set(audience)):
            batch.append(Change(len(batch) + 1, "remove", key, snapshot[key][0], snapshot[key][1]))
        result = live.send_batch(batch) if batch else None
        assert result is None or result.rejected == []
        for c in batch:
            if c.op == "remove":
                del snapshot[c.key]
            else:
                snapshot[c.key] = (c.fields, result.destination_ids.get(c.key, c.destination_id))
        assert fake.members(everyone) == audience
    assert fake.violations == []
