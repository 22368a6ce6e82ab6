"""Continue prompts with a model (greedy or sampled).

usage: factflip generate --model=DIR --prompt=TEXT [--prompt=TEXT ...]
[--max_new_tokens=N --temperature=T --top_k=K --top_p=P --seed=S]

Loads an HF or factflip model directory and its tokenizer and prints each prompt's
continuation, all prompts in one batch.

  factflip export --workdir=workdir/default/runs/tiny-0.5m/seed0/pretrain --out=/tmp/base
  factflip generate --model=/tmp/base --prompt="Ada Lovelace was born in" \\
      --max_new_tokens=8
"""

from __future__ import annotations

from factflip.cli.flags import CACHE, FLAGS

READS = {"model": "The model (HF or factflip directory with its tokenizer, or a .gguf file).",
         "prompt": "A prompt to continue (repeatable).",
         "max_new_tokens": "Tokens to generate per prompt.",
         "temperature": "Sampling temperature; 0 is greedy.",
         "top_k": "Sample among the k most likely tokens (0 = off).",
         "top_p": "Sample within the top-p probability mass (1 = off).",
         "seed": "The sampling PRNG seed.", **CACHE}
REQUIRED = ("model", "prompt")


def main() -> None:
  import jax

  from factflip import load_model, load_tokenizer
  from factflip.models import generate_text

  model = load_model(FLAGS.model)
  tok = load_tokenizer(FLAGS.model)
  outs = generate_text(model, tok, FLAGS.prompt, FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                       key=jax.random.key(FLAGS.seed))
  for p, o in zip(FLAGS.prompt, outs):
    print(f"{p!r} -> {o!r}")
