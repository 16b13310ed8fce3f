"""The fault matrix (issue 10's proof): whatever fails, the destination ends up holding what the
mode promises and the snapshot never claims what the destination does not hold.

Each iteration of :func:`test_fault_matrix` mutates one audience (adds, removes, field
updates), runs ``dbt run``, starts ``audsync run`` of four syncs (one per mode, each to its own
fake webhook process) as a real subprocess, and injects ONE fault at a random point:

========================  ==================================================================
``kill``                  SIGKILL of the runner
``sigterm``               SIGTERM of the runner; the command must end promptly, start no
                          further run, and leave nothing half done
``sigstop``               SIGSTOP past the lock timeout, the audience changed and rebuilt
                          meanwhile, a second run takes over, then SIGCONT: the stalled run
                          must notice it was fenced, commit nothing and exit 1; half the
                          time one of its requests, held by the destination, lands after
                          the takeover (what the stalled run sent must not be forgotten)
``slow``                  answers held past the client's timeout, then applied
``5xx`` / ``429``         errors (``429`` with ``Retry-After``), nothing applied
``apply-5xx``             the batch applied, then a 5xx
``apply-drop``            the batch applied, then the connection dropped
``apply-late``            the batch applied, the answer held past the timeout
``reject``                rows rejected by the destination
``dbt-during``            the audience changes and ``dbt run`` rebuilds it during delivery
``dead-hang``             the destination stops answering (requests read, never answered)
``dead-refuse``           the destination's port closes
``dead-stopped``          the destination's process is stopped (SIGSTOP), then continued
========================  ==================================================================

and, after most faults, sometimes reverts the audience to an earlier state (the case where a
forgotten outcome stays wrong for good). Then it runs again, with no fault, until a run
succeeds (bounded), and checks:

* each destination holds exactly what its mode promises (:class:`EpochOracle`);
* no snapshot row claims what the destination does not hold, the destination holds nothing
  the snapshot does not know of, and no row is left *unknown* (a NULL ``_audsync_hash``,
  convention 1) after a successful run;
* no run is left ``running``, every lock is free, the plan tables, ``audsync_batches`` and
  ``audsync_delivered_ids`` are empty;
* every run's counts agree with its plan; a SIGTERM'd command started no run after the one
  it stopped; a fenced run exited 1 and stayed ``aborted``;
* the fakes saw no request that breaks the webhook contract.

The RNG is seeded; the seed is printed in every failure with the command that replays it::

    AUDSYNC_FAULT_SEED=<seed> AUDSYNC_FAULT_ITERATIONS=<n> .venv/bin/python -m pytest \\
        tests/integration/test_fault_matrix.py --warehouses duckdb

``AUDSYNC_FAULT_ITERATIONS`` (default :data:`DEFAULT_ITERATIONS`, which keeps CI at a few
minutes per warehouse on 2 cores; :data:`SPARK_ITERATIONS` on Spark, which runs only with
``--warehouses spark``, as the rest of the Spark subset) sets the number of iterations; ``AUDSYNC_FAULT_KEEP_GOING=1``
records every failing iteration, repairs the sync and goes on, instead of stopping at the
first (to measure how often something breaks). Timing makes a replay close to, not exactly,
the original run.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pytest

from audsync import names
from tests.fakes.webhook_server import FakeWebhookProcess
from tests.support.dbt_project import with_spark
from tests.support.syncs import (
    audsync,
    audsync_process,
    valid_members,
    webhook_values,
    write_audience,
    write_destinations,
    write_sync,
)

DEFAULT_ITERATIONS = 6
SPARK_ITERATIONS = 2
"""Spark's default: each iteration costs minutes there (every ``dbt run`` and every commit
rewrites tables), so CI's Spark subset runs two."""
KEEP_GOING = os.environ.get("AUDSYNC_FAULT_KEEP_GOING", "") not in ("", "0")

MODES = ("mirror", "add", "upsert", "remove")
SYNCS = {mode: f"fm_{mode}" for mode in MODES}
# Small batches, two threads, a short timeout and a little latency: a run has several
# batches in flight and faults land mid-delivery; retries and timeouts cost seconds, not
# minutes.
BATCH_SIZE = 3
CONCURRENCY = 2
TIMEOUT_S = 1.5
MAX_RETRIES = 2
ATTEMPTS = MAX_RETRIES + 1
"""Attempts of a batch: a fault of up to ``ATTEMPTS * CONCURRENCY`` requests can exhaust every
attempt of a batch (its rows then have an unknown outcome)."""
LATENCY_S = 0.06
UNIVERSE = [f"fm{i:02d}@example.com" for i in range(70)]
NAMES = ["Ann", "Bob", None, "", "zoë", "o'brien", "Chloé"]


@dataclass(frozen=True)
class Pace:
    """The matrix's timeouts on one warehouse."""

    lock_timeout_s: float = 3.0
    command_timeout_s: float = 150.0
    """How long a command may take before the test calls it hung."""
    sigterm_exit_s: float = 25.0
    """SIGTERM must end the command within this (issue 10: 10 s plus one commit)."""
    build_wait_s: float = 40.0
    """How long a ``dbt run`` beside a stalled runner may take before it counts as waiting
    for the stalled runner's transaction."""
    takeover_s: float = 30.0
    request_wait_s: float = 60.0
    iterations: int = DEFAULT_ITERATIONS

    @property
    def run_env(self) -> dict[str, str]:
        return {"AUDSYNC_LOCK_TIMEOUT_S": str(self.lock_timeout_s)}


PACES = {
    # A Spark statement takes a second or more, a rewrite several, a run of the four syncs a
    # minute (on two shared cores). The lock timeout stays far above a heartbeat's rewrite of
    # audsync_syncs, and SIGTERM's bound is 10 s plus a Spark commit (a dozen rewrites).
    "spark": Pace(lock_timeout_s=15.0, command_timeout_s=600.0, sigterm_exit_s=120.0, build_wait_s=300.0,
                  takeover_s=300.0, request_wait_s=240.0, iterations=SPARK_ITERATIONS),
}


def pace_for(warehouse: str) -> Pace:
    """The warehouse's pace; ``AUDSYNC_FAULT_ITERATIONS`` overrides its number of iterations."""
    pace = PACES.get(warehouse, Pace())
    if os.environ.get("AUDSYNC_FAULT_ITERATIONS"):
        pace = replace(pace, iterations=int(os.environ["AUDSYNC_FAULT_ITERATIONS"]))
    return pace

HEAL_ATTEMPTS = 6

FAULTS = (
    "kill", "sigterm", "sigstop", "slow", "5xx", "429", "apply-5xx", "apply-drop", "apply-late",
    "reject", "dbt-during", "dead-hang", "dead-refuse", "dead-stopped",
)
# Faults after which the audience may go back to an earlier state (the others change it
# during the fault themselves).
REVERTIBLE = frozenset(FAULTS) - {"sigstop", "dbt-during"}


class CheckFailed(AssertionError):
    """A property of the matrix does not hold after an iteration."""


# ----------------------------------------------------------------------------------------
# What each mode promises, epoch by epoch
# ----------------------------------------------------------------------------------------


