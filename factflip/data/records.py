"""The one load loop every dataset loader uses, and the small helpers they share.

Owns: `load_records` (a dataset's files, record by record, through a parser into FactItems:
unique ids, located errors, lenient skipping), finding a dataset's files in its folder in
natural order, split names from file names, and typed field access beyond `Record`'s.
Must not: know any public format (`data.edit_datasets`, `data.qa_datasets`) or the schema's
rules (`data.facts`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from factflip.data.facts import FactItem, FactList, Neighbour, Record, UniqueIds, check_item
from factflip.fileio import DataError, iter_json_records

Parse = Callable[[Record], FactItem]

SPLIT_WORDS = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev",
               "test": "test", "eval": "eval", "forget": "forget", "retain": "retain"}


def load_records(path: str, fmt: str, files: Iterable[tuple[str, Parse]], *, lenient: bool,
          key: str | None = None) -> FactList:
  """Parse every record of every (file, parser) pair; validate, check ids, collect or raise."""
  errors: list | None = [] if lenient else None
  items: list[FactItem] = []
  ids = UniqueIds()
  for file, parse in files:
    for index, line, obj in iter_json_records(file, key=key, errors=errors):
      try:
        rec = Record(obj, file, line, index)
        item = check_item(parse(rec), rec)
        ids.check(item, file, line, index)
      except DataError as e:
        if errors is None:
          raise
        errors.append(e)
        continue
      items.append(item)
  return FactList(items, source=path, format=fmt, skipped=errors or ())


def natural_key(text: str) -> list:
  """Sort key comparing digit runs as numbers: P17 < P106, 2_Confucius < 10_Prince_Harry."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def list_folder(folder: str, match: Callable[[str], bool], dirs: bool = False) -> list[str]:
  """Paths of the (non-hidden) files, or sub-folders, in `folder` whose name matches."""
  out = []
  for name in os.listdir(folder):
    full = os.path.join(folder, name)
    if not name.startswith(".") and match(name) and (os.path.isdir(full) if dirs
                                                     else os.path.isfile(full)):
      out.append(full)
  return sorted(out, key=natural_key)


def dataset_files(path: str, match: Callable[[str], bool], what: str) -> list[str]:
  """`path` itself if it is a file, else the files in the folder that match (at least one)."""
  if os.path.isfile(path):
    return [path]
  files = list_folder(path, match)
  if not files:
    raise DataError(path, f"no {what} files in this folder")
  return files


def is_data_file(name: str) -> bool:
  return name.endswith((".json", ".jsonl"))


def file_stem(file: str) -> str:
  name = os.path.basename(file)
  return name.rsplit(".", 1)[0] if "." in name else name


def split_from_name(stem: str, default: str) -> str:
  """The split a file name names (counterfact-val -> dev, forget01 -> forget), else `default`."""
  for word in reversed(re.split(r"[^a-z]+", stem.lower())):
    if word in SPLIT_WORDS:
      return SPLIT_WORDS[word]
  return default


def int_field(rec: Record, field: str, value: Any = ..., *, required: bool = True) -> int | None:
  """An integer (a JSON number without fraction; not a boolean)."""
  if value is ...:
    value = rec.get(field)
  if value is None:
    if required:
      rec.fail(field, "missing; expected an integer")
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    rec.fail(field, f"expected an integer, got {type(value).__name__} {value!r:.60}")
  return value


def obj_field(rec: Record, field: str, value: Any = ..., *, required: bool = True) -> dict | None:
  """A nested JSON object."""
  if value is ...:
    value = rec.get(field)
  if value is None and not required:
    return None
  if not isinstance(value, dict):
    what = "missing" if value is None else f"got {type(value).__name__}"
    rec.fail(field, f"{what}; expected a JSON object")
  return value


def neighbours_field(rec: Record, pfield: str, afield: str, obj: dict | None = None,
                prefix: str = "") -> tuple[Neighbour, ...]:
  """One optional (prompt, answers) neighbour; a prompt without an answer is an error."""
  obj = rec.obj if obj is None else obj
  prompt = rec.text(prefix + pfield, obj.get(pfield), required=False)
  if prompt is None:
    return ()
  return (Neighbour(prompt, rec.texts(prefix + afield, obj.get(afield), required=True)),)

