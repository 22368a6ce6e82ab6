"""Attention internals, per-head patching, knockout, direct logit attribution and the activation
cache, against TransformerLens on the same random HF models (float32, 1e-4)."""

import jax
import numpy as np
import pytest

from factflip.models.hf import load_hf
from factflip.models.hooks import SITES, Intervention
from factflip.probes import interventions as ivs
from factflip.probes.attribution import logit_attribution
from factflip.probes.cache import run_with_cache
from factflip.probes.head_patching import head_patch, knockout, knockout_sweep
from factflip.probes.patching import answer_logit_diff

torch = pytest.importorskip("torch")
tl = pytest.importorskip("transformer_lens")

VOCAB, T = 101, 10
TOL = dict(rtol=1e-4, atol=1e-4)


def _hf(family, seed=0, kv_heads=2):
  import transformers
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=1e4))
  else:
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=24))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model.eval()


def _tl(hf, family, fold_ln=False, opt_in=False, attn_in=False):
  """A HookedTransformer with the HF model's weights (TransformerLens' own conversion), no
  processing but (fold_ln=True) the norms' weights folded into the next matrices; opt_in: with
  hook_result, the split q/k/v inputs and hook_mlp_in; attn_in: with hook_attn_in."""
  from transformer_lens import HookedTransformer, HookedTransformerConfig
  from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
  from transformer_lens.pretrained.weight_conversions.qwen3 import convert_qwen3_weights
  c = hf.config
  d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  cfg = HookedTransformerConfig(
      d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads,
      d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
      d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS",
      positional_embedding_type="rotary", rotary_dim=d_head,
      rotary_base=(getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e4),
      gated_mlp=True, final_rms=True, n_key_value_heads=c.num_key_value_heads,
      eps=c.rms_norm_eps, rotary_adjacent_pairs=False, dtype=torch.float32,
      default_prepend_bos=False, use_qk_norm=family == "qwen3",
      original_architecture="LlamaForCausalLM" if family == "llama" else "Qwen3ForCausalLM",
      use_attn_result=opt_in, use_split_qkv_input=opt_in, use_hook_mlp_in=opt_in,
      use_attn_in=attn_in)
  model = HookedTransformer(cfg)
  convert = convert_llama_weights if family == "llama" else convert_qwen3_weights
  model.load_and_process_state_dict(convert(hf, cfg), fold_ln=fold_ln,
                                    center_writing_weights=False, center_unembed=False,
                                    fold_value_biases=False)
  return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request, tmp_path_factory):
  hf = _hf(request.param)
  d = str(tmp_path_factory.mktemp(f"tl_{request.param}"))
  hf.save_pretrained(d)
  return request.param, hf, load_hf(d, dtype="float32")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  hf = _hf("llama", seed=1)
  d = str(tmp_path_factory.mktemp("tl_llama"))
  hf.save_pretrained(d)
  return hf, load_hf(d, dtype="float32"), _tl(hf, "llama"), _tl(hf, "llama", fold_ln=True)


def _tokens(seed, n=3):
  return np.random.RandomState(seed).randint(3, VOCAB, (n, T)).astype(np.int32)


def test_every_site_matches_transformer_lens(pair):
  family, hf, ours = pair
  ref = _tl(hf, family)
  tokens = _tokens(0)
  logits, cache = run_with_cache(ours, tokens)
  with torch.no_grad():
    tl_logits, tl_cache = ref.run_with_cache(torch.tensor(tokens, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), **TOL)
  names = [n for n in cache.keys() if n in tl_cache.cache_dict]
  hooks = {n.split(".", 2)[-1] for n in names if n.startswith("blocks.0.")}
  assert hooks == {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                   "hook_mlp_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                   "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores",
                   "attn.hook_pattern", "ln1.hook_scale", "ln2.hook_scale", "mlp.hook_post",
                   "ln1.hook_normalized", "ln2.hook_normalized", "mlp.hook_pre",
                   "mlp.hook_pre_linear"}
  for name in names + ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized",
                       "unembed.hook_in", "unembed.hook_out"]:
    ref_x, x = tl_cache[name].numpy(), np.asarray(cache[name])
    assert x.shape == ref_x.shape, name
    if name.endswith("hook_attn_scores"):     # TransformerLens: -inf where masked
      assert np.array_equal(np.isneginf(ref_x), x < -1e37), name
      ref_x, x = np.where(np.isneginf(ref_x), 0, ref_x), np.where(x < -1e37, 0, x)
    np.testing.assert_allclose(x, ref_x, err_msg=name, **TOL)
  assert len(SITES) == 26


