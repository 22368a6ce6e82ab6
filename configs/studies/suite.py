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
or a size to a finished suite runs only what is new. Within the suite two studies run lighter
than their own configs, to keep the default suite within 20 minutes on a 2-core laptop
(docs/studies/suite.md has each part's seconds):
  paper A  poisons at p = 0, .5, .75, 1 (its findings read p >= .5; its own config adds .1,
           .25 and .9), patches every third checkpoint (probe.patch_every = 3; its own, every
           one) with single-layer windows only (probe.patch_windows = (1,); its own adds
           two-layer ones), and runs the monitor every 4 steps, at the checkpoints
           (cpt.monitor.every; its own, every 2);
  paper B  fine-tunes the unk<X> mixtures and D_MK (mixtures.single; its own config adds D_WK,
           D_Natural and the idk50 variant, which no finding reads);
  paper C  trains its SAE for 1000 steps (sae.train.steps; its own, 1500).

Variants: smoke, scale=A+B+..., seeds=0+1+..., and real models:
  hf=DIR[+DIR...],poisoning=FILE,new_knowledge=DIR,morfi=DIR,unlearning=FILE
      each model directory the base of every study named with its own facts (paper A: a
      CounterFact-style file; B and C: EntityQuestions' folder; D: a facts file or RWKU's Target
      folder, as each study's own hf= variant takes); studies without a facts file are left
      out. Each study's hf= settings apply (its learning rates, probes over every device).

  factflip run --config=configs/studies/suite.py:hf=/models/Qwen2.5-0.5B,poisoning=\
/data/counterfact.json,new_knowledge=/data/entity_questions,unlearning=/data/rwku/Target \
      --workdir=workdir/qwen_suite
"""

import os

from factflip.configfile import load_config_file, study_variants
from factflip.studies.suite import STUDIES, base_config

PATH = "configs/studies/suite.py"


def split_variants(arg):
  """(the studies' shared variants, hf model directories or None, {study: its facts file})."""
  shared, hf, facts = [], None, {}
  for part in filter(None, (arg or "").split(",")):
    name, _, value = part.partition("=")
    if name in STUDIES or name == "hf":
      if not value:
        raise ValueError(f"{PATH}: bad variant {part!r}; expected {name}=PATH")
      if name == "hf":
        hf = value
      else:
        facts[name] = value
    elif name == "facts":
      raise ValueError(f"{PATH}: facts= names no study; each study takes its own: "
                       "poisoning=FILE, new_knowledge=DIR, morfi=DIR, unlearning=FILE")
    else:
      shared.append(part)
  if (hf is None) != (not facts):
    raise ValueError(f"{PATH}: hf=DIR goes with at least one study's facts (poisoning=FILE, "
                     "new_knowledge=DIR, morfi=DIR, unlearning=FILE), and those with hf=")
  return ",".join(shared), hf, facts


def get_config(arg=None):
  shared, hf, facts = split_variants(arg)
  variants = study_variants(shared, PATH)
  c = base_config()
  here = os.path.dirname(__file__)
  if hf:
    c.studies = tuple(name for name in STUDIES if name in facts)
  for name in STUDIES:
    own = ",".join(filter(None, [shared] + ([f"hf={hf}", f"facts={facts[name]}"]
                                           if name in facts else [])))
    c[name] = load_config_file(os.path.join(here, f"{name}.py"), own)
  if hf:                             # no shared world or pretraining: each study's own facts
    first = c[c.studies[0]]
    c.sizes, c.seeds = tuple(first.sizes), tuple(first.seeds)
    return c
  if "smoke" not in variants:        # within the suite's 20 minutes on 2 cores (the docstring)
    a = c.poisoning
    a.probe.patch_every = 3          # patching at every third checkpoint (the last included)
    a.probe.patch_windows = (1,)     # single-layer windows only (the depth-comparable ones)
    a.cpt.monitor.every = 4          # the monitor at the checkpoints' cadence
    a.ratios = (0.0, 0.5, 0.75, 1.0)   # A's findings read p >= .5 (and p = 0 beside them)
    b = c.new_knowledge              # the mixtures B's findings read (unk<X>, the linear fit)
    b.mixtures.single = ("MaybeKnown",)   # and D_MK, paper B's best; no D_WK, D_Natural, idk50
    b.mixtures.idk_shares = ()
    c.morfi.sae.train.steps = 1000   # explained variance 0.930 at 1000 steps, 0.938 at 1500
  nk = c.new_knowledge               # paper B's base serves every study
  c.sizes, c.seeds = tuple(nk.sizes), tuple(nk.seeds)
  c.world_seed, c.vocab_size, c.pretrain = nk.world_seed, nk.vocab_size, nk.pretrain
  return c
