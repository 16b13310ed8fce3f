"""Integration fixtures: each test starts with no secrets registered for redaction, as a
fresh ``audsync`` process would."""

import pytest

from audsync import redact


@pytest.fixture(autouse=True)
def fresh_secret_registry():
    redact.clear_secrets()
    yield
    redact.clear_secrets()
