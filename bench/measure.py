"""Timing a child process: wall time and its own peak RSS (``wait4``), and medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence


@dataclass
class Measured:
    """One child process: its exit code, wall seconds, peak RSS (MB) and output."""

    code: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run(argv: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        check: bool = True) -> Measured:
    """Run ``argv`` to its end; the peak RSS is the child's own (``ru_maxrss`` from ``wait4``)."""
    full_env = {**os.environ, **(env or {})}
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{time.monotonic_ns()}"
    with open(f"{out_path}.out", "w+") as out, open(f"{out_path}.err", "w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(map(str, argv)), cwd=cwd, env=full_env, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    os.unlink(f"{out_path}.out")
    os.unlink(f"{out_path}.err")
    result = Measured(process.returncode, wall, usage.ru_maxrss / 1024.0, stdout, stderr)
    if check and result.code != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {result.code}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return result


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the number of values."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
