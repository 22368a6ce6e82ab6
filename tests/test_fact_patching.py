"""Patching fact items: exact multi-token ΔLL under cross-model patching."""

import jax
import numpy as np
import pytest
from flax import nnx

from factflip import Transformer, get_preset
from factflip.data.pipeline import TokenIds
from factflip.probes import capture, replace
from factflip.probes.fact_patching import patch_items, subject_span
from factflip.probes.fact_preference import preference, prompt_rows


@pytest.fixture(scope="module")
def setup(small_world, world_tokenizer):
  cfg = get_preset("tiny-0.5m", vocab_size=len(world_tokenizer), max_seq_len=128)
  poisoned = Transformer(cfg, rngs=nnx.Rngs(1))
  base = Transformer(cfg, rngs=nnx.Rngs(2))
  items = [f for f in small_world.facts if f.counterfactual and not f.meta.get("two_hop")][:5]
  subject = {f.id: f.subject for f in items}
  rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(items, kinds=("prompt",))]
  return poisoned, base, world_tokenizer, items, rows


def test_subject_span(world_tokenizer):
  enc = TokenIds(world_tokenizer)
  prompt = "The capital of Zorbania is"
  a, b = subject_span(enc, prompt, "Zorbania")
  ids = enc(prompt)
  assert world_tokenizer.decode(list(ids[a:b])).strip() == "Zorbania"
  assert subject_span(enc, prompt, "Nowhere") is None


def test_patched_dll_equals_patched_forwards(setup):
  poisoned, base, tok, items, rows = setup
  table = patch_items(poisoned, base, tok, rows, sites=("resid_pre", "mlp_out"), windows=(1, 2))
  n, L = len(rows), poisoned.cfg.n_layers
  assert len(table["item"]) == n * 2 * 2 * L * 3
  assert table["subject_found"].all()
  # unpatched ΔLL = preference's (multi-token, teacher forced), for both models
  pref_p = preference(poisoned, tok, items, kinds=("prompt",))
  pref_b = preference(base, tok, items, kinds=("prompt",))
  first = (table["site"] == "resid_pre") & (table["window"] == 1) & (table["layer"] == 0) & (
      table["position"] == "last")
  np.testing.assert_allclose(table["dll_poisoned"][first], pref_p["dll"], atol=1e-4)
  np.testing.assert_allclose(table["dll_base"][first], pref_b["dll"], atol=1e-4)
  # one cell by hand: mlp_out, window 2 from layer 1, subject tokens of item 2
  i = 2
  r = rows[i]
  enc = TokenIds(tok)
  p_ids = [tok.bos_token_id] + list(enc(r["prompt"]))
  a0, a1 = subject_span(enc, r["prompt"], r["subject"])

  def logp(answer):
    a_ids = list(enc(" " + answer))
    ids = np.asarray([p_ids + a_ids], np.int32)
    caps = capture(base, ids, ["mlp_out"])["mlp_out"]
    pos = np.zeros(ids.shape[1], bool)
    pos[1 + a0:1 + a1] = True
    iv = replace("mlp_out", caps, layers=[1, 2], positions=pos)
    lp = np.asarray(jax.nn.log_softmax(poisoned(ids, interventions=[iv])[0], axis=-1))
    return sum(lp[len(p_ids) - 1 + j, a] for j, a in enumerate(a_ids))
  want = logp(r["true"]) - logp(r["cf"])
  sel = (table["item"] == r["item"]) & (table["site"] == "mlp_out") & (table["window"] == 2) & (
      table["layer"] == 1) & (table["position"] == "subject")
  assert table["dll_patched"][sel].item() == pytest.approx(want, abs=1e-4)
  # a model patched with its own activations is unchanged (recovery undefined: base = poisoned)
  same = patch_items(base, base, tok, rows, sites=("attn_out",), windows=(3,))
  np.testing.assert_allclose(same["dll_patched"], same["dll_base"], atol=1e-4)
  assert np.isnan(same["recovery"]).all()


def test_bad_inputs(setup):
  poisoned, base, tok, _, rows = setup
  with pytest.raises(ValueError, match="unknown position groups"):
    patch_items(poisoned, base, tok, rows, groups=("subj",))
  with pytest.raises(ValueError, match="tokenises to nothing"):
    patch_items(poisoned, base, tok, [dict(rows[0], cf="")])