def test_opt_in_sites_and_their_edits_match_transformer_lens(pair):
  """hook_result, hook_q/k/v_input (kv heads for k and v) and hook_mlp_in, captured and edited:
  adding to one head's query input, one head's result and the MLP's input gives
  TransformerLens' logits when its own hooks add the same."""
  family, hf, ours = pair
  ref = _tl(hf, family, opt_in=True)
  tokens = _tokens(3)
  names = ("result", "q_input", "k_input", "v_input", "mlp_in")
  logits, cache = run_with_cache(ours, tokens, names=names)
  with torch.no_grad():
    tl_logits, tl_cache = ref.run_with_cache(torch.tensor(tokens, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), **TOL)
  for layer in range(3):
    for site in names:
      tl_name = f"blocks.{layer}." + {"result": "attn.hook_result"}.get(site, f"hook_{site}")
      np.testing.assert_allclose(np.asarray(cache[tl_name]), tl_cache[tl_name].numpy(),
                                 err_msg=tl_name, **TOL)
  rng = np.random.RandomState(0)
  edits = {("q_input", 1, 2): rng.normal(0, 1, (64,)), ("k_input", 2, 1): rng.normal(0, 1, (64,)),
           ("result", 0, 3): rng.normal(0, 1, (64,)), ("mlp_in", 1, None): rng.normal(0, 1, (64,))}
  ivs_, hooks = [], []
  for (site, layer, head), delta in edits.items():
    n_heads = {"q_input": 4, "k_input": 2, "result": 4}.get(site)
    values = np.zeros((3, 1, 1) + ((n_heads, 64) if n_heads else (64,)), np.float32)
    values[layer, ..., head if n_heads else slice(None), :] = delta
    ivs_.append(Intervention(np.arange(3) == layer, np.ones((1, T), bool), values,
                             None if head is None else np.arange(n_heads) == head, site=site,
                             mode="add"))

    def hook(x, hook, head=head, delta=delta):
      d = torch.tensor(delta, dtype=x.dtype)
      if head is None:
        return x + d
      x = x.clone()
      x[:, :, head] += d
      return x

    tl_name = f"blocks.{layer}." + {"result": "attn.hook_result"}.get(site, f"hook_{site}")
    hooks.append((tl_name, hook))
  edited = ours.forward(tokens, interventions=ivs_).logits
  with torch.no_grad():
    tl_edited = ref.run_with_hooks(torch.tensor(tokens, dtype=torch.long), fwd_hooks=hooks)
  np.testing.assert_allclose(np.asarray(edited), tl_edited.numpy(), **TOL)
  assert np.abs(np.asarray(edited) - np.asarray(logits)).max() > 0.01


def test_attn_in_matches_transformer_lens_without_grouped_heads(tmp_path):
  """hook_attn_in (one resid_pre copy per head feeding its q, k and v) on a Llama whose every
  head has its own kv head, captured and edited; refused with grouped-query attention."""
  hf = _hf("llama", seed=2, kv_heads=4)
  hf.save_pretrained(str(tmp_path))
  ours, ref = load_hf(str(tmp_path), dtype="float32"), _tl(hf, "llama", attn_in=True)
  tokens = _tokens(4)
  logits, cache = run_with_cache(ours, tokens, names=("attn_in",))
  with torch.no_grad():
    tl_logits, tl_cache = ref.run_with_cache(torch.tensor(tokens, dtype=torch.long))
  np.testing.assert_allclose(np.asarray(logits), tl_logits.numpy(), **TOL)
  np.testing.assert_allclose(np.asarray(cache["blocks.1.hook_attn_in"]),
                             tl_cache["blocks.1.hook_attn_in"].numpy(), **TOL)
  delta = np.random.RandomState(1).normal(0, 1, 64).astype(np.float32)
  values = np.zeros((3, 1, 1, 4, 64), np.float32)
  values[1, ..., 2, :] = delta
  iv = Intervention(np.arange(3) == 1, np.ones((1, T), bool), values, np.arange(4) == 2,
                    site="attn_in", mode="add")

  def hook(x, hook):
    x = x.clone()
    x[:, :, 2] += torch.tensor(delta)
    return x

  with torch.no_grad():
    expect = ref.run_with_hooks(torch.tensor(tokens, dtype=torch.long),
                                fwd_hooks=[("blocks.1.hook_attn_in", hook)])
  edited = np.asarray(ours.forward(tokens, interventions=[iv]).logits)
  np.testing.assert_allclose(edited, expect.numpy(), **TOL)
  assert np.abs(edited - np.asarray(logits)).max() > 0.01
  _hf("llama").save_pretrained(str(tmp_path / "grouped"))
  grouped = load_hf(str(tmp_path / "grouped"), dtype="float32")
  with pytest.raises(ValueError, match="attn_in: grouped-query attention, use q/k/v_input"):
    grouped.forward(tokens, capture=("attn_in",))


