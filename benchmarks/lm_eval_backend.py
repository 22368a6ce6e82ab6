"""The same lm-evaluation-harness tasks through lm-eval's `hf` model and `--model factflip`, side
by side in one run: requests/s per task, and the agreement of the results.

  python benchmarks/lm_eval_backend.py [--preset=tiny-8m --questions=200 --gen=48 --batch=16
                                        --endings --apply_chat_template]
  python benchmarks/lm_eval_backend.py --model=DIR|FILE.gguf --facts=FILE [--questions=50
                                        --gen=16 --shots=2 --batch=16 --apply_chat_template]

Preset mode: a random model of the preset (exported with `save_hf`) and a tokenizer trained on
the fact world with the preset's vocabulary (with --apply_chat_template, given a ChatML
template); tasks built from the world's facts: a 4-choice multiple-choice task with 2-shot
contexts (each question's choices share its context; --endings makes every choice a sentence
long, as in HellaSwag, instead of one object name) and a greedy generate_until task (16
tokens, stop at a newline).

--model mode: a real model, an HF directory or a GGUF file (which `hf` reads as the HF
directory factflip writes from it, `factflip convert --to=hf`: both backends score the same
float32 weights, with the GGUF's tokenizer and chat template); tasks built from the --facts
file (`factflip.load_facts`: CounterFact, ...): a 4-choice multiple-choice task (the true
answer, the counterfactual and two other answers of the same relation, or of the same prompt
template when the file names no relation) with lm-eval's own --shots-shot contexts, and a
greedy generate_until task over the next --gen facts' prompts (16 tokens, stop at a newline or
a full stop). --apply_chat_template renders both tasks with the model's chat template on both
backends (few-shot examples as turns: lm-eval's default).

Each backend runs the tasks twice in one process; the second, warm run (factflip's programs
compiled) is the one reported, the first is printed too. Timed: the backend's request calls
(loglikelihood / generate_until: the model's share), and simple_evaluate end to end (task
building and metrics, the same code for both). Prints markdown rows for benchmarks/RESULTS.md.
"""

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

import numpy as np

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MC_BODY = ('output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
           'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
           "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def build(d: str, preset: str, n_q: int, n_gen: int, ending: bool, chat: bool) -> tuple:
  """Preset mode: (hf's model, factflip's model: the same directory, tasks folder, MC
  requests, gen requests)."""
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
  if chat:
    tok.chat_template = CHATML
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
      ("bench_mc", mc, MC_BODY),
      ("bench_gen", gen, ('output_type: generate_until\ndoc_to_text: "Q: {{question}}\\nA:"\n'
                          'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
                          "  max_gen_toks: 16\n  do_sample: false\n"
                          "metric_list:\n  - metric: exact_match\n"))):
    write_local_task(tasks, name, rows, body)
  return model_dir, model_dir, tasks, sum(len(r["choices"]) for r in mc), len(gen)


def hf_copy(d: str, model: str) -> str:
  """`model` as the `hf` backend reads it: an HF directory as it is; a GGUF file as the HF
  directory (dequantised float32 weights, the GGUF's tokenizer and chat template) that
  `factflip convert --to=hf` writes."""
  from factflip import load_model, load_tokenizer, save_hf
  from factflip.gguf_io import is_gguf
  if not is_gguf(model):
    return model
  out = os.path.join(d, "hf_model")
  save_hf(load_model(model, dtype="float32"), out)
  load_tokenizer(model).save_pretrained(out)
  return out


def relation_pools(facts) -> tuple[list[str], dict[str, list[str]]]:
  """Each fact's relation key (its relation, else its prompt template: the prompt with the
  subject as {}) and each key's answers and counterfactuals, sorted (a fact's distractors)."""
  keys, pools = [], {}
  for f in facts:
    key = f.relation
    if key in ("", "unknown", None):
      key = f.prompt.replace(f.subject, "{}") if f.subject else f.prompt
    keys.append(key)
    pools.setdefault(key, set()).update(a for a in (f.answers[0], f.counterfactual) if a)
  return keys, {k: sorted(v) for k, v in pools.items()}


