import pytest

# The shared connector helpers assert on what the fakes hold: rewritten, their failures show
# the values, as assertions in the test modules do.
pytest.register_assert_rewrite("tests.unit._connector_helpers")
