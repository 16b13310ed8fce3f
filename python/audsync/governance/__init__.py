"""Audience governance (``../shared/design/governance.md``): split groups, exclusions,
guardrails before sending, membership history, alerts, and plans for review.

The dbt half lives in ``macros/governance/``; this package is the runner's half. The runner
calls it through a few hook lines marked ``# governance:`` (see :mod:`.hooks`).
"""
