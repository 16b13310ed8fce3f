"""Unit tests of the governance pieces that need no warehouse: the guardrail verdicts, the
split reference, the alert texts' scrubbing and rules, the Markdown plan."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from audsync.governance import alerts
from audsync.governance.commands import markdown_plan
from audsync.governance.config import Guardrails
from audsync.governance.guardrails import evaluate
from audsync.governance.splits import bucket, group_of
from audsync.redact import clear_secrets, register_secret


def test_an_emptied_audience_is_blocked_unless_allowed():
    verdict = evaluate(0, 20, 0, held=20, audience=0, limits=Guardrails())
    assert verdict.blocked and "audience is empty" in verdict.reasons[0]
    assert not evaluate(0, 20, 0, 20, 0, Guardrails(allow_empty=True)).blocked


@pytest.mark.parametrize("removes, held, min_rows, blocked", [
    (60, 100, 10, True),     # 60% > 50%
    (50, 100, 10, False),    # exactly the limit passes
    (60, 100, 100, False),   # not above guard_min_rows
    (101, 150, 100, True),
])
def test_max_removals_pct_above_guard_min_rows(removes, held, min_rows, blocked):
    verdict = evaluate(0, removes, 0, held, held - removes, Guardrails(guard_min_rows=min_rows))
    assert verdict.blocked is blocked


def test_absolute_and_change_limits_and_the_initial_sync():
    assert evaluate(0, 4, 0, 100, 96, Guardrails(max_removals=3)).reasons == (
        "the run would remove 4 members, above max_removals 3",)
    assert evaluate(30, 0, 0, 10, 40, Guardrails(max_changes_pct=100, guard_min_rows=5)).blocked
    # An initial sync (nothing held) is never blocked by a share.
    assert not evaluate(1000, 0, 0, 0, 1000, Guardrails(max_changes_pct=1, guard_min_rows=0)).blocked


def test_split_reference():
    # bucket = int(first 8 hex digits of md5("s:abc"), 16) mod 10000
    import hashlib

    digest = hashlib.md5(b"s:abc").hexdigest()
    assert bucket("s", "abc") == int(digest[:8], 16) % 10000 == 2162  # DuckDB's own answer
    groups = [("t", 21.62), ("h", 78.38)]
    assert group_of("s", "abc", groups) == "h"  # 2162 is the first bucket of h
    assert group_of("s", "abc", [("t", 21.63), ("h", 78.37)]) == "t"
    with pytest.raises(ValueError, match="sum to 20"):
        group_of("s", "abc", [("t", 10), ("h", 10)])


def test_scrub_masks_secrets_and_member_data():
    clear_secrets()
    register_secret("s3cr3t-token-value")
    try:
        text = alerts.scrub("HTTP 400 for ann@example.com with token s3cr3t-token-value " + "x" * 400)
        assert "ann@example.com" not in text and "s3cr3t-token-value" not in text
        assert "<member>" in text and len(text) == 300
    finally:
        clear_secrets()


def _result(status="success", sent=10, failed=0):
    planned = SimpleNamespace(sent=sent)
    committed = SimpleNamespace(failed=failed)
    return SimpleNamespace(status=status, run_id="R1", planned=planned, committed=committed,
                           error_message="blocked by a guardrail: x.")


def test_rules_fire_on_their_numbers():
    sync = SimpleNamespace(name="S")
    rate = alerts.Rule(("row_failure_rate",), ("c",), above=0.2)
    assert alerts.fired(rate, sync, _result(failed=2), 10, []) is None
    assert alerts.fired(rate, sync, _result(failed=3), 10, []) == (
        "[audsync] S: run R1 had 3 of 10 rows rejected (30.0%, above 20.0%). Next: see audsync_row_errors for run R1.")
    size = alerts.Rule(("size_change",), ("c",), above=0.3, runs=2)
    assert alerts.fired(size, sync, _result(), 12, [10, 10, 1000]) is None
    assert "-50.0% against the mean 20 of the last 2 run(s)" in alerts.fired(size, sync, _result(), 10, [20, 20, 1])
    assert alerts.fired(size, sync, _result(), 10, []) is None  # no history yet
    status = alerts.Rule(("error", "blocked"), ("c",))
    assert alerts.fired(status, sync, _result("success"), 10, []) is None
    assert alerts.fired(status, sync, _result("blocked"), 10, []).startswith("[audsync] S: run R1 ended blocked.")


def test_markdown_plan_escapes_cells():
    sync = SimpleNamespace(name="S", mode="mirror", destination="d")
    counts = SimpleNamespace(adds=1, removes=0, updates=0, recorded=0)
    verdict = evaluate(1, 0, 0, 0, 1, Guardrails())
    text = markdown_plan(sync, counts, verdict, [{"op": "add", "key": "a|b", "fields": {"x": "1\n2"}}])
    assert "| add | a\\|b | {'x': '1\\n2'} |" in text or "| add | a\\|b |" in text
    assert "guardrails: **✅ pass**" in text and "| add | 1 |" in text
