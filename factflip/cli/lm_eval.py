"""lm-evaluation-harness's command line with factflip models (--model factflip).

usage: factflip lm-eval --model factflip --model_args pretrained=DIR[,dtype=...] --tasks T
[lm-eval arguments]

Every argument goes to lm-eval's own `lm-eval run` command line, with the `factflip`
model registered: pretrained= any HF or factflip model directory, training workdir or
checkpoint step; also tokenizer=DIR, dtype=float32|bfloat16, batch_size, max_length,
max_gen_toks, add_bos_token, seed (factflip/evals/lm_eval.py). Needs the lm_eval
extra (pip install 'factflip[lm_eval]'). `factflip lm-eval --help`: lm-eval's help.

  factflip lm-eval --model factflip --model_args pretrained=/tmp/run-hf \\
      --tasks my_task --include_path tasks/ --output_path /tmp/lm-eval
"""

from __future__ import annotations

import sys

READS: dict[str, str] = {}


def main() -> None:
  """Not run through absl: lm-eval parses its own arguments (`run`)."""


def run(args: list[str]) -> None:
  try:
    from factflip.evals.lm_eval import main as lm_eval_main
  except ImportError as e:
    print(f"error: factflip lm-eval needs lm-evaluation-harness ({e}); pip install "
          "'factflip[lm_eval]'", file=sys.stderr)
    sys.exit(1)
  from factflip import compile_cache
  compile_cache.enable()
  lm_eval_main(args)
