"""destinations.yml loading, the connector registry and the CLI errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from audsync import redact
from audsync.config import (
    check_destinations,
    find_destinations_file,
    load_destinations,
)
from audsync.destinations import registry
from audsync.destinations.base import BatchResult, ConfigKey, Connector, SyncInfo
from audsync.errors import (
    AudsyncError,
    ConfigError,
    LockHeld,
    PartialFailure,
    RunFailed,
)

SECRET = "tok-S3cr3t-value-9f8e"


class DummyConnector(Connector):
    """A connector registered at test time, so these tests need no real connector."""

    type = "dummy"
    description = "a connector for tests"
    config_keys = (
        ConfigKey("url", "where to send", required=True),
        ConfigKey("token", "the API token", required=True, secret=True),
        ConfigKey("list_id", "the list to fill", default="main"),
    )

    def send_batch(self, batch):
        return BatchResult()


@pytest.fixture(autouse=True)
def dummy_type():
    """Register the dummy type for each test, and forget secrets afterwards."""
    registry.register("dummy", DummyConnector, replace=True)
    yield
    registry.unregister("dummy")
    redact.clear_secrets()


def write(tmp_path: Path, text: str) -> Path:
    """Write a destinations file and return its path."""
    path = tmp_path / "destinations.yml"
    path.write_text(textwrap.dedent(text))
    return path


VALID = """
    hook:
      type: dummy
      url: https://example.com/in
      token: "{{ env_var('HOOK_TOKEN') }}"
"""


# -- env_var rendering --------------------------------------------------------------------


def test_env_var_renders_from_given_environment(tmp_path):
    loaded = load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})
    assert loaded["hook"].settings["token"] == SECRET


def test_env_var_reads_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "from-os-environ")
    loaded = load_destinations(write(tmp_path, VALID))
    assert loaded["hook"].settings["token"] == "from-os-environ"


def test_env_var_default_used_when_unset_and_ignored_when_set(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: "{{ env_var('HOOK_URL', 'https://default.example/in') }}"
          token: t0ken-value
        """,
    )
    assert load_destinations(path, env={})["hook"].settings["url"] == "https://default.example/in"
    set_url = load_destinations(path, env={"HOOK_URL": "https://set.example"})
    assert set_url["hook"].settings["url"] == "https://set.example"


