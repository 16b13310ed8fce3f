"""``audsync serve`` as a real subprocess on a free loopback port, and a small client for it.

    with ServiceProcess(project, env={"AUDSYNC_API_TOKEN": "t"}) as service:
        answer = service.call("GET", "/api/v1/audience-syncs", token="t")

The process is stopped with SIGTERM when the block ends (and killed if it does not exit);
:meth:`ServiceProcess.stop` returns its exit code. Its log is kept for failure messages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import requests


def free_port() -> int:
    """A TCP port nobody listens on at this moment, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``audsync --project-dir P --profiles-dir P serve --port N ...`` in a child process."""

    def __init__(self, project=None, *args: str, env: Mapping[str, str] | None = None, startup_s: float = 90.0):
        self.project = project
        self.port = free_port()
        self.args = list(args)
        self.env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", **(env or {})}
        self.startup_s = startup_s
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="audsync-serve-", suffix=".log", delete=False)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServiceProcess":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        argv = [sys.executable, "-m", "audsync.cli"]
        if self.project is not None:
            argv += ["--project-dir", str(self.project.root), "--profiles-dir", str(self.project.root)]
        argv += ["serve", "--port", str(self.port), *self.args]
        self.process = subprocess.Popen(argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=str(self.project.root) if self.project is not None else None)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"audsync serve exited {self.process.returncode} at start:\n{self.log}")
            try:
                if requests.get(self.base_url + "/healthz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"audsync serve did not answer /healthz in {self.startup_s:.0f} s:\n{self.log}")

    def stop(self, timeout_s: float = 90.0) -> int | None:
        """SIGTERM, wait, return the exit code (killed with -9 after ``timeout_s``)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def call(self, method: str, path: str, token: str | None = None, json: Any = None,
             headers: Mapping[str, str] | None = None, **kwargs: Any) -> requests.Response:
        """One request; ``token`` goes in ``Authorization: Bearer``."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        response = requests.request(method, self.base_url + path, json=json, headers=all_headers, timeout=120,
                                    **kwargs)
        if response.status_code >= 500:
            # No test expects a 5xx: fail here with the service's own account of it, its last
            # exception first, so that the one-line summary of a CI run says what went wrong.
            log = self.log
            raise AssertionError(f"{method} {path} answered {response.status_code}: {_last_exception(log)}\n"
                                 f"{response.text}\n--- service log (tail) ---\n{log[-4000:]}")
        return response

    def wait_run(self, prefix: str, sync_id: str, run_id: str, token: str, *, until=("success",),
                 timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll a run until it leaves queued/running; assert its status is in ``until``."""
        deadline = time.monotonic() + timeout_s
        run: dict[str, Any] = {}
        while time.monotonic() < deadline:
            answer = self.call("GET", f"{prefix}/audience-syncs/{sync_id}/runs/{run_id}", token)
            assert answer.status_code == 200, answer.text
            run = answer.json()
            if run["status"] not in ("queued", "running"):
                assert run["status"] in until, f"run {run_id} ended {run['status']}: {run}\n{self.log[-3000:]}"
                return run
            time.sleep(0.3)
        raise AssertionError(f"run {run_id} still {run.get('status')} after {timeout_s:.0f} s\n{self.log[-3000:]}")


def _last_exception(log: str) -> str:
    """The line that ends the last traceback in a service log (``KeyError: 'x'``), or a note."""
    lines = log.splitlines()
    for line in reversed(lines):
        if "unexpected error on " in line:
            return line.split("unexpected error on ", 1)[1]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("Traceback"):
            for line in lines[index + 1:]:
                if line and not line.startswith((" ", "\t", "Traceback")):
                    return line.strip()
    return "no traceback in the service's log"