def build_facts(d: str, facts_path: str, n_q: int, n_gen: int, shots: int) -> tuple:
  """--model mode's tasks from a facts file: (tasks folder, MC requests, gen requests)."""
  from factflip import load_facts
  from factflip.evals.lm_eval import write_local_task
  facts = [f for f in load_facts(facts_path) if f.prompt and f.answers and f.counterfactual]
  keys, pools = relation_pools(facts)
  rng = np.random.default_rng(0)
  mc, used = [], set()
  for i, f in enumerate(facts):
    if len(mc) == n_q:
      break
    others = sorted(set(pools[keys[i]]) - {f.answers[0], f.counterfactual})
    if len(others) < 2:
      continue
    choices = [f.answers[0], f.counterfactual, *rng.choice(others, 2, replace=False)]
    rng.shuffle(choices)
    mc.append({"context": f.prompt, "choices": [str(c) for c in choices],
               "gold": choices.index(f.answers[0])})
    used.add(i)
  if len(mc) < max(n_q, shots + 1):
    raise SystemExit(f"{facts_path}: only {len(mc)} facts have a counterfactual and two other "
                     f"answers of their relation; asked for --questions={n_q}")
  gen = [{"context": f.prompt, "answer": f.answers[0]}
         for i, f in enumerate(facts) if i not in used][:n_gen]
  tasks = os.path.join(d, "tasks")
  os.makedirs(tasks)
  write_local_task(tasks, "bench_mc", mc, MC_BODY + f"num_fewshot: {shots}\n")
  write_local_task(tasks, "bench_gen", gen, (
      'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{answer}}"\n'
      'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 16\n  do_sample: false\n'
      "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
      "    ignore_punctuation: true\n"))
  return tasks, 4 * len(mc), len(gen)


def run(model: str, model_dir: str, tasks: str, task: str, batch: int, chat: bool):
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
                                  task_manager=TaskManager(include_path=tasks),
                                  apply_chat_template=chat)
    times.append(time.perf_counter() - t)
    model_s.append(spent[0])
  return times, model_s, res


def agreement(task: str, hres: dict, fres: dict) -> str:
  """How far the two backends' results agree: the prompts lm-eval built (the chat template's
  rendering), acc / acc_norm of each and the largest per-request |ΔLL|, or the generations."""
  hs, fs = (sorted(r["samples"][task], key=lambda x: x["doc_id"]) for r in (hres, fres))
  prompts = [[a[0] for s in ss for a in s["arguments"]] for ss in (hs, fs)]
  same = f"same prompts: {prompts[0] == prompts[1]}"
  if task != "bench_mc":
    ga, gb = ([s["resps"][0][0] for s in ss] for ss in (hs, fs))
    return f"{same}; identical generations: {sum(x == y for x, y in zip(ga, gb))}/{len(ga)}"
  a, b = (np.asarray([r[0][0] for s in ss for r in s["resps"]]) for ss in (hs, fs))
  acc = "; ".join(f"{m} hf {hres['results'][task][f'{m},none']:.3f} / factflip "
                  f"{fres['results'][task][f'{m},none']:.3f}" for m in ("acc", "acc_norm"))
  return f"{same}; {acc}; max abs dLL {np.abs(a - b).max():.1e}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny-8m")
  ap.add_argument("--questions", type=int, default=200)
  ap.add_argument("--gen", type=int, default=48)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--endings", action="store_true",
                  help="preset mode: multi-token choices, each continues with a sentence")
  ap.add_argument("--model", default="",
                  help="a real model (HF directory or .gguf file) instead of the preset")
  ap.add_argument("--facts", default="",
                  help="with --model: the facts file the tasks are built from (load_facts)")
  ap.add_argument("--shots", type=int, default=2, help="with --model: lm-eval's num_fewshot")
  ap.add_argument("--apply_chat_template", action="store_true",
                  help="render the tasks with the model's chat template on both backends")
  args = ap.parse_args()
  if args.model and not args.facts:
    ap.error("--model needs --facts=FILE (the facts the tasks are built from)")
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  import jax
  import lm_eval
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as d:
    if args.model:
      hf_dir, ff_model = hf_copy(d, args.model), args.model
      tasks, n_mc, n_gen = build_facts(d, args.facts, args.questions, args.gen, args.shots)
    else:
      hf_dir, ff_model, tasks, n_mc, n_gen = build(d, args.preset, args.questions, args.gen,
                                                   args.endings, args.apply_chat_template)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, lm-eval "
          f"{lm_eval.__version__}, {datetime.date.today()}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| task | requests | hf model s (cold / warm) | factflip model s (cold / warm) | "
          "hf req/s | factflip req/s | ratio | end to end s hf / factflip (ratio) | agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, n in (("bench_mc", n_mc), ("bench_gen", n_gen)):
      (_, he), (h0, h1), hres = run("hf", hf_dir, tasks, task, args.batch,
                                    args.apply_chat_template)
      (_, fe), (f0, f1), fres = run("factflip", ff_model, tasks, task, args.batch,
                                    args.apply_chat_template)
      agree = agreement(task, hres, fres)
      print(f"| {task} | {n} | {h0:.2f} / {h1:.2f} | {f0:.2f} / {f1:.2f} | {n / h1:.0f} | "
            f"{n / f1:.0f} | {h1 / f1:.2f}x | {he:.1f} / {fe:.1f} ({he / fe:.2f}x) | {agree} |")


if __name__ == "__main__":
  main()
