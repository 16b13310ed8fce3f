"""Integration tests: real dbt runs against DuckDB and PostgreSQL."""
