"""The ``audsync`` command line (contract section 8).

One small function per command; the shared options live on the group and reach commands
through :class:`App`, which loads the project, the warehouse and the destinations only when a
command needs them. Errors are exceptions whose class carries the exit code:
0 success or nothing to do, 1 the run failed, 2 bad usage or configuration, 3 partial failure.
"""

from __future__ import annotations

import datetime as dt
import signal
import sys
from functools import cached_property
from pathlib import Path
from typing import Any

import click

from . import __version__


class App:
    """What the commands share: options, and the project, warehouse and destinations."""

    def __init__(self, project_dir, profiles_dir, target, destinations_file, log_format, verbose):
        self.project_dir = project_dir
        self.profiles_dir = profiles_dir
        self.target = target
        self.destinations_file = destinations_file
        self.log_format = log_format
        self.verbose = verbose

    @cached_property
    def project(self):
        from .project import Project

        return Project.load(self.project_dir, self.profiles_dir, self.target)

    @cached_property
    def warehouse(self):
        return self.project.open_warehouse()

    @cached_property
    def destinations_path(self) -> Path:
        from .config import find_destinations_file

        return find_destinations_file(self.project.project_dir, self.destinations_file)

    @cached_property
    def destinations(self):
        from .config import load_destinations

        return load_destinations(self.destinations_path)

    def runner(self, destinations=None):
        from .output import JsonReporter, TextReporter
        from .runner import SyncRunner

        reporter = JsonReporter() if self.log_format == "json" else TextReporter(self.verbose)
        return SyncRunner(self.project, self.warehouse,
                          self.destinations if destinations is None else destinations, reporter)

    def state_runner(self):
        """A runner for commands that touch only state (no destinations file needed)."""
        return self.runner(destinations={})

    def close(self) -> None:
        if "warehouse" in self.__dict__:
            self.warehouse.close()


pass_app = click.make_pass_decorator(App)


