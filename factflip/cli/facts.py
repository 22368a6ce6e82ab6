"""Load a facts dataset: counts, bad records, optionally our JSONL.

usage: factflip facts --facts=PATH [--format=NAME --lenient --out=FILE.jsonl]

Reads any supported facts format (auto-detected: factflip JSONL, CounterFact's ROME or
EasyEdit layout, {"items"}, ...; see factflip/data/loaders.py) and prints counts per
relation; a bad record is an error naming file, line and field unless --lenient.

  factflip facts --facts=/data/counterfact.json --out=/tmp/counterfact.jsonl
"""

from __future__ import annotations

import sys

from absl import app

from factflip.cli.flags import FLAGS

READS = {"facts": "The dataset file or folder to read.",
         "format": "The dataset format (default: detected from the file).",
         "lenient": "Skip and count bad records instead of failing on the first.",
         "out": "Write the loaded facts here as factflip JSONL."}
REQUIRED = ("facts",)


def load(path: str | None, fmt: str | None, lenient: bool, out: str | None):
  """Load `path` (print its counts and skipped records), and write it to `out` as our JSONL."""
  from factflip.data.facts import write_facts_jsonl
  from factflip.data.loaders import load_facts

  if not path:
    raise app.UsageError("facts needs --facts=PATH (a dataset file or folder)")
  items = load_facts(path, fmt, lenient=lenient)
  print(items.summary())
  for e in items.skipped[:20]:
    print(f"  skipped: {e}")
  if len(items.skipped) > 20:
    print(f"  ... and {len(items.skipped) - 20} more")
  if out:
    write_facts_jsonl(out, items)
    print(f"wrote {len(items)} items to {out}")
  return items


def main() -> None:
  from factflip.fileio import DataError

  try:
    load(FLAGS.facts, FLAGS.format, FLAGS.lenient, FLAGS.out)
  except DataError as e:
    print(f"error: {e}\n(--lenient skips and counts bad records instead)", file=sys.stderr)
    sys.exit(2)
