"""Question-answering and unlearning datasets -> FactItems: EntityQuestions, RWKU (its probes
and its membership-inference texts) and TOFU.

Owns: one loader per dataset (`data.loaders.FORMATS` registers them), `load_rwku_mia`, and
the file names that identify EntityQuestions and RWKU (`EQ_NAME`, `EQ_TEMPLATES`,
`RWKU_FILES`).
Must not: detect formats (`data.loaders`) or define the schema (`data.facts`).
"""

from __future__ import annotations

import os
import re
from functools import partial
from typing import Any

from factflip.data.facts import FactItem, FactList, Record
from factflip.data.records import (
  dataset_files,
  file_stem,
  int_field,
  is_data_file,
  list_folder,
  load_records,
  natural_key,
  split_from_name,
)
from factflip.fileio import DataError, iter_json_records, read_json

EQ_NAME = re.compile(r"(P\d+)\.(train|dev|test)\.json$")
EQ_TEMPLATES = "relation_query_templates.json"
RWKU_FILES = ("forget_level1.json", "forget_level2.json", "forget_level3.json",
              "neighbor_level1.json", "neighbor_level2.json")
RWKU_MIA_FILES = ("forget_mia.json", "retain_mia.json")

# ---------------------------------------------------------------------------------------------
# EntityQuestions.

def _eq_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = list_folder(path, EQ_NAME.match)
  for sub in list_folder(path, lambda n: n in ("train", "dev", "test"), dirs=True):
    files += list_folder(sub, EQ_NAME.match)
  if not files:
    raise DataError(path, "no EntityQuestions files (P<id>.<split>.json, here or in "
                          "train/ dev/ test/) in this folder")
  return sorted(files, key=natural_key)


def _read_templates(path: str) -> dict[str, str]:
  """relation_query_templates.json: {relation: question with one "[X]" for the subject}."""
  obj = read_json(path)
  if not isinstance(obj, dict):
    raise DataError(path, "expected a JSON object mapping relation ids to question templates")
  for rel, t in obj.items():
    if not isinstance(t, str) or t.count("[X]") != 1:
      raise DataError(path, f"expected a question with one '[X]', got {t!r:.60}", field=rel)
  return obj


def _find_templates(file: str, cache: dict) -> dict[str, str]:
  """The templates in the file's folder or up to two folders above it ({} if none)."""
  folder = os.path.dirname(os.path.abspath(file))
  if folder not in cache:
    templates: dict[str, str] = {}
    d = folder
    for _ in range(3):
      candidate = os.path.join(d, EQ_TEMPLATES)
      if os.path.isfile(candidate):
        templates = _read_templates(candidate)
        break
      d = os.path.dirname(d)
    cache[folder] = templates
  return cache[folder]


def subject_from_template(question: str, template: str) -> str | None:
  """The "[X]" of `template` as it appears in `question`, or None when they do not match."""
  pre, _, post = template.partition("[X]")
  if (len(question) > len(pre) + len(post) and question.startswith(pre)
      and question.endswith(post)):
    return question[len(pre):len(question) - len(post)].strip() or None
  return None


def _eq_record(rec: Record, relation: str, split: str, template: str | None) -> FactItem:
  question = rec.text("question")
  return FactItem(
      id=f"eq-{relation}-{split}-{rec.index}", relation=relation, question=question,
      subject=subject_from_template(question, template) if template else None,
      answers=rec.texts("answers", required=True), split=split, source="entityquestions",
      meta={"template": template} if template else {})


def load_entityquestions(path: str, *, lenient: bool = False) -> FactList:
  """The dataset folder ({train,dev,test}/P<id>.<split>.json), one split folder, or one file.
  relation and split come from the file name; the subject from relation_query_templates.json."""
  cache: dict = {}
  sources = []
  for f in _eq_files(path):
    name = os.path.basename(f)
    m = re.match(r"P\d+", name)
    relation = m.group(0) if m else "unknown"
    template = _find_templates(f, cache).get(relation)
    sources.append((f, partial(_eq_record, relation=relation, template=template,
                               split=split_from_name(file_stem(f), "test"))))
  return load_records(path, "entityquestions", sources, lenient=lenient)


# ---------------------------------------------------------------------------------------------
# RWKU.

def _rwku_target_folders(path: str, names: tuple[str, ...]) -> list[str]:
  """`path` if it holds any of `names`, else its sub-folders that do (the Target folder)."""
  if any(os.path.isfile(os.path.join(path, n)) for n in names):
    return [path]
  return list_folder(path, lambda n: any(os.path.isfile(os.path.join(path, n, x)) for x in names),
                  dirs=True)


