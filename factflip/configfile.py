"""Config files and config errors, shared by training, studies and the command line.

Owns: `load_config_file` (what `--config=FILE.py:ARG` does, for Python callers) and
`ConfigError` (a bad config value: names the source, the key and what was expected).
Must not: know any schema (`factflip.train.config` and the studies own theirs).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def study_variants(arg: str | None, path: str, flags: tuple[str, ...] = ()
                   ) -> dict[str, str | None]:
  """A study config's variant string -> {name: value or None}: 'smoke,scale=a+b,seeds=0+1,
  hf=d1+d2,facts=f' (the variants every study config file takes) and the valueless `flags`
  this config also takes (`cpu`: a real model sized for a laptop, with hf=). Bad combinations
  raise ValueError naming `path` and what was expected."""
  out: dict[str, str | None] = {}
  valueless = ("smoke",) + tuple(flags)
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    if name not in valueless + ("scale", "seeds", "hf", "facts") or (
        name in valueless) == bool(value):
      raise ValueError(f"{path}: bad variant {part!r}; expected "
                       f"{', '.join(valueless)}, scale=A+B, seeds=0+1, hf=DIR[+DIR] or "
                       "facts=FILE, joined by commas")
    out[name] = value or None
  if ("hf" in out) != ("facts" in out):
    raise ValueError(f"{path}: hf=DIR and facts=FILE go together")
  if "cpu" in out and "hf" not in out:
    raise ValueError(f"{path}: cpu sizes a real model's study for a laptop; give the model "
                     "and its facts: hf=MODEL,facts=FILE,cpu")
  if "hf" in out and "scale" in out:
    raise ValueError(f"{path}: scale= picks presets, hf= model directories; a scaling study "
                     "over real models lists them in hf=A+B")
  if "seeds" in out and not all(k.isdigit() for k in out["seeds"].split("+")):
    raise ValueError(f"{path}: seeds={out['seeds']}; expected integers joined by '+', e.g. "
                     "seeds=0+1+2")
  return out


def apply_study_variants(c, variants: dict[str, str | None], ladder: Sequence[str]) -> None:
  """The variants every study shares, set on study config `c`: scale= (presets; 'ladder'),
  seeds=, hf=DIR[+DIR] with facts=FILE (model directories as bases, probed models sharded
  over the host's accelerators). Sizes and seeds are tuples, like every sequence in a
  config: --config.KEY overrides tuples, not lists."""
  if "scale" in variants:
    c.sizes = tuple(ladder if variants["scale"] == "ladder" else variants["scale"].split("+"))
  if "seeds" in variants:
    c.seeds = tuple(int(k) for k in variants["seeds"].split("+"))
  if "hf" in variants:
    c.sizes = tuple(variants["hf"].split("+"))
    c.facts = variants["facts"]
    c.probe.devices = -1
