"""Paper A's config: every key the poisoning study reads, with its default, and its checks.

Owns: `base_config` (configs/studies/poisoning.py starts from it) and `validate` (ConfigError
naming the source and key, before anything runs).
Must not: run anything.
"""

from __future__ import annotations

import os

from factflip.configfile import ConfigError
from factflip.data.mixtures import RATIO_READINGS, PoisonConfig, read_ratio
from factflip.models.hooks import STREAM_SITES
from factflip.probes.fact_patching import GROUPS
from factflip.probes.fact_preference import KINDS
from factflip.studies.schema import check_schema, common_config, mutable, validate_common
from factflip.train import config as train_config
from factflip.train.monitor import parse_rule

LENSES = ("logit", "tuned")


def base_config():
  """Every key a poisoning study reads, with its default (configs/studies/poisoning.py starts
  from it): the keys every study has (`schema.common_config`) and paper A's own. `pretrain`
  and `cpt` are training configs with `factflip.train.config`'s schema."""
  c = common_config()
  c.study = "poisoning"
  c.ratios = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)   # poisoning ratios p
  c.ratio_reading = "restate"      # what p is (`data.mixtures.read_ratio`): "restate" = the
  #                                  counterfactual share of the target mentions, the rest true
  #                                  restatements, replay at cpt.data.replay_weight (SCIENCE.md
  #                                  A); "replay" = the counterfactual mentions' share of the
  #                                  stream, every target mention counterfactual, the rest replay
  #                                  text (p > 0; cpt.data.replay_weight unused)
  c.min_base_accuracy = 0.8        # the base must know this share of targets (greedy, prompt);
  #                                  with `facts`, > 0 also makes the draw stop when the base
  #                                  knows fewer candidates than targets + controls
  c.cpt = train_config.base_config()        # continual pretraining per ratio (data.ratio is
  c.cpt.data.kind = "poison"                # set per run; dense checkpoints are the point)
  c.probe.kinds = ("prompt", "paraphrase", "question", "language", "neighbour")
  c.probe.n_control = 40           # non-target facts (collateral accuracy)
  c.probe.patch_sites = ("resid_pre", "attn_out", "mlp_out")
  c.probe.patch_windows = (1, 2)
  c.probe.patch_groups = ("subject", "last")
  c.probe.patch_every = 1          # patch every n-th checkpoint (1 = all); step 0 never
  c.probe.patch_stride = 1         # patch every n-th layer (0, n, 2n, ...; 1 = all)
  c.probe.lens = "logit"           # the lens of the dll_l<ℓ> columns (lens.csv,
  #                                  lens_agreement.csv): "logit" (final norm and W_U) or
  #                                  "tuned" (a tuned lens trained on each base over the clean
  #                                  replay text, `probes.tuned_lens`, read at every checkpoint)
  c.probe.tuned_lens_steps = 300   # tuned lens: steps of cpt.data.batch_size x seq_len tokens
  c.probe.tuned_lens_lr = 1e-3
  c.probe.attribution = False      # direct logit attribution of the targets' logit(true) −
  #                                  logit(cf) per layer and head (`probes.fact_heads`), at the
  #                                  base and every patched checkpoint: attribution.csv
  c.probe.knockout_window = 0      # > 0: the answer position's attention to the subject knocked
  #                                  out in windows of this many layers, swept (Geva et al.
  #                                  2023), at the same checkpoints: knockout.csv (0 = off)
  return c


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs (training configs included, per size and
  ratio): ConfigError naming the source and key."""
  import jax


  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  def subset(key, given, allowed):
    bad = [x for x in given if x not in allowed]
    need(given and not bad, key, f"{list(given)}; expected a non-empty list of {list(allowed)}")

  check_schema(c, base_config(), "poisoning", ("probe",), source)
  validate_common(c, source, "a facts file or folder (`factflip facts --facts=PATH` "
                           "checks one)")
  if c.facts:
    need(c.facts_limit >= 0, "facts_limit", f"{c.facts_limit}; expected >= 0 (0 = all)")
  need(not c.replay or os.path.exists(c.replay), "replay",
       f"{c.replay!r} does not exist; expected a JSONL of {{\"text\"}} documents")
  need(len(c.ratios) > 0 and all(0 <= p <= 1 for p in c.ratios)
       and len(set(c.ratios)) == len(c.ratios), "ratios",
       f"{list(c.ratios)}; expected distinct poisoning ratios in [0, 1]")
  need(c.tau >= 0, "tau", f"{c.tau}; expected >= 0 nats")
  need(0 <= c.min_base_accuracy <= 1, "min_base_accuracy",
       f"{c.min_base_accuracy}; expected a share in [0, 1]")
  subset("probe.kinds", list(c.probe.kinds), KINDS)
  subset("probe.patch_sites", list(c.probe.patch_sites), STREAM_SITES)
  subset("probe.patch_groups", list(c.probe.patch_groups), GROUPS)
  need(len(c.probe.patch_windows) > 0 and min(c.probe.patch_windows) >= 1,
       "probe.patch_windows", f"{list(c.probe.patch_windows)}; expected windows >= 1")
  need(c.probe.patch_every >= 1, "probe.patch_every", f"{c.probe.patch_every}; expected >= 1")
  need(c.probe.lens in LENSES, "probe.lens", f"{c.probe.lens!r}; expected one of {list(LENSES)}")
  need(c.probe.tuned_lens_steps >= 1 and c.probe.tuned_lens_lr > 0, "probe.tuned_lens_steps",
       f"{c.probe.tuned_lens_steps} steps at lr {c.probe.tuned_lens_lr}; expected >= 1 step "
       "at a positive learning rate")
  need(c.probe.knockout_window >= 0, "probe.knockout_window",
       f"{c.probe.knockout_window}; expected 0 (off) or a window of layers >= 1")
  need(c.probe.patch_stride >= 1, "probe.patch_stride",
       f"{c.probe.patch_stride}; expected >= 1")
  need(c.probe.n_control >= 0 and c.probe.batch_size >= 1, "probe",
       "n_control must be >= 0 and batch_size >= 1")
  need(c.cpt.data.kind == "poison", "cpt.data.kind", f"{c.cpt.data.kind!r}; expected 'poison'")
  if c.cpt.monitor.every:
    need(any(r.name == "flip" and r.arg == c.tau for r in map(parse_rule, c.cpt.monitor.rules)),
         "cpt.monitor.rules", f"{list(c.cpt.monitor.rules)}; expected a flip:{c.tau:g} rule "
         "(the output flip at the study's tau, which lead times count to)")
  need(c.ratio_reading in RATIO_READINGS, "ratio_reading",
       f"{c.ratio_reading!r}; expected one of {list(RATIO_READINGS)}")
  need(c.ratio_reading != "replay" or min(c.ratios) > 0, "ratios",
       f"{list(c.ratios)} with ratio_reading 'replay': p = 0 would be replay text alone, no "
       "target mention; expected ratios > 0 (the restate reading's p = 0 is the unpoisoned "
       "control)")
  for p in c.ratios:
    ratio, weight = read_ratio(c.ratio_reading, p, c.cpt.data.replay_weight)
    try:
      PoisonConfig(ratio=ratio, mentions_per_fact=c.cpt.data.mentions_per_fact,
                   replay_weight=weight).validate(c.cpt.data.n_targets)
    except ValueError as e:
      raise ConfigError(source, "cpt.data.mentions_per_fact",
                        f"p = {p:g} read as {c.ratio_reading!r}: {e}") from None
  for stage in ("cpt",) if c.facts else ("pretrain", "cpt"):
    sub = mutable(c[stage])
    if c.facts:                  # what `cpt` sets per model (the files are written per run)
      sub.model.init_from, sub.data.facts_path = c.sizes[0], c.facts
      sub.data.replay_path = sub.data.eval_path = "runs/<size>/seed<k>/base/*.jsonl"
    else:
      sub.model.preset = c.sizes[0]
    if stage == "cpt" and sub.monitor.every:   # written per run by build_cpt
      sub.monitor.watch = "runs/<size>/seed<k>/cpt_p<p>/watch/targets.jsonl"
    train_config.validate(sub, source=f"{source}: {stage}", n_devices=jax.device_count(),
                          n_processes=jax.process_count())
