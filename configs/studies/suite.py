r"""The whole mission in one command: papers A–D on one world and one pretrained base per size
and seed, each study in its own subdirectory with its own report, and a suite report with every
paper's findings beside what this run measured.

  factflip run --config=configs/studies/suite.py --workdir=workdir/suite
  factflip run --config=configs/studies/suite.py:smoke --workdir=/tmp/suite    # the tests

The studies are configured by their own files (configs/studies/{poisoning,new_knowledge,morfi,
unlearning}.py, with the same variant); the suite sets the keys they share — sizes, seeds,
world_seed, vocab_size and pretrain (paper B's: tiny-2m on the 100-person world, whose SliCK
categories need the larger model) — so the world and each base are built once. Override a
study's key with --config.<study>.<key>=VALUE (e.g. --config.unlearning.epochs=3), the studies
run with --config.studies="('poisoning','unlearning')". Stages are fingerprinted: adding a study
or a size to a finished suite runs only what is new.

Variants: smoke, scale=A+B+..., seeds=0+1+... (hf= is each study's own: their facts differ).
"""

import os

from factflip.configfile import load_config_file, study_variants
from factflip.studies.suite import STUDIES, base_config


def get_config(arg=None):
  variants = study_variants(arg, "configs/studies/suite.py")
  if "hf" in variants:
    raise ValueError("configs/studies/suite.py: hf= is not a suite variant (each study reads "
                     "its own facts file); run the studies' configs with hf=")
  c = base_config()
  here = os.path.dirname(__file__)
  for name in STUDIES:
    c[name] = load_config_file(os.path.join(here, f"{name}.py"), arg)
  nk = c.new_knowledge               # paper B's base serves every study
  c.sizes, c.seeds = list(nk.sizes), list(nk.seeds)
  c.world_seed, c.vocab_size, c.pretrain = nk.world_seed, nk.vocab_size, nk.pretrain
  return c
