"""The split-group formula in Python: the reference the warehouses' macro is tested against.

``bucket = int(first 8 hex digits of md5(salt || ':' || key), 16) mod 10000``; group ``i``
of a split takes buckets ``[sum of the percents before it, that + its percent) * 100``.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

BUCKETS = 10_000


def bucket(salt: str, key: str) -> int:
    """The bucket (0..9999) of ``key`` under ``salt``."""
    digest = hashlib.md5(f"{salt}:{key}".encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % BUCKETS


def group_of(salt: str, key: str, groups: Sequence[tuple[str, float]]) -> str:
    """The group of ``key`` among ``groups`` ((name, percent), in order, summing to 100)."""
    position = bucket(salt, key)
    low = 0
    for name, percent in groups:
        high = low + round(percent * 100)
        if low <= position < high:
            return name
        low = high
    raise ValueError(f"the groups' percents sum to {low / 100}; expected 100")