def _rwku_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = [os.path.join(d, n) for d in _rwku_target_folders(path, RWKU_FILES)
           for n in RWKU_FILES if os.path.isfile(os.path.join(d, n))]
  if not files:
    raise DataError(path, "no RWKU probe files (forget_level{1,2,3}.json, "
                          "neighbor_level{1,2}.json) here or in its target folders")
  return files


def _rwku_target_id(folder: str) -> str:
  """'1' for .../1_Stephen_King; the folder name itself when it has no number."""
  name = os.path.basename(os.path.abspath(folder))
  m = re.match(r"(\d+)_", name)
  return m.group(1) if m else name


def _rwku_record(rec: Record, target: str, stem: str, neighbour: bool) -> FactItem:
  level = rec.get("level")
  if isinstance(level, str) and level.strip().isdigit():
    level = int(level)
  int_field(rec, "level", level)
  meta = {"level": level, "type": rec.text("type"), "target": rec.text("subject")}
  if neighbour:
    meta["neighbor"] = rec.text("neighbor")
  return FactItem(
      id=f"rwku-{target}-{stem}-{rec.index}", relation="rwku",
      subject=meta["neighbor"] if neighbour else meta["target"],
      question=rec.text("query"), answers=(rec.text("answer"),),
      split="neighbour" if neighbour else "forget", source="rwku", meta=meta)


def load_rwku(path: str, *, lenient: bool = False) -> FactList:
  """RWKU's Target folder, one <N>_<Name> target folder, or one probe file. Every query (level-1
  cloze queries with their "___" blank included) is a `question`. The subject is the target for
  forget probes and the neighbouring entity for neighbour probes; meta has level, type, target
  and neighbor."""
  sources = []
  for f in _rwku_files(path):
    stem = file_stem(f)
    sources.append((f, partial(_rwku_record, target=_rwku_target_id(os.path.dirname(f)),
                               stem=stem, neighbour=stem.startswith("neighbor"))))
  return load_records(path, "rwku", sources, lenient=lenient)


def load_rwku_mia(path: str) -> dict[str, dict[str, list[str]]]:
  """RWKU's membership-inference texts: {target name: {"forget": [...], "retain": [...]}} from
  forget_mia.json / retain_mia.json in the Target folder's target folders (or one target
  folder). The target name is the folder's <Name> with spaces ("Prince Harry, Duke of Sussex")."""
  out: dict[str, dict[str, list[str]]] = {}
  for folder in _rwku_target_folders(path, RWKU_MIA_FILES):
    name = os.path.basename(os.path.abspath(folder))
    name = re.sub(r"^\d+_", "", name).replace("_", " ")
    if name in out:
      raise DataError(folder, f"a second target folder named {name!r}")
    out[name] = {}
    for split in ("forget", "retain"):
      file = os.path.join(folder, f"{split}_mia.json")
      out[name][split] = [] if not os.path.isfile(file) else [
          Record(obj, file, line, index).text("text")
          for index, line, obj in iter_json_records(file)]
  if not out:
    raise DataError(path, "no RWKU forget_mia.json / retain_mia.json here or in its target "
                          "folders")
  return out


# ---------------------------------------------------------------------------------------------
# TOFU.

def _tofu_record(rec: Record, stem: str, split: str) -> FactItem:
  qf = "prompt" if "question" not in rec.obj and "prompt" in rec.obj else "question"
  af = "response" if "answer" not in rec.obj and "response" in rec.obj else "answer"
  answer = rec.text(af)
  meta: dict[str, Any] = {}
  if "paraphrased_answer" in rec.obj:
    meta["paraphrased_answer"] = rec.text("paraphrased_answer")
  if "perturbed_answer" in rec.obj:
    meta["perturbed_answer"] = list(rec.texts("perturbed_answer", required=True))
  options = sorted((k for k in rec.obj if re.fullmatch(r"option\d+", k)), key=natural_key)
  if options:
    meta["options"] = [rec.text(k) for k in options]
    if answer not in meta["options"]:
      rec.fail(af, f"{answer!r} is not one of the options {meta['options']}")
  return FactItem(
      id=f"tofu-{stem}-{rec.index}", relation="tofu", question=rec.text(qf), answers=(answer,),
      paraphrases=rec.texts("paraphrased_question"), split=split, source="tofu", meta=meta)


def load_tofu(path: str, *, lenient: bool = False) -> FactList:
  """TOFU files ({question, answer}, or {prompt, response} in forget01/05; full.json and
  retain90.json hold one array per line). forget* -> split forget, retain* -> retain, else
  train. Perturbed and paraphrased answers and world_facts' options go to meta."""
  files = dataset_files(path, is_data_file, "TOFU *.json")
  return load_records(path, "tofu", [
      (f, partial(_tofu_record, stem=file_stem(f), split=split_from_name(file_stem(f), "train")))
      for f in files], lenient=lenient)

