"""Text for an SAE on a real model, from the public datasets a machine has (paper C's `cpu`
variant on SmolLM2: benchmarks/RESULTS.md): RWKU's membership-inference passages (Wikipedia-
style paragraphs about its 100 targets and their neighbours) and, so that the dictionary also
sees the prompts MoRFI reads it on, EntityQuestions' dev questions with their answers in the
study's QA format ("Q: <question>\\nA: <answer>.").

  python benchmarks/sae_text.py --rwku=DATA/rwku/Target --entityquestions=DATA/entityquestions \
      --out=/tmp/sae_text.jsonl

Writes one {"text": ...} record per passage or question (`factflip.train.inputs.read_examples`),
passages and questions interleaved in a seeded order, and prints the counts and tokens.
"""

import argparse
import json
import os

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--rwku", required=True, help="RWKU's Target folder")
  ap.add_argument("--entityquestions", required=True, help="EntityQuestions' folder")
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  from factflip.data.loaders import load_facts
  from factflip.data.qa_datasets import load_rwku_mia
  from factflip.fileio import atomic_path
  passages = [t for sets in load_rwku_mia(a.rwku).values() for k in ("forget", "retain")
              for t in sets[k]]
  qa = [f"Q: {f.question}\nA: {f.answers[0]}." for f in load_facts(a.entityquestions)
        if f.split == "dev" and f.question and f.answers]
  texts = passages + qa
  order = np.random.default_rng(a.seed).permutation(len(texts))
  with atomic_path(a.out) as tmp, open(tmp, "w") as f:
    for i in order:
      f.write(json.dumps({"text": texts[i]}) + "\n")
  words = sum(len(t.split()) for t in texts)
  print(f"{a.out}: {len(passages)} RWKU passages, {len(qa)} EntityQuestions dev questions, "
        f"{words} words ({os.path.getsize(a.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
  main()
