"""SliCK categorisation throughput: `factflip.probes.slick.categorise` against a loop of HF
transformers `generate` calls (PyTorch, CPU), same model, same prompts, same protocol.

The model is a tiny random HF Llama saved with `save_pretrained` (with a byte-level BPE tokenizer
trained on a fact world) and loaded by factflip with `factflip.load_model(dir)`. The prompts are
`slick.slick_prompts` (N_ex k-shot prompts per fact, exemplars from the dev split of the fact's
relation). Per prompt, both sides produce one greedy answer and `n_samples` answers sampled at
temperature 0.5 with top-k 40, up to `max_new_tokens`, stopping at a newline (or EOS), and score
them (normalised exact match) into the four categories:

  ours        slick.categorise (one compiled fan-out program per batch of prompts: each prompt
              prefilled once, 1 + n_samples continuations); warmed up first (first call timed
              separately: it compiles), then best of --iters runs
  HF batched  per prompt: model.generate(do_sample=False) + model.generate(do_sample=True,
              num_return_sequences=n_samples) (one call for all of a prompt's samples)
  HF naive    per prompt: 1 + n_samples generate calls of one sequence each (on the first
              --naive_facts facts only; their median prompt time x all prompts)

HF's time is also given as the median prompt time x the number of prompts, which a
transient load on a shared machine barely moves; torch's thread count is the faster of 1 and
all cores on a few prompts (--torch_threads fixes it).

A random model rarely emits a newline, so every continuation runs the full token budget on both
sides (the worst case for both).

  python benchmarks/slick.py [--facts=40 --n_prompts=10 --k_shot=4 --n_samples=16
                              --max_new_tokens=12 --d_model=128 --layers=6 --iters=2]

Prints a markdown block for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import os
import platform
import tempfile
import time

import numpy as np


def build(args, d):
  """(items, dev, tokenizer dir = model dir, torch model): a fact world, its tokenizer, a
  random HF Llama saved with both."""
  import torch
  import transformers

  from factflip.data.tokenizer import train_tokenizer
  from factflip.data.world import WorldConfig, build_world
  world = build_world(WorldConfig(n_people=args.people))
  tok = train_tokenizer(world.texts(), os.path.join(d, "tok"), vocab_size=args.vocab)
  by_rel = {}
  for f in world.facts:
    if f.question and f.answers and f.split == "train":
      by_rel.setdefault(f.relation, []).append(f)
  rels = sorted(r for r, fs in by_rel.items() if len(fs) >= 2 * args.k_shot + 2)
  # test facts round-robin over the relations; the rest of each relation is its dev split
  items, i = [], 0
  while len(items) < args.facts:
    r = rels[i % len(rels)]
    j = i // len(rels)
    if j < len(by_rel[r]) // 2:
      items.append(by_rel[r][j])
    i += 1
  chosen = {f.id for f in items}
  dev = [f.replace(split="dev") for r in rels for f in by_rel[r] if f.id not in chosen]
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=args.d_model, intermediate_size=4 * args.d_model,
      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model_dir = os.path.join(d, "model")
  model.save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  return items, dev, model_dir, model, sum(p.numel() for p in model.parameters())


def hf_answers(model, tok, prompt, cfg, stop_ids, naive):
  """(greedy, [samples]) for one prompt with HF generate; stops at a newline or EOS."""
  import torch
  ids = torch.tensor([tok.encode(prompt)])
  kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": cfg.max_new_tokens,
        "eos_token_id": stop_ids, "pad_token_id": tok.pad_token_id}

  def text(row):
    return tok.decode(row[ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()

  with torch.no_grad():
    g = model.generate(ids, do_sample=False, **kw)
    sk = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": 1.0,
          **kw}
    if naive:
      samples = [text(model.generate(ids, **sk)[0]) for _ in range(cfg.n_samples)]
    else:
      out = model.generate(ids, num_return_sequences=cfg.n_samples, **sk)
      samples = [text(r) for r in out]
  return text(g[0]), samples


def hf_categorise(model, tok, items, prompts, cfg, stop_ids, naive=False):
  """(rows, seconds per prompt)."""
  from factflip.evals import qa
  from factflip.probes import slick
  rows, per_prompt = [], []
  for f, ps in zip(items, prompts):
    greedy, sampled = [], []
    for p in ps:
      t = time.perf_counter()
      g, s = hf_answers(model, tok, p, cfg, stop_ids, naive)
      per_prompt.append(time.perf_counter() - t)
      greedy.append(g)
      sampled += s
    p0 = float(np.mean([qa.exact_match(a, f.answers) for a in greedy]))
    ps_ = float(np.mean([qa.exact_match(a, f.answers) for a in sampled]))
    rows.append({"item": f.id, "greedy": " | ".join(greedy), "p_greedy": p0, "p_sample": ps_,
                 "category": slick.category(p0, ps_)})
  return rows, per_prompt


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--facts", type=int, default=40)
  ap.add_argument("--n_prompts", type=int, default=10)
  ap.add_argument("--k_shot", type=int, default=4)
  ap.add_argument("--n_samples", type=int, default=16)
  ap.add_argument("--max_new_tokens", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--people", type=int, default=300)
  ap.add_argument("--iters", type=int, default=2)
  ap.add_argument("--naive_facts", type=int, default=2, help="0 = skip the naive loop")
  ap.add_argument("--torch_threads", type=int, default=0,
                  help="0 = the faster of 1 and all cores, timed on a few prompts")
  args = ap.parse_args()
  import jax
  import torch
  import transformers

  from factflip import load_model, load_tokenizer
  from factflip.probes import slick
  cfg = slick.SliCKConfig(n_prompts=args.n_prompts, k_shot=args.k_shot, n_samples=args.n_samples,
                          max_new_tokens=args.max_new_tokens)
  tmp = tempfile.TemporaryDirectory()
  t = time.perf_counter()
  items, dev, model_dir, hf_model, n_params = build(args, tmp.name)
  t_build = time.perf_counter() - t
  model = load_model(model_dir)
  tok = load_tokenizer(model_dir)
  prompts = slick.slick_prompts(items, dev, cfg, seed=0)
  lens = [len(tok.encode(p)) for ps in prompts for p in ps]
  assert max(lens) + cfg.max_new_tokens <= model.cfg.max_seq_len, "prompts would be cut"
  nl = tok.encode("\n", add_special_tokens=False)
  assert len(nl) == 1
  stop_ids = [tok.eos_token_id, nl[0]]
  key = jax.random.key(0)
  n = len(items)
  print(f"{n} facts x {cfg.n_prompts} prompts ({cfg.k_shot}-shot, {min(lens)}-{max(lens)} "
        f"tokens, mean {np.mean(lens):.0f}) x (1 greedy + {cfg.n_samples} samples) x "
        f"{cfg.max_new_tokens} new tokens; model {n_params:,} params; world+tokenizer+model "
        f"{t_build:.1f} s", flush=True)

  # ours: the first call compiles; then best of --iters
  load0 = os.getloadavg()[0]
  t = time.perf_counter()
  ours = slick.categorise(model, tok, items, dev, cfg, seed=0, key=key)
  t_first = time.perf_counter() - t
  times = []
  for _ in range(args.iters):
    t = time.perf_counter()
    again = slick.categorise(model, tok, items, dev, cfg, seed=0, key=key)
    times.append(time.perf_counter() - t)
  assert again == ours
  t_ours = min(times)
  print(f"ours: first call {t_first:.2f} s, then {', '.join(f'{x:.2f}' for x in times)} s "
        f"(load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after)", flush=True)

  # HF: one greedy + one sampled call (all samples of the prompt) per prompt; torch's thread
  # count chosen in its favour (on a busy 2-core VM, 2 threads can be many times slower than 1)
  threads = [args.torch_threads] if args.torch_threads else sorted({1, os.cpu_count()})
  calib = {}
  for th in threads:
    torch.set_num_threads(th)
    hf_answers(hf_model, tok, prompts[0][0], cfg, stop_ids, False)          # warm-up
    t = time.perf_counter()
    for p in prompts[0][:3]:
      hf_answers(hf_model, tok, p, cfg, stop_ids, False)
    calib[th] = (time.perf_counter() - t) / 3
  th = min(calib, key=calib.get)
  torch.set_num_threads(th)
  print("HF s/prompt by torch threads: " + ", ".join(f"{k}: {v:.3f}" for k, v in calib.items())
        + f"; using {th}", flush=True)
  load0 = os.getloadavg()[0]
  t = time.perf_counter()
  hf, per_prompt = hf_categorise(hf_model, tok, items, prompts, cfg, stop_ids)
  t_hf = time.perf_counter() - t
  t_hf_median = float(np.median(per_prompt)) * len(per_prompt)
  print(f"HF batched per prompt: {t_hf:.2f} s (median prompt x prompts: {t_hf_median:.2f} s; "
        f"load average {load0:.2f} before, {os.getloadavg()[0]:.2f} after)", flush=True)
  same_greedy = sum(a == b for r, h in zip(ours, hf)
                    for a, b in zip(r["greedy"].split(" | "), h["greedy"].split(" | ")))
  t_naive = None
  if args.naive_facts:
    m = min(args.naive_facts, n)
    t = time.perf_counter()
    _, naive_pp = hf_categorise(hf_model, tok, items[:m], prompts[:m], cfg, stop_ids, naive=True)
    t_naive = float(np.median(naive_pp)) * n * cfg.n_prompts
    print(f"HF naive per sample ({m} facts, {time.perf_counter() - t:.2f} s; median prompt x "
          f"{n * cfg.n_prompts} prompts): {t_naive:.2f} s", flush=True)

  print()
  print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, "
        f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), torch "
        f"{torch.__version__}, transformers {transformers.__version__}.")
  print(f"Random HF Llama: d_model {args.d_model}, {args.layers} layers, 4 heads (2 KV), d_ff "
        f"{4 * args.d_model}, tied {len(tok)}-token embeddings ({n_params:,} params), float32. "
        f"{n} facts x {cfg.n_prompts} prompts ({cfg.k_shot}-shot, {min(lens)}-{max(lens)} "
        f"tokens) x (1 greedy + {cfg.n_samples} samples at T={cfg.temperature}, top-k "
        f"{cfg.top_k}) x {cfg.max_new_tokens} new tokens = {n * cfg.n_prompts * (1 + cfg.n_samples):,} "
        f"continuations. Greedy answers equal to HF's: {same_greedy}/{n * cfg.n_prompts}.")
  print()
  print("| impl | s / run | facts/s | ours faster by |")
  print("|---|---|---|---|")
  print(f"| factflip `slick.categorise` (warm; first call {t_first:.2f} s) | {t_ours:.2f} | "
        f"{n / t_ours:.2f} | 1.00x |")
  print(f"| HF `generate` ({th} torch thread{'s' * (th > 1)}), per prompt: greedy + "
        f"{cfg.n_samples} samples in one call | {t_hf:.2f} | {n / t_hf:.2f} | "
        f"{t_hf / t_ours:.1f}x |")
  print(f"| same, median prompt time x {n * cfg.n_prompts} prompts | {t_hf_median:.2f} | "
        f"{n / t_hf_median:.2f} | {t_hf_median / t_ours:.1f}x |")
  if t_naive is not None:
    print(f"| HF `generate`, one call per answer (median prompt of {m} facts x "
          f"{n * cfg.n_prompts}) | {t_naive:.2f} | "
          f"{n / t_naive:.2f} | {t_naive / t_ours:.1f}x |")
  tmp.cleanup()
  print()
  print(f"ratio (HF batched / ours): {t_hf / t_ours:.1f}x (by median prompt "
        f"{t_hf_median / t_ours:.1f}x); against our first call, compile included: "
        f"{t_hf / t_first:.1f}x")


if __name__ == "__main__":
  main()
