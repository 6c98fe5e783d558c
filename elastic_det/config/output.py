"""The config as output: plain data, YAML and a hash (credentials redacted), and the difference of two
configs. Works on any config dataclass (it names YAML keys by the ``key`` metadata of a field)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from omegaconf import OmegaConf

from .redaction import redact


def yaml_key(f: dataclasses.Field) -> str:
    """The YAML name of a config field (``checkpoint.async`` is ``async_save`` in Python)."""
    return f.metadata.get("key", f.name)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain data, with YAML key names (``checkpoint.async``). Holds credentials: use
    :func:`to_public_dict` for anything that is written, logged or compared."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[yaml_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def to_public_dict(cfg: Any) -> dict[str, Any]:
    """``to_dict`` with credentials redacted: what config.yaml, checkpoints and events may hold."""
    return redact(to_dict(cfg))


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, credentials redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(to_public_dict(cfg)))


def config_hash(cfg: Any) -> str:
    """A short hash of the resolved config (credentials left out), stored in every checkpoint manifest."""
    text = json.dumps(to_public_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two configs as plain data, as ``key: old -> new`` lines.

    Both sides are redacted first, so a changed credential shows as a change without its value."""
    old, new = redact(old), redact(new)
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines
