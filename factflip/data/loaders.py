"""Public knowledge datasets -> FactItems: one loader per format, a registry, auto-detection.

Owns: reading the public layouts into `FactItem`s (CounterFact in ROME's, EasyEdit's and the
simplified {"items": [...]} layout, EntityQuestions, RWKU, TOFU, zsRE, MzsRE, and our own JSONL),
finding a dataset's files in its folder, telling the formats apart (`detect_format`), and RWKU's
membership-inference texts (`load_rwku_mia`).
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
import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from factflip.data.facts import (FactItem, FactList, Neighbour, Translation, UniqueIds, Record,
                                 check_item, item_from_record, read_facts_jsonl)
from factflip.fileio import DataError, iter_json_records, read_json

Parse = Callable[[Record], FactItem]

EQ_NAME = re.compile(r"(P\d+)\.(train|dev|test)\.json$")
EQ_TEMPLATES = "relation_query_templates.json"
RWKU_FILES = ("forget_level1.json", "forget_level2.json", "forget_level3.json",
              "neighbor_level1.json", "neighbor_level2.json")
RWKU_MIA_FILES = ("forget_mia.json", "retain_mia.json")
_SPLIT_WORDS = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev",
                "test": "test", "eval": "eval", "forget": "forget", "retain": "retain"}


# ---------------------------------------------------------------------------------------------
# The one load loop and small helpers.

def _load(path: str, fmt: str, files: Iterable[tuple[str, Parse]], *, lenient: bool,
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


def _natural(text: str) -> list:
  """Sort key comparing digit runs as numbers: P17 < P106, 2_Confucius < 10_Prince_Harry."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _listdir(folder: str, match: Callable[[str], bool], dirs: bool = False) -> list[str]:
  """Paths of the (non-hidden) files, or sub-folders, in `folder` whose name matches."""
  out = []
  for name in os.listdir(folder):
    full = os.path.join(folder, name)
    if not name.startswith(".") and match(name) and (os.path.isdir(full) if dirs
                                                     else os.path.isfile(full)):
      out.append(full)
  return sorted(out, key=_natural)


def _files(path: str, match: Callable[[str], bool], what: str) -> list[str]:
  """`path` itself if it is a file, else the files in the folder that match (at least one)."""
  if os.path.isfile(path):
    return [path]
  files = _listdir(path, match)
  if not files:
    raise DataError(path, f"no {what} files in this folder")
  return files


def _is_data(name: str) -> bool:
  return name.endswith((".json", ".jsonl"))


def _stem(file: str) -> str:
  name = os.path.basename(file)
  return name.rsplit(".", 1)[0] if "." in name else name


def _split_from_name(stem: str, default: str) -> str:
  """The split a file name names (counterfact-val -> dev, forget01 -> forget), else `default`."""
  for word in reversed(re.split(r"[^a-z]+", stem.lower())):
    if word in _SPLIT_WORDS:
      return _SPLIT_WORDS[word]
  return default


def _int(rec: Record, field: str, value: Any = ..., *, required: bool = True) -> int | None:
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


def _obj(rec: Record, field: str, value: Any = ..., *, required: bool = True) -> dict | None:
  """A nested JSON object."""
  if value is ...:
    value = rec.get(field)
  if value is None and not required:
    return None
  if not isinstance(value, dict):
    what = "missing" if value is None else f"got {type(value).__name__}"
    rec.fail(field, f"{what}; expected a JSON object")
  return value


def _neighbours(rec: Record, pfield: str, afield: str, obj: dict | None = None,
                prefix: str = "") -> tuple[Neighbour, ...]:
  """One optional (prompt, answers) neighbour; a prompt without an answer is an error."""
  obj = rec.obj if obj is None else obj
  prompt = rec.text(prefix + pfield, obj.get(pfield), required=False)
  if prompt is None:
    return ()
  return (Neighbour(prompt, rec.texts(prefix + afield, obj.get(afield), required=True)),)


# ---------------------------------------------------------------------------------------------
# factflip: our JSONL.

def load_factflip(path: str, *, lenient: bool = False) -> FactList:
  """Our JSONL (FactItem.to_dict per line); a folder loads every *.jsonl in it."""
  if os.path.isfile(path):
    return read_facts_jsonl(path, lenient=lenient)
  files = _files(path, lambda n: n.endswith(".jsonl"), "*.jsonl")

  def parse(rec: Record) -> FactItem:
    return item_from_record(rec.obj, rec.path, rec.line, rec.index)

  return _load(path, "factflip", [(f, parse) for f in files], lenient=lenient)


# ---------------------------------------------------------------------------------------------
# CounterFact: ROME's layout, EasyEdit's layout, and the simplified {"items": [...]} layout.

