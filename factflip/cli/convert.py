"""Convert a model between the HF, GGUF and factflip formats.

usage: factflip convert --model=DIR|FILE.gguf --out=DIR [--to=hf|factflip]

Reads an HF (safetensors + config.json) or factflip model directory, or a GGUF file
(dequantised to float32), and writes it as an HF or factflip directory, with the
model's tokenizer when it has one; our models are our own, HF is the interchange
format.

  factflip convert --model=/models/Qwen2.5-0.5B --out=/tmp/qwen-ff --to=factflip
  factflip convert --model=SmolLM2-135M-Instruct.Q4_1.gguf --out=/tmp/smollm2
"""

from __future__ import annotations

from factflip.cli.flags import FLAGS

READS = {"model": "The model to read: an HF or factflip directory, or a .gguf file.",
         "out": "The directory the converted model is written to.",
         "to": "The format to write."}
REQUIRED = ("model", "out")


def main() -> None:
  from factflip import load_model, load_tokenizer, save_hf, save_model
  from factflip.data.tokenizer import has_tokenizer

  model = load_model(FLAGS.model)
  # a GGUF's or the directory's own tokenizer goes along
  tok = load_tokenizer(FLAGS.model) if has_tokenizer(FLAGS.model) else None
  if FLAGS.to == "hf":
    save_hf(model, FLAGS.out, tokenizer=tok)
  else:
    save_model(model, FLAGS.out)
    if tok is not None:
      tok.save_pretrained(FLAGS.out)
  print(f"wrote {FLAGS.to} model{' and tokenizer' if tok is not None else ''} to {FLAGS.out}")
