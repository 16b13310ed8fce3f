"""profiles.yml read as dbt reads it: env_var, filters, aliases, targets, and clear errors."""

from __future__ import annotations

import pytest

from audsync.errors import ConfigError
from audsync.profiles import load_credentials

PROFILES = """
shop:
  target: "{{ env_var('SHOP_TARGET', 'dev') }}"
  outputs:
    dev:
      type: duckdb
      path: data/shop.duckdb
      settings: {memory_limit: 1GB}
    pg:
      type: postgres
      host: "{{ env_var('SHOP_PGHOST', '127.0.0.1') }}"
      port: "{{ env_var('SHOP_PGPORT', '5433') | as_number }}"
      user: analyst
      pass: "{{ env_var('SHOP_PGPASSWORD') }}"
      dbname: analytics
      schema: marts
      threads: 4
"""


@pytest.fixture
def profiles_dir(tmp_path):
    (tmp_path / "profiles.yml").write_text(PROFILES)
    return tmp_path


def test_duckdb_target_with_the_catalog_named_after_the_file(profiles_dir, monkeypatch):
    monkeypatch.delenv("SHOP_TARGET", raising=False)
    credentials, target = load_credentials(profiles_dir, "shop", None)
    assert target == "dev" and credentials.type == "duckdb"
    assert (credentials.path, credentials.database, credentials.schema) == ("data/shop.duckdb", "shop", "main")
    assert credentials.settings == {"memory_limit": "1GB"}


def test_postgres_target_renders_env_vars_and_takes_dbt_aliases(profiles_dir, monkeypatch):
    monkeypatch.setenv("SHOP_TARGET", "pg")
    monkeypatch.setenv("SHOP_PGPASSWORD", "s3cret-pw")
    credentials, target = load_credentials(profiles_dir, "shop", None)
    assert target == "pg" and credentials.type == "postgres"
    assert (credentials.host, credentials.port, credentials.user) == ("127.0.0.1", 5433, "analyst")
    assert (credentials.database, credentials.schema, credentials.password) == ("analytics", "marts", "s3cret-pw")
    assert credentials.sslmode is None
    assert "s3cret-pw" not in repr(credentials)


def test_missing_env_var_names_the_key_and_variable(profiles_dir, monkeypatch):
    monkeypatch.delenv("SHOP_PGPASSWORD", raising=False)
    with pytest.raises(ConfigError) as error:
        load_credentials(profiles_dir, "shop", "pg")
    assert "SHOP_PGPASSWORD" in error.value.message and "target 'pg'" in error.value.message


@pytest.mark.parametrize("profile,target,words", [
    ("nope", None, ["profile 'nope'", "profiles.yml"]),
    ("shop", "prod", ["target 'prod'", "dev, pg"]),
])
def test_unknown_profile_or_target(profiles_dir, profile, target, words):
    with pytest.raises(ConfigError) as error:
        load_credentials(profiles_dir, profile, target)
    for word in words:
        assert word in error.value.message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no profiles.yml"):
        load_credentials(tmp_path, "shop", None)
