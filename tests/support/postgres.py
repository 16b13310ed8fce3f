"""A throwaway PostgreSQL cluster for one test session.

The suite never assumes a server is running: :func:`start_postgres` finds ``initdb`` and
``pg_ctl`` (on ``PATH``, then under ``/usr/lib/postgresql/*/bin``), creates a cluster in a
temporary folder with trust authentication, starts it on ``127.0.0.1`` on a free port with its
unix socket in that folder, and :meth:`PostgresServer.stop` removes it all again.

``initdb`` refuses to run as root, so as root every server command runs as the ``postgres``
user (created by Debian's package), or as a dedicated ``audsync_pg`` system user when there is
none, and the temporary folder is handed to that user.

Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): a test
cluster that dies is thrown away, never recovered.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERUSER = "postgres"
"""The cluster's superuser (``initdb -U``), whichever OS user runs it."""

DEDICATED_OS_USER = "audsync_pg"
"""The OS user created to run the server as root when no ``postgres`` user exists."""

TEMP_PREFIX = "audsync-pg-"
"""Prefix of the cluster folders; short, because a unix socket path is at most 107 bytes."""

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "60",
    "shared_buffers": "64MB",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "timezone": "'UTC'",
}
"""``postgresql.conf`` settings for a fast, disposable test cluster."""


class PostgresNotFound(RuntimeError):
    """Raised when no PostgreSQL server binaries (``initdb``, ``pg_ctl``) can be found."""


def find_bin_dir() -> Path | None:
    """Return the folder holding ``initdb`` and ``pg_ctl``, or ``None`` when there is none.

    ``PATH`` comes first, then Debian's versioned folders, newest version first.
    """
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")

    def version(path: str) -> tuple[int, ...]:
        match = re.search(r"/postgresql/([\d.]+)/", path)
        return tuple(int(p) for p in match.group(1).split(".") if p) if match else ()

    for initdb in sorted(candidates, key=version, reverse=True):
        bin_dir = Path(initdb).parent
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class _RunAs:
    """The OS user that runs the server commands (``None`` fields: the current user)."""

    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _run_as_user() -> _RunAs:
    """Pick the OS user for the server: ourselves, or an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return _RunAs()
    for name in (SUPERUSER, DEDICATED_OS_USER):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            DEDICATED_OS_USER,
        ],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(DEDICATED_OS_USER)
    return _RunAs(DEDICATED_OS_USER, entry.pw_uid, entry.pw_gid)


def _clean_env() -> dict[str, str]:
    """The environment for server commands, without ``PG*`` variables that would redirect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


