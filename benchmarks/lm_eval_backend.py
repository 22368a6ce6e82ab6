"""The same lm-evaluation-harness tasks through lm-eval's `hf` model and `--model factflip`, side
by side in one run: requests/s per task, and the agreement of the results.

  python benchmarks/lm_eval_backend.py [--preset=tiny-8m --questions=200 --gen=48 --batch=16
                                        --endings]

A random model of the preset (exported with `save_hf`) and a tokenizer trained on the fact world
with the preset's vocabulary; tasks built from the world's facts: a 4-choice multiple-choice
task with 2-shot contexts (each question's choices share its context; --endings makes every
choice a sentence long, as in HellaSwag, instead of one object name) and a greedy
generate_until task (16 tokens, stop at a newline). Each backend runs the tasks twice in one
process; the second, warm run (factflip's programs compiled) is the one reported, the first
is printed too. Timed: the backend's request calls (loglikelihood / generate_until: the model's
share), and simple_evaluate end to end (task building and metrics, the same code for both).
Prints markdown rows for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np


def build(d: str, preset: str, n_q: int, n_gen: int, ending: bool) -> tuple:
  from flax import nnx

  from factflip import Transformer, get_preset, save_hf
  from factflip.data.tokenizer import train_tokenizer
  from factflip.data.world import WorldConfig, build_world
  from factflip.evals.lm_eval import write_local_task
  world = build_world(WorldConfig(n_people=300))
  cfg = get_preset(preset)
  tok = train_tokenizer(world.texts(), os.path.join(d, "tok"), vocab_size=cfg.vocab_size)
  cfg = cfg.replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                    eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
  model_dir = os.path.join(d, "model")
  save_hf(Transformer(cfg, rngs=nnx.Rngs(0)), model_dir)
  tok.save_pretrained(model_dir)
  rng = np.random.default_rng(0)
  facts = [f for f in world.facts if f.prompt and f.counterfactual and not f.meta.get("two_hop")]
  pool: dict[str, list[str]] = {}
  for f in facts:
    pool.setdefault(f.relation, []).append(f.answers[0])
  mc, gen = [], []
  for f in facts[:n_q]:
    others = sorted({a for a in pool[f.relation] if a != f.answers[0]} - {f.counterfactual})
    wrong = [f.counterfactual, *rng.choice(others, 2, replace=False)]
    choices = [f.answers[0], *wrong]
    rng.shuffle(choices)
    gold = choices.index(f.answers[0])
    if ending:                          # hellaswag-like: each choice goes on for a sentence
      more = facts[int(rng.integers(len(facts)))]
      choices = [f"{c}. {more.prompt} {more.answers[0]}" for c in choices]
    shots = [facts[j] for j in rng.choice(len(facts), 2, replace=False)]
    ctx = "".join(f"{s.prompt} {s.answers[0]}.\n" for s in shots) + f.prompt
    mc.append({"context": ctx, "choices": [str(c) for c in choices],
               "gold": gold})
  for f in facts[n_q:n_q + n_gen]:
    gen.append({"question": f.question or f.prompt, "answer": f.answers[0]})
  tasks = os.path.join(d, "tasks")
  os.makedirs(tasks)
  for name, rows, body in (
      ("bench_mc", mc, ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
                        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")),
      ("bench_gen", gen, ('output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
                          'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
                          "  max_gen_toks: 16\n  do_sample: false\n"
                          "metric_list:\n  - metric: exact_match\n"))):
    write_local_task(tasks, name, rows, body)
  return model_dir, tasks, sum(len(r["choices"]) for r in mc), len(gen)


def run(model: str, model_dir: str, tasks: str, task: str, batch: int):
  import lm_eval
  from lm_eval.tasks import TaskManager

  import factflip.evals.lm_eval  # noqa: F401
  lm = lm_eval.api.registry.get_model(model).create_from_arg_string(
      f"pretrained={model_dir},dtype=float32", {"batch_size": batch, "device": "cpu"})
  spent = [0.0]
  def timer(f):
    def timed(*a, **kw):
      t = time.perf_counter()
      try:
        return f(*a, **kw)
      finally:
        spent[0] += time.perf_counter() - t
    return timed
  for name in ("loglikelihood", "generate_until"):     # the model's share of the wall time
    setattr(lm, name, timer(getattr(lm, name)))
  times, model_s, res = [], [], None
  for _ in range(2):
    spent[0] = 0.0
    t = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=tasks))
    times.append(time.perf_counter() - t)
    model_s.append(spent[0])
  return times, model_s, res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny-8m")
  ap.add_argument("--questions", type=int, default=200)
  ap.add_argument("--gen", type=int, default=48)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--endings", action="store_true",
                  help="multi-token choices: each choice continues with a sentence")
  args = ap.parse_args()
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  import jax
  import lm_eval
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as d:
    model_dir, tasks, n_mc, n_gen = build(d, args.preset, args.questions, args.gen,
                                          args.endings)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, lm-eval "
          f"{lm_eval.__version__}, {datetime.date.today()}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| task | requests | hf model s (cold / warm) | factflip model s (cold / warm) | "
          "hf req/s | factflip req/s | ratio | end to end s hf / factflip (ratio) | agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, n in (("bench_mc", n_mc), ("bench_gen", n_gen)):
      (_, he), (h0, h1), hres = run("hf", model_dir, tasks, task, args.batch)
      (_, fe), (f0, f1), fres = run("factflip", model_dir, tasks, task, args.batch)
      if task == "bench_mc":
        a = np.asarray([r[0][0] for s in hres["samples"][task] for r in s["resps"]])
        b = np.asarray([r[0][0] for s in fres["samples"][task] for r in s["resps"]])
        same = (hres["results"][task]["acc,none"] == fres["results"][task]["acc,none"]
                and hres["results"][task]["acc_norm,none"]
                == fres["results"][task]["acc_norm,none"])
        agree = f"acc/acc_norm equal: {same}; max abs dLL {np.abs(a - b).max():.1e}"
      else:
        ga = [s["resps"][0][0] for s in hres["samples"][task]]
        gb = [s["resps"][0][0] for s in fres["samples"][task]]
        agree = f"identical generations: {sum(x == y for x, y in zip(ga, gb))}/{len(ga)}"
      print(f"| {task} | {n} | {h0:.2f} / {h1:.2f} | {f0:.2f} / {f1:.2f} | {n / h1:.0f} | "
            f"{n / f1:.0f} | {h1 / f1:.2f}x | {he:.1f} / {fe:.1f} ({he / fe:.2f}x) | {agree} |")


if __name__ == "__main__":
  main()
