"""Starting ``audsync serve``: workspaces, readiness, then uvicorn until SIGTERM.

uvicorn turns SIGTERM (and Ctrl-C) into a graceful stop: it stops accepting connections and
runs the app's shutdown, which stops the scheduler and drains the workers (runs end
``aborted``, committing what was delivered); then the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from .runs import recover_queued
from .workspaces import DBT_LOCK, Registry, default_workspace, load_workspaces

logger = logging.getLogger("audsync.serve")


def build_registry(project_dir, profiles_dir, target, destinations_file, workspaces_file: Path | None) -> Registry:
    """The workspaces to serve; ConfigError (exit 2) when none has a token."""
    if workspaces_file:
        workspaces = load_workspaces(workspaces_file)
    else:
        workspaces = [default_workspace(project_dir, profiles_dir, target, destinations_file)]
    registry = Registry(workspaces)
    if not registry.has_tokens():
        raise ConfigError(
            "audsync serve needs at least one API token: set AUDSYNC_API_TOKEN (or AUDSYNC_API_TOKENS, "
            "comma-separated), or give tokens in --workspaces"
        )
    return registry


def prepare(registry: Registry) -> None:
    """Make each workspace ready: its project parses, its state tables exist (built with
    ``dbt run --select package:audsync`` when missing), runs left queued are ended."""
    for ws in registry.workspaces.values():
        project = ws.project()
        if ws.missing_state_tables():
            logger.info("workspace %s: building audsync's state tables", ws.name)
            args = [sys.executable, "-m", "dbt.cli.main", "run", "--select", "package:audsync", "--quiet",
                    "--project-dir", str(project.project_dir), "--profiles-dir", str(project.profiles_dir)]
            if ws.target:
                args += ["--target", ws.target]
            with DBT_LOCK:
                done = subprocess.run(args, capture_output=True, text=True,
                                      env={**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"})
            if done.returncode != 0:
                raise ConfigError(f"workspace {ws.name!r}: `dbt run --select package:audsync` failed: "
                                  f"{' '.join(done.stdout.strip().splitlines()[-3:])}")
        ended = recover_queued(ws)
        if ended:
            logger.info("workspace %s: %d run(s) left queued by a stopped service ended aborted", ws.name, ended)


def serve(registry: Registry, *, host: str, port: int, workers: int, scheduler: bool, evaluate: bool,
          tick_s: float, drain_s: float, rate_limit: int) -> int:
    """Serve until stopped; return the exit code."""
    import uvicorn

    from .app import create_app

    prepare(registry)
    app = create_app(registry, workers=workers, evaluate=evaluate, scheduler=scheduler, tick_s=tick_s,
                     drain_s=drain_s, rate_limit=rate_limit)
    for ws in registry.workspaces.values():
        logger.info("workspace %s (%s): %s", ws.name, ws.id, ws.project_dir)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=max(1, int(drain_s) + 5), server_header=False)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM itself (a graceful stop, our shutdown drains the runs), then
    # raises the signal again against the handler that was there before it: let that one be
    # a no-op, so that a drained service exits 0 as api.md says.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1
