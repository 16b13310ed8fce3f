"""The diff build alone, before and after a macro change, back to back on the same data.

    python -m bench.diffbuild --target duckdb --n 10000000 --packages before=/tmp/base,after=.

Builds the bench scenario once (``audience_v0``/``v1``, the sync model), runs the model on v0
and fills the snapshot from ``S`` as a sync would leave it, then points the audience at v1 (the
3% change) and runs ``dbt run --select S`` ``--runs`` times per package, the packages
alternating (each run re-links ``dbt_packages/audsync``). Reported per run: the model's
execution time, the dbt process's wall and CPU seconds (start-up and parsing included). With
``--profile`` each package's statements of the model (from dbt's debug log) are then replayed
under EXPLAIN ANALYZE (DuckDB: CPU seconds of the replay too) into ``<root>/profile-*.txt``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from .warehouse import ENV, SYNC, VENV_BIN, BenchProject

_LOG_LINE = re.compile(r"^(?:\x1b\[0m)?\d\d:\d\d:\d\d\.\d+ ", re.M)
_HEAVY = re.compile(r"^\s*(create\s+table|insert\s+into)\b", re.I)


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pg_cpu(pg) -> float:
    """CPU seconds of the cluster's processes so far: the postmaster's reaped children
    (parallel workers, ended backends) and every live child. Approximate: a backend that ends
    between two readings can be missed (a difference can even come out negative)."""
    pid = int(Path(pg.data_dir, "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid:
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick
        elif int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def link(bp: BenchProject, package: Path) -> None:
    target = bp.root / "dbt_packages" / "audsync"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(package.resolve())


def dbt_run(bp: BenchProject, pg) -> dict[str, float]:
    cpu0, pg0 = _cpu_children(), (_pg_cpu(pg) if pg else 0.0)
    started = time.perf_counter()
    subprocess.run([str(VENV_BIN / "dbt"), "--debug", "run", "--select", SYNC, "--project-dir", str(bp.root),
                    "--profiles-dir", str(bp.root)], cwd=bp.root, env={**os.environ, **ENV},
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    result = {"model_s": bp.node_time(SYNC), "wall_s": wall, "dbt_cpu_s": _cpu_children() - cpu0,
              "pg_cpu_s": (_pg_cpu(pg) - pg0) if pg else 0.0}
    # The snapshot holds v0's hashes: a build that hashes as before finds exactly the 3% change.
    candidates = bp.query(f"select count(*) from {bp.relation(SYNC + '__candidates')}")[0][0]
    expected = 3 * (int(bp.query(f"select count(*) from {bp.relation('audience_v0')}")[0][0]) // 100)
    if candidates != expected:
        raise RuntimeError(f"{candidates:,} candidate keys, expected {expected:,}: the hash changed?")
    return result


def setup(bp: BenchProject, n: int, package: Path) -> None:
    print(f"generating {n:,} members: {bp.generate(n):.1f} s", flush=True)
    bp.write_sync("http://127.0.0.1:9/unused")
    link(bp, package)
    bp.dbt("run", "--select", SYNC)
    s, snap = bp.relation(SYNC), bp.relation(SYNC + "__snapshot")
    # The snapshot as a sync of v0 leaves it: every member of S, known (a hash), sent.
    cols = "_audsync_key, first_name, country, ltv, _audsync_hash"
    bp.project.execute(f"insert into {snap} ({cols}, _audsync_synced_at, _audsync_run_id) "
                       f"select {cols}, current_timestamp, 'bench' from {s}")
    if bp.target == "postgres":
        bp.project.execute(f"analyze {snap}")
    bp.point_at(1)


def statements(bp: BenchProject) -> list[str]:
    """The model's create-table and insert statements of the latest dbt run, from its log."""
    text = (bp.root / "logs" / "dbt.log").read_text()
    text = text[text.rfind("Running with dbt"):]
    found = []
    for block in _LOG_LINE.split(text):
        head, sep, sql = block.partition(f"On model.bench.{SYNC}: ")
        if sep and "/*" in sql[:3]:
            sql = sql.split("*/", 1)[1].strip()
            if _HEAVY.match(sql):
                found.append(sql)
    return found


def profile(bp: BenchProject, name: str, pg) -> str:
    out = [f"# {name}: {bp.target}"]
    for sql in statements(bp):
        out.append("\n## " + " ".join(sql.split())[:160])
        if bp.target == "duckdb":
            import duckdb

            con = duckdb.connect(str(bp.project.duckdb_path))
            con.execute("begin")
            cpu, started = time.process_time(), time.perf_counter()
            rows = con.execute("explain analyze " + sql).fetchall()
            out.append(f"wall {time.perf_counter() - started:.2f} s, cpu {time.process_time() - cpu:.2f} s")
            out.append(rows[0][1])
            con.execute("rollback")
            con.close()
        else:
            with pg.connect(bp.project.database, autocommit=False) as conn, conn.cursor() as cur:
                cpu = _pg_cpu(pg)
                cur.execute("explain (analyze, buffers) " + sql)
                plan = "\n".join(r[0] for r in cur.fetchall())
                out.append(f"server cpu {_pg_cpu(pg) - cpu:.2f} s")
                out.append(plan)
                conn.rollback()
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["duckdb", "postgres"], default="duckdb")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--packages", required=True, help="name=path,name=path (the first builds the data)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="project folder (DuckDB: kept and reused)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    packages = [(p.split("=", 1)[0], Path(p.split("=", 1)[1]).resolve()) for p in args.packages.split(",")]
    root = args.root or Path(f"/tmp/audsync-diffbuild-{args.target}-{args.n}")
    pg = None
    if args.target == "postgres":
        from tests.support import postgres

        from .__main__ import PG_TUNING

        postgres.SETTINGS.update(PG_TUNING)
        pg = postgres.start_postgres()
        shutil.rmtree(root, ignore_errors=True)
    try:
        bp = BenchProject(root, args.target, pg)
        if pg or not (root / ".diffbuild-ready").exists():
            setup(bp, args.n, packages[0][1])
            (root / ".diffbuild-ready").write_text("")
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in packages}
        print(f"load average {os.getloadavg()[0]:.1f}", flush=True)
        for i in range(args.runs):
            for name, path in packages:
                link(bp, path)
                r = dbt_run(bp, pg)
                results[name].append(r)
                print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
        print(f"load average {os.getloadavg()[0]:.1f}")
        for name, runs in [(k, v) for k, v in results.items() if v]:
            print(f"median {name}: " + ", ".join(
                f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))
        if args.profile:
            for name, path in packages:
                link(bp, path)
                dbt_run(bp, pg)
                report = profile(bp, name, pg)
                (root.parent / f"diffbuild-profile-{args.target}-{args.n}-{name}.txt").write_text(report)
                print(f"profile written: {root.parent}/diffbuild-profile-{args.target}-{args.n}-{name}.txt")
    finally:
        if pg is not None:
            pg.stop()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