def test_head_patching_matches_transformer_lens(llama):
  from transformer_lens import patching
  _, ours, ref, _ = llama
  clean, corrupted = _tokens(1, 2), _tokens(2, 2)
  answers = np.array([[5, 7], [9, 4]], np.int32)

  def metric_tl(logits):
    return answer_logit_diff(jax.numpy.asarray(logits.numpy()[:, -1:]), answers).mean()

  def metric(logits_BxPxV, answers_Bx2):
    return answer_logit_diff(logits_BxPxV, answers_Bx2)

  t = lambda x: torch.tensor(x, dtype=torch.long)
  sweeps = {("z", False): "out_all_pos", ("z", True): "out_by_pos",
            ("pattern", False): "pattern_all_pos", ("pattern", True): "pattern_by_pos",
            ("q", True): "q_by_pos", ("k", False): "k_all_pos", ("v", True): "v_by_pos",
            ("pattern", "src"): "pattern_dest_src_pos"}
  with torch.no_grad():
    _, clean_cache = ref.run_with_cache(t(clean))
    expect = {key: getattr(patching, f"get_act_patch_attn_head_{name}")(
        ref, t(corrupted), clean_cache, lambda lg: torch.tensor(float(metric_tl(lg))))
        for key, name in sweeps.items()}
  for (site, by_pos), ref_res in expect.items():
    by_src = by_pos == "src"
    res = head_patch(ours, corrupted, clean, metric, site=site, by_pos=by_pos is True,
                     by_src=by_src, metric_aux=answers).mean(0)   # [L, (T, (T,)) H]
    ref_res = ref_res.numpy()
    heads = 2 if site in ("k", "v") else 4                        # GQA: k and v per kv head
    if site == "pattern" and by_pos:            # TransformerLens: [layer, head, dest (, src)]
      ref_res = np.moveaxis(ref_res, 1, -1)
    assert res.shape == ref_res.shape == (3,) + (T,) * bool(by_pos) + (T,) * by_src + (heads,)
    np.testing.assert_allclose(res, ref_res, err_msg=f"{site} by_pos={by_pos}", **TOL)
  # a head patched from its own run changes nothing
  same = head_patch(ours, clean, clean, metric, metric_aux=answers)
  base = np.asarray(metric(ours(clean)[:, -1:], answers))
  np.testing.assert_allclose(same, np.broadcast_to(base[:, None, None], same.shape), **TOL)


def test_logit_attribution_matches_transformer_lens(llama):
  _, ours, _, folded = llama
  tokens = _tokens(3)
  answers = np.array([[5, 7], [9, 4], [11, 3]], np.int32)
  res = logit_attribution(ours, tokens, answers)
  with torch.no_grad():
    _, c = folded.run_with_cache(torch.tensor(tokens, dtype=torch.long))
    stack, labels = c.decompose_resid(pos_slice=-1, return_labels=True)
    ref = c.logit_attrs(stack, torch.tensor(answers[:, 0]), torch.tensor(answers[:, 1]),
                        pos_slice=-1).numpy()                   # [1 + 2L, B]
    heads = c.logit_attrs(c.stack_head_results(layer=-1, pos_slice=-1),
                          torch.tensor(answers[:, 0]), torch.tensor(answers[:, 1]),
                          pos_slice=-1).numpy()                 # [L·H, B]
  assert labels[:3] == ["embed", "0_attn_out", "0_mlp_out"]
  np.testing.assert_allclose(res["embed"], ref[0], **TOL)
  np.testing.assert_allclose(res["attn"], ref[1::2].T, **TOL)
  np.testing.assert_allclose(res["mlp"], ref[2::2].T, **TOL)
  np.testing.assert_allclose(res["heads"], heads.T.reshape(3, 3, 4), **TOL)
  # the components sum to the logit difference itself
  logits = np.asarray(ours(tokens))[:, -1]
  diff = logits[np.arange(3), answers[:, 0]] - logits[np.arange(3), answers[:, 1]]
  np.testing.assert_allclose(res["total"], diff, **TOL)
  np.testing.assert_allclose(res["embed"] + res["attn"].sum(1) + res["mlp"].sum(1), diff, **TOL)
  # the heads sum to attn_out (no attention bias in Llama)
  np.testing.assert_allclose(res["heads"].sum(2), res["attn"], **TOL)