@dataclass
class PostgresServer:
    """A running throwaway cluster: connection facts plus helpers to make databases."""

    host: str
    port: int
    base_dir: Path
    bin_dir: Path
    user: str = SUPERUSER
    password: str = ""
    dbname: str = "postgres"
    _run_as: _RunAs = field(default_factory=_RunAs, repr=False)
    _created: int = field(default=0, repr=False)

    @property
    def data_dir(self) -> Path:
        """The cluster's data folder."""
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """The folder holding the server's unix socket."""
        return self.base_dir

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self.base_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """A libpq key/value connection string for the maintenance database."""
        return self.dsn_for(self.dbname)

    def dsn_for(self, dbname: str) -> str:
        """A libpq key/value connection string for ``dbname`` on this server."""
        parts = [f"host={self.host}", f"port={self.port}", f"user={self.user}", f"dbname={dbname}"]
        if self.password:
            parts.append(f"password={self.password}")
        return " ".join(parts)

    def url(self, dbname: str | None = None) -> str:
        """A ``postgresql://`` URL for ``dbname`` (default: the maintenance database)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname or self.dbname}"

    def connect(self, dbname: str | None = None, autocommit: bool = True):
        """Open a psycopg2 connection to ``dbname`` (default: the maintenance database)."""
        import psycopg2

        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname or self.dbname,
            connect_timeout=10,
        )
        conn.autocommit = autocommit
        return conn

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its name.

        ``name`` is lowercased, reduced to ``[a-z0-9_]`` and cut to PostgreSQL's 63 bytes; a
        database of that name left over from earlier is dropped first. Without ``name`` a
        fresh ``test_<n>`` name is chosen.
        """
        self._created += 1
        if name is None:
            name = f"test_{self._created}"
        name = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_") or f"test_{self._created}"
        if name[0].isdigit():
            name = f"db_{name}"
        name = name[:63]
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'drop database if exists "{name}" with (force)')
                # FILE_COPY skips WAL-logging the template, which is faster with fsync off.
                cur.execute(f'create database "{name}" template template0 strategy file_copy')
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, closing its open connections."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'drop database if exists "{name}" with (force)')
        finally:
            conn.close()

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            cwd=self.base_dir,
            env=_clean_env(),
            text=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=check,
            **self._run_as.popen_kwargs(),
        )

    def is_running(self) -> bool:
        """Whether the server process is up."""
        if not self.data_dir.exists():
            return False
        return self._pg_ctl("status", check=False).returncode == 0

    def stop(self) -> None:
        """Stop the server at once and remove its folder. Safe to call twice."""
        if self.data_dir.exists():
            try:
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", "30", check=False)
            except OSError:  # no pg_ctl any more: nothing can be running from it either
                pass
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_clusters(bin_dir: Path, run_as: _RunAs | None = None) -> list[Path]:
    """Stop and remove clusters left by test sessions that died without cleaning up.

    A cluster folder records the pid of the session that made it (``owner.pid``); one whose
    owner is gone is stale. Returns the folders removed.
    """
    run_as = run_as or _RunAs()
    removed = []
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), TEMP_PREFIX + "*")):
        base = Path(folder)
        try:
            owner = int((base / "owner.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        PostgresServer("127.0.0.1", 0, base, bin_dir, _run_as=run_as).stop()
        removed.append(base)
    return removed


def start_postgres(bin_dir: Path | None = None, attempts: int = 3) -> PostgresServer:
    """Create and start a throwaway cluster; the caller must :meth:`~PostgresServer.stop` it.

    Raises :class:`PostgresNotFound` when no server binaries exist, and ``RuntimeError`` with
    the server's log when it cannot start.
    """
    bin_dir = bin_dir or find_bin_dir()
    if bin_dir is None:
        raise PostgresNotFound(
            "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under "
            "/usr/lib/postgresql/*/bin; install them with `apt-get install -y postgresql` "
            "(bash .ci/run does), or run only the DuckDB tests with --warehouses duckdb"
        )
    run_as = _run_as_user()
    remove_stale_clusters(bin_dir, run_as)

    base = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    (base / "owner.pid").write_text(str(os.getpid()))
    if run_as.uid is not None:
        os.chown(base, run_as.uid, run_as.gid)
    server = PostgresServer("127.0.0.1", 0, base, bin_dir, _run_as=run_as)
    atexit.register(server.stop)
    try:
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=base,
            env=_clean_env(),
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            **run_as.popen_kwargs(),
        )
    except subprocess.CalledProcessError as exc:
        server.stop()
        raise RuntimeError(f"initdb failed ({exc.returncode}):\n{exc.stdout}") from exc

    settings = dict(SETTINGS, unix_socket_directories=f"'{server.socket_dir}'")
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("\n# audsync test cluster\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    last_output = ""
    for _ in range(attempts):
        server.port = free_port()
        proc = server._pg_ctl(
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            str(server.log_file),
            "-o",
            f"-p {server.port}",
            check=False,
        )
        if proc.returncode == 0 and _wait_ready(server):
            return server
        last_output = proc.stdout
        server._pg_ctl("stop", "-m", "immediate", "-w", check=False)
    log = server.log_tail()
    server.stop()
    raise RuntimeError(f"PostgreSQL did not start:\n{last_output}\n--- server log ---\n{log}")


def _wait_ready(server: PostgresServer, timeout_s: float = 30.0) -> bool:
    """Wait until the server accepts a query (``pg_ctl -w`` already waited for startup)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn = server.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("select 1")
                return True
            finally:
                conn.close()
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


__all__ = [
    "PostgresNotFound",
    "PostgresServer",
    "find_bin_dir",
    "free_port",
    "remove_stale_clusters",
    "start_postgres",
]
