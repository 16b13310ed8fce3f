"""The runner's memory over one initial ``audsync run``: where its peak RSS is reached.

    python -m bench.rss_timeline [--target duckdb|postgres] [--n 10000000] [--again 3]

Builds the benchmark project at N members (as ``python -m bench`` does), runs ``audsync run S``
and samples the process's ``VmRSS`` every 20 ms, printing each move of 20 MB or more beside the
run's JSON log lines (``planned``, ``delivered``, ``finished``), so a peak is placed in the freeze,
the delivery or the commit. ``--again K`` then runs K more ``audsync run S`` with nothing to send,
with their log lines. On PostgreSQL the server logs every statement over 150 ms and every
autovacuum, and the statements of the runs follow the timeline. The output is kept in
``bench/results/rss-timeline-<target>-<n>.txt``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .receiver import Receiver
from .warehouse import ENV, SYNC, BenchProject

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_S = 0.02
STEP_KB = 20_000


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def timeline(argv: list[str], cwd: Path, out: list[str]) -> float:
    """Run ``argv``, appending its sampled RSS and log lines to ``out``; return the peak MB."""
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        last = 0
        while process.poll() is None:
            kb = _rss_kb(process.pid)
            if kb is not None:
                peak[0] = max(peak[0], kb)
                if abs(kb - last) >= STEP_KB:
                    out.append(f"{time.monotonic() - started:7.2f}s RSS {kb / 1024:.0f} MB")
                    last = kb
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        out.append(f"{time.monotonic() - started:7.2f}s LOG {line.rstrip()[:240]}")
    process.wait()
    sampler.join()
    return peak[0] / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rss_timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="duckdb", choices=("duckdb", "postgres"))
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--again", type=int, default=0, help="runs with nothing to send afterwards")
    args = parser.parse_args(argv)

    pg = None
    if args.target == "postgres":
        from tests.support import postgres

        from .__main__ import PG_TUNING

        postgres.SETTINGS.update(PG_TUNING)
        postgres.SETTINGS.update({"log_min_duration_statement": "150", "log_autovacuum_min_duration": "0"})
        pg = postgres.start_postgres()
    work = Path(tempfile.mkdtemp(prefix="audsync-rss-"))
    out: list[str] = [f"python -m bench.rss_timeline --target {args.target} --n {args.n} --again {args.again}",
                      f"load average at the start: {os.getloadavg()[0]:.1f}", ""]
    try:
        with Receiver() as receiver:
            bp = BenchProject(work / "project", args.target, pg)
            bp.generate(args.n)
            bp.write_sync(receiver.url)
            bp.dbt("run")  # the package's state tables and S, as bench.profile builds them
            run = [str(a) for a in bp.audsync_argv("run", SYNC)]
            out.append("--- the initial sync")
            peak = timeline(run, bp.root, out)
            out.append(f"peak RSS {peak:.0f} MB")
            for i in range(args.again):
                out.append(f"--- run {i + 1} with nothing to send")
                out.append(f"peak RSS {timeline(run, bp.root, out):.0f} MB")
        if pg is not None:
            out += ["", "--- the server's statements over 150 ms, and its autovacuums",
                    *(line for line in pg.log_file.read_text(errors="replace").splitlines()
                      if "duration:" in line or "automatic" in line)]
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(out) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"rss-timeline-{args.target}-{args.n}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