@click.group(context_settings={"auto_envvar_prefix": "AUDSYNC", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="audsync")
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dbt project (default: the current directory).")
@click.option("--profiles-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where profiles.yml is (default: as dbt looks for it).")
@click.option("--target", default=None, help="The dbt target (default: the profile's).")
@click.option("--destinations", "destinations_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="destinations.yml (default: beside dbt_project.yml).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per line, for orchestrators.")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.pass_context
def cli(ctx, project_dir, profiles_dir, target, destinations_file, log_format, verbose):
    """audsync: keep audiences defined in SQL in step with the tools that act on them."""
    from .output import setup_logging

    setup_logging(log_format, verbose)
    app = App(project_dir, profiles_dir, target, destinations_file, log_format, verbose)
    ctx.obj = app
    ctx.call_on_close(app.close)


# -- inspection ---------------------------------------------------------------------------------


@cli.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def list_syncs(app: App, fmt: str):
    """The syncs of the project: mode, destination, schedule, status."""
    from .output import print_json, print_table

    from .state import SyncRow

    statuses = _sync_rows(app, quiet=True)
    starts = _slot_starts(app)
    rows = []
    for sync in sorted(app.project.syncs.values(), key=lambda s: s.name):
        state = statuses.get(sync.name) or SyncRow(sync.name)
        rows.append({
            "sync": sync.name, "mode": sync.mode, "destination": sync.destination,
            "schedule": sync.schedule, "status": state.status or "never run",
            "last_synced_at": state.last_synced_at, "evaluated_at": state.evaluated_at,
            "next_run_at": _next_run(sync, state, starts), "description": sync.description,
        })
    if fmt == "json":
        print_json(rows)
    else:
        print_table(["sync", "mode", "destination", "schedule", "status", "last synced", "evaluated", "next run"],
                    [[r["sync"], r["mode"], r["destination"], r["schedule"], r["status"], r["last_synced_at"],
                      r["evaluated_at"], r["next_run_at"]] for r in rows])


def _slot_starts(app: App) -> dict:
    """When each sync last took a schedule slot (empty before the state tables exist)."""
    from .schedule import last_slot_starts

    runner = app.state_runner()
    with app.warehouse.session() as session:
        if runner.state.missing_tables(session):
            return {}
        return last_slot_starts(session, runner.state)


def _row_value(row, column: str):
    from .schedule import row_value

    return row_value(row, column)


def _next_run(sync, state, starts: dict):
    """When the schedule next runs ``sync`` (naive UTC, as the state tables' times), or None."""
    from .schedule import next_run_at

    moment = next_run_at(sync.schedule, _row_value(state, "status"), starts.get(sync.name),
                         dt.datetime.now(dt.timezone.utc))
    return moment.replace(tzinfo=None, microsecond=0) if moment else None


@cli.command()
@click.argument("sync_name", required=False)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def status(app: App, sync_name: str | None, fmt: str):
    """The state of each sync (or one): status, last run, lock."""
    from .output import print_json, print_table

    from .state import SyncRow

    syncs = [app.project.get(sync_name)] if sync_name else sorted(app.project.syncs.values(), key=lambda s: s.name)
    states = _sync_rows(app)
    starts = _slot_starts(app) if states else {}
    rows = []
    for sync in syncs:
        state = states.get(sync.name) or SyncRow(sync.name)
        rows.append({
            "sync": sync.name, "status": state.status or "never run",
            "status_error": state.status_error, "last_synced_at": state.last_synced_at,
            "evaluated_at": state.evaluated_at, "next_run_at": _next_run(sync, state, starts),
            "last_run_id": state.last_run_id, "locked_by": state.lock_run_id,
            "heartbeat_at": state.lock_heartbeat_at,
        })
    if fmt == "json":
        print_json(rows)
    else:
        print_table(["sync", "status", "last synced", "evaluated", "next run", "last run", "locked by", "error"],
                    [[r["sync"], r["status"], r["last_synced_at"], r["evaluated_at"], r["next_run_at"],
                      r["last_run_id"], r["locked_by"], r["status_error"]] for r in rows])


def _sync_rows(app: App, quiet: bool = False) -> dict[str, Any]:
    """The ``audsync_syncs`` rows by sync (empty when the state tables are not built yet)."""
    runner = app.state_runner()
    with app.warehouse.session() as session:
        if runner.state.missing_tables(session):
            if not quiet:
                click.echo("audsync's state tables are not built yet: run `dbt run` first.", err=True)
            return {}
        return runner.state.all_sync_rows(session)


@cli.command()
@click.argument("sync_name")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def runs(app: App, sync_name: str, limit: int, fmt: str):
    """Run history of SYNC_NAME, newest first."""
    from .output import print_json, print_table

    sync = app.project.get(sync_name)
    runner = app.state_runner()
    with app.warehouse.session() as session:
        if runner.state.missing_tables(session):
            raise _config_error("audsync's state tables are not built yet: run `dbt run` first")
        history = runner.state.runs_of(session, sync.name, limit)
    if fmt == "json":
        print_json([r.as_dict() for r in history])
        return
    print_table(
        ["run_id", "status", "trigger", "started_at", "duration", "planned a/r/u", "added", "removed", "updated",
         "failed", "unknown", "match", "error"],
        [[r.run_id, r.status, r.trigger, r.started_at,
          f"{(r.duration_ms or 0) / 1000:.1f}s",
          f"{r.planned_adds or 0}/{r.planned_removes or 0}/{r.planned_updates or 0}",
          r.rows_added, r.rows_removed, r.rows_updated, r.rows_failed, r.rows_unknown,
          "" if r.match_rate is None else f"{r.match_rate:.0%}", r.error_message]
         for r in history],
        title=f"runs of {sync.name}",
    )


@cli.command()
@click.argument("sync_name")
@click.option("--sample", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]), default="table")  # governance: markdown
@pass_app
def plan(app: App, sync_name: str, sample: int, fmt: str):
    """What the next run of SYNC_NAME would send: counts and a sample. Nothing is sent."""
    _show_plan(app, app.project.get(sync_name), sample, fmt)


