"""audsync's benchmark: diff build, delivery and memory, side by side with the alternatives.

Run ``python -m bench --quick`` from the repository root; see ``bench/README.md``.
"""
