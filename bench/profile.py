"""Profile one ``audsync run`` with py-spy: where the runner's time goes, as a flat table.

    python -m bench.profile [--n 1000000] [--target duckdb] [--kind initial|incremental|nochange]

Builds the benchmark project at N members, records ``audsync run S`` with ``py-spy record``
(``--threads --idle``, from bench/.venv-peers) and prints the functions with the most samples:
self time (the frame on top) and total (anywhere on the stack), in the calling thread and in the
sender threads. The summary is kept in ``bench/results/profile-<kind>-<n>.txt``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
from pathlib import Path

from . import peers
from .receiver import Receiver
from .warehouse import ENV, SYNC, BenchProject

RESULTS = Path(__file__).resolve().parent / "results"


IDLE_LEAVES = ("_worker (concurrent/futures/thread.py:81)", "Condition.wait", "SocketIO.readinto")
"""Leaf frames of a thread that waits: a sender with no batch, the heartbeat, an HTTP answer."""


def flat(collapsed: Path, top: int = 15) -> str:
    """The calling thread's samples by its deepest audsync frames, and the senders' active ones."""
    main: collections.Counter[str] = collections.Counter()
    work: collections.Counter[str] = collections.Counter()
    n_main = n_work = n_idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n, frames = int(count), stack.split(";")
        ours = [f.split(" (")[0] for f in frames if "audsync/" in f]
        if "MainThread" in frames[0]:
            n_main += n
            main[" > ".join(ours[-3:]) or frames[-1]] += n
        elif frames[-1].startswith(IDLE_LEAVES):
            n_idle += n
        else:
            n_work += n
            work[" > ".join(ours[-2:]) + " | " + frames[-1].split(" (")[0]] += n
    out = [f"calling thread: {n_main} samples (200 Hz), by its deepest audsync frames:"]
    out += [f"  {100 * c / max(n_main, 1):5.1f}%  {f}" for f, c in main.most_common(top)]
    out += ["", f"sender threads: {n_work} active samples ({n_idle} waiting), by frame:"]
    out += [f"  {100 * c / max(n_work, 1):5.1f}%  {f}" for f, c in work.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--target", default="duckdb", choices=["duckdb"])
    parser.add_argument("--kind", default="initial", choices=["initial", "incremental", "nochange"])
    args = parser.parse_args(argv)
    bin_dir = peers.ensure_peers_venv()
    workdir = Path(tempfile.mkdtemp(prefix="audsync-prof-"))
    try:
        bp = BenchProject(workdir / "p", args.target)
        bp.generate(args.n)
        with Receiver() as receiver:
            bp.write_sync(receiver.url)
            bp.dbt("run")
            if args.kind != "initial":
                bp.audsync("run", SYNC)
                if args.kind == "incremental":
                    bp.flip()
                    bp.dbt("run", "--select", SYNC)
            out = workdir / "profile.txt"
            subprocess.run([str(bin_dir / "py-spy"), "record", "--threads", "--idle", "--rate", "200",
                            "--format", "raw", "-o", str(out), "--", *map(str, bp.audsync_argv("run", SYNC))],
                           cwd=bp.root, env={**__import__("os").environ, **ENV}, check=True,
                           stdout=subprocess.DEVNULL)
        text = flat(out)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"profile-{args.kind}-{args.n}.txt").write_text(text + "\n")
        print(text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
