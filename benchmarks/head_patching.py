"""Per-head patching (every layer x head, all positions: TransformerLens'
`get_act_patch_attn_head_out_all_pos`) three ways, in one run, same model, prompts and metric:
factflip's `head_patch` (one compiled program, the cells vmapped in chunks), a per-cell loop of
jitted factflip forwards with one head replaced, and TransformerLens' own function on a
HookedTransformer holding the same HF weights. Also direct logit attribution per layer and head:
factflip's `logit_attribution` (one compiled program) against TransformerLens' cache
(`run_with_cache`, `decompose_resid`, `stack_head_results`, `logit_attrs`).

  python benchmarks/head_patching.py [--layers=12 --d_model=128 --heads=8 --seq=32 --batch=4]

Prints a markdown block for benchmarks/RESULTS.md, with the largest difference between the
three sweeps.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from factflip import load_model
from factflip.models import attention
from factflip.models.hooks import Intervention
from factflip.models.transformer import forward, unembed
from factflip.probes.attribution import logit_attribution
from factflip.probes.head_patching import head_patch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from patching import best_of  # noqa: E402 (benchmarks/patching.py: best of n, warm)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--iters", type=int, default=3)
  args = ap.parse_args()
  import torch
  import transformers
  from test_attention_hooks import _tl
  torch.set_num_threads(os.cpu_count())

  L, D, H, T, B = args.layers, args.d_model, args.heads, args.seq, args.batch
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L,
      num_attention_heads=H, num_key_value_heads=H // 2, max_position_embeddings=256,
      rope_theta=1e4)).eval()
  d = tempfile.mkdtemp()
  hf.save_pretrained(d)
  model = load_model(d)
  ref = _tl(hf, "llama")
  folded = _tl(hf, "llama", fold_ln=True)
  rng = np.random.RandomState(0)
  clean = rng.randint(3, args.vocab, (B, T)).astype(np.int32)
  corrupted = rng.randint(3, args.vocab, (B, T)).astype(np.int32)
  answers = rng.randint(3, args.vocab, (B, 2)).astype(np.int32)

  def metric(logits_BxPxV, answers_Bx2):
    lg = logits_BxPxV[:, -1]
    return lg[jnp.arange(lg.shape[0]), answers_Bx2[:, 0]] - lg[jnp.arange(lg.shape[0]),
                                                                answers_Bx2[:, 1]]

  t_ours, ours = best_of(lambda: head_patch(model, corrupted, clean, metric, site="z",
                                            metric_aux=answers).mean(0), args.iters)

  params, cfg = model.params(), model.cfg
  clean_z = forward(params, cfg, clean, capture=("z",), return_logits=False).captures["z"]

  @jax.jit
  def one(layer, head):
    iv = Intervention(jnp.arange(L) == layer, jnp.ones((1,), bool), clean_z,
                      jnp.arange(H) == head, site="z", mode="replace")
    out = forward(params, cfg, corrupted, attention.causal(), interventions=(iv,),
                  return_logits=False)
    return metric(unembed(params, cfg, out.residual[:, -1:]), answers).mean()

  def loop():
    return np.asarray([[float(one(layer, h)) for h in range(H)] for layer in range(L)])
  t_loop, looped = best_of(loop, args.iters)

  from transformer_lens import patching
  tt = lambda x: torch.tensor(x, dtype=torch.long)

  def tl_metric(logits):
    lg = logits[:, -1]
    return (lg[torch.arange(B), tt(answers[:, 0])] - lg[torch.arange(B), tt(answers[:, 1])]).mean()

  def tl_sweep():
    with torch.no_grad():
      _, cache = ref.run_with_cache(tt(clean))
      return patching.get_act_patch_attn_head_out_all_pos(ref, tt(corrupted), cache,
                                                          tl_metric).numpy()
  t_tl, tl = best_of(tl_sweep, args.iters)

  t_dla, dla = best_of(lambda: logit_attribution(model, corrupted, answers), args.iters)

  def tl_dla():
    with torch.no_grad():
      _, c = folded.run_with_cache(tt(corrupted))
      a, b = tt(answers[:, 0]), tt(answers[:, 1])
      return (c.logit_attrs(c.decompose_resid(pos_slice=-1), a, b, pos_slice=-1).numpy(),
              c.logit_attrs(c.stack_head_results(layer=-1, pos_slice=-1), a, b,
                            pos_slice=-1).numpy())
  t_tl_dla, (tl_layers, tl_heads) = best_of(tl_dla, args.iters)

  cells = L * H
  print(f"### Per-head patching and direct logit attribution ({datetime.date.today()}, "
        f"`python benchmarks/head_patching.py --layers={L} --d_model={D} --heads={H} "
        f"--seq={T} --batch={B}`)\n")
  print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, torch "
        f"{torch.__version__}; a random Llama, {L} layers, d_model {D}, {H} heads "
        f"({H // 2} kv), vocab {args.vocab}; batch {B} x {T} tokens; best of {args.iters}, warm.\n")
  print("| what | factflip | per-cell loop of jitted forwards | TransformerLens |")
  print("|---|---|---|---|")
  print(f"| head patching, {cells} cells (all positions) | {t_ours:.3f} s | {t_loop:.3f} s "
        f"({t_loop / t_ours:.1f}x) | {t_tl:.3f} s ({t_tl / t_ours:.1f}x) |")
  print(f"| direct logit attribution, {L} layers + {cells} heads | {t_dla:.3f} s | — | "
        f"{t_tl_dla:.3f} s ({t_tl_dla / t_dla:.1f}x) |")
  print(f"\nLargest difference, factflip vs TransformerLens: head patching "
        f"{np.abs(ours - tl).max():.2e}, per-cell loop {np.abs(ours - looped).max():.2e}; "
        f"attribution (layers) {np.abs(dla['attn'].T - tl_layers[1::2]).max():.2e}, "
        f"(heads) {np.abs(dla['heads'].transpose(1, 2, 0).reshape(cells, B) - tl_heads).max():.2e}.")


if __name__ == "__main__":
  main()
