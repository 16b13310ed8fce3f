"""The errors the CLI turns into exit codes.

Each class is a :class:`click.ClickException` whose ``exit_code`` is the code of the contract
(section 8), as dbt-core's ``cli/exceptions.py`` does, so a command only has to raise: click
prints ``Error: <message>`` and exits with the class's code.

Every message passes through :func:`audsync.redact.redact` when the error is created, so a
secret that slipped into one is masked before it can be printed, logged or stored.
"""

from __future__ import annotations

from typing import Any

import click

from audsync.redact import redact

EXIT_SUCCESS = 0
EXIT_RUN_FAILED = 1
EXIT_CONFIG = 2
EXIT_PARTIAL = 3

# The one table of exit codes by a run's final status (contract section 8).
RUN_STATUS_EXIT = {
    "success": EXIT_SUCCESS,
    "skipped": EXIT_SUCCESS,
    "partial_failure": EXIT_PARTIAL,
    "error": EXIT_RUN_FAILED,
    "aborted": EXIT_RUN_FAILED,
    "blocked": EXIT_RUN_FAILED,
}


def exit_code_of(status: str) -> int:
    """The exit code of a run that ended with ``status`` (unknown statuses: failed)."""
    return RUN_STATUS_EXIT.get(status, EXIT_RUN_FAILED)


def worst_exit_code(codes: list[int]) -> int:
    """The exit code of several runs: a failure over a configuration error over a partial one."""
    for code in (EXIT_RUN_FAILED, EXIT_CONFIG, EXIT_PARTIAL):
        if code in codes:
            return code
    return EXIT_SUCCESS


class AudsyncError(click.ClickException):
    """Base of the errors audsync reports to its user.

    Args:
        message: what was wrong, naming the sync, destination or key it concerns.
    """

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str):
        super().__init__(redact(str(message)))


class ConfigError(AudsyncError):
    """Bad usage or configuration: a wrong key, a missing variable, an unknown name (exit 2).

    Args:
        message: what was wrong and what was expected.
        destination: the destination concerned, if any.
        key: the configuration key concerned, if any.
        sync: the sync concerned, if any.
    """

    exit_code = EXIT_CONFIG

    def __init__(
        self,
        message: str,
        *,
        destination: str | None = None,
        key: str | None = None,
        sync: str | None = None,
    ):
        super().__init__(message)
        self.destination = destination
        self.key = key
        self.sync = sync


class RunFailed(AudsyncError):
    """A run could not complete: the warehouse, the destination or the runner failed (exit 1).

    Args:
        message: what failed.
        sync: the sync whose run failed, if known.
        run_id: the failed run, if it was recorded.
    """

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str, *, sync: str | None = None, run_id: str | None = None):
        super().__init__(message)
        self.sync = sync
        self.run_id = run_id


class LockHeld(AudsyncError):
    """Another run of the sync holds its lock (exit 1).

    Args:
        message: which sync is locked and by which run; see :meth:`for_run`.
        sync: the locked sync.
        holder_run_id: the run holding the lock.
    """

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str, *, sync: str | None = None, holder_run_id: str | None = None):
        super().__init__(message)
        self.sync = sync
        self.holder_run_id = holder_run_id

    @classmethod
    def for_run(cls, sync: str, holder_run_id: str, heartbeat_at: Any = None) -> LockHeld:
        """The error for ``sync`` locked by ``holder_run_id``, with its last heartbeat if known."""
        message = f"sync {sync!r} is locked by run {holder_run_id}"
        if heartbeat_at is not None:
            message += f" (last heartbeat {heartbeat_at})"
        # Say what to do: the lock is taken over by itself once the heartbeat is old enough.
        message += (
            "; wait for it to finish, or for its heartbeat to be older than"
            " AUDSYNC_LOCK_TIMEOUT_S seconds, when the lock is taken over"
        )
        return cls(message, sync=sync, holder_run_id=holder_run_id)


class PartialFailure(AudsyncError):
    """A run completed but the destination rejected some rows (exit 3).

    Args:
        message: which sync and how many rows failed.
        sync: the sync concerned.
        run_id: the run concerned.
        rows_failed: how many rows failed.
    """

    exit_code = EXIT_PARTIAL

    def __init__(
        self,
        message: str,
        *,
        sync: str | None = None,
        run_id: str | None = None,
        rows_failed: int | None = None,
    ):
        super().__init__(message)
        self.sync = sync
        self.run_id = run_id
        self.rows_failed = rows_failed


class LockLost(AudsyncError):
    """Another run took this run's lock over, after its heartbeat had stopped (exit 1).

    The run stops sending, commits nothing and leaves its run row to the run that took over
    (which marked it ``aborted`` and recovered what it had delivered).

    Args:
        message: which run lost the lock and which run took it.
        sync: the sync concerned.
        taken_by: the run that holds the lock now, if known.
    """

    exit_code = EXIT_RUN_FAILED

    def __init__(self, message: str, *, sync: str | None = None, taken_by: str | None = None):
        super().__init__(message)
        self.sync = sync
        self.taken_by = taken_by


class RunStopped(AudsyncError):
    """The run was asked to stop (SIGTERM, a service shutting down) (exit 1).

    Raised inside delivery where a retry would wait, so the stop is not delayed by backoff.
    """

    exit_code = EXIT_RUN_FAILED
