"""The commit record of a checkpoint: a small JSON file written after the data, and only then.

A step directory holds one data object and ``manifest.json``. The manifest names the data object relative
to its own directory (so a step directory can be copied elsewhere as a unit), its size and sha256, and
what produced it.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata

FORMAT_VERSION = 1

_DATA_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Manifest:
    step: int
    data: str  # name of the data object inside the step directory
    size: int
    sha256: str
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    world_size: int = 0
    reason: str = "interval"
    created: float = 0.0  # unix time
    metrics: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and check a manifest; ``ValueError`` with the reason when it is not a valid one."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"manifest is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError("manifest is not a JSON object")
        version = raw.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"manifest has no valid format_version ({version!r})")
        if version > FORMAT_VERSION:
            raise ValueError(f"manifest format_version {version} is newer than this elastic_det supports "
                             f"({FORMAT_VERSION}); upgrade elastic_det")
        _check(raw, "step", int)
        _check(raw, "data", str)
        _check(raw, "size", int)
        _check(raw, "sha256", str)
        if not _DATA_NAME.match(raw["data"]) or raw["data"] in (".", ".."):
            raise ValueError(f"manifest data name {raw['data']!r} is not a plain file name")
        if raw["step"] < 0 or raw["size"] < 0:
            raise ValueError("manifest step and size must be >= 0")
        if not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
            raise ValueError("manifest sha256 is not 64 hex digits")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in raw.items() if k in known}
        try:
            manifest = cls(**values)
            manifest.metrics = {str(k): float(v) for k, v in (manifest.metrics or {}).items()}
            manifest.versions = {str(k): str(v) for k, v in (manifest.versions or {}).items()}
            manifest.world_size = int(manifest.world_size)
            manifest.created = float(manifest.created)
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"manifest has a malformed field ({e})") from None
        return manifest


def _check(raw: dict, key: str, tp: type) -> None:
    value = raw.get(key)
    if not isinstance(value, tp) or isinstance(value, bool):
        raise ValueError(f"manifest field '{key}' is missing or not {tp.__name__} ({value!r})")


@cache
def versions() -> dict[str, str]:
    """Versions recorded in every manifest (read from package metadata: no imports)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "elastic_det"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out
