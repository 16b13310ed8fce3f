"""Tests of audsync: the dbt package and the runner, against real warehouses."""
