"""Masking of secrets in everything that leaves the process.

Secrets (tokens, passwords, signing keys) are registered once, when ``destinations.yml`` is
rendered, in a registry for the whole process. From then on:

* :class:`RedactingFilter`, attached to a logging handler, masks them in every record that
  handler emits (message, arguments and traceback);
* :func:`redact` masks them in any other text: exception messages, ``error_message`` columns,
  anything printed.

Each secret is masked as written, URL-encoded (it may travel in a query string that ends up in
an error) and JSON-escaped (it may sit in a request body that is echoed back).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "****"

# Secrets this short match ordinary text by chance ("abc" inside "abcdef"), so masking them
# also masks unrelated words, and a mask in a short word hints at the secret's value. They are
# masked all the same: leaking a short secret is worse than an over-eager mask.
SHORT_SECRET_LENGTH = 4

_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _forms(secret: str) -> set[str]:
    """The ways ``secret`` may be spelled in text: as is, URL-encoded, JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    forms.add(json.dumps(secret)[1:-1])
    forms.add(json.dumps(secret, ensure_ascii=False)[1:-1])
    return {f for f in forms if f}


def register_secret(value: object) -> None:
    """Mask ``value`` wherever text leaves the process from now on.

    ``None`` and values that are empty or only whitespace are ignored: masking them would mask
    every gap between words.
    """
    if value is None:
        return
    text = str(value)
    if not text.strip():
        return
    global _pattern
    with _lock:
        if text not in _secrets:
            _secrets.add(text)
            _pattern = None


def register_secrets(values: Iterable[object]) -> None:
    """Register every value of ``values`` (see :func:`register_secret`)."""
    for value in values:
        register_secret(value)


def clear_secrets() -> None:
    """Forget every registered secret (for tests, and for a process that reloads config)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def registered_count() -> int:
    """How many secrets are registered (never the secrets themselves)."""
    with _lock:
        return len(_secrets)


def _compiled() -> re.Pattern[str] | None:
    """One pattern matching every form of every secret, longest first, rebuilt on change."""
    global _pattern
    with _lock:
        if _pattern is None and _secrets:
            forms: set[str] = set()
            for secret in _secrets:
                forms |= _forms(secret)
            # Longest first, so a secret that contains another is masked whole, not in part.
            ordered = sorted(forms, key=lambda f: (-len(f), f))
            _pattern = re.compile("|".join(re.escape(f) for f in ordered))
        return _pattern


def redact(text: str) -> str:
    """``text`` with every registered secret, in each of its forms, replaced by ``****``.

    Non-string values are converted with ``str``; ``None`` and ``""`` are returned unchanged,
    so a nullable ``error_message`` stays null.
    """
    if not text:
        return text
    if not isinstance(text, str):
        text = str(text)
    pattern = _compiled()
    if pattern is None:
        return text
    return pattern.sub(MASK, text)


# Attributes every LogRecord has; anything else came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class RedactingFilter(logging.Filter):
    """A logging filter that masks registered secrets in each record; it never drops a record.

    Attach it to handlers (``handler.addFilter(RedactingFilter())``) or use
    :func:`install`: a filter on a *logger* only sees records logged to that very logger, not
    those propagated from its children, while a handler's filter sees everything it emits.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask secrets in the record's message, arguments and traceback; keep the record."""
        if _compiled() is None:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string: mask the parts separately
            message = f"{record.msg} {record.args!r}"
        # The message is formatted here and the arguments dropped, so a secret split across
        # the format string and an argument is masked too.
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # Formatters keep a preset ``exc_text`` instead of formatting the exception again.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        # Text passed with ``extra=`` reaches structured (JSON) formatters as is.
        for name, value in list(vars(record).items()):
            if name not in _RECORD_ATTRIBUTES and isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def install(*handlers: logging.Handler) -> RedactingFilter:
    """Attach one :class:`RedactingFilter` to ``handlers`` (default: the root logger's handlers).

    Returns the filter, so the caller can attach it to handlers added later.
    """
    redacting = RedactingFilter()
    targets = handlers or tuple(logging.getLogger().handlers)
    for handler in targets:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(redacting)
    return redacting
