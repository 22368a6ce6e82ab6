"""Config files and config errors, shared by training, studies and the command line.

Owns: `load_config_file` (what `--config=FILE.py:ARG` does, for Python callers) and
`ConfigError` (a bad config value: names the source, the key and what was expected).
Must not: know any schema (`factflip.train.config` and the studies own theirs).
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A bad training config: names the source, the key and what was expected."""

  def __init__(self, source: str, key: str, message: str):
    self.source, self.key = source, key
    super().__init__(f"{source}: config.{key}: {message}")


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file (what `--config=path:arg` does), for Python callers."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("factflip_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()
