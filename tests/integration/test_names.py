"""The names shared by the dbt package and the runner are spelled once for each side
(``macros/_names.sql`` and ``python/audsync/names.py``, style.md "one home"); this test holds
the two spellings together, so that a suffix or system column changed on one side only fails
here rather than as a missing relation in a run."""

from __future__ import annotations

import json

from audsync import names
from tests.support.dbt_project import DbtProject

MARK = "AUDSYNC_NAMES "
PRINT_MACRO = (
    "{% macro print_audsync_names() %}\n"
    f"  {{% do log('{MARK}' ~ tojson(audsync.audsync_names()), info=True) %}}\n"
    "{% endmacro %}\n"
)


def macro_names(tmp_path) -> dict:
    """``audsync.audsync_names()`` as dbt renders it, read back through a run-operation."""
    project = DbtProject(tmp_path / "names", "duckdb")
    project.write_file("macros/print_audsync_names.sql", PRINT_MACRO)
    result = project.dbt("run-operation", "print_audsync_names")
    lines = [line.split(MARK, 1)[1] for line in result.log if MARK in line]
    assert len(lines) == 1, result.log_text
    return json.loads(lines[0])


def test_the_macros_and_python_spell_the_shared_names_alike(tmp_path):
    spelled = macro_names(tmp_path)
    python = {
        "key": names.KEY, "hash": names.HASH, "op": names.OP, "synced_at": names.SYNCED_AT,
        "run_id": names.RUN_ID, "destination_id": names.DESTINATION_ID, "seq": names.SEQ,
        "send": names.SEND, "reason": names.REASON,
        "suffixes": names.SUFFIXES,
        "governance_suffixes": names.GOVERNANCE_SUFFIXES,
        "rewrite_suffixes": names.REWRITE_SUFFIXES,
        "ops": list(names.OPS), "modes": list(names.MODES), "mode_aliases": names.MODE_ALIASES,
        "mode_sends": {mode: sorted(sends) for mode, sends in names.MODE_SENDS.items()},
    }
    spelled["mode_sends"] = {mode: sorted(sends) for mode, sends in spelled["mode_sends"].items()}
    # Every name of either side is on the other, with the same spelling.
    assert spelled == python
