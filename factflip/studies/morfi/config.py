"""Paper C's config: paper B's keys (its mixtures are C's models) plus `sae` and `morfi`.

Owns: `base_config` (configs/studies/morfi.py starts from it) and `validate` (paper C's keys,
then paper B's checks on the rest).
Must not: run anything.
"""

from __future__ import annotations

import os

from factflip.configfile import ConfigError
from factflip.probes.morfi import POSITIONS
from factflip.sae.train import base_config as sae_train_config
from factflip.studies.new_knowledge import config as nk_config
from factflip.studies.schema import check_schema


def base_config():
  """Every key a MoRFI study reads: paper B's (`new_knowledge.config.base_config`) and `sae`,
  `morfi`."""
  import ml_collections

  c = nk_config.base_config()
  c.study = "morfi"
  c.mixtures.unknown_shares = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
  c.mixtures.single = ()
  c.mixtures.idk_shares = ()
  c.sae = ml_collections.ConfigDict()
  c.sae.path = ""                # an SAE to load (SAELens dir, Gemma Scope npz, Llama Scope
  #                                dir); "" = train one on the base model
  c.sae.hook_name = ""           # "" = the middle layer's resid_post (or the file's hook)
  c.sae.layers = ()              # a layer sweep: an SAE trained per layer at that site, each
  #                                with its latents, tests and steering; () = the one site
  c.sae.train = sae_train_config()   # when trained here (model, hook and data set by the study)
  c.morfi = ml_collections.ConfigDict()
  c.morfi.positions = "last"     # latents at the last prompt token | mean over the prompt
  c.morfi.bootstrap = 1000       # resamples of the prompts for ρ's interval
  c.morfi.confidence = 0.95
  c.morfi.mk_alpha = 0.05        # Mann–Kendall significance
  c.morfi.min_activation = 1e-6  # a latent this quiet in every model is not tested
  c.morfi.top_latents = 3        # monotonic latents steered (largest |ρ|)
  c.morfi.n_random = 3           # non-monotonic control latents steered
  c.morfi.permutations = 100     # label permutations of the null count of monotonic latents
  #                                (every one when there are fewer; 0 = no null)
  c.morfi.alphas = (0.5, 1.0, 2.0, 4.0, 8.0)   # steering / clamping strengths, in units of
  #                                each direction's own M_0 − M_100 difference (1: M_0's level)
  c.morfi.max_new_tokens = 12
  c.morfi.batch_rows = 256       # (direction, prompt) rows per generation program
  return c


def validate(c, source: str = "study") -> None:
  """paper C's keys, then paper B's checks on the rest of the config."""

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)
  check_schema(c, base_config(), "morfi", ("sae", "morfi"), source)
  m = c.morfi
  need(m.positions in POSITIONS, "morfi.positions", f"{m.positions!r}; expected {POSITIONS}")
  need(m.bootstrap >= 0 and 0 < m.confidence < 1 and 0 < m.mk_alpha < 1, "morfi",
       "bootstrap >= 0, confidence and mk_alpha in (0, 1)")
  need(m.permutations >= 0, "morfi.permutations", f"{m.permutations}; expected >= 0")
  need(m.top_latents >= 1 and m.n_random >= 0, "morfi.top_latents",
       f"top_latents {m.top_latents} (>= 1), n_random {m.n_random} (>= 0)")
  need(len(m.alphas) > 0 and all(a > 0 for a in m.alphas), "morfi.alphas",
       f"{list(m.alphas)}; expected positive magnitudes (the sign comes from the trend)")
  need(len(c.mixtures.unknown_shares) >= 3, "mixtures.unknown_shares",
       f"{list(c.mixtures.unknown_shares)}; a trend needs at least 3 shares")
  need(not c.mixtures.idk_shares and not c.mixtures.single, "mixtures",
       "idk_shares and single must be empty: the study compares the %Unknown models")
  need(bool(c.sae.path) or not c.facts or bool(c.sae.train.data.path), "sae.path",
       "empty with a facts file: give an SAE file, or text to train one on "
       "(sae.train.data.kind = 'examples', sae.train.data.path)")
  layers = list(c.sae.layers)
  need(all(isinstance(x, int) and x >= 0 for x in layers) and len(set(layers)) == len(layers),
       "sae.layers", f"{layers}; expected distinct layer indices >= 0")
  need(not (layers and c.sae.path), "sae.layers",
       f"{layers} with sae.path: a loaded SAE reads one site; sweep layers with SAEs trained here")
  if c.sae.path:
    need(os.path.exists(c.sae.path), "sae.path", f"{c.sae.path}: no such file or directory")
  view = c.copy_and_resolve_references()
  with view.unlocked():
    view.study = "new_knowledge"
    del view["sae"]
    del view["morfi"]
  nk_config.validate(view, source)
