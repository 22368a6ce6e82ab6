"""Training objectives (factflip/train/objectives.py): SFT with a retain term against the direct
negative log-likelihood, DPO at its reference point and after a step."""

import jax
import numpy as np
import pytest

from factflip import get_preset
from factflip.models.transformer import forward, init_params
from factflip.train import objectives as O
from factflip.train.optim import OptimConfig, make_optimizer
from factflip.train.step import init_state, make_train_step

CFG = get_preset("tiny-0.5m", vocab_size=64, max_seq_len=32)


def lm_batch(B=8, T=16, seed=0):
  inp = np.random.default_rng(seed).integers(3, 64, (B, T)).astype(np.int32)
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": np.ones((B, T), np.int32),
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def _batch(B, T=12, seed=0):
  inp = np.random.default_rng(seed).integers(3, 64, (B, T)).astype(np.int32)
  mask = np.zeros((B, T), np.int32)
  mask[:, 6:9] = 1
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": mask,
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def test_sft_objective_is_the_forget_nll_plus_the_weighted_retain_nll():
  params = init_params(CFG, jax.random.key(0))
  f, r = _batch(4, seed=1), _batch(3, seed=2)
  r["loss_mask"][0, 6:] = 0                          # unequal retain answer lengths

  def mean_nll(b):                                    # directly: -log softmax at the targets
    logits = np.asarray(jax.jit(lambda p, x: forward(p, CFG, x).logits)(params, b["inputs"]),
                        np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                         ) - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(lp, b["targets"][..., None], -1)[..., 0]
    return float(-(picked * b["loss_mask"]).sum() / b["loss_mask"].sum())

  obj = O.sft_objective(retain_weight=0.3)
  loss, terms = jax.jit(lambda p, b: O.total(obj, p, CFG, b))(params, {"forget": f,
                                                                       "retain": r})
  assert obj.weights == {"forget_nll": 1.0, "retain_nll": 0.3}
  assert float(terms["forget_nll"]) == pytest.approx(mean_nll(f), rel=1e-5)
  assert float(terms["retain_nll"]) == pytest.approx(mean_nll(r), rel=1e-5)
  assert float(loss) == pytest.approx(mean_nll(f) + 0.3 * mean_nll(r), rel=1e-5)
  alone, _ = jax.jit(lambda p, b: O.total(O.sft_objective(has_retain=False), p, CFG, b))(
      params, {"forget": f})
  assert float(alone) == pytest.approx(mean_nll(f), rel=1e-5)


def test_dpo_starts_at_log_2_and_a_step_prefers_the_chosen_answers():
  tx = make_optimizer(OptimConfig(name="sgd", lr=0.5, warmup_steps=0, schedule="constant"))
  params = init_params(CFG, jax.random.key(3))
  chosen, rejected = lm_batch(B=4, seed=6), lm_batch(B=4, seed=7)
  for b in (chosen, rejected):            # answer-only: the last 4 targets of each row
    b["loss_mask"][:, :12] = 0
  batch = {"chosen": chosen, "rejected": rejected}
  obj = O.dpo_objective(beta=0.5, has_retain=False)
  loss, terms = O.total(obj, params, CFG, batch, obj.prepare(params, CFG, batch))
  assert float(loss) == pytest.approx(np.log(2), rel=1e-6) and list(terms) == ["dpo"]
  state = init_state(CFG, tx, jax.random.key(0), params=params)
  step = make_train_step(CFG, tx, obj)
  state, m = step(state, batch, params)
  assert float(m["loss/dpo"]) == pytest.approx(np.log(2), rel=1e-6)
  assert float(m["count"]) == 4                          # pairs
  after, _ = O.total(obj, state.params, CFG, batch, obj.prepare(params, CFG, batch))
  assert float(after) < np.log(2) - 1e-3                 # the chosen answers gained on the rest
  ref = obj.prepare(params, CFG, batch)
  new = obj.prepare(state.params, CFG, batch)
  margin = (np.asarray(new[0]) - np.asarray(ref[0])) - (np.asarray(new[1]) - np.asarray(ref[1]))
  assert (margin > 0).mean() >= 0.75
