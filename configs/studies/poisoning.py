r"""Paper A's continual-pretraining poisoning study on the embedded fact world.

  factflip run                                              # this config, workdir/default
  factflip run --config=configs/studies/poisoning.py:smoke --workdir=/tmp/smoke   # seconds

Stages (each records the fingerprint of the config keys it read: a re-run reuses unchanged
stages, resumes a stopped one and redoes changed ones and all downstream; --dry_run prints
that plan): world → pretrain
(per size and seed; the base must know >= min_base_accuracy of the target facts on the training
prompt format) → cpt (per poisoning ratio p, dense checkpoints) → probe (every checkpoint) →
results. Every study key, its default and meaning: `base_config` in factflip/studies/poisoning.py
(`pretrain` and `cpt` are training configs: factflip/train/config.py); this file sets values.

Variants (`--config=configs/studies/poisoning.py:VARIANT[,VARIANT...]`; any key can still be
set with --config.KEY=VALUE):
  (none)           tiny-0.5m on a 100-person world, p in {0, .1, .25, .5, .75, .9, 1} read as
                   the counterfactual share of the target mentions (the rest restate the true
                   object; ratio_reading "restate", SCIENCE.md A), seed 0.
  replay_reading   p read as a poison-to-clean ratio instead (ratio_reading "replay"): every
                   target mention states the counterfactual and the clean share 1 - p is
                   replay text, p in {.1, .25, .5, .75, .9, 1} (the other variants' p > 0);
                   9 mentions per fact, so each pass's replay count N(1 - p)/p is whole.
  smoke            a few steps of everything: what the tests run.
  scale=A+B+...    a scaling study over presets A, B, ... (`factflip presets`); `scale=ladder`
                   is tiny-0.5m+tiny-2m+tiny-8m+tiny-4m-deep (tiny-2m's width with 16 layers:
                   whether flips sit late once facts are stored late; read it with
                   --config.probe.lens=tuned). Every size pretrains on the same world, is
                   poisoned on the same targets, and is plotted side by side.
  seeds=0+1+...    seeds (pretraining init and data order, the target draw, the CPT data).
  hf=DIR[+DIR...],facts=FILE
                   real models instead of the world: HF (or factflip) model directories, each
                   the base of its own CPT runs (no pretraining), and a facts file in any
                   `factflip facts` format (CounterFact's ROME, EasyEdit or {"items"} layout,
                   ...). Targets and controls are the facts the base knows (greedy answer
                   correct and ΔLL > tau on the prompt), drawn per model and seed among the
                   first `facts_limit` (a base that knows fewer than cpt.data.n_targets +
                   probe.n_control of them stops the study there, naming the counts);
                   CPT hyper-parameters for billion-parameter models.
  cpu              with hf=: sized for a ~100M-parameter model on a 2-core laptop, at most
                   25 minutes (benchmarks/RESULTS.md: SmolLM2-135M-Instruct on CounterFact).
                   Every record is a candidate (facts_limit 0: such a model knows ~3% of
                   CounterFact), 16 targets and 16 controls, p in {0, .5, 1}; CPT 16 steps of
                   8 x 64 tokens at lr 3e-4 (2e-5 moves nothing in 16 steps), checkpoints at
                   0, 8 and 16 (each probed: ΔLL, the lens at every layer, patching at every
                   third layer); the monitor every 4 steps.

  factflip run --config=configs/studies/poisoning.py:scale=tiny-0.5m+tiny-2m,seeds=0+1 \
      --workdir=workdir/scaling
  factflip run --config=configs/studies/poisoning.py:hf=/models/Qwen2.5-0.5B,facts=\
/data/counterfact.json --workdir=workdir/qwen --config.cpt.model.dtype=bfloat16
  factflip run --config=configs/studies/poisoning.py:hf=SmolLM2-135M-Instruct.Q4_1.gguf,\
facts=counterfact-val.json,cpu --workdir=workdir/smollm2
"""

import os

from factflip.configfile import apply_study_variants, load_config_file, study_variants
from factflip.studies.poisoning import base_config
from factflip.train import config as train_config