def test_missing_env_var_names_destination_key_and_variable(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_destinations(write(tmp_path, VALID), env={})
    message = caught.value.message
    assert "'hook'" in message and "'token'" in message and "'HOOK_TOKEN'" in message
    assert caught.value.exit_code == 2
    assert (caught.value.destination, caught.value.key) == ("hook", "token")


def test_env_var_in_nested_values_and_numbers_coerced(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: https://example.com
          token: t0ken-value
          batch_size: "{{ env_var('BATCH', '250') }}"
          rate_limit: "2.5"
        """,
    )
    settings = load_destinations(path, env={})["hook"].settings
    assert settings["batch_size"] == 250 and isinstance(settings["batch_size"], int)
    assert settings["rate_limit"] == 2.5


def test_defaults_filled_and_type_kept_out_of_settings(tmp_path):
    loaded = load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})["hook"]
    assert loaded.type == "dummy"
    assert loaded.connector is DummyConnector
    assert "type" not in loaded.settings
    assert loaded.settings["list_id"] == "main"
    assert loaded.settings["timeout_s"] == 30.0 and loaded.settings["max_retries"] == 5


def test_undefined_name_in_template_is_an_error(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: "{{ not_a_function }}"
          token: t0ken-value
        """,
    )
    with pytest.raises(ConfigError, match=r"destination 'hook', key 'url'.*not_a_function"):
        load_destinations(path, env={})


def test_sandbox_refuses_python_internals(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: "{{ ''.__class__.__mro__ }}"
          token: t0ken-value
        """,
    )
    with pytest.raises(ConfigError, match=r"key 'url'"):
        load_destinations(path, env={})


# -- finding the file ---------------------------------------------------------------------


def test_find_prefers_explicit_then_env_then_project_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("AUDSYNC_DESTINATIONS", raising=False)
    assert find_destinations_file(tmp_path) == tmp_path / "destinations.yml"
    monkeypatch.setenv("AUDSYNC_DESTINATIONS", str(tmp_path / "from_env.yml"))
    assert find_destinations_file(tmp_path) == tmp_path / "from_env.yml"
    assert find_destinations_file(tmp_path, tmp_path / "x.yml") == tmp_path / "x.yml"


def test_missing_file_says_where_it_looked_and_how_to_point_elsewhere(tmp_path):
    missing = tmp_path / "nope" / "destinations.yml"
    with pytest.raises(ConfigError) as caught:
        load_destinations(missing)
    message = caught.value.message
    assert str(missing) in message
    assert "--destinations" in message and "AUDSYNC_DESTINATIONS" in message
    assert caught.value.exit_code == 2


# -- validation messages ------------------------------------------------------------------


def test_file_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of destination names"):
        load_destinations(write(tmp_path, "- hook\n- other\n"))


def test_destination_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"destination 'hook': expected a mapping"):
        load_destinations(write(tmp_path, "hook: just-a-string\n"))


def test_empty_file_has_no_destinations(tmp_path):
    assert load_destinations(write(tmp_path, "")) == {}


def test_missing_type_lists_known_types(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_destinations(write(tmp_path, "hook:\n  url: https://x\n"))
    assert "destination 'hook', key 'type': missing" in caught.value.message
    assert "dummy" in caught.value.message and "webhook" in caught.value.message


def test_unknown_type_lists_known_types_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_destinations(write(tmp_path, "hook:\n  type: dumy\n"))
    message = caught.value.message
    assert "destination 'hook', key 'type'" in message and "'dumy'" in message
    assert "did you mean 'dummy'?" in message
    for known in ("webhook", "file", "braze", "klaviyo_list"):
        assert known in message


def test_reserved_type_without_module_is_a_clear_error(tmp_path):
    registry.register("future_tool", "audsync.destinations.no_such_module:FutureConnector")
    try:
        with pytest.raises(ConfigError) as caught:
            load_destinations(write(tmp_path, "hook:\n  type: future_tool\n"))
    finally:
        registry.unregister("future_tool")
    message = caught.value.message
    assert "destination 'hook', key 'type'" in message
    assert "not available" in message and "audsync.destinations.no_such_module" in message


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "hook:\n  type: dummy\n  token: t0ken-value\n")
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    assert caught.value.message.startswith("destination 'hook', key 'url': missing")
    assert caught.value.key == "url"


def test_required_key_rendered_empty(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: https://x
          token: "{{ env_var('HOOK_TOKEN', '') }}"
        """,
    )
    with pytest.raises(ConfigError, match=r"destination 'hook', key 'token': empty"):
        load_destinations(path, env={})


def test_unknown_key_suggests_closest(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: https://x
          token: t0ken-value
          batch_sise: 10
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    message = caught.value.message
    assert "destination 'hook', key 'batch_sise': unknown key" in message
    assert "did you mean 'batch_size'?" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("batch_size", "0", "a positive integer"),
        ("batch_size", "-5", "a positive integer"),
        ("batch_size", "2.5", "a positive integer"),
        ("batch_size", "lots", "a positive integer"),
        ("batch_size", "true", "a positive integer"),
        ("max_concurrency", "0", "a positive integer"),
        ("rate_limit", "0", "a positive number"),
        ("rate_limit", "fast", "a positive number"),
        ("timeout_s", "-1", "a positive number"),
        ("timeout_s", ".nan", "a positive number"),
        ("max_retries", "-1", "an integer of 0 or more"),
        ("max_retries", "1.5", "an integer of 0 or more"),
    ],
)
def test_wrong_numbers(tmp_path, key, value, expected):
    path = write(tmp_path, f"hook:\n  type: dummy\n  url: x\n  token: t0ken\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    assert caught.value.message.startswith(f"destination 'hook', key '{key}': must be {expected}")


def test_good_numbers_accepted(tmp_path):
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: x
          token: t0ken
          batch_size: 100
          max_concurrency: 2
          rate_limit: 0.5
          timeout_s: 3
          max_retries: 0
        """,
    )
    settings = load_destinations(path)["hook"].settings
    assert (settings["batch_size"], settings["max_concurrency"]) == (100, 2)
    assert (settings["rate_limit"], settings["timeout_s"], settings["max_retries"]) == (0.5, 3, 0)


def test_duplicate_destination_is_an_error(tmp_path):
    path = write(tmp_path, "hook:\n  type: dummy\nother: {}\nhook:\n  type: dummy\n")
    with pytest.raises(ConfigError, match=r"line 4.*'hook' is defined twice \(first at line 1\)"):
        load_destinations(path)


def test_yaml_merge_keys_still_work(tmp_path):
    path = write(
        tmp_path,
        """
        base: &base
          type: dummy
          url: https://x
          token: t0ken
        hook:
          <<: *base
          url: https://y
        """,
    )
    assert load_destinations(path)["hook"].settings["url"] == "https://y"


# -- secrets ------------------------------------------------------------------------------


def test_secret_values_lists_only_secret_keys(tmp_path):
    loaded = load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})["hook"]
    assert loaded.secret_values() == [SECRET]


def test_repr_never_shows_settings(tmp_path):
    loaded = load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})["hook"]
    assert SECRET not in repr(loaded) and "hook" in repr(loaded)


def test_loading_registers_secrets_for_redaction(tmp_path):
    load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})
    assert redact.redact(f"Authorization: Bearer {SECRET}") == "Authorization: Bearer ****"


def test_errors_about_a_destination_never_show_its_secret(tmp_path, monkeypatch):
    # Registration is switched off so that the messages themselves are shown to be clean,
    # not merely masked afterwards.
    monkeypatch.setattr(redact, "register_secrets", lambda values: None)
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          token: "{{ env_var('HOOK_TOKEN') }}"
          tokn: "{{ env_var('HOOK_TOKEN') }}"
          batch_size: nope
        """,
    )
    result = check_destinations(path, env={"HOOK_TOKEN": SECRET})
    assert len(result.errors) == 3  # missing url, unknown key tokn, bad batch_size
    for error in result.errors:
        assert SECRET not in error.message
        assert "'hook'" in error.message


