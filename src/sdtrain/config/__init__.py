"""Typed configuration: component dataclasses composed in ``schema``, loaded by ``loader``."""

from sdtrain.config.errors import ConfigError
from sdtrain.config.loader import load_config, to_dict, to_yaml

__all__ = ["ConfigError", "load_config", "to_dict", "to_yaml"]