def test_cache_decompositions_match_transformer_lens(llama):
  _, ours, _, folded = llama
  tokens = _tokens(4)
  _, cache = run_with_cache(ours, tokens)
  with torch.no_grad():
    _, c = folded.run_with_cache(torch.tensor(tokens, dtype=torch.long))
    for kw in (dict(apply_ln=True), dict(layer=2, mlp_input=True, apply_ln=True),
               dict(mode="attn", pos_slice=-1)):
      np.testing.assert_allclose(np.asarray(cache.decompose_resid(**kw)),
                                 c.decompose_resid(**kw).numpy(), err_msg=str(kw), **TOL)
    for kw in (dict(apply_ln=True), dict(layer=2, incl_mid=True, pos_slice=-1)):
      np.testing.assert_allclose(np.asarray(cache.accumulated_resid(**kw)),
                                 c.accumulated_resid(**kw).numpy(), err_msg=str(kw), **TOL)
    np.testing.assert_allclose(np.asarray(cache.stack_head_results(layer=2, apply_ln=True)),
                               c.stack_head_results(layer=2, apply_ln=True).numpy(), **TOL)
    c.compute_head_results()
    np.testing.assert_allclose(np.asarray(cache["result", 1]), c["result", 1].numpy(), **TOL)
  assert np.allclose(np.asarray(cache["scale", None]), np.asarray(cache["ln_final.hook_scale"]))
  assert np.asarray(cache["pattern", 2]).shape == (3, 4, T, T)
  with pytest.raises(KeyError, match="hook_bogus"):
    cache["blocks.0.hook_bogus"]


def test_knockout(llama):
  _, ours, ref, _ = llama
  tokens = _tokens(5, 2)
  keys = np.zeros((2, T), bool)
  keys[:, 2:5] = True                                   # "the subject"
  queries = np.zeros((2, T), bool)
  queries[:, -1] = True
  # an empty key set changes nothing (but rounding: the hooked attention path sums in another
  # order); the knockout matches TransformerLens with the blocked scores set to -inf at layer 1
  none = knockout(3, [1], np.zeros((2, T), bool), queries)
  np.testing.assert_allclose(np.asarray(ours(tokens, interventions=[none])),
                             np.asarray(ours(tokens)), rtol=0, atol=1e-6)
  iv = knockout(3, [1], keys, queries)

  def block(scores, hook):
    scores[:, :, -1, 2:5] = -torch.inf
    return scores
  with torch.no_grad():
    ref_logits = ref.run_with_hooks(torch.tensor(tokens, dtype=torch.long),
                                    fwd_hooks=[("blocks.1.attn.hook_attn_scores", block)])
  ko = np.asarray(ours(tokens, interventions=[iv]))
  np.testing.assert_allclose(ko, ref_logits.numpy(), **TOL)
  assert np.abs(ko - np.asarray(ours(tokens))).max() > 1e-3
  _, cache = run_with_cache(ours, tokens)
  out = ours.forward(tokens, capture=("pattern",), interventions=[iv]).captures["pattern"]
  assert np.asarray(out)[1, :, -1, :, 2:5].max() == 0.0   # [L, B, query, head, key]
  # per head: only head 3's edges are cut
  one = ours.forward(tokens, capture=("pattern",), interventions=[
      knockout(3, [1], keys, queries, heads=[3], n_heads=4)]).captures["pattern"]
  p = np.asarray(one)[1, :, -1]
  assert p[:, 3, 2:5].max() == 0.0 and p[:, :3, 2:5].min() > 0.0
  # the sweep: window 1 at layer 1 is the single knockout above
  targets = np.array([5, 9], np.int32)
  sweep = knockout_sweep(ours, tokens, keys, targets, window=1)
  logp = jax.nn.log_softmax(ko[:, -1], axis=-1)
  np.testing.assert_allclose(sweep["logprob"][:, 1], np.asarray(logp)[[0, 1], targets], **TOL)
  np.testing.assert_allclose(sweep["relative_change"],
                             np.exp(sweep["logprob"] - sweep["base"][:, None]) - 1, **TOL)
  wide = knockout_sweep(ours, tokens, keys, targets, window=3)
  assert not np.allclose(wide["logprob"], sweep["logprob"])
  # several targets per row: each column is that target's own sweep
  both = knockout_sweep(ours, tokens, keys, np.stack([targets, targets[::-1]], 1), window=1)
  assert both["logprob"].shape == both["relative_change"].shape == (2, 3, 2)
  np.testing.assert_allclose(both["logprob"][..., 0], sweep["logprob"], **TOL)
  np.testing.assert_allclose(both["logprob"][:, 1, 1], np.asarray(logp)[[0, 1], targets[::-1]],
                             **TOL)


