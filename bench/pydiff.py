"""The plain Python diff peer: load both sides into dicts and compare them.

Run as a child process so that its time and peak memory are its own::

    python -m bench.pydiff duckdb <file> <old_table> <new_table>
    python -m bench.pydiff postgres "<dsn>" <old_table> <new_table>

Prints one JSON line: adds, removes, updates and the seconds spent loading and comparing.
"""

from __future__ import annotations

import json
import sys
import time


def _load(target: str, where: str, table: str) -> dict[str, tuple]:
    sql = f"select email, first_name, country, ltv from {table}"
    if target == "duckdb":
        import duckdb

        con = duckdb.connect(where, read_only=True)
        try:
            rows = con.execute(sql).fetchall()
        finally:
            con.close()
    else:
        import psycopg2

        con = psycopg2.connect(where)
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                rows = cur.fetchall()
        finally:
            con.close()
    members = {row[0]: row[1:] for row in rows}
    del rows
    return members


def main(argv: list[str]) -> int:
    target, where, old_table, new_table = argv
    started = time.perf_counter()
    old = _load(target, where, old_table)
    new = _load(target, where, new_table)
    loaded = time.perf_counter()
    adds = [k for k in new if k not in old]
    removes = [k for k in old if k not in new]
    updates = [k for k, v in new.items() if k in old and old[k] != v]
    done = time.perf_counter()
    print(json.dumps({"adds": len(adds), "removes": len(removes), "updates": len(updates),
                      "load_s": loaded - started, "compare_s": done - loaded}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
