"""The config: YAML files with ``_base_`` inheritance, OmegaConf merge, a dataclass schema, ``--cfg-options``
overrides (``schema``), the allowed ranges of numeric keys (``ranges``) and the redaction of secrets
before a config is written anywhere (``redaction``)."""

from .schema import Config, load_config

__all__ = ["Config", "load_config"]
