r"""Paper C's study (MoRFI): SAE latents that move monotonically with the share of Unknown facts
in the fine-tuning set, and steering along them to recover knowledge, on top of paper B's
stages (the same world, base, SliCK categories and SFT; configs/studies/new_knowledge.py).

  factflip run --config=configs/studies/morfi.py --workdir=workdir/morfi
  factflip run --config=configs/studies/morfi.py:smoke --workdir=/tmp/morfi   # the tests

Stages (fingerprinted, resumable; --dry_run prints the plan): world → pretrain → slick →
mixtures (0/12.5/25/50/75/87.5/100% Unknown on the world, whose |D| = 32 makes 10% and 90% not
whole numbers of examples; paper C's 0/10/25/50/75/90/100% with hf=) → sft (per mixture, a checkpoint per epoch) → sae (a
TopK SAE trained on the base's middle-layer resid_post over the world's corpus, or
`sae.path`) → latents (per checkpoint, on the held-out QA prompts) → steering (the cloze check
of M_0 and M_100; the monotonic test across mixtures, its label-permutation null and the same
test across the 100%-Unknown run's epochs; then the 100%-Unknown model steered and clamped at
α times each direction's own M_0 - M_100 difference) → results. Every key, its default and
meaning: `base_config` in factflip/studies/morfi/config.py (paper B's keys, `sae` and `morfi`).

Variants: those of configs/studies/new_knowledge.py (smoke, scale=, seeds=, hf=DIR,facts=DIR,
cpu); smoke here runs five mixtures, 0/25/50/75/100% (with B's three no latent can pass
Mann-Kendall, and the steering and clamping of monotonic latents would go untested). With hf=
give the SAE of that model's site: --config.sae.path=DIR (SAELens directory, Gemma
Scope params.npz or Llama Scope directory) and, where the file does not name it,
--config.sae.hook_name=blocks.12.hook_resid_post; or train one on text you give
(--config.sae.train.data.kind=examples --config.sae.train.data.path=FILE.jsonl). A layer sweep
of the SAE's site: --config.sae.layers='(1,2,3)' (an SAE trained per layer; default: one site).
  cpu   with hf= (a ~100M-parameter model on 2 cores): B's cpu variant (its relations,
        SliCK and SFT settings; in B's workdir its SliCK stage is reused) with five mixtures,
        0 / 25 / 50 / 75 / 100% Unknown (the fewest with which the Mann-Kendall test can reach
        p < 0.05; B's three cannot), and a TopK SAE (k 32, 8x) trained here on the middle
        layer's resid_post from 300 steps of 2,048 tokens of the text at
        --config.sae.train.data.path (benchmarks/sae_text.py writes one from RWKU's passages
        and EntityQuestions' dev questions), activations scaled to sqrt(d_in) (SAELens's
        expected_average_only_in: a real model's residual norms). About 36 minutes on
        SmolLM2-135M (benchmarks/RESULTS.md): over the 25-minute aim.

  factflip run --config=configs/studies/morfi.py:hf=SmolLM2-135M-Instruct.Q4_1.gguf,\
facts=entityquestions,cpu --config.sae.train.data.path=/tmp/sae_text.jsonl --workdir=workdir/smollm2-c
"""

import os

from factflip.configfile import load_config_file
from factflip.studies.morfi import base_config


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(__file__), "new_knowledge.py"), arg)
  schema = base_config()
  with c.unlocked():
    c.study = "morfi"
    c.sae, c.morfi = schema.sae, schema.morfi
  c.mixtures.unknown_shares = schema.mixtures.unknown_shares   # paper C's 0..100%
  if not arg or "hf" not in arg:
    # the world's 33 in-distribution Unknown train facts allow |D| = 32 (B's), where 10% and
    # 90% are not whole numbers of examples: the nearest exact shares, 12.5% and 87.5%
    c.mixtures.unknown_shares = (0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0)
  c.mixtures.single, c.mixtures.idk_shares = (), ()
  t = c.sae.train                  # a TopK SAE on the base's middle layer (tiny-2m: d 128)
  t.steps, t.batch_tokens, t.buffer_batches = 1500, 1024, 8
  t.sae.expansion_factor, t.sae.k = 8, 32
  t.optim.lr, t.optim.warm_up_steps = 1e-3, 50
  t.data.seq_len, t.data.batch_size = 64, 16
  t.eval.every, t.checkpoint.every, t.log_every = 500, 500, 250
  if arg and "cpu" in arg.split(","):
    # five mixtures, the fewest with which the Mann-Kendall test can reach p < 0.05 (with
    # B's three, 0 / 50 / 100%, its smallest p is 0.30: no latent could be monotonic); a
    # TopK SAE on a ~100M model's middle layer from ~600k tokens of the given text
    c.mixtures.unknown_shares = (0.0, 0.25, 0.5, 0.75, 1.0)
    t.data.kind = "examples"       # --config.sae.train.data.path=FILE.jsonl (records "text")
    t.data.seq_len, t.data.batch_size = 128, 16
    t.steps, t.batch_tokens, t.buffer_batches = 300, 2048, 8
    t.sae.expansion_factor, t.sae.k = 8, 32
    t.sae.normalize_activations = "expected_average_only_in"   # a real model's large norms
    t.optim.lr, t.optim.warm_up_steps = 5e-4, 20
    t.eval.every, t.eval.batches, t.checkpoint.every, t.log_every = 0, 4, 300, 25
    c.morfi.bootstrap = 200
  if arg and "smoke" in arg.split(","):
    # five mixtures: with fewer no latent can pass Mann-Kendall, and the steering and clamping
    # of monotonic latents would go untested
    c.mixtures.unknown_shares = (0.0, 0.25, 0.5, 0.75, 1.0)
    t.steps, t.batch_tokens, t.buffer_batches = 60, 128, 2
    t.sae.expansion_factor, t.sae.k = 4, 8
    t.data.seq_len, t.data.batch_size = 32, 8
    t.eval.every, t.eval.batches, t.checkpoint.every, t.log_every = 0, 1, 60, 20
    c.morfi.bootstrap, c.morfi.alphas = 50, (1.0, 4.0)
    c.morfi.top_latents, c.morfi.n_random = 2, 1
  return c