def _show_plan(app: App, sync, sample: int, fmt: str) -> None:
    from .output import print_json, print_table

    runner = app.state_runner()
    tables = runner.check_ready(sync)
    counts, rows = app.warehouse.in_session(lambda session: tables.preview(session, sample))
    if fmt == "markdown": return _governance_commands().print_markdown_plan(app, sync, tables, counts, rows)  # noqa: E701 - governance:
    record = {"sync": sync.name, "mode": sync.mode, "destination": sync.destination,
              "adds": counts.adds, "removes": counts.removes, "updates": counts.updates,
              "recorded_without_sending": counts.recorded, "sample": rows}
    if fmt == "json":
        print_json(record)
        return
    click.echo(f"{sync.name} ({sync.mode} -> {sync.destination}): {counts.adds} to add, "
               f"{counts.removes} to remove, {counts.updates} to update"
               + (f", {counts.recorded} to record without sending" if counts.recorded else ""))
    if rows:
        print_table(["op", "key", "fields"], [[r["op"], r["key"], r["fields"]] for r in rows], title="sample")


@cli.command()
@pass_app
def check(app: App):
    """Validate the project, destinations.yml and alerts.yml; send nothing. Exit 2 naming every problem."""
    from .config import check_destinations
    from .errors import AudsyncError
    from .schedule import parse_schedule

    problems: list[str] = []
    project = app.project
    try:
        result = check_destinations(app.destinations_path)
        destinations = result.destinations
        problems += [e.message for e in result.errors]
    except AudsyncError as error:
        destinations = {}
        problems.append(error.message)
    # Syncs whose config is invalid: named here, while other commands leave them aside.
    problems += [project.invalid[name] for name in sorted(project.invalid)]
    for sync in sorted(project.syncs.values(), key=lambda s: s.name):
        where = f"sync {sync.name!r} ({sync.path})"
        if sync.destination not in destinations and not any(f"destination {sync.destination!r}" in p for p in problems):
            problems.append(f"{where}: destination {sync.destination!r} is not in {app.destinations_path}")
        try:
            parse_schedule(sync.schedule)
        except ValueError as error:
            problems.append(f"{where}: schedule: {error}")
        if not sync.identifier:
            problems.append(f"{where}: config key 'identifier' is missing")
    try:
        runner = app.runner(destinations=destinations)
        for sync in project.syncs.values():
            try:
                runner.check_ready(sync)
            except AudsyncError as error:
                problems.append(error.message)
    except AudsyncError as error:
        problems.append(error.message)
    except Exception as error:  # noqa: BLE001 - the warehouse is unreachable: a problem to name
        problems.append(f"warehouse: {type(error).__name__}: {error}")
    problems += _governance_commands().alerts_problems(app)  # governance: alerts.yml, every bad entry
    from .config import normalise_warning

    for sync in sorted(project.syncs.values(), key=lambda s: s.name):
        warning = normalise_warning(sync, destinations.get(sync.destination))
        if warning:
            click.echo(f"  warning: {warning}", err=True)
    for warning in _rebuild_warnings(app):
        click.echo(f"  warning: {warning}", err=True)
    if problems:
        for problem in dict.fromkeys(problems):
            click.echo(f"  - {problem}", err=True)
        raise _config_error(f"{len(set(problems))} problem(s) found")
    click.echo(f"OK: {len(project.syncs)} sync(s), {len(destinations)} destination(s), {app.warehouse.describe()}")


