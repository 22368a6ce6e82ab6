"""Hook sites and interventions: capture, identity replacement, cross-run replacement, add."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

from factflip import load_model
from factflip.models import embed, unembed
from factflip.models.hooks import hook_name, model_sites
from factflip.probes import SITES, add, capture, parse_hook_name, replace, residual_stream


INTERNALS = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "ln1_scale", "ln2_scale",
             "ln1_normalized", "ln2_normalized", "mlp_pre", "mlp_pre_linear", "result", "q_input",
             "k_input", "v_input", "attn_in", "mlp_in")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, hf_dirs):
  return load_model(hf_dirs[request.param][0])


def test_residual_stream_indexing(model, batch):
  tokens, mask = batch
  stream = residual_stream(model, tokens, mask)
  params = model.params()
  # index 0 is the embedding output, with Gemma's sqrt(d) scale applied
  np.testing.assert_array_equal(stream[0], embed(params, model.cfg, jnp.asarray(tokens)))
  # the last entry is before the final norm: unembedding it gives the logits
  np.testing.assert_allclose(unembed(params, model.cfg, stream[-1]), model(tokens, mask),
                             atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_identity_replacement_reproduces_logits_exactly(model, batch, site):
  tokens, mask = batch
  if site not in model_sites(model.cfg):
    pytest.skip(f"{model.cfg.family} has no {site}")
  if site in INTERNALS and model.cfg.family not in ("llama", "gemma2", "gpt_neox"):
    pytest.skip("the block internals' identity is tested on llama, gemma2 (soft-cap, sliding "
                "windows, post-norms) and gpt_neox (LayerNorm, partial rotary, parallel "
                "residual, ungated MLP)")
  # the run that captured the site (a hooked norm scale or attention pattern runs its own path,
  # equal to the unhooked one up to rounding) is reproduced bit for bit
  out = model.forward(tokens, mask, capture=(site,))
  iv = replace(site, out.captures[site])
  np.testing.assert_array_equal(np.asarray(model(tokens, mask, interventions=[iv])),
                                np.asarray(out.logits))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(model(tokens, mask)),
                             rtol=0, atol=1e-5)


def test_replacing_a_layer_with_another_run_equals_running_the_tail(model, batch):
  tokens, mask = batch
  other = np.where(mask, (tokens * 7 + 3) % model.cfg.vocab_size, 0)
  layer = 2
  theirs = capture(model, other, ["resid_pre"], mask)["resid_pre"]
  # All positions replaced at layer `layer`: the rest of the network sees only the other run.
  iv = replace("resid_pre", theirs, layers=[layer])
  patched = np.asarray(model(tokens, mask, interventions=[iv]))
  tail = model.forward(tokens, mask, resid_BxTxD=theirs[layer], start_layer=layer).logits
  # a different compiled program (a shorter scan): equal up to float32 rounding
  np.testing.assert_allclose(patched, np.asarray(tail), rtol=0, atol=1e-6)
  # the same tail with the layer as data: the blocks below it pass the stream through
  skipped = model.forward(tokens, mask, resid_BxTxD=theirs[layer], first_layer=jnp.int32(layer),
                          capture=("resid_post",))
  np.testing.assert_allclose(np.asarray(skipped.logits), np.asarray(tail), rtol=0, atol=1e-6)
  assert not np.asarray(skipped.captures["resid_post"][:layer]).any()
  np.testing.assert_allclose(patched, np.asarray(model(other, mask)), atol=1e-5)


def test_single_cell_patch_changes_only_downstream(model, batch):
  tokens, mask = batch
  other = np.where(mask, (tokens * 7 + 3) % model.cfg.vocab_size, 0)
  theirs = capture(model, other, ["resid_pre"], mask)["resid_pre"]
  iv = replace("blocks.1.hook_resid_pre", theirs, positions=[6])
  base = np.asarray(model(tokens, mask))
  patched = np.asarray(model(tokens, mask, interventions=[iv]))
  early = mask[:, :6]  # causal: earlier real positions are untouched (padding rows see nothing real)
  np.testing.assert_array_equal(patched[:, :6][early], base[:, :6][early])
  assert np.abs(patched[0, 6:] - base[0, 6:]).max() > 1e-3


def test_add_steering_vector_at_one_layer(model, batch):
  tokens, mask = batch
  L, D = model.cfg.n_layers, model.cfg.d_model
  direction = jax.random.normal(jax.random.key(0), (D,))
  values = jnp.zeros((L, 1, 1, D)).at[1, 0, 0].set(direction)
  zero = add("resid_post", jnp.zeros((L, 1, 1, D)), layers=[1])
  np.testing.assert_array_equal(np.asarray(model(tokens, mask, interventions=[zero])),
                                np.asarray(model(tokens, mask)))
  steered = capture(model, tokens, ["resid_post"], mask,
                    interventions=[add("resid_post", values, layers=[1])])["resid_post"]
  clean = capture(model, tokens, ["resid_post"], mask)["resid_post"]
  np.testing.assert_allclose(steered[1] - clean[1], jnp.broadcast_to(direction, clean[1].shape),
                             atol=1e-5)
  np.testing.assert_array_equal(steered[0], clean[0])


def test_capture_at_positions_and_vmap_over_masks(model, batch):
  tokens, mask = batch
  full = capture(model, tokens, ["mlp_out"], mask)["mlp_out"]
  some = capture(model, tokens, ["mlp_out"], mask, positions=[0, 5, 13])["mlp_out"]
  np.testing.assert_array_equal(some, full[:, :, [0, 5, 13]])

  # Interventions are data: a sweep over layers is a vmap over layer masks in one program.
  from factflip.models import attention
  from factflip.models.transformer import forward

  caps = capture(model, tokens, ["resid_pre"], mask)["resid_pre"]
  L = model.cfg.n_layers
  ivs = jax.vmap(lambda m: replace("resid_pre", caps, layers=m))(jnp.eye(L, dtype=bool))
  ctx = attention.causal(mask)
  swept = jax.jit(jax.vmap(lambda iv: forward(model.params(), model.cfg, tokens, ctx,
                                              interventions=(iv,)).logits))(ivs)
  assert swept.shape == (L, *tokens.shape, model.cfg.vocab_size)
  np.testing.assert_allclose(swept, jnp.broadcast_to(model(tokens, mask), swept.shape), atol=1e-5)


@pytest.fixture
def family(request):
  """The model family of the test's `model` parameter."""
  return request.node.callspec.params["model"]


