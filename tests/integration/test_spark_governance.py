"""Governance on Spark: a member's split bucket is the Python reference's, as on every
warehouse (``spark__split_bucket``: Spark 4's ANSI mode refuses the default's cast of
0x-prefixed text, so the hex digits are read by ``conv``).

Marked ``spark`` like ``test_spark.py``: runs with ``--warehouses spark`` on the session's
Thrift server.
"""

from __future__ import annotations

import pytest

from audsync.governance.splits import bucket, group_of
from tests.support.dbt_project import DbtProject

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]

SALT = "hv-2026-q4"
SPLITS = {"hv_q4": {"salt": SALT, "groups": [{"name": "treatment", "percent": 80},
                                             {"name": "holdout", "percent": 20}]}}
KEYS = 20_000

# The keys made in Spark SQL: the warehouse's own text for each key.
KEYS_MODEL = f"""
with k as (select concat('user-', cast(id as string), '@example.com') as email from range({KEYS}))
select email,
       {{{{ audsync.split_bucket(audsync._split_key('email'), '{SALT}') }}}} as bucket,
       {{{{ audsync.split_group('email', 'hv_q4') }}}} as hv_group
from k
"""


def test_split_buckets_on_spark_are_the_python_reference(spark_server, tmp_path):
    project = DbtProject(tmp_path / "proj", "spark", spark=spark_server, vars={"audsync_splits": SPLITS})
    try:
        project.write_model("split_keys", KEYS_MODEL)
        project.dbt("run", "--select", "split_keys")
        rows = project.query(f"select email, bucket, hv_group from {project.relation('split_keys')}")
    finally:
        spark_server.drop_schema(project.schema)
    assert len(rows) == KEYS
    groups = [("treatment", 80), ("holdout", 20)]
    mismatched = [r for r in rows if r[1] != bucket(SALT, r[0]) or r[2] != group_of(SALT, r[0], groups)]
    assert mismatched == [], mismatched[:5]
    share = sum(1 for r in rows if r[2] == "treatment") / KEYS
    assert abs(share - 0.80) < 0.02, share