def _rebuild_warnings(app: App) -> list[str]:
    """Syncs whose schedule fires more often than their audience has been rebuilt (api.md)."""
    from .errors import AudsyncError
    from .schedule import rebuild_warning, row_value

    warnings = []
    try:
        runner = app.state_runner()
        with app.warehouse.session() as session:
            if runner.state.missing_tables(session):
                return []
            for sync in sorted(app.project.syncs.values(), key=lambda s: s.name):
                runs = [r for r in runner.state.runs_of(session, sync.name, 10) if row_value(r, "status") != "queued"]
                warning = rebuild_warning(sync.schedule, runs)
                if warning:
                    warnings.append(f"sync {sync.name!r} ({sync.path}): {warning}")
    except AudsyncError:
        return warnings
    return warnings


@cli.command()
@pass_app
def destinations(app: App):
    """The destination types audsync can send to, with their config keys."""
    from .destinations.registry import describe_all

    for entry in describe_all():
        state = "" if entry.get("available", True) else f"  (unavailable: {entry.get('error')})"
        click.echo(f"{entry['type']}{state}")
        if entry.get("description"):
            click.echo(f"  {entry['description']}")
        for key in entry.get("keys", []):
            flags = ", ".join(f for f, on in (("required", key["required"]), ("secret", key["secret"])) if on)
            default = f" [default: {key['default']}]" if key.get("default") is not None else ""
            click.echo(f"    {key['name']}{' (' + flags + ')' if flags else ''}: {key['help']}{default}")


# -- governance: membership history (governance.md) ------------------------------------------


def _governance_commands():
    from .governance import commands

    return commands


