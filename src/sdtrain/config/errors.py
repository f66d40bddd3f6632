"""``ConfigError`` lives in :mod:`sdtrain.errors` (the ground floor); re-exported here for the
import path older code uses."""

from sdtrain.errors import ConfigError

__all__ = ["ConfigError"]