def test_template_error_in_secret_key_does_not_quote_it(tmp_path):
    # A secret written in clear with a stray brace: Jinja's message could quote it.
    path = write(
        tmp_path,
        """
        hook:
          type: dummy
          url: https://x
          token: "sk_live_{{ abc secretpart }}"
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    assert "destination 'hook', key 'token'" in caught.value.message
    assert "secretpart" not in caught.value.message and "sk_live" not in caught.value.message


def test_template_error_in_plain_key_gives_jinja_detail(tmp_path):
    path = write(tmp_path, 'hook:\n  type: dummy\n  token: t0ken\n  url: "{{ abc def }}"\n')
    with pytest.raises(ConfigError, match=r"key 'url'.*got 'def'"):
        load_destinations(path)


def test_yaml_error_does_not_quote_the_line(tmp_path):
    path = write(tmp_path, 'hook:\n  type: dummy\n  token: "sk_live_abc\n  url: [\n')
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    assert "invalid YAML" in caught.value.message
    assert "sk_live_abc" not in caught.value.message


# -- check mode ---------------------------------------------------------------------------


def test_check_collects_every_problem(tmp_path):
    path = write(
        tmp_path,
        """
        good:
          type: dummy
          url: https://x
          token: t0ken
        bad_type:
          type: nonsense
          secret: "{{ env_var('UNSET_ONE') }}"
        bad_keys:
          type: dummy
          token: "{{ env_var('UNSET_TWO') }}"
          urll: https://x
          max_retries: -2
        not_a_mapping: 12
        """,
    )
    result = check_destinations(path, env={})
    found = {(e.destination, e.key) for e in result.errors}
    assert found == {
        ("bad_type", "type"),
        ("bad_type", "secret"),
        ("bad_keys", "token"),
        ("bad_keys", "urll"),
        ("bad_keys", "url"),
        ("bad_keys", "max_retries"),
        ("not_a_mapping", None),
    }
    assert list(result.destinations) == ["good"]
    assert all(isinstance(e, ConfigError) for e in result.errors)


def test_check_reports_missing_file_as_one_error(tmp_path):
    result = check_destinations(tmp_path / "absent.yml")
    assert len(result.errors) == 1 and "absent.yml" in result.errors[0].message
    assert result.destinations == {}


def test_load_stops_at_first_problem(tmp_path):
    path = write(tmp_path, "a:\n  type: nonsense\nb:\n  type: nonsense\n")
    with pytest.raises(ConfigError) as caught:
        load_destinations(path)
    assert caught.value.destination == "a"


def test_create_connector_passes_settings(tmp_path):
    loaded = load_destinations(write(tmp_path, VALID), env={"HOOK_TOKEN": SECRET})["hook"]
    sync = SyncInfo(name="s", mode="mirror", run_id="r1", identifier="email", fields=())
    connector = loaded.create_connector(sync, http=None)
    assert isinstance(connector, DummyConnector)
    assert connector.name == "hook" and connector.settings["token"] == SECRET


# -- the registry -------------------------------------------------------------------------


def test_known_types_include_reserved_ones():
    known = registry.known_types()
    for name in (
        "webhook",
        "file",
        "facebook_custom_audience",
        "google_customer_match",
        "hubspot_list",
        "salesforce_campaign",
        "braze",
        "mailchimp",
        "klaviyo_list",
    ):
        assert name in known
    assert list(known) == sorted(known)


def test_alias_from_the_contract_example_resolves():
    assert registry.resolve_type("google_ads_customer_match") == "google_customer_match"
    assert registry.resolve_type("no_such_type") is None


def test_get_connector_unknown_type():
    with pytest.raises(ConfigError, match=r"unknown destination type 'nope'; known types: .*dummy"):
        registry.get_connector("nope")


def test_get_connector_imports_lazily(tmp_path, monkeypatch):
    module = tmp_path / "lazy_connector_mod.py"
    module.write_text(
        "from audsync.destinations.base import Connector\n"
        "class LazyConnector(Connector):\n    type = 'lazy'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register("lazy", "lazy_connector_mod:LazyConnector")
    try:
        assert "lazy_connector_mod" not in sys.modules
        connector = registry.get_connector("lazy")
        assert connector.__name__ == "LazyConnector"
        assert "lazy_connector_mod" in sys.modules
    finally:
        registry.unregister("lazy")
        sys.modules.pop("lazy_connector_mod", None)


def test_get_connector_missing_class(tmp_path, monkeypatch):
    (tmp_path / "empty_connector_mod.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register("empty", "empty_connector_mod:Nothing")
    try:
        with pytest.raises(ConfigError, match="has no Connector class Nothing"):
            registry.get_connector("empty")
    finally:
        registry.unregister("empty")
        sys.modules.pop("empty_connector_mod", None)


def test_get_connector_missing_third_party_dependency(tmp_path, monkeypatch):
    (tmp_path / "needy_connector_mod.py").write_text("import some_sdk_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.register("needy", "needy_connector_mod:Needy")
    try:
        with pytest.raises(ConfigError, match="needs the Python package 'some_sdk_that_is_not"):
            registry.get_connector("needy")
    finally:
        registry.unregister("needy")


def test_register_refuses_duplicates_and_bad_targets():
    with pytest.raises(ValueError, match="registered already"):
        registry.register("dummy", DummyConnector)
    with pytest.raises(ValueError, match="module:Class"):
        registry.register("other", "no_colon_here")
    with pytest.raises(ValueError, match="Connector subclass"):
        registry.register("other", dict)
    assert "other" not in registry.known_types()


def test_unregister_restores_builtin():
    registry.register("webhook", DummyConnector, replace=True)
    registry.unregister("webhook")
    assert "webhook" in registry.known_types()
    assert registry._registry["webhook"] == "audsync.destinations.webhook:WebhookConnector"


def test_describe_all():
    described = {entry["type"]: entry for entry in registry.describe_all()}
    dummy = described["dummy"]
    assert dummy["available"] is True and dummy["description"] == "a connector for tests"
    keys = {k["name"]: k for k in dummy["keys"]}
    assert keys["token"]["secret"] is True and keys["token"]["required"] is True
    assert keys["list_id"]["default"] == "main" and keys["list_id"]["common"] is False
    assert keys["batch_size"]["common"] is True
    assert set(described) == set(registry.known_types())


def test_importing_the_registry_imports_no_connector():
    code = (
        "import sys, audsync.destinations.registry as r; r.known_types(); "
        "print([m for m in sys.modules if m.startswith('audsync.destinations.')"
        " and m not in ('audsync.destinations.registry', 'audsync.destinations.base')])"
    )
    env_path = str(Path(__file__).resolve().parents[2] / "python")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": env_path},
        check=True,
    )
    assert out.stdout.strip() == "[]"


# -- the CLI errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad key"), 2),
        (RunFailed("warehouse down"), 1),
        (LockHeld.for_run("s", "run-1"), 1),
        (PartialFailure("3 rows rejected", rows_failed=3), 3),
    ],
)
def test_errors_exit_with_their_code(error, code):
    @click.command()
    def fail():
        raise error

    result = CliRunner().invoke(fail)
    assert isinstance(error, (AudsyncError, click.ClickException))
    assert result.exit_code == code
    assert error.message in result.output


def test_lock_held_names_the_holder():
    error = LockHeld.for_run("high_value", "run-42", heartbeat_at="2026-01-01T00:00:00Z")
    assert "'high_value'" in error.message and "run-42" in error.message
    assert error.holder_run_id == "run-42"


def test_error_messages_are_redacted():
    redact.register_secret(SECRET)
    assert SECRET not in str(RunFailed(f"request to https://x?key={SECRET} failed"))
