"""Knowledge-editing datasets -> FactItems: CounterFact (ROME's, EasyEdit's and the simplified
{"items": [...]} layout), zsRE (MEND / ROME layout) and MzsRE (multilingual, ReMaKE).

Owns: one loader per layout (`data.loaders.FORMATS` registers them).
Must not: detect formats (`data.loaders`) or define the schema (`data.facts`).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from factflip.data.facts import FactItem, FactList, Neighbour, Record, Translation
from factflip.data.records import (
  dataset_files,
  file_stem,
  int_field,
  is_data_file,
  load_records,
  neighbours_field,
  obj_field,
  split_from_name,
)

# ---------------------------------------------------------------------------------------------
# CounterFact: ROME's layout, EasyEdit's layout, and the simplified {"items": [...]} layout.

def _counterfact_record(rec: Record, split: str) -> FactItem:
  case_id = int_field(rec, "case_id")
  rw = obj_field(rec, "requested_rewrite")
  f = "requested_rewrite."
  template = rec.text(f + "prompt", rw.get("prompt"))
  if "{}" not in template:
    rec.fail(f + "prompt", f"{template!r} has no '{{}}' where the subject goes")
  subject = rec.text(f + "subject", rw.get("subject"))
  true = obj_field(rec, f + "target_true", rw.get("target_true"))
  new = obj_field(rec, f + "target_new", rw.get("target_new"))
  truth = rec.text(f + "target_true.str", true.get("str"))
  meta = {"case_id": case_id,
          "pararel_idx": int_field(rec, "pararel_idx", required=False),
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
  files = dataset_files(path, is_data_file, "CounterFact *.json")
  return load_records(path, "counterfact", [
      (f, partial(_counterfact_record, split=split_from_name(file_stem(f), "test"))) for f in files],
      lenient=lenient)


def _easyedit_record(rec: Record, split: str) -> FactItem:
  case_id = int_field(rec, "case_id")
  return FactItem(
      id=f"counterfact-{case_id}", subject=rec.text("subject"), prompt=rec.text("prompt"),
      answers=(rec.text("ground_truth"),), counterfactual=rec.text("target_new"),
      paraphrases=rec.texts("rephrase_prompt"),
      neighbours=neighbours_field(rec, "locality_prompt", "locality_ground_truth"),
      split=split, source="counterfact_easyedit", meta={"case_id": case_id})


def load_counterfact_easyedit(path: str, *, lenient: bool = False) -> FactList:
  """EasyEdit's CounterFact (counterfact-{train,val,edit}.json); ids match ROME's case ids."""
  files = dataset_files(path, is_data_file, "CounterFact *.json")
  return load_records(path, "counterfact_easyedit", [
      (f, partial(_easyedit_record, split=split_from_name(file_stem(f), "test"))) for f in files],
      lenient=lenient)


def _counterfact_simple_record(rec: Record, stem: str, split: str) -> FactItem:
  return FactItem(
      id=f"counterfact_simple-{stem}-{rec.index}", prompt=rec.text("prompt"),
      answers=(rec.text("target_true"),), counterfactual=rec.text("target_new"),
      split=split, source="counterfact_simple")


def load_counterfact_simple(path: str, *, lenient: bool = False) -> FactList:
  """{"items": [{prompt, target_true, target_new}]} (or a bare array); no subject, no relation."""
  files = dataset_files(path, is_data_file, "CounterFact *.json")
  return load_records(path, "counterfact_simple", [
      (f, partial(_counterfact_simple_record, stem=file_stem(f),
                  split=split_from_name(file_stem(f), "test"))) for f in files],
      lenient=lenient, key="items")


# ---------------------------------------------------------------------------------------------
# zsRE (MEND / ROME layout) and MzsRE (multilingual, ReMaKE).

def _zsre_record(rec: Record, stem: str, split: str) -> FactItem:
  return FactItem(
      id=f"zsre-{stem}-{rec.index}", subject=rec.text("subject", required=False),
      question=rec.text("src"), answers=rec.texts("answers", required=True),
      counterfactual=rec.text("alt"), paraphrases=rec.texts("rephrase"),
      neighbours=neighbours_field(rec, "loc", "loc_ans"), split=split, source="zsre",
      meta={k: rec.get(k) for k in ("pred", "cond") if k in rec.obj})


def load_zsre(path: str, *, lenient: bool = False) -> FactList:
  """zsRE as MEND/ROME ship it ({subject, src, pred, rephrase, alt, answers, loc, loc_ans,
  cond}): question = src, answers = answers, counterfactual = alt (the edit's new object)."""
  files = dataset_files(path, is_data_file, "zsRE *.json")
  return load_records(path, "zsre", [
      (f, partial(_zsre_record, stem=file_stem(f), split=split_from_name(file_stem(f), "test")))
      for f in files], lenient=lenient)


def _portability(rec: Record, field: str, obj: dict) -> dict | None:
  p = obj_field(rec, field, obj.get("portability"), required=False)
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
  sides = {lang: obj_field(rec, lang) for lang in pair}
  cf = {lang: rec.text(f"{lang}.alt", sides[lang].get("alt")) for lang in pair}
  texts = {lang: rec.texts(f"{lang}.rephrase", sides[lang].get("rephrase")) for lang in pair}
  extra = {"subject": rec.text(f"{tgt}.subject", sides[tgt].get("subject"), required=False),
           "neighbours": [{"prompt": n.prompt, "answers": list(n.answers)} for n in
                          neighbours_field(rec, "loc", "loc_ans", sides[tgt], f"{tgt}.")],
           "portability": _portability(rec, tgt, sides[tgt])}
  meta: dict[str, Any] = {"portability": _portability(rec, src, sides[src]),
                          "translations": {tgt: {k: v for k, v in extra.items() if v}}}
  return FactItem(
      id=f"mzsre-{name}-{rec.index}", answers=(),
      subject=rec.text(f"{src}.subject", sides[src].get("subject"), required=False),
      question=rec.text(f"{src}.src", sides[src].get("src")), counterfactual=cf[src],
      paraphrases=texts[src], neighbours=neighbours_field(rec, "loc", "loc_ans", sides[src], f"{src}."),
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
  for f in dataset_files(path, is_data_file, "MzsRE *.json"):
    m = re.search(r"_([a-z]{2})([a-z]{2})$", file_stem(f))
    pair = (m.group(1), m.group(2)) if m else None
    sources.append((f, partial(_mzsre_record, pair=pair,
                               name="".join(pair) if pair else file_stem(f))))
  return load_records(path, "mzsre", sources, lenient=lenient)