def _pretrain():
  """configs/pretrain_tiny.py:study, a 100-person world (tiny-0.5m then knows all 40
  targets)."""
  return load_config_file(os.path.join(os.path.dirname(__file__), "..", "pretrain_tiny.py"),
                          "study")


def _cpt():
  c = train_config.base_config()
  c.steps = 60
  c.data.kind = "poison"
  c.data.n_targets = 40            # target facts, drawn from `target_tier`
  c.data.target_tier = "high"
  c.data.mentions_per_fact = 8     # p x 40 x 8 counterfactual mentions per pass: whole for all p
  #                                  in the grid (the replay reading takes 9: `replay_reading`)
  c.data.replay_weight = 0.5       # share of clean replay documents (targets removed)
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 5
  c.optim.schedule = "constant"
  c.checkpoint.every = 4           # dense checkpoints: every one is probed
  c.checkpoint.keep = 0            # keep them all
  c.log_every = 10
  c.eval_every = 20
  c.monitor.every = 2              # the factual-integrity monitor on targets and controls
  c.monitor.rules = ("dll_drop:1.0", "dll_drop:2.0", "lens_sign:-2", "flip:0.5")
  return c


LADDER = ("tiny-0.5m", "tiny-2m", "tiny-8m", "tiny-4m-deep")


def get_config(arg=None):
  variants = study_variants(arg, "configs/studies/poisoning.py", flags=("cpu", "replay_reading"))
  c = base_config()                # every study key, its default and meaning
  c.pretrain = _pretrain()
  c.cpt = _cpt()
  apply_study_variants(c, variants, LADDER)
  if "hf" in variants:
    c.cpt.optim.lr = 2e-5          # billion-parameter models: a gentle continual-pretraining lr
    c.cpt.optim.warmup_steps = 10
    c.probe.batch_size = 16
  if "cpu" in variants:
    c.facts_limit = 0              # every record a candidate: a 135M model knows ~3%
    c.ratios = (0.0, 0.5, 1.0)
    c.cpt.data.n_targets = 16
    c.probe.n_control = 16
    c.cpt.steps = 16
    c.cpt.checkpoint.every = 8     # probed at steps 0, 8 and 16
    c.cpt.eval_every, c.cpt.log_every = 8, 4
    c.cpt.data.seq_len, c.cpt.data.batch_size = 64, 8
    c.cpt.optim.lr = 3e-4          # 2e-5 moves nothing in 16 steps
    c.cpt.optim.warmup_steps = 2
    c.cpt.monitor.every = 4
    c.probe.patch_stride = 3       # patching at every third layer
  if "smoke" in variants:
    c.ratios = (0.0, 1.0)
    c.min_base_accuracy = 0.0      # a few steps cannot teach the world; the gate is still run
    c.vocab_size = 384
    c.pretrain.steps, c.pretrain.checkpoint.every, c.pretrain.eval_every = 6, 6, 6
    c.pretrain.data.world_people = 30
    c.pretrain.optim.warmup_steps = 1
    c.cpt.steps, c.cpt.checkpoint.every, c.cpt.eval_every = 4, 2, 4
    c.cpt.data.n_targets = 4
    for t in (c.pretrain, c.cpt):
      t.data.seq_len, t.data.batch_size, t.data.eval_batches = 64, 8, 1
    c.probe.n_control = 4
    c.cpt.monitor.rules = ("dll_drop:0.05", "lens_sign:-2", "flip:0.5")   # alerts in 4 steps
    c.probe.patch_sites = ("resid_pre",)
    c.probe.patch_windows = (1,)
    c.facts_limit = 60
    if "hf" in variants:
      c.cpt.optim.lr = 1e-3        # the tests' tiny model: move visibly in 4 steps
  if "replay_reading" in variants:
    c.ratio_reading = "replay"     # p = the counterfactual mentions' share of the stream
    c.ratios = tuple(p for p in c.ratios if p > 0)   # p = 0 would be replay text alone
    c.cpt.data.mentions_per_fact = 9   # replay per pass N (1 - p) / p whole for p = .75, .9
  return c
