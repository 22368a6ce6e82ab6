"""The suite's config: which studies run, the keys they share, and each study's own config.

Owns: `STUDIES` (the suite's studies, in run order), `SHARED` (the keys every study takes from
the suite's), `base_config`, `study_config` (a study's config as the suite runs it) and
`validate`.
Must not: run anything.
"""

from __future__ import annotations

import ml_collections

from factflip.configfile import ConfigError
from factflip.studies.platform import study_record
from factflip.studies.schema import mutable
from factflip.train import config as train_config

STUDIES = ("poisoning", "new_knowledge", "morfi", "unlearning")
SHARED = ("sizes", "seeds", "world_seed", "vocab_size", "pretrain", "barrier_timeout_s")


def base_config():
  """The suite's keys: which studies run, the keys they share (every study's `sizes`, `seeds`,
  `world_seed`, `vocab_size` and `pretrain` are set from these) and each study's own config
  (configs/studies/suite.py loads them from the studies' config files)."""
  c = ml_collections.ConfigDict()
  c.study = "suite"
  c.studies = STUDIES              # run in this order
  c.sizes = ("tiny-2m",)           # presets, shared by every study
  c.seeds = (0,)
  c.world_seed = 0
  c.vocab_size = 1024
  c.pretrain = train_config.base_config()   # the one pretraining of each size and seed
  c.pretrain.data.kind = "world"
  c.barrier_timeout_s = 7200.0     # multi-host: a process's longest wait for the others
  for name in STUDIES:
    c[name] = study_record(name).base_config()
  return c


def study_config(c, name: str):
  """Study `name`'s config as the suite runs it: its own keys with the shared ones set."""
  sub = mutable(c[name])
  for key in SHARED:
    v = c[key]
    sub[key] = (mutable(v) if key == "pretrain"
                else tuple(v) if key in ("sizes", "seeds") else v)
  return sub


def validate(c, source: str = "study") -> None:
  """The suite's own keys: ConfigError naming the source and key (each study's config is
  checked by that study when the suite constructs it)."""
  bad = [s for s in c.studies if s not in STUDIES]
  if not c.studies or bad or len(set(c.studies)) != len(c.studies):
    raise ConfigError(source, "studies", f"{list(c.studies)}; expected distinct studies of "
                      f"{list(STUDIES)}")
  with_facts = [name for name in c.studies if c[name].get("facts")]
  if with_facts and len(with_facts) != len(c.studies):   # each study validates the rest of its
    missing = [n for n in c.studies if n not in with_facts]  # config when the suite builds it
    raise ConfigError(source, f"{missing[0]}.facts", "empty, but the other studies read facts "
                      f"files ({', '.join(with_facts)}): on real models (hf=) every study "
                      "needs its own; leave it out of `studies` otherwise")
