"""A DuckDB session is one transaction: a step that fails midway leaves nothing behind.

Found by the membership-history benchmark: a DuckDB cursor is a connection of its own, and
the session began its transaction on the other one, so every statement autocommitted; a
commit step that ran out of memory after writing the snapshot was retried with an empty plan
(the run recorded 0 rows added and ``S__history`` had no rows for a 1M-member sync).
"""

from __future__ import annotations

from types import SimpleNamespace

import duckdb
import pytest

from audsync.warehouse.duckdb import DuckDBWarehouse


@pytest.fixture
def warehouse(tmp_path):
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as connection:
        connection.execute("create table t (i integer)")
    found = DuckDBWarehouse(SimpleNamespace(path=str(path), settings={}), "test")
    yield found
    found.close()


def count(warehouse) -> int:
    with warehouse.session() as session:
        return int(session.scalar("select count(*) from t"))


def test_a_failed_step_is_rolled_back_and_a_good_one_committed(warehouse):
    with pytest.raises(RuntimeError):
        with warehouse.session() as session:
            session.execute("insert into t values (?)", (1,))
            raise RuntimeError("the step failed after its first write")
    assert count(warehouse) == 0

    def step(session):
        session.execute("insert into t values (?)", (2,))
        attempts.append(1)
        if len(attempts) == 1:
            raise duckdb.OutOfMemoryException("out of memory")  # in_session retries this
        session.execute("insert into t values (?)", (3,))

    attempts: list[int] = []
    warehouse.memory_limit = "10MB"
    warehouse.in_session(step)
    # The first attempt's write was rolled back; the retry wrote both rows once.
    with warehouse.session() as session:
        assert session.fetchall("select i from t order by i") == [(2,), (3,)]