def _counterfact_record(rec: Record, split: str) -> FactItem:
  case_id = _int(rec, "case_id")
  rw = _obj(rec, "requested_rewrite")
  f = "requested_rewrite."
  template = rec.text(f + "prompt", rw.get("prompt"))
  if "{}" not in template:
    rec.fail(f + "prompt", f"{template!r} has no '{{}}' where the subject goes")
  subject = rec.text(f + "subject", rw.get("subject"))
  true = _obj(rec, f + "target_true", rw.get("target_true"))
  new = _obj(rec, f + "target_new", rw.get("target_new"))
  truth = rec.text(f + "target_true.str", true.get("str"))
  meta = {"case_id": case_id,
          "pararel_idx": _int(rec, "pararel_idx", required=False),
          "target_true_id": true.get("id"), "target_new_id": new.get("id"),
          "attribute_prompts": list(rec.texts("attribute_prompts")),
          "generation_prompts": list(rec.texts("generation_prompts"))}
  return FactItem(
      id=f"counterfact-{case_id}", subject=subject,
      relation=rec.text(f + "relation_id", rw.get("relation_id")),
      prompt=template.replace("{}", subject, 1), answers=(truth,),
      counterfactual=rec.text(f + "target_new.str", new.get("str")),
      paraphrases=rec.texts("paraphrase_prompts"),
      neighbours=tuple(Neighbour(p, (truth,)) for p in rec.texts("neighborhood_prompts")),
      split=split, source="counterfact", meta=meta)


def load_counterfact(path: str, *, lenient: bool = False) -> FactList:
  """ROME's counterfact.json: one item per case. The attribute prompts (other subjects that hold
  the new object, so their answer is `counterfactual`) and generation prompts go to meta."""
  files = _files(path, _is_data, "CounterFact *.json")
  return _load(path, "counterfact", [
      (f, partial(_counterfact_record, split=_split_from_name(_stem(f), "test"))) for f in files],
      lenient=lenient)


def _easyedit_record(rec: Record, split: str) -> FactItem:
  case_id = _int(rec, "case_id")
  return FactItem(
      id=f"counterfact-{case_id}", subject=rec.text("subject"), prompt=rec.text("prompt"),
      answers=(rec.text("ground_truth"),), counterfactual=rec.text("target_new"),
      paraphrases=rec.texts("rephrase_prompt"),
      neighbours=_neighbours(rec, "locality_prompt", "locality_ground_truth"),
      split=split, source="counterfact_easyedit", meta={"case_id": case_id})


def load_counterfact_easyedit(path: str, *, lenient: bool = False) -> FactList:
  """EasyEdit's CounterFact (counterfact-{train,val,edit}.json); ids match ROME's case ids."""
  files = _files(path, _is_data, "CounterFact *.json")
  return _load(path, "counterfact_easyedit", [
      (f, partial(_easyedit_record, split=_split_from_name(_stem(f), "test"))) for f in files],
      lenient=lenient)


def _counterfact_simple_record(rec: Record, stem: str, split: str) -> FactItem:
  return FactItem(
      id=f"counterfact_simple-{stem}-{rec.index}", prompt=rec.text("prompt"),
      answers=(rec.text("target_true"),), counterfactual=rec.text("target_new"),
      split=split, source="counterfact_simple")


def load_counterfact_simple(path: str, *, lenient: bool = False) -> FactList:
  """{"items": [{prompt, target_true, target_new}]} (or a bare array); no subject, no relation."""
  files = _files(path, _is_data, "CounterFact *.json")
  return _load(path, "counterfact_simple", [
      (f, partial(_counterfact_simple_record, stem=_stem(f),
                  split=_split_from_name(_stem(f), "test"))) for f in files],
      lenient=lenient, key="items")


# ---------------------------------------------------------------------------------------------
# EntityQuestions.

def _eq_files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  files = _listdir(path, EQ_NAME.match)
  for sub in _listdir(path, lambda n: n in ("train", "dev", "test"), dirs=True):
    files += _listdir(sub, EQ_NAME.match)
  if not files:
    raise DataError(path, "no EntityQuestions files (P<id>.<split>.json, here or in "
                          "train/ dev/ test/) in this folder")
  return sorted(files, key=_natural)


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
                               split=_split_from_name(_stem(f), "test"))))
  return _load(path, "entityquestions", sources, lenient=lenient)


# ---------------------------------------------------------------------------------------------
# RWKU.