@cli.command("history")
@click.argument("sync_name")
@click.option("--key", default=None, help="Only this member's key.")
@click.option("--since", type=click.DateTime(), default=None, help="Only changes committed at or after this time (UTC).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def history(app: App, sync_name: str, key: str | None, since: dt.datetime | None, limit: int, fmt: str):
    """Membership history of SYNC_NAME: when members entered and left, and what was sent."""
    _governance_commands().show_history(app, sync_name, key, since, limit, fmt)


# -- changing state -----------------------------------------------------------------------------


@cli.command()
@click.argument("sync_name")
@pass_app
def pause(app: App, sync_name: str):
    """Pause SYNC_NAME: `audsync run` skips it until it is resumed."""
    _set_status(app, sync_name, "paused")


@cli.command()
@click.argument("sync_name")
@pass_app
def resume(app: App, sync_name: str):
    """Resume a paused SYNC_NAME."""
    _set_status(app, sync_name, "active")


def _set_status(app: App, sync_name: str, status: str) -> None:
    sync = app.project.get(sync_name)
    runner = app.state_runner()
    runner.check_ready(sync)
    with app.warehouse.session() as session:
        runner.state.set_status(session, sync.name, status)
    click.echo(f"{sync.name}: {status}")


@cli.command()
@click.argument("sync_name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def reset(app: App, sync_name: str, yes: bool):
    """Forget SYNC_NAME's snapshot: the next run is an initial sync. The destination is untouched.

    The reset takes the sync's lock as a run does: a run holding it refuses the reset, a dead
    one is recovered first."""
    sync = app.project.get(sync_name)
    if not yes and sys.stdin.isatty():
        click.confirm(f"Forget everything audsync knows {sync.name} has sent?", abort=True)
    forgotten = app.state_runner().reset(sync)
    click.echo(f"{sync.name}: snapshot reset ({forgotten} member(s) forgotten); the next run is an initial sync")


# -- running ------------------------------------------------------------------------------------


@cli.command()
@click.argument("sync_names", nargs=-1)
@click.option("-s", "--select", "selector", default=None, help="dbt-style selection: names, tag:T, path:P, ...")
@click.option("--due", is_flag=True, help="Run the syncs whose schedule is due.")
@click.option("--full-resync", is_flag=True, help="Send every member again, not only the changes.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option("--force", is_flag=True, help="Send even if a guardrail would block the run (once).")  # governance:
@pass_app
def run(app: App, sync_names: tuple[str, ...], selector: str | None, due: bool, full_resync: bool, dry_run: bool,
        force: bool = False):  # governance: --force
    """Run syncs: SYNC... by name, --select SELECTOR, or --due."""
    from .errors import AudsyncError, worst_exit_code
    from .output import print_summary

    if sum(bool(x) for x in (sync_names, selector, due)) != 1:
        raise click.UsageError("name the syncs to run, or give --select or --due (one of them)")
    project = app.project
    if sync_names:
        syncs = [project.get(n) for n in dict.fromkeys(sync_names)]
    elif selector:
        syncs = project.select(selector)
        if not syncs:
            raise _config_error(f"--select {selector!r} matches no sync; syncs: {', '.join(sorted(project.syncs)) or 'none'}")
    else:
        syncs = _due_syncs(app)
        if not syncs:
            click.echo("no sync is due")
            return
    if dry_run:
        for sync in syncs:
            _show_plan(app, sync, 5, "json" if app.log_format == "json" else "table")
        return

    runner = app.runner()
    _stop_on_sigterm(runner)
    results = []
    config_errors: list[AudsyncError] = []
    trigger = "schedule" if due else "manual"
    for sync in syncs:
        try:
            skipped = _skip_unevaluated(app, runner, sync) if due and not full_resync else None
            results.append(skipped or runner.run(sync, trigger=trigger, full_resync=full_resync, force=force))
        except AudsyncError as error:
            if len(syncs) == 1:
                raise
            config_errors.append(error)
            click.echo(f"Error: {error.message}", err=True)
    print_summary(results, app.log_format)
    codes = [r.exit_code for r in results] + [e.exit_code for e in config_errors]
    for result in results:
        if result.status == "skipped":
            click.echo(result.error_message, err=True)
    code = worst_exit_code(codes)
    if code:
        sys.exit(code)


def _due_syncs(app: App):
    """The syncs whose schedule is due: the one rule the service's scheduler uses too."""
    from .schedule import CLI_TOLERANCE, due_syncs, last_slot_starts

    runner = app.state_runner()
    with app.warehouse.session() as session:
        if runner.state.missing_tables(session):
            raise _config_error("audsync's state tables are not built yet: run `dbt run` first")
        starts = last_slot_starts(session, runner.state)
        states = runner.state.all_sync_rows(session)
    now = dt.datetime.now(dt.timezone.utc)
    try:
        return due_syncs(app.project.syncs.values(), states, starts, now, tolerance=CLI_TOLERANCE)
    except ValueError as error:
        raise _config_error(str(error)) from None


def _skip_unevaluated(app: App, runner, sync):
    """For ``--due``: a skipped run's result when the audience was not rebuilt since the last
    successful run and nothing is left to retry (freshness, api.md), else ``None``."""
    from .runner import RunResult
    from .schedule import freshness_skip_reason, record_skip

    tables = runner.check_ready(sync)
    with app.warehouse.session() as session:
        reason = freshness_skip_reason(session, runner.state, tables, sync.name)
        if not reason:
            return None
        run_id = record_skip(session, runner.state, sync, reason)
    return RunResult(run_id, sync.name, "skipped", error_message=f"sync {sync.name!r}: {reason}; skipped",
                     destination=sync.destination, mode=sync.mode)


# -- the service (api.md) -------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workspaces", "workspaces_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="workspaces.yml: several projects, each with its tokens (default: this project, with "
                   "AUDSYNC_API_TOKENS or AUDSYNC_API_TOKEN).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Runs at once (a bounded pool).")
@click.option("--no-scheduler", is_flag=True, help="Run syncs only when triggered.")
@click.option("--no-evaluate", is_flag=True,
              help="Do not `dbt run --select <sync>` before a run: another tool runs dbt.")
@click.option("--scheduler-tick", default=30.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="Seconds between the scheduler's checks (at most 60).")
@click.option("--drain-timeout", default=60.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Seconds SIGTERM waits for runs to end aborted.")
@click.option("--rate-limit", default=200, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Requests per token in 10 s before 429.")
@pass_app
def serve(app: App, host, port, workspaces_file, workers, no_scheduler, no_evaluate, scheduler_tick,
          drain_timeout, rate_limit):
    """The REST API and the scheduler (api.md) on this project, until SIGTERM."""
    from .service.server import build_registry, serve as run_server

    registry = build_registry(app.project_dir, app.profiles_dir, app.target, app.destinations_file, workspaces_file)
    code = run_server(registry, host=host, port=port, workers=workers, scheduler=not no_scheduler,
                      evaluate=not no_evaluate, tick_s=scheduler_tick, drain_s=drain_timeout, rate_limit=rate_limit)
    if code:
        sys.exit(code)


def _stop_on_sigterm(runner) -> None:
    """Orchestrators stop a task with SIGTERM (and a user with Ctrl-C): ask the runner to
    stop, never raise at an arbitrary point. The current run stops sending, records what was
    answered, commits and ends ``aborted``; the syncs after it do not start. A second signal
    exits at once: the next run recovers what this one left, as after a kill."""
    import os

    def handler(signum, frame):
        if runner.stopping:
            os._exit(128 + signum)
        runner.request_stop()
        try:
            sys.stderr.write(f"audsync: {signal.Signals(signum).name} received; stopping after the batches in flight"
                             " (again to exit at once)\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stderr must not stop the stop
            pass

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(signum, handler)
        except ValueError:  # not the main thread (an embedding caller)
            pass


def _config_error(message: str):
    from .errors import ConfigError

    return ConfigError(message)


# -- audsync verify (connectors branch) ------------------------------------------------------


@cli.command()
@click.argument("sync_name")
@click.option("--repair", is_flag=True, help="Mark drifted keys so that the next run sends the truth.")
@click.option("--sample", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_app
def verify(app: App, sync_name: str, repair: bool, sample: int, fmt: str):
    """Read SYNC_NAME's destination back and compare it with the snapshot.

    Exit 0 when they agree, 3 when they drift (after --repair too: the next run heals it),
    2 when the destination cannot list its members.
    """
    from .output import print_json
    from .verify import verify as verify_sync

    result = verify_sync(app.runner(), app.project.get(sync_name), repair=repair, sample=sample)
    if fmt == "json":
        print_json(result.as_dict())
    else:
        click.echo(
            f"{result.sync} -> {result.destination}: {result.listed} member(s) in the destination,"
            f" {result.committed} committed by audsync"
        )
        click.echo(f"  missing from the destination: {result.missing}"
                   + (f" (e.g. {', '.join(result.missing_sample)})" if result.missing_sample else ""))
        click.echo(f"  in the destination, never sent: {result.unexpected}"
                   + (f" (e.g. {', '.join(result.unexpected_sample)})" if result.unexpected_sample else ""))
        if result.drifted:
            click.echo(f"  {result.repaired} key(s) marked unknown: the next run sends them" if repair
                       else f"  drift: `audsync verify {result.sync} --repair`, then run the sync")
        else:
            click.echo("  in agreement")
    if result.drifted:
        sys.exit(3)


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; return the exit code. Unexpected errors exit 1 with one line
    (the traceback with -v), never a traceback on an orchestrator's log."""
    import logging

    from .redact import redact

    try:
        cli.main(args=argv, prog_name="audsync", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 1
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 1
    except Exception as error:  # noqa: BLE001 - the last line of defence of the CLI
        logging.getLogger("audsync").debug("unexpected error", exc_info=True)
        click.echo(redact(f"Error: {type(error).__name__}: {error}"), err=True)
        return 1
    return 0


def main() -> None:
    """The console script."""
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
