"""``python -m bench [--quick] [--only duckdb,postgres,spark] [--runs 3] [--out latest]``: run the benchmark.

Writes ``bench/results/<out>.json`` (every run's value) and ``bench/results/<out>.md`` (the
table, medians with min-max, the targets and every ratio to audsync; ``--out`` defaults to
``latest``), and prints the table. ``spark`` (not in the default ``--only``) starts a Thrift
server from the installed pyspark as the tests do (``tests/support/spark.py``) and stops it at
the end; on Spark only audsync is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import peers, report
from .receiver import Receiver
from .scenario import Scenario, log

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_SIZES = [100_000]
FULL_SIZES = [1_000_000, 10_000_000]
PG_TUNING = {
    "shared_buffers": "2GB",
    "work_mem": "256MB",
    "maintenance_work_mem": "1GB",
    "effective_cache_size": "16GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "1h",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "jit": "off",
    "max_parallel_workers_per_gather": "2",
}
"""Over the tests' throwaway-cluster settings: memory for sorts and hashes, little WAL."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_SIZES[0]:,} only")
    parser.add_argument("--sizes", default=None, help="comma-separated N (default: 1M,10M; --quick: 100k)")
    parser.add_argument("--only", default="duckdb,postgres", help="warehouses: duckdb,postgres,spark")
    parser.add_argument("--out", default="latest", help="results file name in bench/results/ (no suffix)")
    parser.add_argument("--skip", default="", help="peers to leave out: snapshot,pydiff,drt")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (median reported)")
    parser.add_argument("--heavy-runs", type=int, default=None,
                        help="runs of the slow steps at N >= 5M: initial sync, drt, Python diff (default: --runs)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the scenarios of the previous latest.json that this run does not measure")
    parser.add_argument("--keep-going", action="store_true", help="a failing scenario does not stop the others")
    return parser.parse_args(argv)


def machine() -> dict:
    import duckdb

    info = {
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "platform": platform.platform(),
    }
    try:
        from importlib.metadata import version

        info["dbt-core"] = version("dbt-core")
    except Exception:  # noqa: BLE001
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    warehouses = [w.strip() for w in args.only.split(",") if w.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    heavy_runs = args.heavy_runs or args.runs
    if "drt" not in skip:
        peers.ensure_peers_venv()
    info = machine()
    info["drt-core"] = peers.drt_version() if "drt" not in skip else "skipped"
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="audsync-bench-"))
    pg = spark = None
    scenarios: list[Scenario] = []
    failures: list[str] = []
    global _KEPT
    _KEPT = []
    if args.merge and (RESULTS / f"{args.out}.json").exists():
        previous = json.loads((RESULTS / f"{args.out}.json").read_text())
        measured = {(w, n) for w in warehouses for n in sizes}
        _KEPT = [s for s in previous.get("scenarios", []) if (s["warehouse"], s["n"]) not in measured]
        failures += [f for f in previous.get("failures", [])
                     if not any(f.startswith(f"{w} N={n:,}:") for w, n in measured)]
        for key in ("postgres", "drt-core"):
            if previous.get("machine", {}).get(key) and info.get(key) in (None, "skipped"):
                info[key] = previous["machine"][key]
    try:
        if "postgres" in warehouses:
            from tests.support import postgres

            postgres.SETTINGS.update(PG_TUNING)
            pg = postgres.start_postgres()
            with pg.connect() as conn, conn.cursor() as cur:
                cur.execute("show server_version")
                info["postgres"] = cur.fetchone()[0]
        if "spark" in warehouses:
            from importlib.metadata import version

            from tests.support.spark import start_spark

            spark = start_spark()
            info["pyspark"] = version("pyspark")
            info["dbt-spark"] = version("dbt-spark")
        with Receiver() as receiver:
            for target in warehouses:
                for n in sizes:
                    scenario = Scenario(target, n, runs=args.runs, heavy_runs=heavy_runs, workdir=workdir,
                                        pg=pg, receiver=receiver, skip=skip, spark=spark)
                    try:
                        scenario.run()
                    except Exception as error:  # noqa: BLE001
                        failures.append(f"{target} N={n:,}: {type(error).__name__}: {error}")
                        log(f"FAILED {failures[-1]}")
                        if not args.keep_going:
                            raise
                    finally:
                        scenarios.append(scenario)
                        write(scenarios, info, args, started, failures)
    finally:
        if pg is not None:
            pg.stop()
        if spark is not None:
            spark.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(write(scenarios, info, args, started, failures))
    return 1 if failures else 0


_KEPT: list[dict] = []


def _order(scenarios: list[dict]) -> list[dict]:
    rank = {"duckdb": 0, "postgres": 1, "spark": 2}
    return sorted(scenarios, key=lambda s: (rank.get(s["warehouse"], 9), s["n"]))


def write(scenarios: list[Scenario], info: dict, args: argparse.Namespace, started: float,
          failures: list[str]) -> str:
    """Write ``<out>.json`` and ``<out>.md`` (after every scenario, so a long run shows progress)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": info,
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "failures": failures,
        "scenarios": _order(_KEPT + [s.as_json() for s in scenarios]),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(data, indent=1) + "\n")
    text = report.render(data)
    (RESULTS / f"{args.out}.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