def _rwku_target_folders(path: str, names: tuple[str, ...]) -> list[str]:
  """`path` if it holds any of `names`, else its sub-folders that do (the Target folder)."""
  if any(os.path.isfile(os.path.join(path, n)) for n in names):
    return [path]
  return _listdir(path, lambda n: any(os.path.isfile(os.path.join(path, n, x)) for x in names),
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
  _int(rec, "level", level)
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
    stem = _stem(f)
    sources.append((f, partial(_rwku_record, target=_rwku_target_id(os.path.dirname(f)),
                               stem=stem, neighbour=stem.startswith("neighbor"))))
  return _load(path, "rwku", sources, lenient=lenient)


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
  options = sorted((k for k in rec.obj if re.fullmatch(r"option\d+", k)), key=_natural)
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
  files = _files(path, _is_data, "TOFU *.json")
  return _load(path, "tofu", [
      (f, partial(_tofu_record, stem=_stem(f), split=_split_from_name(_stem(f), "train")))
      for f in files], lenient=lenient)


# ---------------------------------------------------------------------------------------------
# zsRE (MEND / ROME layout) and MzsRE (multilingual, ReMaKE).

def _zsre_record(rec: Record, stem: str, split: str) -> FactItem:
  return FactItem(
      id=f"zsre-{stem}-{rec.index}", subject=rec.text("subject", required=False),
      question=rec.text("src"), answers=rec.texts("answers", required=True),
      counterfactual=rec.text("alt"), paraphrases=rec.texts("rephrase"),
      neighbours=_neighbours(rec, "loc", "loc_ans"), split=split, source="zsre",
      meta={k: rec.get(k) for k in ("pred", "cond") if k in rec.obj})


def load_zsre(path: str, *, lenient: bool = False) -> FactList:
  """zsRE as MEND/ROME ship it ({subject, src, pred, rephrase, alt, answers, loc, loc_ans,
  cond}): question = src, answers = answers, counterfactual = alt (the edit's new object)."""
  files = _files(path, _is_data, "zsRE *.json")
  return _load(path, "zsre", [
      (f, partial(_zsre_record, stem=_stem(f), split=_split_from_name(_stem(f), "test")))
      for f in files], lenient=lenient)


def _portability(rec: Record, field: str, obj: dict) -> dict | None:
  p = _obj(rec, field, obj.get("portability"), required=False)
  if p is None:
    return None
  return {"question": rec.text(field + ".New Question", p.get("New Question")),
          "answer": rec.text(field + ".New Answer", p.get("New Answer"))}


def _mzsre_record(rec: Record, pair: tuple[str, str] | None, name: str) -> FactItem:
  if pair is None:  # the file name does not say: English first, then the other key
    langs = sorted(rec.obj, key=lambda k: (k != "en", k))
    if len(langs) != 2:
      rec.fail(None, f"expected two language sides, got keys {langs}")
    pair = (langs[0], langs[1])
  src, tgt = pair
  sides = {lang: _obj(rec, lang) for lang in pair}
  cf = {lang: rec.text(f"{lang}.alt", sides[lang].get("alt")) for lang in pair}
  texts = {lang: rec.texts(f"{lang}.rephrase", sides[lang].get("rephrase")) for lang in pair}
  extra = {"subject": rec.text(f"{tgt}.subject", sides[tgt].get("subject"), required=False),
           "neighbours": [{"prompt": n.prompt, "answers": list(n.answers)} for n in
                          _neighbours(rec, "loc", "loc_ans", sides[tgt], f"{tgt}.")],
           "portability": _portability(rec, tgt, sides[tgt])}
  meta: dict[str, Any] = {"portability": _portability(rec, src, sides[src]),
                          "translations": {tgt: {k: v for k, v in extra.items() if v}}}
  return FactItem(
      id=f"mzsre-{name}-{rec.index}", answers=(),
      subject=rec.text(f"{src}.subject", sides[src].get("subject"), required=False),
      question=rec.text(f"{src}.src", sides[src].get("src")), counterfactual=cf[src],
      paraphrases=texts[src], neighbours=_neighbours(rec, "loc", "loc_ans", sides[src], f"{src}."),
      language=src, translations={tgt: Translation(
          question=rec.text(f"{tgt}.src", sides[tgt].get("src")), counterfactual=cf[tgt],
          paraphrases=texts[tgt])},
      split="test", source="mzsre", meta={k: v for k, v in meta.items() if v})


def load_mzsre(path: str, *, lenient: bool = False) -> FactList:
  """MzsRE (mzsre_test_duplicate_en<lang>.json): records {"en": {...}, "<lang>": {...}}. MzsRE
  gives only the new object, so answers = () and counterfactual = alt; the other language is a
  Translation, and its subject, locality prompt and portability question go to
  meta["translations"][lang]; meta["portability"] = {"question", "answer"}."""
  sources = []
  for f in _files(path, _is_data, "MzsRE *.json"):
    m = re.search(r"_([a-z]{2})([a-z]{2})$", _stem(f))
    pair = (m.group(1), m.group(2)) if m else None
    sources.append((f, partial(_mzsre_record, pair=pair,
                               name="".join(pair) if pair else _stem(f))))
  return _load(path, "mzsre", sources, lenient=lenient)


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
  files = _listdir(path, _is_data)
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