@dataclass
class EpochOracle:
    """What a destination may and must hold after a successful run, under faults.

    Every ``dbt run`` builds an *epoch*: the audience ``S`` then. A run *froze* an epoch when it
    planned from it; the epoch is *settled* when a run that froze it ended ``success`` (so
    the destination held all of it at that moment). A faulted run may have sent any part of
    its plan, so an epoch it froze bounds what the destination may hold, and only settled
    epochs bound what it must hold. A run whose freeze may have seen either side of a ``dbt
    run`` (it was alive during it) counts for both epochs, and only for what may be held.

    * ``mirror``: exactly the last epoch, with its values.
    * ``add``: every key of a settled epoch; no key outside the frozen ones.
    * ``upsert``: as ``add``; a key of the last epoch has its values; another has the values
      of its last settled epoch or of a later frozen one (a faulted update may or may not
      have been sent, and convention 1 re-sends the unknown row's values).
    * ``remove``: the initial members, less every key that was in a frozen epoch and missing
      from a later settled one, and less nothing that was not in some frozen epoch and
      missing from a later one.
    """

    mode: str
    initial: dict[str, Any] = field(default_factory=dict)
    frozen: set[int] = field(default_factory=set)
    maybe: set[int] = field(default_factory=set)
    settled: set[int] = field(default_factory=set)

    def check(
        self, epochs: list[dict[str, tuple]], final: int, held: dict[str, Any],
    ) -> list[str]:
        """Problems of ``held`` (key -> destination fields) after the run that settled epoch
        ``final``; empty when it holds what the mode promises."""
        assert final in self.settled, "the check runs after a successful run of the last epoch"
        problems: list[str] = []
        values = {k: webhook_values(f) for k, f in held.items()}
        certain = sorted(self.frozen | self.settled)
        possible = sorted(self.frozen | self.maybe | self.settled)
        if self.mode == "mirror":
            expected = epochs[final]
            _compare_keys(problems, set(held), set(expected), set(expected), "mirror")
            for key in sorted(set(held) & set(expected)):
                if values[key] != expected[key]:
                    problems.append(f"mirror: {key} holds {values[key]}, expected {expected[key]}")
            return problems
        if self.mode in ("add", "upsert"):
            must = set().union(*(epochs[e].keys() for e in self.settled))
            may = set().union(*(epochs[e].keys() for e in possible))
            _compare_keys(problems, set(held), must, may, self.mode)
            if self.mode == "upsert":
                for key in sorted(set(held) & may):
                    allowed = self._upsert_values(epochs, final, possible, key)
                    if values[key] not in allowed:
                        problems.append(
                            f"upsert: {key} holds {values[key]}, expected one of {sorted(allowed, key=repr)}"
                        )
            return problems
        # remove: a key is removed once a run saw it and a later successful run did not.
        must_removed = {
            key for key in self.initial
            if any(key in epochs[e1] and key not in epochs[e2]
                   for e1 in certain for e2 in self.settled if e1 < e2)
        }
        may_removed = {
            key for key in self.initial
            if any(key in epochs[e1] and key not in epochs[e2]
                   for e1 in possible for e2 in possible if e1 < e2)
        }
        must = set(self.initial) - may_removed
        may = set(self.initial) - must_removed
        _compare_keys(problems, set(held), must, may, "remove")
        return problems

    def _upsert_values(self, epochs, final: int, possible: list[int], key: str) -> set[tuple]:
        if key in epochs[final]:
            return {epochs[final][key]}
        settled_with = [e for e in self.settled if key in epochs[e]]
        since = max(settled_with) if settled_with else -1
        return {epochs[e][key] for e in possible if e >= since and key in epochs[e]}


def _compare_keys(problems: list[str], held: set[str], must: set[str], may: set[str], mode: str) -> None:
    missing = sorted(must - held)
    extra = sorted(held - may)
    if missing:
        problems.append(f"{mode}: the destination misses {len(missing)} member(s): {missing[:8]}")
    if extra:
        problems.append(f"{mode}: the destination holds {len(extra)} member(s) it should not: {extra[:8]}")


# ----------------------------------------------------------------------------------------
# The world: a project, four syncs, four fake webhook processes
# ----------------------------------------------------------------------------------------


RUN_FIELDS = ("run_id", "sync_name", "status", "planned_adds", "planned_removes", "planned_updates",
              "rows_added", "rows_removed", "rows_updated", "rows_failed", "error_message")


