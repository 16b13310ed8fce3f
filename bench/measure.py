"""Timing a child process: wall time and its own peak RSS (``wait4``), and medians."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
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


# Linux reports a child's peak RSS as at least its parent's peak when it forked (exec records
# the old address space's high-water mark), and this process grows while it checks results.
# So each child is started by a small launcher that forks it, waits, and writes the child's
# own peak RSS (KB) and wall seconds to the file named by its first argument.
_LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_maxrss} {time.perf_counter() - started}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(argv: Sequence[str], *, cwd: str | Path | None = None, env: Mapping[str, str] | None = None,
        check: bool = True) -> Measured:
    """Run ``argv`` to its end; the peak RSS is the child's own (``ru_maxrss`` from ``wait4``)."""
    full_env = {**os.environ, **(env or {})}
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{time.monotonic_ns()}"
    with open(f"{out_path}.out", "w+") as out, open(f"{out_path}.err", "w+") as err:
        process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, f"{out_path}.usage", *map(str, argv)],
                                   cwd=cwd, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        process.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    maxrss_kb, wall = Path(f"{out_path}.usage").read_text().split()
    for suffix in (".out", ".err", ".usage"):
        os.unlink(f"{out_path}{suffix}")
    result = Measured(process.returncode, float(wall), int(maxrss_kb) / 1024.0, stdout, stderr)
    if check and result.code != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {result.code}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return result


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the number of values."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
