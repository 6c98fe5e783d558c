"""Credentials never leave the process: how configs are redacted before they are written or compared.

Credentials may be given in ``checkpoint.storage_options`` (or any other ``storage_options`` mapping); they
reach s3fs only. Everything that is written (``config.yaml``, every checkpoint's config text), logged or
compared (the ``resume`` event's list of changed keys) goes through :func:`redact` first.
"""

from __future__ import annotations

from typing import Any

REDACTED = "<redacted>"
_SECRET_WORDS = frozenset({"key", "secret", "token", "password", "passwd", "credential", "credentials",
                           "signature", "auth", "authorization"})


def is_secret_key(name: str) -> bool:
    """A mapping key that holds a credential (``key``, ``secret``, ``aws_secret_access_key``, ``token``, ...)."""
    words = name.lower().replace("-", "_").split("_")
    return any(w in _SECRET_WORDS for w in words)


def redact(value: Any) -> Any:
    """``value`` with every credential inside ``storage_options`` mappings replaced by ``<redacted>``."""
    if isinstance(value, dict):
        return {k: (_redact_options(v) if k == "storage_options" else redact(v)) for k, v in value.items()}
    return value


def _redact_options(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else _redact_options(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_options(v) for v in value]
    return value
