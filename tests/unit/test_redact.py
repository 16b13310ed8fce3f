"""Secret masking in text and in log records."""

from __future__ import annotations

import logging
from urllib.parse import quote, quote_plus

import pytest

from audsync import redact
from audsync.redact import RedactingFilter

SECRET = "p@ss w/rd&x=1"


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test starts and ends with no secret registered."""
    redact.clear_secrets()
    yield
    redact.clear_secrets()


@pytest.fixture
def masked_caplog(caplog):
    """caplog with the redacting filter on its handler, as the CLI puts it on its own."""
    redacting = RedactingFilter()
    caplog.handler.addFilter(redacting)
    caplog.set_level(logging.DEBUG)
    yield caplog
    caplog.handler.removeFilter(redacting)


# -- redact() -----------------------------------------------------------------------------


def test_nothing_registered_leaves_text_alone():
    assert redact.redact(f"value {SECRET}") == f"value {SECRET}"


def test_every_occurrence_masked():
    redact.register_secret(SECRET)
    assert redact.redact(f"a {SECRET} b {SECRET}") == "a **** b ****"


@pytest.mark.parametrize(
    "encoded",
    [quote(SECRET, safe=""), quote(SECRET), quote_plus(SECRET)],
    ids=["quote-safe-none", "quote", "quote_plus"],
)
def test_url_encoded_forms_masked(encoded):
    assert encoded != SECRET  # the test is only meaningful for a secret that encodes
    redact.register_secret(SECRET)
    assert redact.redact(f"GET https://api.example.com/x?token={encoded}&y=2") == (
        "GET https://api.example.com/x?token=****&y=2"
    )


def test_json_escaped_form_masked():
    secret = 'quo"te\\slash'
    redact.register_secret(secret)
    assert redact.redact('{"token": "quo\\"te\\\\slash"}') == '{"token": "****"}'


def test_longer_secret_masked_whole_when_it_contains_another():
    redact.register_secrets(["abcd", "abcdef-123"])
    assert redact.redact("x abcdef-123 y abcd") == "x **** y ****"


def test_short_secret_still_masked():
    redact.register_secret("k9")
    assert redact.redact("key=k9") == "key=****"


def test_empty_and_blank_values_ignored():
    redact.register_secrets(["", "   ", None])
    assert redact.registered_count() == 0
    assert redact.redact("a b  c") == "a b  c"


def test_non_string_secret_and_text():
    redact.register_secret(123456)
    assert redact.redact("pin 123456") == "pin ****"
    assert redact.redact(None) is None
    assert redact.redact("") == ""


def test_clear_forgets():
    redact.register_secret(SECRET)
    redact.clear_secrets()
    assert redact.redact(SECRET) == SECRET


# -- logging ------------------------------------------------------------------------------


def test_secret_in_log_args_masked(masked_caplog):
    redact.register_secret(SECRET)
    logging.getLogger("audsync.test").info("calling with token=%s now", SECRET)
    assert SECRET not in masked_caplog.text
    assert "calling with token=**** now" in masked_caplog.text
    assert masked_caplog.records[0].getMessage() == "calling with token=**** now"


def test_secret_in_log_message_masked(masked_caplog):
    redact.register_secret(SECRET)
    logging.getLogger("audsync.test").warning(f"bad answer for {SECRET}")
    assert SECRET not in masked_caplog.text and "bad answer for ****" in masked_caplog.text


def test_url_encoded_secret_in_log_masked(masked_caplog):
    redact.register_secret(SECRET)
    logging.getLogger("audsync.test").error("GET /x?t=%s failed", quote_plus(SECRET))
    assert quote_plus(SECRET) not in masked_caplog.text
    assert "GET /x?t=**** failed" in masked_caplog.text


def test_secret_in_traceback_masked(masked_caplog):
    redact.register_secret(SECRET)
    try:
        raise RuntimeError(f"auth failed with {SECRET}")
    except RuntimeError:
        logging.getLogger("audsync.test").exception("delivery failed")
    assert "RuntimeError: auth failed with ****" in masked_caplog.text
    assert SECRET not in masked_caplog.text


def test_secret_in_extra_masked(masked_caplog):
    redact.register_secret(SECRET)
    logging.getLogger("audsync.test").info("request", extra={"url": f"https://x/?k={SECRET}"})
    assert masked_caplog.records[0].url == "https://x/?k=****"


def test_secret_registered_after_the_filter_is_masked(masked_caplog):
    logger = logging.getLogger("audsync.test")
    logger.info("before %s", "tok-late-1234")
    redact.register_secret("tok-late-1234")
    logger.info("after %s", "tok-late-1234")
    assert masked_caplog.messages == ["before tok-late-1234", "after ****"]


def test_records_are_never_dropped(masked_caplog):
    redact.register_secret(SECRET)
    logging.getLogger("audsync.test").info("plain line")
    assert masked_caplog.messages == ["plain line"]


def test_without_the_filter_the_secret_would_leak(caplog):
    # Guards the tests above: caplog itself does not mask anything.
    redact.register_secret(SECRET)
    caplog.set_level(logging.INFO)
    logging.getLogger("audsync.test").info("token=%s", SECRET)
    assert SECRET in caplog.text


def test_install_attaches_once_to_root_handlers():
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        redact.install()
        redact.install()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        root.removeHandler(handler)


def test_install_on_given_handler_masks_its_output(capsys):
    handler = logging.StreamHandler()
    redact.install(handler)
    logger = logging.getLogger("audsync.test.install")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        redact.register_secret(SECRET)
        logger.warning("secret is %s", SECRET)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    err = capsys.readouterr().err
    assert "secret is ****" in err and SECRET not in err
