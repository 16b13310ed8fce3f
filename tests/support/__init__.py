"""Test support: a throwaway PostgreSQL cluster and a harness for throwaway dbt projects."""