def _is_busy(error: BaseException) -> bool:
    """A DuckDB file held by another process (the runner, between its steps)."""
    text = str(error).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class World:
    """The project, its fakes, the audience history and one :class:`EpochOracle` per sync."""

    def __init__(self, project, seed: int, tmp: Path, pace: Pace | None = None):
        self.project = project
        self.pace = pace or Pace()
        self.rng = random.Random(seed)
        self.seed = seed
        self.schema = project.schema + "_audsync"
        self.fakes: dict[str, FakeWebhookProcess] = {}
        for mode in MODES:
            fake = FakeWebhookProcess(secret=f"fm-secret-{mode}", latency_s=LATENCY_S)
            fake.__enter__()
            self.fakes[mode] = fake
        self.epochs: list[dict[str, tuple]] = []
        self.rows_history: list[list[tuple]] = []
        self.oracles: dict[str, EpochOracle] = {}
        self.attributed: set[str] = set()
        self.checked_runs: set[str] = set()
        self.run_fields: tuple[str, ...] | None = None
        self.stale_landings = 0
        """Iterations where a stalled run's in-flight batch landed after the takeover."""
        self.pending_settle: list[tuple[str, EpochOracle, int]] = []
        """Runs attributed to an epoch before they ended: the epoch is settled if they succeed."""
        self.log: list[str] = []

    def close(self) -> None:
        for fake in self.fakes.values():
            fake.stop()

    # -- setup ----------------------------------------------------------------------------

    def set_up(self) -> None:
        for mode, name in SYNCS.items():
            write_sync(self.project, name, mode=mode, destination=f"fm_hook_{mode}", tags=["fault_matrix"])
        write_destinations(self.project, {
            f"fm_hook_{mode}": {
                "type": "webhook", "url": fake.url, "secret": f"fm-secret-{mode}",
                "batch_size": BATCH_SIZE, "max_concurrency": CONCURRENCY, "timeout_s": TIMEOUT_S,
                "max_retries": MAX_RETRIES,
            }
            for mode, fake in self.fakes.items()
        })
        self.start_oracles()
        rows = [self.random_member(key) for key in self.rng.sample(UNIVERSE, self.rng.randint(20, 40))]
        self.build(rows)

    def start_oracles(self) -> None:
        """Fresh oracles (and, for ``remove``, the destination's initial members)."""
        initial = {k: {"first_name": "seeded", "ltv": 0} for k in self.rng.sample(UNIVERSE, 45)}
        self.fakes["remove"].inject(seed_members=initial)
        for fake in self.fakes.values():
            fake.inject(record_batches=True)
        self.oracles = {mode: EpochOracle(mode, initial if mode == "remove" else {}) for mode in MODES}

    def random_member(self, key: str | None) -> tuple:
        return (key, self.rng.choice(NAMES), self.rng.choice([None, float(self.rng.randint(0, 99))]))

    # -- the audience ---------------------------------------------------------------------

    def mutate(self) -> list[tuple]:
        """The current audience with random adds, removes and field updates (20 to 60 members)."""
        current = {r[0]: r for r in self.rows_history[-1] if r[0] is not None}
        keys = list(current)
        for key in self.rng.sample(keys, min(len(keys), self.rng.randint(0, 10))):
            if len(current) > 20:
                del current[key]
        outside = [k for k in UNIVERSE if k not in current]
        for key in self.rng.sample(outside, min(len(outside), self.rng.randint(1, 12))):
            if len(current) < 60:
                current[key] = self.random_member(key)
        for key in self.rng.sample(list(current), min(len(current), self.rng.randint(2, 12))):
            current[key] = self.random_member(key)
        rows = list(current.values())
        if self.rng.random() < 0.15:
            rows.append((None, "no key", 1.0))  # an invalid row, left out of S
        if self.rng.random() < 0.1 and rows:
            rows.append(rows[0])  # a duplicate key: both copies are left out of S
        return rows

    def earlier(self) -> list[tuple]:
        """An earlier audience: mostly the one before the last, sometimes older."""
        if len(self.rows_history) < 2:
            return self.mutate()
        back = 2 if self.rng.random() < 0.7 else self.rng.randint(2, len(self.rows_history))
        return list(self.rows_history[-back])

    def build(self, rows: list[tuple], *, while_running: bool | Callable[[], bool] = False) -> None:
        """Write the audience and ``dbt run``: a new epoch. ``while_running``: a run may have
        frozen its plan during the dbt run (a callable: asked once the dbt run is done)."""
        self.attribute(ambiguous=False)
        write_audience_retrying(self.project, rows)
        self.dbt_run()
        self.rows_history.append(list(rows))
        self.epochs.append(valid_members(rows))
        # A run alive during the dbt run may have frozen either epoch.
        self.attribute(ambiguous=while_running() if callable(while_running) else while_running)

    def dbt_run(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            result = self.project.dbt("run", "--quiet", expect_ok=None)
            if result.success:
                return
            if not _is_busy(Exception(result.error_text)) or time.monotonic() > deadline:
                raise AssertionError(f"dbt run failed:\n{result.error_text}")
            time.sleep(0.3)

    # -- the warehouse --------------------------------------------------------------------

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.project.query(sql, params)
            except Exception as error:  # noqa: BLE001 - only a busy DuckDB file is retried
                if not _is_busy(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def state_relation(self, table: str) -> str:
        return self.project.relation(table, schema=self.schema)

    def runs(self) -> list[dict[str, Any]]:
        """Every run of the matrix's syncs, oldest first (``rows_unknown`` where recorded)."""
        if self.run_fields is None:
            columns = {c.lower() for c in self.project.columns(self.state_relation(names.RUNS_TABLE))}
            self.run_fields = RUN_FIELDS + (("rows_unknown",) if "rows_unknown" in columns else ())
        rows = self.query(
            f"select {', '.join(self.run_fields)} from {self.state_relation(names.RUNS_TABLE)}"
            f" where sync_name in ({', '.join(['%s'] * len(SYNCS))}) order by started_at, run_id",
            list(SYNCS.values()),
        )
        return [dict(zip(self.run_fields, r)) for r in rows]

    def attribute(self, *, ambiguous: bool) -> None:
        """Give each run that has frozen its plan since the last look the current epoch (or,
        when ``ambiguous``, the last two)."""
        if not self.epochs:
            return
        current = len(self.epochs) - 1
        mode_of = {name: mode for mode, name in SYNCS.items()}
        for run in self.runs():
            if run["run_id"] in self.attributed or run["planned_adds"] is None:
                continue
            self.attributed.add(run["run_id"])
            oracle = self.oracles[mode_of[run["sync_name"]]]
            if ambiguous and current > 0:
                oracle.maybe |= {current - 1, current}
                self.note(f"run {run['run_id']} ({run['sync_name']}) froze epoch {current - 1} or {current}")
            else:
                oracle.frozen.add(current)
                run["epoch"] = current
                self.settle_if(run, oracle, current)

    def settle_if(self, run: dict, oracle: EpochOracle, epoch: int) -> None:
        if run["status"] == "success":
            oracle.settled.add(epoch)
        else:
            # Not finished yet when attributed: settled if it ends well, checked at the end.
            self.pending_settle.append((run["run_id"], oracle, epoch))

    def settle_pending(self) -> None:
        statuses = {r["run_id"]: r["status"] for r in self.runs()}
        still = []
        for run_id, oracle, epoch in self.pending_settle:
            status = statuses.get(run_id)
            if status == "success":
                oracle.settled.add(epoch)
            elif status == "running":
                still.append((run_id, oracle, epoch))
        self.pending_settle = still

    def note(self, text: str) -> None:
        self.log.append(text)

    # -- the fakes ------------------------------------------------------------------------

    def pending_batches(self) -> dict[str, int]:
        """How many batches each sync's next run will send (what ``S__changes`` holds now)."""
        counts = {}
        for mode, name in SYNCS.items():
            rows = self.query(f"select count(*) from {self.project.relation(name, '__changes')}")[0][0]
            counts[mode] = -(-int(rows) // BATCH_SIZE)
        return counts

    def requests_seen(self) -> int:
        return sum(f.state(members=False)["requests"] for f in self.fakes.values())

    def heal_fakes(self) -> None:
        """Every fake alive, without queued failures, at its normal latency, and idle."""
        for fake in self.fakes.values():
            os.kill(fake.pid, signal.SIGCONT)
            fake.revive()
            fake.inject(clear=True, latency_s=LATENCY_S)
        time.sleep(0.3)  # a fake that was stopped reads what queued meanwhile
        deadline = time.monotonic() + 30
        while any(f.state(members=False)["in_flight"] for f in self.fakes.values()):
            if time.monotonic() > deadline:
                raise AssertionError("the fakes still hold requests 30 s after the fault")
            time.sleep(0.05)


def write_audience_retrying(project, rows: list[tuple]) -> None:
    """:func:`write_audience`, waiting while a runner holds the DuckDB file."""
    deadline = time.monotonic() + 60
    while True:
        try:
            write_audience(project, rows)
            return
        except Exception as error:  # noqa: BLE001 - only a busy DuckDB file is retried
            if not _is_busy(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ----------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------


@dataclass
class Command:
    """One ``audsync run`` subprocess."""

    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    stdout: str = ""
    stderr: str = ""
    code: int | None = None
    timeout_s: float = Pace.command_timeout_s

    def finish(self, timeout_s: float | None = None) -> int:
        """Wait for the command (at most ``timeout_s``, default the pace's); its exit code (a
        negative one for a signal)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if self.code is None:
            try:
                self.stdout, self.stderr = self.process.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.stdout, self.stderr = self.process.communicate()
                raise CheckFailed(
                    f"audsync run did not end within {timeout_s:.0f} s:\n{self.output[-3000:]}"
                ) from None
            self.code = self.process.returncode
        return self.code

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def start_run(world: World, syncs: list[str]) -> Command:
    return Command(audsync_process(world.project, "run", *syncs, env=world.pace.run_env),
                   timeout_s=world.pace.command_timeout_s)


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def wait_for_point(world: World, command: Command, point: tuple[str, float]) -> bool:
    """Wait until the fault's point: ``("requests", n)`` more hook requests, or ``("time", s)``
    after the start. False when the command ended first."""
    kind, value = point
    if kind == "time":
        remaining = value - (time.monotonic() - command.started)
        wait_until(lambda: not command.alive(), max(0.0, remaining))
    else:
        base = world.requests_seen() if value else 0
        wait_until(lambda: not command.alive() or world.requests_seen() >= base + value, world.pace.request_wait_s)
    return command.alive()


# ----------------------------------------------------------------------------------------
# One iteration
# ----------------------------------------------------------------------------------------


@dataclass
class Iteration:
    number: int
    fault: str
    target: str
    order: list[str]
    notes: list[str] = field(default_factory=list)
    reverted: bool = False
    batches: dict[str, int] = field(default_factory=dict)
    """Batches each sync's next run sends (from ``S__changes`` before the fault)."""
    sigterm_runs: list[dict] | None = None
    """The runs of a SIGTERM'd command, as it left them."""
    sigterm_locks: list[str] = field(default_factory=list)
    """Locks held when the SIGTERM'd command had ended."""
    stalled: "Stall | None" = None
    dead_run: tuple[dict, int] | None = None
    """The target sync's run against a dead destination, and its number of row errors."""

    def describe(self) -> str:
        extra = "; ".join(self.notes)
        return (f"iteration {self.number}: fault {self.fault} on {self.target}"
                f" (batches {','.join(str(self.batches.get(m, '?')) for m in MODES)})"
                f"{' then the audience reverted' if self.reverted else ''}"
                f" (order {', '.join(self.order)}){': ' + extra if extra else ''}")


def new_iteration(world: World, number: int) -> Iteration:
    """The iteration's fault, target sync and the order the command runs the syncs in."""
    rng = world.rng
    order = list(SYNCS.values())
    rng.shuffle(order)
    forced = os.environ.get("AUDSYNC_FAULT_ONLY")  # one fault only, to chase one bug
    return Iteration(number, forced or rng.choice(FAULTS), rng.choice(MODES), order)


def run_iteration(world: World, it: Iteration) -> None:
    clock = time.monotonic()
    world.build(world.mutate())
    it.batches = world.pending_batches()
    if not it.batches[it.target]:  # aim the fault at a sync with something to send
        it.target = next((m for m in world.rng.sample(MODES, len(MODES)) if it.batches[m]), it.target)
    INJECT[it.fault](world, it)
    if it.fault in REVERTIBLE and world.rng.random() < 0.4:
        it.reverted = True
        world.build(world.earlier())
    it.notes.append(f"fault {time.monotonic() - clock:.0f} s")
    clock = time.monotonic()
    heal(world, it)
    it.notes.append(f"heal {time.monotonic() - clock:.0f} s")
    check(world, it)


def inject_signal(world: World, it: Iteration, signum: int) -> Command:
    command = start_run(world, it.order)
    batches = sum(it.batches.values())
    point = (("requests", world.rng.randint(0, batches)) if world.rng.random() < 0.7
             else ("time", world.rng.uniform(0.3, 4.0)))
    if not wait_for_point(world, command, point):
        it.notes.append(f"the run ended before the point {point}")
        command.finish()
        return command
    it.notes.append(f"signal at {point}")
    command.signal(signum)
    return command


def fault_kill(world: World, it: Iteration) -> None:
    command = inject_signal(world, it, signal.SIGKILL)
    command.finish()


def fault_sigterm(world: World, it: Iteration) -> None:
    before = {r["run_id"] for r in world.runs()}
    command = inject_signal(world, it, signal.SIGTERM)
    stopped = time.monotonic()
    command.finish()
    took = time.monotonic() - stopped
    it.notes.append(f"exit {command.code} {took:.1f} s after SIGTERM")
    if took > world.pace.sigterm_exit_s:
        raise CheckFailed(f"SIGTERM: the command took {took:.1f} s to end (at most {world.pace.sigterm_exit_s:.0f} s)")
    it.sigterm_runs = [r for r in world.runs() if r["run_id"] not in before]
    held = world.query(
        f"select lock_run_id from {world.state_relation(names.SYNCS_TABLE)} where lock_run_id is not null"
    )
    it.sigterm_locks = [r[0] for r in held]


def _duckdb_file_free(world: World) -> bool:
    if world.project.target != "duckdb":
        return True
    import duckdb

    try:
        duckdb.connect(str(world.project.duckdb_path)).close()
        return True
    except duckdb.Error as error:
        if _is_busy(error):
            return False
        raise


@dataclass
class Stall:
    """A runner stopped past the lock timeout and what it left behind."""

    command: Command
    victim: dict | None
    """Its run that was ``running`` when the takeover started (None: it held no lock)."""
    keys_before: dict[str, int]
    """Requests each fake had received when the stalled runner went on."""
    takeover_runs: list[dict]
    released: list[str] = field(default_factory=list)
    """Idempotency keys of its requests the destination held and applied after the takeover."""


def fault_sigstop(world: World, it: Iteration) -> None:
    """Stall the runner past the lock timeout while the audience changes and a second run takes
    the sync over; then let it go on. On DuckDB it is stopped only between warehouse steps
    (stopped inside one, it would hold the file and nothing could take over).

    Half the time the stall lands while the target's destination holds one of its requests,
    unapplied, and applies it only once the takeover is done, just before the runner goes
    on: a request started before the stall that lands after the takeover, for certain (left to
    chance, the stall rarely falls between a lease check and the request's last byte)."""
    before = {r["run_id"] for r in world.runs()}
    fake = world.fakes[it.target]
    holding = world.rng.random() < 0.5
    if holding:
        after = world.rng.randint(0, max(0, it.batches[it.target] - 1))
        fake.inject(hold={"n": 1, "after": after})
        stalled = start_run(world, it.order)
        wait_until(lambda: not stalled.alive() or fake.state(members=False)["held"], world.pace.request_wait_s)
        held = fake.state(members=False)["held"]
        if not held:
            fake.inject(clear=True)
            it.notes.append("the run ended before the held request")
            stalled.finish()
            return
        it.notes.append(f"stopped with request {held[0]} held by the destination (after {after})")
        stalled.signal(signal.SIGSTOP)
    else:
        stalled = inject_signal(world, it, signal.SIGSTOP)
    if not stalled.alive():
        return
    for _ in range(40):
        if _duckdb_file_free(world):
            break
        stalled.signal(signal.SIGCONT)
        time.sleep(world.rng.uniform(0.02, 0.2))
        stalled.signal(signal.SIGSTOP)
    else:
        stalled.signal(signal.SIGCONT)
        it.notes.append("could not stop the runner between DuckDB steps; let it run")
        stalled.finish()
        return
    time.sleep(world.pace.lock_timeout_s + 1.0)
    # The audience changes while the stalled run waits: its frozen plan is now stale.
    resumed = build_beside(world, world.mutate() if world.rng.random() < 0.5 else world.earlier(), stalled)
    if resumed:
        it.notes.append("the dbt run waited for the stalled runner's transaction: let it go on")
        stalled.finish()
        return
    mine = [r for r in world.runs() if r["run_id"] not in before]
    victim = next((r for r in mine if r["status"] == "running"), None)
    takeover = start_run(world, it.order)
    try:
        takeover.finish(world.pace.takeover_s)
    except CheckFailed:
        # On PostgreSQL the stalled runner may hold a row lock the takeover waits for.
        it.notes.append("the takeover waited for the stalled runner's transaction")
        takeover = None
    keys_before = {m: len(f.state(members=False)["idempotency_keys"]) for m, f in world.fakes.items()}
    released = fake.state(members=False)["held"] if holding else []
    if released:
        # The held request lands now: after the takeover, before the stalled run goes on.
        fake.inject(release_held=True)
        if not wait_until(lambda: not fake.state(members=False)["held"], 10):
            raise CheckFailed("the fake did not apply the released request")
    stalled.signal(signal.SIGCONT)
    stalled.finish()
    it.notes.append(f"stalled run exit {stalled.code}")
    if takeover is None:
        return
    it.notes.append(f"takeover exit {takeover.code}")
    known = before | {r["run_id"] for r in mine}
    taken = [r for r in world.runs() if r["run_id"] not in known]
    it.stalled = Stall(stalled, victim, keys_before, taken, released)


def build_beside(world: World, rows: list[tuple], stalled: Command) -> bool:
    """``world.build(rows)`` while ``stalled`` is stopped; True when the dbt run had to wait
    for it (it was stopped inside a transaction) and it was let go on (SIGCONT)."""
    error: list[BaseException] = []

    def build() -> None:
        try:
            world.build(rows, while_running=resumed.is_set)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            error.append(exc)

    resumed = threading.Event()
    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(world.pace.build_wait_s)
    if thread.is_alive():
        resumed.set()
        stalled.signal(signal.SIGCONT)
        thread.join(120)
    if error:
        raise error[0]
    return resumed.is_set()


def _http_fault(spec: Callable[[World, Iteration, int], dict]) -> Callable[[World, Iteration], None]:
    def fault(world: World, it: Iteration) -> None:
        after = world.rng.randint(0, max(0, it.batches[it.target] - 1))
        world.fakes[it.target].inject(**spec(world, it, after))
        it.notes.append(f"after {after} requests")
        command = start_run(world, it.order)
        command.finish()
        it.notes.append(f"exit {command.code}")
    return fault


def _rejected_keys(world: World, it: Iteration, after: int) -> dict:
    name = SYNCS[it.target]
    keys = [r[0] for r in world.query(f"select {names.KEY} from {world.project.relation(name, '__changes')}")]
    return {"reject_keys": world.rng.sample(keys, min(len(keys), world.rng.randint(1, 5)))}


def fault_dbt_during(world: World, it: Iteration) -> None:
    """A `dbt run` that changes the audience while the target sync delivers."""
    name = SYNCS[it.target]
    fake = world.fakes[it.target]
    base = fake.state(members=False)["requests"]
    command = start_run(world, [name])
    wait_until(lambda: not command.alive() or fake.state(members=False)["requests"] > base, world.pace.request_wait_s)
    it.notes.append("dbt run during delivery" if command.alive() else "the run ended before a request")
    world.build(world.mutate() if world.rng.random() < 0.6 else world.earlier(), while_running=True)
    command.finish()
    it.notes.append(f"exit {command.code}")


def fault_dead(mode: str) -> Callable[[World, Iteration], None]:
    def fault(world: World, it: Iteration) -> None:
        fake = world.fakes[it.target]
        before = {r["run_id"] for r in world.runs()}
        command = start_run(world, it.order)
        after = world.rng.randint(0, max(0, it.batches[it.target] - 1))
        base = fake.state(members=False)["requests"]
        wait_until(lambda: not command.alive() or fake.state(members=False)["requests"] >= base + after,
                   world.pace.request_wait_s)
        if mode == "stopped":
            fake.suspend()
        else:
            fake.inject(dead={"mode": mode})
        died = time.monotonic()
        it.notes.append(f"dead ({mode}) after {after} requests")
        try:
            command.finish()
        finally:
            if mode == "stopped":
                fake.resume()
            else:
                fake.revive()
        target = [r for r in world.runs() if r["run_id"] not in before and r["sync_name"] == SYNCS[it.target]]
        it.notes.append(f"exit {command.code} {time.monotonic() - died:.0f} s after it died")
        if target:
            run = target[-1]
            it.notes.append(f"{run['sync_name']} {run['status']}: {str(run['error_message'])[:90]}")
            errors = world.query(
                f"select count(*) from {world.state_relation(names.ROW_ERRORS_TABLE)} where run_id = %s",
                [run["run_id"]],
            )[0][0]
            it.dead_run = (run, int(errors))
    return fault


def dead_problems(it: Iteration) -> list[str]:
    """A dead destination ends the run with one error, "destination unreachable", not one
    error per member; what was not answered is planned again (the oracle checks that)."""
    if it.dead_run is None:
        return []
    run, errors = it.dead_run
    problems = []
    if run["status"] == "error" and "unreachable" not in str(run["error_message"]):
        problems.append(f"dead destination: the run ended error with {run['error_message']!r},"
                        " not 'destination unreachable'")
    # At most the rows in flight when the breaker opened fail (or go unknown) one by one.
    bound = 2 * CONCURRENCY * BATCH_SIZE
    if errors > bound:
        problems.append(f"dead destination: {errors} row errors for the run (one per member), not at most {bound}")
    return problems


INJECT: dict[str, Callable[[World, Iteration], None]] = {
    "kill": fault_kill,
    "sigterm": fault_sigterm,
    "sigstop": fault_sigstop,
    "slow": _http_fault(lambda w, it, after: {"delay": {
        "n": w.rng.randint(1, ATTEMPTS * CONCURRENCY), "seconds": TIMEOUT_S + 1.0, "after": after}}),
    "5xx": _http_fault(lambda w, it, after: {"fail": {
        "n": w.rng.randint(1, ATTEMPTS * CONCURRENCY), "status": w.rng.choice([500, 502, 503]), "after": after}}),
    "429": _http_fault(lambda w, it, after: {"fail": {
        "n": w.rng.randint(1, 3), "status": 429, "retry_after": 1, "after": after}}),
    "apply-5xx": _http_fault(lambda w, it, after: {"apply_then_fail": {
        "n": w.rng.randint(1, ATTEMPTS * CONCURRENCY), "status": w.rng.choice([500, 503]), "after": after}}),
    "apply-drop": _http_fault(lambda w, it, after: {"apply_then_fail": {
        "n": w.rng.randint(1, ATTEMPTS * CONCURRENCY), "drop": True, "after": after}}),
    "apply-late": _http_fault(lambda w, it, after: {"apply_then_fail": {
        "n": w.rng.randint(1, ATTEMPTS * CONCURRENCY), "delay_s": TIMEOUT_S + 1.0, "after": after}}),
    "reject": _http_fault(_rejected_keys),
    "dbt-during": fault_dbt_during,
    "dead-hang": fault_dead("hang"),
    "dead-refuse": fault_dead("refuse"),
    "dead-stopped": fault_dead("stopped"),
}
assert set(INJECT) == set(FAULTS)


def heal(world: World, it: Iteration) -> None:
    """Run again, with no fault, until a run of every sync succeeds."""
    world.heal_fakes()
    outputs = []
    for attempt in range(HEAL_ATTEMPTS):
        command = start_run(world, it.order)
        code = command.finish()
        if code == 0:
            it.notes.append(f"healed after {attempt + 1} run(s)")
            world.attribute(ambiguous=False)
            world.settle_pending()
            return
        outputs.append(f"exit {code}:\n{command.output[-1500:]}")
        time.sleep(world.pace.lock_timeout_s + 0.5 if "lock" in command.output else 0.5)
    raise CheckFailed(f"no run succeeded in {HEAL_ATTEMPTS} attempts after the fault:\n" + "\n".join(outputs))


# ----------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------


def check(world: World, it: Iteration) -> None:
    problems: list[str] = []
    final = len(world.epochs) - 1
    project = world.project
    # Reported: the stalled run records such keys as unknown once it goes on, and the next
    # run sends their truth, so they are checked like every other key.
    stale_landings(world, it)
    for mode, name in SYNCS.items():
        state = world.fakes[mode].state()
        held = state["members"]
        oracle = world.oracles[mode]
        if final not in oracle.settled:
            problems.append(f"{name}: the last run that succeeded did not freeze the last epoch")
            continue
        problems += [f"{name}: {p}" for p in oracle.check(world.epochs, final, held)]
        if state["violations"] or state["bad_signatures"]:
            problems.append(f"{name}: the fake saw {state['violations'][:3]}, {state['bad_signatures']} bad signatures")
        snapshot = world.query(
            f"select {names.KEY}, first_name, ltv, {names.HASH} from {project.relation(name, '__snapshot')}"
        )
        unknown = sorted(r[0] for r in snapshot if r[3] is None)
        if unknown:
            problems.append(f"{name}: {len(unknown)} snapshot row(s) still unknown after a successful run: {unknown[:5]}")
        claims = {r[0]: (r[1], None if r[2] is None else float(r[2]))
                  for r in snapshot if r[3] is not None}
        if mode != "remove":
            for key, values in sorted(claims.items()):
                if key not in held:
                    problems.append(f"{name}: the snapshot claims {key}, which the destination does not hold")
                elif webhook_values(held[key]) != values:
                    problems.append(f"{name}: the snapshot claims {key} = {values}, the destination holds "
                                    f"{webhook_values(held[key])}")
            unknown_to_snapshot = sorted(set(held) - set(claims))
            if unknown_to_snapshot:
                problems.append(f"{name}: the destination holds {unknown_to_snapshot[:5]}, which the snapshot does not know")
        audience = set(world.epochs[final])
        differ = set(claims) ^ audience
        if mode == "remove":
            # A key whose remove had an unknown outcome and that is back in S is removed again
            # (convention 1) and recorded by the next run, not this one (the diff views' design):
            # harmless while the destination does not hold it.
            differ -= {k for k in audience - set(claims) if k not in state["members"]}
        if mode in ("mirror", "remove") and differ:
            problems.append(f"{name}: the snapshot is not the audience: {sorted(differ)[:6]} differ")
        plan = world.query(f"select count(*) from {project.relation(name, '__plan')}")[0][0]
        if plan:
            problems.append(f"{name}: its plan table holds {plan} row(s) between runs")
    problems += check_state_tables(world)
    problems += check_runs(world, it)
    if problems:
        raise CheckFailed("\n".join(problems))


def stale_landings(world: World, it: Iteration) -> dict[str, set[str]]:
    """Keys of batches a stalled run had started before it was stopped and that reached the
    destination only after it went on, by mode.

    Such a request was on its way (or past the lease check, about to be written) when the
    process stopped (or held by the destination: :func:`fault_sigstop`); it lands after the
    run that took over. Fencing bounds it to one batch per thread (:func:`fencing_problems`
    fails beyond); the stalled run then records those keys as unknown, and the next holder of
    the lock marks them so, so the next run sends their truth. The matrix reports these
    landings and checks their keys like every other.
    """
    stall = it.stalled
    if stall is None or stall.victim is None:
        return {}
    mode = next(m for m, n in SYNCS.items() if n == stall.victim["sync_name"])
    state = world.fakes[mode].state(members=False)
    prefix = stall.victim["run_id"] + "-"
    late = [k for k in state["idempotency_keys"][stall.keys_before[mode]:] if k.startswith(prefix)]
    late += [k for k in stall.released if k.startswith(prefix)]
    keys = set().union(*(set(state["batch_keys"].get(k, [])) for k in late))
    if keys:
        it.notes.append(f"stale in-flight batch(es) {sorted(set(late))} of the stalled run landed after the"
                        f" takeover: {len(keys)} key(s), checked")
        world.stale_landings += 1
    return {mode: keys} if keys else {}


def check_state_tables(world: World) -> list[str]:
    problems = []
    for table in (names.BATCHES_TABLE, names.DELIVERED_IDS_TABLE):
        count = world.query(f"select count(*) from {world.state_relation(table)}")[0][0]
        if count:
            problems.append(f"{table} holds {count} row(s) between runs")
    locks = world.query(
        f"select sync_name, lock_run_id from {world.state_relation(names.SYNCS_TABLE)} where lock_run_id is not null"
    )
    if locks:
        problems.append(f"locks still held between runs: {locks}")
    return problems


def check_runs(world: World, it: Iteration) -> list[str]:
    problems = []
    runs = world.runs()
    running = [r["run_id"] for r in runs if r["status"] == "running"]
    if running:
        problems.append(f"runs left running: {running}")
    for run in runs:
        if run["run_id"] in world.checked_runs or run["status"] == "running":
            continue
        world.checked_runs.add(run["run_id"])
        problems += [f"run {run['run_id']} ({run['sync_name']}, {run['status']}): {p}" for p in count_problems(run)]
    if it.sigterm_runs is not None:
        problems += sigterm_problems(it)
    if it.stalled is not None:
        problems += fencing_problems(world, it.stalled)
    problems += dead_problems(it)
    return problems


def count_problems(run: dict) -> list[str]:
    """How a finished run's counts disagree with its plan.

    Applied rows never exceed the plan; with everything answered (``success``,
    ``partial_failure``) applied and failed rows make up the plan. Where runs record
    ``rows_unknown`` (rows written as unknown: unanswered, or failed with a retryable error,
    which ``rows_failed`` counts too), those are never applied rows, and a success has none.
    """
    planned = [run[f"planned_{op}"] for op in ("adds", "removes", "updates")]
    applied = [run[f"rows_{op}"] or 0 for op in ("added", "removed", "updated")]
    failed = run["rows_failed"] or 0
    unknown = run.get("rows_unknown") or 0
    if planned[0] is None:
        if any(applied) or failed or unknown:
            return [f"nothing was planned, yet it counts {applied} applied, {failed} failed, {unknown} unknown"]
        return []
    problems = []
    if run["status"] == "success":
        if applied != planned or failed or unknown:
            problems.append(f"success, but planned {planned} and applied {applied}, {failed} failed, {unknown} unknown")
    elif run["status"] == "partial_failure":
        if not failed or sum(applied) + failed != sum(planned) or unknown > failed:
            problems.append(f"partial_failure, but planned {planned}, applied {applied}, {failed} failed,"
                            f" {unknown} unknown")
    if any(a > p for a, p in zip(applied, planned)) or sum(applied) + max(failed, unknown) > sum(planned):
        problems.append(f"applied {applied}, {failed} failed and {unknown} unknown exceed the plan {planned}")
    return problems


def sigterm_problems(it: Iteration) -> list[str]:
    """SIGTERM ends the run in progress as ``aborted`` (never ``running``, lock released) and
    starts no other: after the stopped run, nothing of the command planned anything."""
    problems = []
    runs = it.sigterm_runs or []
    for run in runs:
        if run["status"] == "running":
            problems.append(f"SIGTERM left run {run['run_id']} ({run['sync_name']}) running")
    locks = set(it.sigterm_locks) & {r["run_id"] for r in runs}
    if locks:
        problems.append(f"SIGTERM left the lock held by {sorted(locks)}")
    stopped = [i for i, r in enumerate(runs) if r["status"] in ("aborted", "running")]
    if stopped:
        later = [r for r in runs[stopped[0] + 1:] if r["planned_adds"] is not None]
        if later:
            problems.append(f"SIGTERM: {', '.join(r['sync_name'] for r in later)} ran after the stopped run"
                            f" {runs[stopped[0]]['run_id']} ({runs[stopped[0]]['sync_name']})")
    return problems


def fencing_problems(world: World, stall: Stall) -> list[str]:
    """A stalled run that was taken over stops within one batch (a batch per thread in flight),
    exits 1 naming the run that took over, and stays ``aborted``."""
    victim = stall.victim
    if victim is None:
        return []
    problems = []
    status = {r["run_id"]: r for r in world.runs()}[victim["run_id"]]["status"]
    if status != "aborted":
        problems.append(f"fencing: the taken-over run {victim['run_id']} ({victim['sync_name']}) ended {status}")
    if stall.command.code != 1:
        problems.append(f"fencing: the stalled command exited {stall.command.code}, not 1")
    taker = next((r for r in stall.takeover_runs if r["sync_name"] == victim["sync_name"]), None)
    if taker is not None and taker["run_id"] not in stall.command.output:
        problems.append(f"fencing: the stalled command's output does not name {taker['run_id']}, which took over")
    mode = next(m for m, n in SYNCS.items() if n == victim["sync_name"])
    keys = world.fakes[mode].state(members=False)["idempotency_keys"]
    late = {k for k in keys[stall.keys_before[mode]:] if k.startswith(victim["run_id"] + "-")}
    if len(late) > CONCURRENCY:
        problems.append(f"fencing: the taken-over run {victim['run_id']} sent {len(late)} batches after it went on")
    return problems


# ----------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------


def repair(world: World) -> None:
    """After a failed iteration (keep-going mode): start every sync again from nothing."""
    project = world.project
    world.query(f"update {world.state_relation(names.RUNS_TABLE)} set status = 'aborted' where status = 'running'")
    world.query(f"update {world.state_relation(names.SYNCS_TABLE)} set lock_run_id = null, lock_heartbeat_at = null")
    world.query(f"delete from {world.state_relation(names.BATCHES_TABLE)}")
    world.query(f"delete from {world.state_relation(names.DELIVERED_IDS_TABLE)}")
    world.heal_fakes()
    for fake in world.fakes.values():
        fake.reset()
    for name in SYNCS.values():
        audsync(project, "reset", name, "--yes", expect=None)
    world.start_oracles()
    world.attributed |= {r["run_id"] for r in world.runs()}
    world.checked_runs |= world.attributed
    world.pending_settle = []
    world.build(world.rows_history[-1])
    heal(world, Iteration(-1, "none", "-", list(SYNCS.values())))


@pytest.mark.slow
@pytest.mark.ci
# Spark too, selected only with --warehouses spark (its marker), as the rest of the Spark subset.
@pytest.mark.parametrize("warehouse", with_spark(pytest.mark.timeout(1800)))
def test_fault_matrix(dbt_project, warehouse, tmp_path):
    pace = pace_for(warehouse)
    seed = int(os.environ.get("AUDSYNC_FAULT_SEED") or random.SystemRandom().randrange(1, 10**9))
    replay = (f"replay: AUDSYNC_FAULT_SEED={seed} AUDSYNC_FAULT_ITERATIONS={pace.iterations} .venv/bin/python -m pytest"
              f" tests/integration/test_fault_matrix.py --warehouses {warehouse}")
    world = World(dbt_project, seed, tmp_path, pace)
    faults: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    try:
        world.set_up()
        heal(world, Iteration(0, "none", "-", list(SYNCS.values())))
        for number in range(1, pace.iterations + 1):
            it = new_iteration(world, number)
            faults[it.fault] += 1
            try:
                run_iteration(world, it)
                print(f"fault matrix: {it.describe()}", flush=True)
            except CheckFailed as error:
                what = it.describe()
                print(f"fault matrix: FAILED {what}\n{error}", flush=True)
                failures.append(f"{what}\n{error}")
                if not KEEP_GOING:
                    raise CheckFailed(f"fault matrix, {warehouse}, seed {seed}: {what}\n{error}\n{replay}") from None
                repair(world)
    finally:
        world.close()
        print(f"\nFAULT MATRIX {warehouse}: seed {seed}, {pace.iterations} iterations in {time.monotonic() - started:.0f} s,"
              f" {len(failures)} failed, {world.stale_landings} stale in-flight landings after a takeover;"
              f" faults {dict(sorted(faults.items()))}")
    if failures:
        raise CheckFailed(f"fault matrix, {warehouse}, seed {seed}: {len(failures)} of {pace.iterations} iterations failed:\n"
                          + "\n\n".join(failures) + f"\n{replay}")


def test_the_fake_webhook_injects_each_fault_from_another_process():
    """The matrix trusts the fake's faults: each one does what it says, seen by a real client,
    and the counters the matrix reads agree."""
    from audsync.delivery.http import HttpClient
    from audsync.destinations.base import Change, RetriesExhausted, SyncInfo
    from audsync.destinations.webhook import WebhookConnector

    def send(hook: WebhookConnector, seq: int, key: str):
        try:
            return hook.send_batch([Change(seq, "add", key, {"f": seq}, None)])
        except RetriesExhausted as error:
            return error.code

    with FakeWebhookProcess(secret="fake-secret") as fake:
        # A timeout well above a loaded machine's answer time, the slow answers well above it.
        http = HttpClient(max_retries=0, timeout_s=2.0, sleep=lambda s: None)
        hook = WebhookConnector("h", {"url": fake.url, "secret": "fake-secret"},
                                SyncInfo("s", "mirror", "r1", "email", ("f",)), http)
        # Applied, then: a dropped connection (after one request that passes), a 503, a late answer.
        fake.inject(apply_then_fail={"n": 1, "drop": True, "after": 1})
        assert send(hook, 1, "a").rejected == []
        assert send(hook, 2, "b") == "connection_error"
        fake.inject(apply_then_fail={"n": 1, "status": 503})
        assert send(hook, 3, "c") == "503"
        fake.inject(apply_then_fail={"n": 1, "delay_s": 4.0})
        assert send(hook, 4, "d") == "timeout"
        # Not applied: an error answer, a 429 with Retry-After, a rejected row.
        fake.inject(fail={"n": 1, "status": 502}, reject_keys=["f"])
        assert send(hook, 5, "e") == "502"
        assert [r.key for r in send(hook, 6, "f").rejected] == ["f"]
        fake.inject(clear=True, fail={"n": 1, "status": 429, "retry_after": 7})
        assert send(hook, 7, "g") == "429"
        # A slow answer: applied after the client gave up.
        fake.inject(delay={"n": 1, "seconds": 4.0})
        assert send(hook, 8, "h") == "timeout"
        assert wait_until(lambda: fake.state(members=False)["in_flight"] == 0, 10)
        state = fake.state()
        assert sorted(state["members"]) == ["a", "b", "c", "d", "h"]
        assert (state["applied_unanswered"], state["answers_dropped"], state["pending_failures"]) == (3, 1, 0)
        assert state["injected"] == {"applied": 3, "answer": 2, "timeout": 1}

        # Dead: hanging (control still answers), then a closed port (revived by signal).
        fake.inject(dead={"mode": "hang"})
        assert send(hook, 9, "i") == "timeout"
        assert fake.state(members=False)["dead_requests"] == 1
        fake.inject(revive=True)
        fake.inject(dead={"mode": "refuse"})
        assert send(hook, 10, "j") == "connection_error"
        assert send(hook, 11, "k") == "connection_error"
        with pytest.raises(OSError):
            fake.state()
        fake.revive()
        assert send(hook, 12, "l").rejected == []
        # The whole process stopped: connections open, nothing answers.
        fake.suspend()
        try:
            assert send(hook, 13, "m") == "timeout"
        finally:
            fake.resume()
        assert wait_until(lambda: "m" in fake.state()["members"], 5)
        state = fake.state()
        assert set(state["members"]) == {"a", "b", "c", "d", "h", "l", "m"}  # m: applied late
        # Held, unapplied, until released (a stalled sender's request landing late); others pass.
        fake.inject(hold={"n": 1})
        held = threading.Thread(target=lambda: send(hook, 14, "n"), daemon=True)
        held.start()
        assert wait_until(lambda: len(fake.state(members=False)["held"]) == 1, 5)
        assert send(hook, 15, "o").rejected == []
        assert "n" not in fake.state()["members"]
        fake.inject(release_held=True)
        assert wait_until(lambda: "n" in fake.state()["members"], 5)
        held.join(5)
        state = fake.state()
        assert state["held"] == [] and state["injected"]["held"] == 1
        assert state["violations"] == [] and state["bad_signatures"] == 0
        http.close()


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("relock", ["taken back", "held by another run"])
def test_a_request_started_before_a_stall_and_landing_after_the_takeover_is_not_forgotten(
    dbt_project, monkeypatch, relock,
):
    """The stall the fault matrix found, made deterministic: run A has passed its lease check
    and is about to send the batch that adds x when it stalls (its heartbeat stops); the
    audience drops x; run B takes the sync over and succeeds; then A's request goes out. A
    records x as unknown: it applies that itself when it can take the lock back ("taken
    back"), else the next run does ("held by another run": a live holder keeps the lock).
    After one more successful run a mirror destination must not hold x."""
    from audsync import runner as runner_module
    from audsync.destinations.webhook import WebhookConnector
    from audsync.plan import unknown_marks_id
    from tests.fakes.webhook_server import FakeWebhook
    from tests.support.syncs import run_rows

    monkeypatch.setenv("AUDSYNC_LOCK_TIMEOUT_S", "2")
    fake = FakeWebhook(secret="stall-secret").start()
    stalled, parked, release = threading.Event(), threading.Event(), threading.Event()
    send, loop = WebhookConnector.send_batch, runner_module._Heartbeat._loop
    thread = threading.Thread()
    syncs = dbt_project.relation(names.SYNCS_TABLE, schema=dbt_project.schema + "_audsync")
    plan = dbt_project.relation("s", "__plan")
    try:
        write_sync(dbt_project, "s", mode="mirror", destination="hook")
        write_destinations(dbt_project, {"hook": {"type": "webhook", "url": fake.url, "secret": "stall-secret",
                                                  "batch_size": 2, "max_concurrency": 1}})
        base = [(f"s{i}@example.com", "n", float(i)) for i in range(4)]
        write_audience(dbt_project, base)
        dbt_project.dbt("run")
        audsync(dbt_project, "run", "s")
        write_audience(dbt_project, base + [("x@example.com", "x", 1.0)])
        dbt_project.dbt("run")

        def send_batch(self, batch):
            if any(change.key == "x@example.com" for change in batch) and not release.is_set():
                stalled.set()  # past the lease check: the stall lands here
                release.wait(60)
            return send(self, batch)

        def heartbeat_loop(self):
            # The whole process stalls: its heartbeat thread parks before its next beat, and
            # holds no warehouse session meanwhile (as a stopped process would not).
            wait = self._stop.wait

            def parking_wait(timeout=None):
                if stalled.is_set() and not release.is_set():
                    parked.set()
                    release.wait(60)
                return wait(timeout)

            self._stop.wait = parking_wait
            return loop(self)

        monkeypatch.setattr(WebhookConnector, "send_batch", send_batch)
        monkeypatch.setattr(runner_module._Heartbeat, "_loop", heartbeat_loop)
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(result=audsync(dbt_project, "run", "s", expect=None)),
                                  daemon=True)
        thread.start()
        assert stalled.wait(60), "run A never sent the batch with x"
        assert parked.wait(30), "run A's heartbeat never parked"
        a_id = run_rows(dbt_project, "s")[-1]["run_id"]
        write_audience(dbt_project, base)  # x leaves the audience while A is stalled
        dbt_project.dbt("run")
        time.sleep(2.5)  # A's last beat is now older than the lock timeout
        takeover = audsync_process(dbt_project, "run", "s", env={"AUDSYNC_LOCK_TIMEOUT_S": "2"})
        out, err = takeover.communicate(timeout=120)
        assert takeover.returncode == 0, out + err
        if relock == "held by another run":
            # A live holder (its heartbeat in the future): A cannot take the lock back, and
            # tries only once.
            monkeypatch.setattr(runner_module, "RELOCK_WAIT_MAX_S", 0.0)
            later = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(hours=1)
            dbt_project.query(f"update {syncs} set lock_run_id = %s, lock_heartbeat_at = %s,"
                              f" lock_generation = lock_generation + 1 where sync_name = %s",
                              ["holder-run", later, "s"])
        release.set()  # A goes on: its request leaves now
        thread.join(120)
        result = first["result"]
        assert result.code == 1, result.output  # fenced
        assert "x@example.com" in fake.members  # the stale add landed after B's remove
        assert "recorded the 1 key(s)" in result.output, result.output
        marks = dbt_project.query(f"select count(*) from {plan} where _audsync_run_id = %s", [unknown_marks_id(a_id)])
        if relock == "held by another run":
            assert marks == [(1,)]  # left for the next holder of the lock
            dbt_project.query(f"update {syncs} set lock_run_id = null, lock_heartbeat_at = null"
                              f" where sync_name = %s", ["s"])
        else:
            assert marks == [(0,)]  # A applied them itself
            hashes = dbt_project.query(
                f"select _audsync_hash from {dbt_project.relation('s', '__snapshot')} where _audsync_key = %s",
                ["x@example.com"])
            assert hashes == [(None,)]  # x unknown
        audsync(dbt_project, "run", "s")
        assert run_rows(dbt_project, "s")[-1]["status"] == "success"
        assert "x@example.com" not in fake.members
        assert dbt_project.query(f"select count(*) from {plan}") == [(0,)]
    finally:
        release.set()  # never leave run A's sending thread blocked: it would hold the process
        if thread.is_alive():
            thread.join(60)
        fake.stop()