def test_head_interventions_refuse_bad_input(llama):
  _, ours, _, _ = llama
  with pytest.raises(ValueError, match="head_mask"):
    Intervention(jax.numpy.ones(3, bool), jax.numpy.ones(1, bool), jax.numpy.zeros((3, 1, 1, 64)),
                 jax.numpy.ones(4, bool), site="resid_pre")
  with pytest.raises(ValueError, match="head axis"):
    ivs.replace("resid_pre", np.zeros((3, 1, T, 64)), heads=[0])
  with pytest.raises(ValueError, match="out of range for 4 heads"):
    ivs.replace("z", np.zeros((3, 1, T, 4, 16)), heads=[4])
  with pytest.raises(ValueError, match="per-head sites"):
    head_patch(ours, _tokens(0, 1), _tokens(1, 1), lambda lg: lg[:, -1, 0], site="resid_pre")
  with pytest.raises(ValueError, match="keys has shape"):
    knockout_sweep(ours, _tokens(0, 1), np.zeros((1, 3), bool), [5])
  with pytest.raises(ValueError, match=r"targets has shape \(2,\); expected \(1,\) or \(1, K\)"):
    knockout_sweep(ours, _tokens(0, 1), np.zeros((1, T), bool), [5, 6])
  with pytest.raises(ValueError, match=r"by_src=True\) patches single pattern entries; site "
                                       r"is 'z'"):
    head_patch(ours, _tokens(0, 1), _tokens(1, 1), lambda lg: lg[:, -1, 0], by_src=True)


def test_fact_items_attribution_and_knockout(small_world, world_tokenizer):
  """Paper A's probe-stage tables on world facts: an item's components sum to its logit
  difference, the heads to their layer's attn_out, and the knockout's relative change is
  p_knocked / p_base − 1 per layer."""
  import flax
  import pandas as pd

  from factflip.models.config import get_preset
  from factflip.models.transformer import Transformer
  from factflip.probes.fact_heads import attribute_items, item_prompts, knockout_items
  from factflip.probes.fact_preference import prompt_rows
  cfg = get_preset("tiny-0.5m", vocab_size=len(world_tokenizer))
  model = Transformer(cfg, rngs=flax.nnx.Rngs(0))
  facts = [f for f in small_world.facts if f.counterfactual is not None and f.subject][:6]
  subject = {f.id: f.subject for f in facts}
  rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(facts, kinds=("prompt",))]
  b = item_prompts(world_tokenizer, rows, cfg.max_seq_len)
  assert len(b["items"]) + len(b["dropped"]) == len(rows) and b["subject"].any(1).all()
  t = pd.DataFrame(attribute_items(model, world_tokenizer, rows, batch_size=4))
  L, H = cfg.n_layers, cfg.n_heads
  assert len(t) == len(b["items"]) * (1 + 2 * L + L * H)
  for _, g in t.groupby("item"):
    parts = g[g.component != "head"]
    np.testing.assert_allclose(parts.value.sum(), g.total.iloc[0], atol=1e-4)
    heads = g[g.component == "head"].groupby("layer").value.sum().values
    np.testing.assert_allclose(heads, g[g.component == "attn"].sort_values("layer").value,
                               atol=1e-4)
  k = pd.DataFrame(knockout_items(model, world_tokenizer, rows, window=2, batch_size=4))
  assert len(k) == len(b["items"]) * L and (k.window == 2).all()
  np.testing.assert_allclose(k.relative_change, np.exp(k.logp_knocked - k.logp_base) - 1,
                             atol=1e-6)
  np.testing.assert_allclose(k.relative_change_cf,
                             np.exp(k.logp_cf_knocked - k.logp_cf_base) - 1, atol=1e-6)
  assert (k.relative_change.abs() > 1e-6).any() and (k.logp_base != k.logp_cf_base).all()
