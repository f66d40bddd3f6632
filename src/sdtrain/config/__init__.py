"""The config ground floor: the generic loader (YAML files + ``include:`` + ``key=value``
overrides -> a given dataclass, errors naming key and file), the resolver of shipped config
names, and ``ConfigError``. The schemas belong to their components (``models/config.py``,
``data/config.py``, ...); the experiment root is :mod:`sdtrain.trainer.experiment`."""

from sdtrain.config.loader import load_dataclass, to_dict, to_yaml
from sdtrain.config.resolve import configs_dir, resolve_config_path
from sdtrain.errors import ConfigError

__all__ = [
    "ConfigError",
    "configs_dir",
    "load_dataclass",
    "resolve_config_path",
    "to_dict",
    "to_yaml",
]
