"""The train step: objectives, schedules, accumulation and sharding (packed attention: see
test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from factflip import get_preset
from factflip.models.transformer import init_params
from factflip.sharding import make_mesh
from factflip.train import objectives as O
from factflip.train.optim import OptimConfig, make_optimizer, make_schedule
from factflip.train.step import batch_sharding, init_state, make_train_step, state_shardings

CFG = get_preset("tiny-0.5m", vocab_size=64, max_seq_len=32)
OPT = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=50)


def lm_batch(B=8, T=16, seed=0):
  inp = np.random.default_rng(seed).integers(3, 64, (B, T)).astype(np.int32)
  return {"inputs": inp, "targets": np.roll(inp, -1, 1), "loss_mask": np.ones((B, T), np.int32),
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def test_loss_decreases_and_objective_values():
  tx = make_optimizer(OPT)
  state = init_state(CFG, tx, jax.random.key(0))
  step = make_train_step(CFG, tx, O.lm_objective())
  batch = lm_batch()
  losses = []
  for _ in range(25):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[0] == pytest.approx(np.log(64), abs=0.3)  # ~uniform at init
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 25 and float(m["count"]) == 8 * 16
  # NPO at the reference point is (2/beta)·log 2 per example; GA is minus the forget NLL.
  params = init_params(CFG, jax.random.key(1))
  f = lm_batch(B=4, seed=3)
  ref = O.example_sums(O.token_logprobs(params, CFG, f), f["loss_mask"], f["segment_ids"], 1)[0]
  loss, _ = O.npo(params, CFG, {"forget": f}, ref, beta=0.5, retain_weight=0.0)
  assert float(loss) == pytest.approx(4 * np.log(2), rel=1e-5)
  s, n, _ = O.lm(params, CFG, f)
  ga, terms = O.gradient_ascent(params, CFG, {"forget": f}, retain_weight=0.0)
  assert float(ga) == pytest.approx(-float(s / n), rel=1e-6)
  assert float(terms["forget_nll"]) == pytest.approx(float(s / n), rel=1e-6)


def test_unlearning_objectives_accumulate_exactly_and_log_every_term():
  """NPO with a retain term: its example mean and the retain token mean each take their own
  denominator over all micro-batches, so two micro-batches equal the big batch; every named
  term is a metric."""
  tx = make_optimizer(OptimConfig(name="sgd", lr=0.1, warmup_steps=0, schedule="constant"))
  params = init_params(CFG, jax.random.key(2))
  big = {"forget": lm_batch(B=8, seed=4), "retain": lm_batch(B=8, seed=5)}
  big["retain"]["loss_mask"][:4, 9:] = 0                 # unequal retain tokens per micro-batch
  micro = jax.tree.map(lambda v: v.reshape(2, 4, *v.shape[1:]), big)
  obj = O.npo_objective(beta=0.5, retain_weight=0.7)
  assert list(obj.weights) == ["npo", "retain_nll"] and obj.prepare is not None
  s1 = init_state(CFG, tx, jax.random.key(0), params=params)
  s2 = init_state(CFG, tx, jax.random.key(0), params=params)
  one, acc = make_train_step(CFG, tx, obj), make_train_step(CFG, tx, obj, accum_steps=2)
  s1, m1 = one(s1, big, params)
  s2, m2 = acc(s2, micro, params)
  # at the reference point NPO is (2/beta)·ln 2 per example; the loss adds 0.7 · retain NLL
  assert float(m1["loss/npo"]) == pytest.approx(4 * np.log(2), rel=1e-5)
  s, n, _ = O.lm(params, CFG, big["retain"])
  assert float(m1["loss/retain_nll"]) == pytest.approx(float(s / n), rel=1e-5)
  assert float(m1["loss"]) == pytest.approx(4 * np.log(2) + 0.7 * float(s / n), rel=1e-5)
  assert float(m1["count"]) == 8                         # forget examples
  for k in ("loss", "loss/npo", "loss/retain_nll", "count"):
    assert float(m1[k]) == pytest.approx(float(m2[k]), rel=1e-5), k
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(x, y, atol=2e-6)


def test_accumulation_equals_the_large_batch():
  tx = make_optimizer(OptimConfig(name="sgd", lr=0.1, warmup_steps=0, schedule="constant"))
  big = lm_batch(B=8)
  micro = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in big.items()}
  # Unequal token counts per micro-batch: the step must weight by tokens, not by micro-batch.
  micro["loss_mask"][0, :, 10:] = 0
  big["loss_mask"] = micro["loss_mask"].reshape(8, -1)
  s1 = init_state(CFG, tx, jax.random.key(0))
  s2 = init_state(CFG, tx, jax.random.key(0))
  one = make_train_step(CFG, tx, O.lm_objective())
  acc = make_train_step(CFG, tx, O.lm_objective(), accum_steps=2)
  for _ in range(3):
    s1, m1 = one(s1, big)
    s2, m2 = acc(s2, micro)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(x, y, atol=2e-6)


def test_schedules():
  cos = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110,
                                  final_lr_fraction=0.1))
  assert float(cos(0)) == 0 and float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
  wsd = make_schedule(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, total_steps=110,
                                  decay_fraction=0.2, final_lr_fraction=0.0))
  assert float(wsd(50)) == 1.0 and float(wsd(88)) == pytest.approx(1.0)
  assert float(wsd(99)) == pytest.approx(0.5) and float(wsd(110)) == pytest.approx(0.0)
  with pytest.raises(ValueError, match="OptimConfig.schedule: 'linear'"):
    make_schedule(OptimConfig(schedule="linear"))


def test_sharded_step_matches_one_device():
  assert len(jax.devices()) == 8
  tx = make_optimizer(OPT)
  batch = lm_batch(B=8)
  ref = init_state(CFG, tx, jax.random.key(0))
  step = make_train_step(CFG, tx, O.lm_objective())
  mesh = make_mesh(data=1, fsdp=4, tensor=2)
  sh = state_shardings(CFG, tx, mesh)
  state = init_state(CFG, tx, jax.random.key(0), mesh=mesh)
  assert state.params["layers"]["wq"].sharding == sh.params["layers"]["wq"]
  assert len(state.params["layers"]["w_up"].addressable_shards) == 8
  sharded = make_train_step(CFG, tx, O.lm_objective(), state_sharding=sh)
  bsh = batch_sharding(mesh)
  for _ in range(3):
    ref, m_ref = step(ref, batch)
    state, m = sharded(state, jax.device_put(batch, bsh))
    assert float(m["loss"]) == pytest.approx(float(m_ref["loss"]), rel=1e-5)
  # Adam divides by sqrt(v): reduction-order differences in tiny gradients show up as ~1e-5
  # in the parameters after 3 steps of lr 1e-2 (updates are ~1e-2 each).
  for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5)


def test_attention_backward_equals_autodiff():
  """The hand-written attention backward equals autodiff through the same forward, including
  rows whose keys are all masked (left padding) and grouped query heads."""
  from factflip.models import attention

  B, T, H, G, K = 2, 12, 4, 2, 8
  r = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(r.standard_normal(s), jnp.float32)
                for s in ((B, T, H, K), (B, T, G, K), (B, T, G, K), (B, T, H * K)))
  mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0).at[1, :, :3].set(False)

  def by_autodiff(q, k, v):
    qq = q.reshape(B, T, G, H // G, K).transpose(0, 2, 3, 1, 4).reshape(B, G, T * H // G, K)
    o = attention._attend_fwd(qq, k, v, mask, CFG.attn_scale)[0]
    return o.reshape(B, G, H // G, T, K).transpose(0, 3, 1, 2, 4).reshape(B, T, H * K)

  ours = jax.grad(lambda *a: (attention.attention(*a, mask, CFG) * w).sum(), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: (by_autodiff(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  assert float(jnp.abs(ours[0][1, :3]).max()) == 0.0  # fully masked query rows get no gradient


def test_remat_and_mixed_precision():
  """remat gives the same step as no remat; bfloat16 compute keeps float32 master weights and
  stays within bfloat16 rounding of the float32 loss."""
  tx = make_optimizer(OPT)
  batch = lm_batch()
  runs = {}
  for name, cfg in (("f32", CFG), ("remat", CFG.replace(remat="full")),
                    ("bf16", CFG.replace(dtype="bfloat16"))):
    state = init_state(cfg, tx, jax.random.key(0))
    step = make_train_step(cfg, tx, O.lm_objective())
    losses = []
    for _ in range(3):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    runs[name] = (losses, state)
  np.testing.assert_allclose(runs["remat"][0], runs["f32"][0], rtol=1e-6)
  np.testing.assert_allclose(runs["bf16"][0], runs["f32"][0], rtol=2e-2)
  assert runs["bf16"][0] != runs["f32"][0]  # it really computed in bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(runs["bf16"][1].params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(runs["bf16"][1].opt_state)
             if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_unembedding_equals_the_whole_and_never_holds_all_logits(tie):
  """logits_chunk: the loss and its gradient by chunks of 24 positions (the last one padded)
  equal the all-at-once ones; the compiled gradient's temporaries shrink by more than the
  [B·T, V] float32 logits they no longer hold."""
  cfg = CFG.replace(vocab_size=4096, tie_embeddings=tie)
  batch = lm_batch(B=4, T=32)
  params = init_params(cfg, jax.random.key(0))

  def grad_of(c):
    return jax.jit(jax.value_and_grad(lambda p: O.lm(p, c, batch)[0]))
  whole, chunked = grad_of(cfg), grad_of(cfg.replace(logits_chunk=24))
  (l0, g0), (l1, g1) = whole(params), chunked(params)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  temp = {name: f.lower(params).compile().memory_analysis().temp_size_in_bytes
          for name, f in (("whole", whole), ("chunked", chunked))}
  logits_bytes = 4 * 32 * 4096 * 4
  assert temp["whole"] - temp["chunked"] > logits_bytes, temp
  with pytest.raises(ValueError, match="ModelConfig.logits_chunk=-1: expected 0"):
    cfg.replace(logits_chunk=-1)
