"""The commit record of a checkpoint: a small JSON file written after the data, and only then.

A step directory holds one data object and ``manifest.json``. The manifest names the data object relative
to its own directory (so a step directory can be copied elsewhere as a unit), its size and digest, and
what produced it.

Format 2 records the digest as ``hash_alg`` + ``digest`` (new checkpoints: ``crc32/zip``, see
:mod:`elastic_det.storage.hashing`); format 1 recorded a ``sha256`` field, and such manifests are still read
and verified with sha256.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata

from ..storage.hashing import HASH_ALGS, SHA256, check_digest

FORMAT_VERSION = 2

_DATA_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class Manifest:
    step: int
    data: str  # name of the data object inside the step directory
    size: int
    sha256: str = field(default="", compare=False, repr=False)  # format 1's digest: hash_alg sha256
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    world_size: int = 0
    reason: str = "interval"
    created: float = 0.0  # unix time
    metrics: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    hash_alg: str = ""  # how ``digest`` was computed over the data object's bytes (HASH_ALGS)
    digest: str = ""  # hex

    def __post_init__(self) -> None:
        if not self.digest and self.sha256:
            self.hash_alg, self.digest = SHA256, self.sha256
        if not self.hash_alg:
            self.hash_alg = SHA256
        if self.hash_alg == SHA256 and not self.sha256:
            self.sha256 = self.digest

    def to_json(self) -> str:
        """Always the current format (``hash_alg`` + ``digest``, no ``sha256`` field)."""
        record = asdict(self)
        del record["sha256"]
        record["format_version"] = FORMAT_VERSION
        return json.dumps(record, indent=1, sort_keys=True) + "\n"

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
        if not _DATA_NAME.match(raw["data"]) or raw["data"] in (".", ".."):
            raise ValueError(f"manifest data name {raw['data']!r} is not a plain file name")
        if raw["step"] < 0 or raw["size"] < 0:
            raise ValueError("manifest step and size must be >= 0")
        if version == 1:  # sha256 only; hash_alg/digest are filled in from it
            _check(raw, "sha256", str)
            hash_alg, digest = SHA256, raw["sha256"]
        else:
            _check(raw, "hash_alg", str)
            _check(raw, "digest", str)
            hash_alg, digest = raw["hash_alg"], raw["digest"]
            if hash_alg not in HASH_ALGS:
                raise ValueError(f"manifest hash_alg {hash_alg!r} is not one this elastic_det knows "
                                 f"({', '.join(HASH_ALGS)}); upgrade elastic_det")
        try:
            check_digest(hash_alg, digest, raw["size"])
        except ValueError as e:
            raise ValueError(f"manifest {'sha256' if version == 1 else f'digest ({hash_alg})'} {e}") from None
        known = {f for f in cls.__dataclass_fields__} - {"sha256", "hash_alg", "digest"}
        values = {k: v for k, v in raw.items() if k in known}
        values.update(hash_alg=hash_alg, digest=digest)
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
