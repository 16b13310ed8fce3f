"""The cost of membership history (S__history) at a large initial sync on DuckDB.

Builds an audience of N members in SQL, then runs the same initial sync twice from an empty
snapshot against the counting receiver: once with ``S__history`` present (the commit appends
N rows to it in its transaction) and once without it (the runner skips history when the table
is missing). Prints both walls and the difference.

    .venv/bin/python -m bench.governance_history --members 1000000
    .venv/bin/python -m bench.governance_history --members 10000000 --runs 1 \
        --out bench/results/governance-history-10000000.md

``--out`` also writes the figures with the command, the time and the load average (the
machine is shared: the load says how far the walls are from a quiet machine's).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.receiver import Receiver  # noqa: E402
from tests.support.dbt_project import DbtProject  # noqa: E402
from tests.support.syncs import audsync, write_destinations  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the figures to this Markdown file")
    args = parser.parse_args(argv)
    command = "python -m bench.governance_history " + " ".join(sys.argv[1:] if argv is None else argv)
    started_at, load_before, clock = dt.datetime.now(dt.timezone.utc), os.getloadavg(), time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="audsync-history-bench-"))
    try:
        project = DbtProject(root / "proj", "duckdb")
        project.write_model("audience", (
            "{{ config(materialized='table') }}\n"
            "select 'user' || cast(i as varchar) || '@example.com' as email, 'n' || cast(i % 97 as varchar) as first_name,"
            f" cast(i % 1000 as double) as ltv from range({args.members}) as t(i)"))
        project.write_model("big_sync", (
            "{{ config(materialized='audience_sync', destination='hook', identifier='email', field_mapping=["
            "{'source_column': 'email', 'destination_field': 'email'},"
            "{'source_column': 'first_name', 'destination_field': 'first_name'},"
            "{'source_column': 'ltv', 'destination_field': 'ltv'}]) }}\n"
            "select email, first_name, ltv from {{ ref('audience') }}"))
        results: dict[str, list[float]] = {"with history": [], "without history": []}
        with Receiver() as receiver:
            write_destinations(project, {"hook": {"type": "webhook", "url": receiver.url, "batch_size": 10000}})
            project.dbt("run")
            for _ in range(args.runs):
                for label in ("with history", "without history"):
                    audsync(project, "reset", "big_sync", "--yes")
                    if label == "without history":
                        project.execute(f"drop table if exists {project.relation('big_sync__history')}")
                    else:
                        project.dbt("run", "--select", "big_sync")  # creates S__history when missing
                        project.execute(f"delete from {project.relation('big_sync__history')}")
                        audsync(project, "reset", "big_sync", "--yes")
                    started = time.monotonic()
                    run = audsync(project, "--log-format", "json", "run", "big_sync")
                    results[label].append(time.monotonic() - started)
                    print(f"measured {label}: {results[label][-1]:.1f} s", flush=True)  # kept if stopped later
                    if label == "with history":
                        rows = project.query(f"select count(*) from {project.relation('big_sync__history')}")[0][0]
                        if rows != args.members:
                            runs = project.relation("audsync_runs", schema=project.schema + "_audsync")
                            row = project.query(f"select status, planned_adds, rows_added, error_message from {runs}"
                                                " order by started_at desc limit 1")
                            raise SystemExit(f"S__history holds {rows} rows after an initial sync of {args.members}:"
                                             f" the history is wrong, the figure meaningless. The run: {row}; its log: {run.output[-3000:]}")
        lines = [f"{label}: {', '.join(f'{w:.1f}' for w in walls)} s (best {min(walls):.1f} s)"
                 for label, walls in results.items()]
        with_h, without_h = min(results["with history"]), min(results["without history"])
        lines.append(f"history append at {args.members} members: {with_h - without_h:+.1f} s"
                     f" ({(with_h - without_h) / with_h:.0%} of the run with history)")
        print("\n".join(lines))
        if args.out:
            load_after = os.getloadavg()
            args.out.write_text(
                f"# Membership history cost at {args.members:,} members (DuckDB)\n\n"
                f"`{command}`, started {started_at:%Y-%m-%dT%H:%M:%SZ}, took {(time.monotonic() - clock) / 60:.1f} min"
                f" on {os.cpu_count()} cores (Python {platform.python_version()}).\n"
                f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.1f}' for x in load_before)};"
                f" after: {', '.join(f'{x:.1f}' for x in load_after)}.\n\n"
                "Wall of `audsync run big_sync` (an initial sync from an empty snapshot to the counting receiver;"
                " three mapped fields, batches of 10,000), with `S__history` and without it:\n\n"
                + "".join(f"- {line}\n" for line in lines))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