def test_z_and_mlp_post_equal_hf_o_proj_and_down_proj_inputs(model, family, hf_dirs, batch):
  """attn.hook_z = the input of each layer's o_proj split into heads; mlp.hook_post = the input
  of down_proj (HF modules' forward pre-hooks on the same weights)."""
  import torch
  tokens, mask = batch
  tm = hf_dirs[family][1]
  seen = {"z": [], "mlp_post": []}
  hooks = []
  neox = family == "gpt_neox"
  for layer in (tm.gpt_neox.layers if neox else tm.model.layers):
    o_proj = layer.attention.dense if neox else layer.self_attn.o_proj
    down = layer.mlp.dense_4h_to_h if neox else layer.mlp.down_proj
    hooks.append(o_proj.register_forward_pre_hook(
        lambda m, a: seen["z"].append(a[0].numpy())))
    hooks.append(down.register_forward_pre_hook(
        lambda m, a: seen["mlp_post"].append(a[0].numpy())))
  try:
    with torch.no_grad():
      tm(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask.astype(int)))
  finally:
    for h in hooks:
      h.remove()
  caps = capture(model, tokens, ["mlp_post", "z"], mask)
  H, K = model.cfg.n_heads, model.cfg.head_dim
  want_z = np.stack(seen["z"]).reshape(model.cfg.n_layers, *tokens.shape, H, K)
  assert caps["z"].shape == want_z.shape
  np.testing.assert_allclose(np.where(mask[None, :, :, None, None], caps["z"], 0),
                             np.where(mask[None, :, :, None, None], want_z, 0), atol=1e-4)
  np.testing.assert_allclose(np.where(mask[None, :, :, None], caps["mlp_post"], 0),
                             np.where(mask[None, :, :, None], np.stack(seen["mlp_post"]), 0),
                             atol=1e-4)
  # a replaced head changes only what follows it; the TransformerLens name picks the layer
  z = caps["z"]
  iv = replace("blocks.0.attn.hook_z", z.at[0, :, :, 1].set(0.0), positions=[5])
  out = model.forward(tokens, mask, interventions=(iv,), capture=("z", "resid_mid"))
  np.testing.assert_array_equal(out.captures["z"][0, :, :5], z[0, :, :5])
  np.testing.assert_array_equal(out.captures["z"][0, :, 5, 1], 0.0)
  clean_mid = capture(model, tokens, ["resid_mid"], mask)["resid_mid"][0]
  np.testing.assert_array_equal(out.captures["resid_mid"][0, :, :5], clean_mid[:, :5])
  assert not np.allclose(out.captures["resid_mid"][0, :, 5], clean_mid[:, 5])


def test_hook_names_and_bad_interventions(model):
  assert parse_hook_name("blocks.3.hook_attn_out") == ("attn_out", 3)
  assert parse_hook_name("blocks.2.attn.hook_z") == ("z", 2)
  assert parse_hook_name("blocks.0.mlp.hook_post") == ("mlp_post", 0)
  assert hook_name("z", 4) == "blocks.4.attn.hook_z"
  assert parse_hook_name("resid_post") == ("resid_post", None)
  L = model.cfg.n_layers
  with pytest.raises(ValueError, match="unknown hook site"):
    parse_hook_name("blocks.1.hook_q")
  with pytest.raises(ValueError, match="out of range"):
    replace("resid_pre", jnp.zeros((L, 1, 4, 8)), layers=[L])
  with pytest.raises(ValueError, match="leading axis"):
    replace("resid_pre", jnp.zeros((L + 1, 1, 4, 8)), n_layers=L)
  with pytest.raises(ValueError, match="unknown hook site"):
    capture(model, np.zeros((1, 4), np.int32), ["resid"])
