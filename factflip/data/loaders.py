"""Public knowledge datasets -> FactItems: one loader per format, a registry, auto-detection.

Owns: the registry of formats (`FORMATS`: our own JSONL here; CounterFact, zsRE and MzsRE in
`data.edit_datasets`; EntityQuestions, RWKU and TOFU in `data.qa_datasets`), telling the formats
apart (`detect_format`) and the entry point (`load_facts`). The one load loop and its helpers:
`data.records`.
Must not: define the schema or its rules (facts.py), parse JSON itself (fileio.py), or know where
data lives (callers pass paths).

Rules every loader keeps
- Each record goes through `Record` (typed, located field access) and `check_item`, and ids are
  unique over the whole load. A bad record raises DataError naming file, line, record and field;
  with lenient=True it is skipped and listed in `FactList.skipped`, so loaded + skipped = records
  read. A file that is not valid JSON between records still raises when lenient (its records
  cannot be counted), except JSON lines, where the bad line is skipped.
- A folder is read file by file in natural sorted order (P17 before P106, 2_X before 10_Y).
- Answers are stripped (CounterFact's simplified layout stores " French"); `source` is the format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from factflip.data.edit_datasets import (
  load_counterfact,
  load_counterfact_easyedit,
  load_counterfact_simple,
  load_mzsre,
  load_zsre,
)
from factflip.data.facts import FactItem, FactList, Record, item_from_record, read_facts_jsonl
from factflip.data.qa_datasets import (
  EQ_NAME,
  EQ_TEMPLATES,
  RWKU_FILES,
  load_entityquestions,
  load_rwku,
  load_tofu,
)
from factflip.data.records import dataset_files, is_data_file, list_folder, load_records
from factflip.fileio import DataError, iter_json_records

# ---------------------------------------------------------------------------------------------
# factflip: our JSONL.

def load_factflip(path: str, *, lenient: bool = False) -> FactList:
  """Our JSONL (FactItem.to_dict per line); a folder loads every *.jsonl in it."""
  if os.path.isfile(path):
    return read_facts_jsonl(path, lenient=lenient)
  files = dataset_files(path, lambda n: n.endswith(".jsonl"), "*.jsonl")

  def parse(rec: Record) -> FactItem:
    return item_from_record(rec.obj, rec.path, rec.line, rec.index)

  return load_records(path, "factflip", [(f, parse) for f in files], lenient=lenient)


# ---------------------------------------------------------------------------------------------
# Registry, detection, entry point.

FORMATS: dict[str, Callable[..., FactList]] = {
    "factflip": load_factflip,
    "counterfact": load_counterfact,
    "counterfact_easyedit": load_counterfact_easyedit,
    "counterfact_simple": load_counterfact_simple,
    "entityquestions": load_entityquestions,
    "rwku": load_rwku,
    "tofu": load_tofu,
    "zsre": load_zsre,
    "mzsre": load_mzsre,
}


def _format_of_record(r: Any) -> str | None:
  """The format a first record's keys point to, or None."""
  if not isinstance(r, dict):
    return None
  keys = set(r)
  items = r.get("items")
  if isinstance(items, list) and items and isinstance(items[0], dict):
    keys = set(items[0])
  rules = (("counterfact", {"case_id", "requested_rewrite"}),
           ("counterfact_easyedit", {"case_id", "prompt", "target_new", "ground_truth"}),
           ("counterfact_simple", {"prompt", "target_true", "target_new"}),
           ("rwku", {"query", "answer"}),
           ("zsre", {"src", "alt", "answers"}),
           ("factflip", {"id", "answers"}),
           ("entityquestions", {"question", "answers"}),
           ("tofu", {"question", "answer"}),
           ("tofu", {"prompt", "response"}))
  for fmt, need in rules:
    if need <= keys:
      return fmt
  if "en" in r and isinstance(r["en"], dict) and {"src", "alt"} <= set(r["en"]):
    return "mzsre"
  return None


def _detect_file(path: str) -> str:
  name = os.path.basename(path)
  if EQ_NAME.match(name):
    return "entityquestions"
  if name in RWKU_FILES:
    return "rwku"
  first = next(iter_json_records(path), None)
  if first is None:
    raise DataError(path, "no records; cannot tell the format")
  index, line, record = first
  fmt = _format_of_record(record)
  if fmt is None:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(path, f"cannot tell the format from the first record (keys {keys}); "
                          f"pass format=, one of: {', '.join(FORMATS)}", line=line, record=index)
  return fmt


def detect_format(path: str) -> str:
  """The format name of a file or folder: from EntityQuestions' and RWKU's file names and
  folder layouts, else from the keys of the first record (of the folder's first data file)."""
  if not os.path.isdir(path):
    return _detect_file(path)
  names = os.listdir(path)
  subdirs = [os.path.join(path, n) for n in names if os.path.isdir(os.path.join(path, n))]
  if set(names) & set(RWKU_FILES) or any(set(os.listdir(d)) & set(RWKU_FILES) for d in subdirs):
    return "rwku"
  if EQ_TEMPLATES in names or any(EQ_NAME.match(n) for n in names) or any(
      EQ_NAME.match(n) for d in subdirs if os.path.basename(d) in ("train", "dev", "test")
      for n in os.listdir(d)):
    return "entityquestions"
  files = list_folder(path, is_data_file)
  if not files:
    raise DataError(path, "no data files (*.json, *.jsonl) in this folder; cannot tell the "
                          f"format (one of: {', '.join(FORMATS)})")
  jsonl = [f for f in files if f.endswith(".jsonl")]
  return _detect_file((jsonl or files)[0])


def load_facts(path: str | os.PathLike, format: str | None = None, *,
               lenient: bool = False) -> FactList:
  """Load a dataset file or folder as FactItems. `format` is a FORMATS name; None detects it.
  Strict: the first bad record raises DataError (file, line, record, field). Lenient: bad
  records are skipped and listed in `.skipped`."""
  path = os.fspath(path)
  if format is not None and format not in FORMATS:
    raise DataError(path, f"unknown format {format!r}; expected one of: {', '.join(FORMATS)}",
                    field="format")
  if not os.path.exists(path):
    raise DataError(path, "no such file or folder")
  return FORMATS[format or detect_format(path)](path, lenient=lenient)
