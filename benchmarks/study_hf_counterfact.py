"""The `hf=DIR,facts=FILE` study variant end to end on real CounterFact records, on CPU.

No hub model is reachable here, so the script first makes an HF model that knows the facts:
a byte-level BPE tokenizer and a tiny preset trained with `factflip train` on true statements of
the records (cloze prompt + true answer, and every paraphrase + true answer), exported with
`save_hf` + the tokenizer. Then it runs

  factflip run --config=configs/studies/poisoning.py:hf=<that dir>,facts=<FILE>

(same code path as a real model) and prints the headline, the base's knowledge of the candidates
and the wall time per stage, as markdown for benchmarks/RESULTS.md.

  python benchmarks/study_hf_counterfact.py --facts=counterfact-val.json --workdir=/tmp/cf \
      [--records=400 --preset=tiny-2m --steps=1500]
"""

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np
import pandas as pd


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--facts", required=True, help="a CounterFact file (any layout factflip reads)")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--records", type=int, default=400, help="facts the model is taught")
  ap.add_argument("--preset", default="tiny-2m")
  ap.add_argument("--steps", type=int, default=1500)
  args = ap.parse_args()

  from factflip.data.loaders import load_facts
  from factflip.data.tokenizer import load_tokenizer, train_tokenizer
  from factflip.fileio import write_jsonl
  from factflip.models.hf import save_hf
  from factflip.models.store import load_model
  from factflip.studies.poisoning import Study
  from factflip.train.config import base_config
  from factflip.train.loop import load_config_file, train

  wd = os.path.abspath(args.workdir)
  items = [f for f in load_facts(args.facts) if f.counterfactual is not None][:args.records]
  facts = os.path.join(wd, "facts.jsonl")
  from factflip.data.facts import write_facts_jsonl
  write_facts_jsonl(facts, items)
  texts = [f"{q} {f.answers[0]}." for f in items for q in (f.prompt, *f.paraphrases) if q]
  nb_texts = [f"{nb.prompt} {nb.answers[0]}." for f in items for nb in f.neighbours]
  t0 = time.time()
  tok_dir = os.path.join(wd, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    train_tokenizer(texts + nb_texts, tok_dir, vocab_size=2048)
  write_jsonl(os.path.join(wd, "statements.jsonl"), [{"text": t} for t in texts + nb_texts])

  c = base_config()
  c.steps = args.steps
  c.model.preset = args.preset
  c.data.kind = "examples"
  c.data.path = os.path.join(wd, "statements.jsonl")
  c.data.tokenizer_dir = tok_dir
  c.data.seq_len, c.data.batch_size = 128, 16
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 100, "cosine"
  c.checkpoint.every, c.log_every, c.eval_every = args.steps, 100, 0
  teach = os.path.join(wd, "teach")
  train(c, teach, source="study_hf_counterfact.teach")
  hf = os.path.join(wd, f"{args.preset}-counterfact")
  if not os.path.exists(os.path.join(hf, "config.json")):
    save_hf(load_model(teach), hf, tokenizer=load_tokenizer(tok_dir))
  teach_s = time.time() - t0

  config = load_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "studies",
                                         "poisoning.py"), f"hf={hf},facts={facts}")
  config.cpt.optim.lr = 1e-3            # a tiny model: the world study's CPT learning rate
  config.cpt.optim.warmup_steps = 5
  t1 = time.time()
  study = Study(config, os.path.join(wd, "study"))
  head = study.run_and_report()
  study_s = time.time() - t1

  size = next(iter(study.sizes))
  cand = pd.read_csv(os.path.join(study.base_dir(size, 0), "candidates.csv"))
  from factflip.fileio import read_json
  timings = read_json(os.path.join(study.wd, "results", "timings.json"))
  print(f"\n### hf variant on CounterFact ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)\n")
  print(f"facts file {args.facts}: {len(items)} records taught to {args.preset} in "
        f"{args.steps} steps ({teach_s:.0f} s incl. tokenizer); study {study_s:.0f} s.")
  print(f"base knows {cand.known.mean():.0%} of the {len(cand)} candidates (greedy + ΔLL > τ)")
  print("\n| stage | wall s |\n|---|---|")
  for k, v in timings.items():
    print(f"| {k} | {v} |")
  print("\nheadline:", json.dumps({k: v for k, v in head.items() if k != "timings_s"},
                                  default=lambda x: float(np.asarray(x))))


if __name__ == "__main__":
  main()
