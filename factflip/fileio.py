"""Files: atomic writes and JSON / JSONL reading with file:line errors.

Owns: the one way factflip writes a file (temporary path in the same directory, then rename, so a
reader never sees half a file), and the one way it reads JSON records with their line numbers.
Must not: know about models, facts or any schema; callers validate fields.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator


class DataError(ValueError):
  """Bad input, located: `path`, 1-based `line` (or None), `record` index (or None), `field`."""

  def __init__(self, path: str, message: str, *, line: int | None = None,
               record: int | None = None, field: str | None = None):
    self.path, self.line, self.record, self.field, self.message = path, line, record, field, message
    where = path
    if line is not None:
      where += f":{line}"
    if record is not None:
      where += f": record {record}"
    if field is not None:
      where += f": field '{field}'"
    super().__init__(f"{where}: {message}")


@contextlib.contextmanager
def atomic_path(path: str):
  """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str):
  """Yield a temporary directory next to `path`; when the block succeeds it replaces `path`
  (an existing directory there is removed first), so readers see the old or the new whole."""
  import shutil

  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    yield tmp
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_csv(df, path: str) -> None:
  """Atomic CSV write of a pandas DataFrame, without its index."""
  with atomic_path(path) as tmp:
    df.to_csv(tmp, index=False)


def strict_json(v):
  """`v` with every NaN or infinity as None, so summary.json is strict JSON (browsers and most
  parsers reject the NaN token): an undefined value is null."""
  if isinstance(v, dict):
    return {k: strict_json(x) for k, x in v.items()}
  if isinstance(v, list | tuple):
    return [strict_json(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def write_json(path: str, obj, indent: int = 2) -> None:
  """Atomic JSON write (temporary file, then rename)."""
  write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str, records) -> int:
  """Atomic JSON-lines write of an iterable of JSON-able records; returns the count."""
  n = 0
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False))
      f.write("\n")
      n += 1
  return n


def read_json(path: str):
  """Parse a JSON file; a syntax error names the file and line."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(path, f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno) from e


_WS = " \t\r\n"


def iter_json_records(path: str, key: str | None = None,
                      errors: list | None = None) -> Iterator[tuple[int, int, object]]:
  """Yield (record index, line, value) for every record of a JSON data file.

  Accepts the layouts public datasets use: JSON lines (one value per line), one JSON array, several
  arrays one after another (TOFU's full.json), or an object holding the array under `key`
  (e.g. {"items": [...]}). Records inside arrays are located by the line they start on.
  Syntax errors raise DataError with the line; with an `errors` list, a bad line of a JSON-lines
  file is appended there instead and reading goes on at the next line (lenient loading).
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  decoder = json.JSONDecoder()
  line, last = 1, 0  # line number at offset `last`

  def line_at(offset: int) -> int:
    nonlocal line, last
    line += text.count("\n", last, offset)
    last = offset
    return line

  def skip(i: int) -> int:
    while i < len(text) and text[i] in _WS:
      i += 1
    return i

  def decode(i: int):
    try:
      return decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError(path, f"not valid JSON ({e.msg}, column {e.colno})", line=e.lineno) from e

  index = 0
  i = skip(0)
  if i == len(text):
    return
  if key is not None and text[i] == "{":
    # Walk the top-level object's members until `key`, then read its array below.
    i = skip(i + 1)
    while True:
      if i >= len(text) or text[i] != '"':
        raise DataError(path, f"expected a JSON object with key '{key}' holding the records",
                        line=line_at(min(i, len(text))))
      name, end = decode(i)
      i = skip(end)
      if i >= len(text) or text[i] != ":":
        raise DataError(path, "expected ':' after an object key", line=line_at(i))
      i = skip(i + 1)
      if name == key:
        if i >= len(text) or text[i] != "[":
          raise DataError(path, f"expected '{key}' to hold a JSON array", line=line_at(i))
        break
      _, end = decode(i)
      i = skip(end)
      if i < len(text) and text[i] == ",":
        i = skip(i + 1)
  while i < len(text):
    if text[i] == "[":  # an array of records
      i = skip(i + 1)
      if i < len(text) and text[i] == "]":
        i = skip(i + 1)
        continue
      while True:
        value, end = decode(i)
        yield index, line_at(i), value
        index += 1
        i = skip(end)
        if i < len(text) and text[i] == ",":
          i = skip(i + 1)
          continue
        if i < len(text) and text[i] == "]":
          i = skip(i + 1)
          break
        raise DataError(path, "expected ',' or ']' between array records", line=line_at(i))
      if key is not None:
        return  # the rest is the enclosing object
    else:
      try:
        value, end = decode(i)
      except DataError as e:
        if errors is None:
          raise
        errors.append(DataError(path, e.message, line=line_at(i), record=index))
        index += 1
        nl = text.find("\n", i)
        i = skip(len(text) if nl < 0 else nl + 1)
        continue
      yield index, line_at(i), value
      index += 1
      i = skip(end)
