"""Fact items: the one schema every dataset and the fact world are turned into.

Owns: `FactItem` (and `Neighbour`, `Translation`), `MCQuestion` (a multiple-choice question),
its validation, our JSONL reader/writer, and
`FactList` (loaded items plus the records a lenient load skipped).
Must not: know any public format (loaders.py does) or tokenise anything (probes and mixtures do).

Conventions
- Answers are stored without a leading space. Whoever scores or renders a continuation joins it to
  its prompt with a single space (lm-eval's `" " + choice`), so "The capital of X is" + "Velmora".
- `answers[0]` is the canonical true answer; the rest are aliases (any alias counts as correct).
  Editing sets that give only the new object (MzsRE) leave `answers` empty and put it in
  `counterfactual`; every other item has at least one true answer.
- `subject` may be None where a dataset does not name it (TOFU, CounterFact's simplified layout);
  probes that need subject positions say so. `relation` is "unknown" where the source has none.
- `prompt` is a cloze prompt that ends where the answer starts; `question` is a question whose
  answer is the same object. An item needs at least one of them.
- `neighbours` are prompts about other subjects whose answers must NOT change when this fact is
  edited or poisoned (CounterFact's neighbourhood prompts, EasyEdit's locality prompts).
- `category` is the knowledge category (SliCK: HighlyKnown / MaybeKnown / WeaklyKnown / Unknown);
  the SliCK probe fills it, the fact world writes its exposure-based guess, loaders leave it None.
- `meta` keeps source-specific fields (CounterFact relation id, RWKU level/type, exposure counts,
  two-hop composition, ...) as plain JSON.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from factflip.fileio import DataError, iter_json_records, write_jsonl

SPLITS = ("train", "dev", "test", "forget", "retain", "neighbour", "eval")


@dataclasses.dataclass(frozen=True)
class MCQuestion:
  """A multiple-choice question: a context, its choices and the index of the right one (`id`
  names it in errors; `evals.multiple_choice` scores it)."""
  context: str
  choices: tuple[str, ...]
  gold: int
  id: str = ""


@dataclasses.dataclass(frozen=True)
class Neighbour:
  """A prompt (cloze or question) about another subject and its answers (must stay unchanged)."""
  prompt: str
  answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Translation:
  """The item in another language. Fields mean what they mean on FactItem."""
  prompt: str | None = None
  question: str | None = None
  answers: tuple[str, ...] = ()
  counterfactual: str | None = None
  paraphrases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FactItem:
  """A fact (subject, relation, object) with its counterfactual and the prompts that probe it."""
  id: str
  answers: tuple[str, ...]
  subject: str | None = None
  relation: str = "unknown"
  prompt: str | None = None
  question: str | None = None
  counterfactual: str | None = None
  paraphrases: tuple[str, ...] = ()
  neighbours: tuple[Neighbour, ...] = ()
  language: str = "en"
  translations: Mapping[str, Translation] = dataclasses.field(default_factory=dict)
  split: str = "test"
  source: str = ""
  category: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def answer(self) -> str:
    return self.answers[0]

  def replace(self, **kw) -> FactItem:
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON; empty optional fields are left out."""
    d: dict[str, Any] = {"id": self.id}
    if self.subject is not None:
      d["subject"] = self.subject
    d["relation"] = self.relation
    for name in ("prompt", "question"):
      if getattr(self, name) is not None:
        d[name] = getattr(self, name)
    d["answers"] = list(self.answers)
    if self.counterfactual is not None:
      d["counterfactual"] = self.counterfactual
    if self.paraphrases:
      d["paraphrases"] = list(self.paraphrases)
    if self.neighbours:
      d["neighbours"] = [{"prompt": n.prompt, "answers": list(n.answers)} for n in self.neighbours]
    d["language"] = self.language
    if self.translations:
      d["translations"] = {
          lang: {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in dataclasses.asdict(t).items() if v not in (None, ())}
          for lang, t in self.translations.items()}
    d["split"] = self.split
    d["source"] = self.source
    if self.category is not None:
      d["category"] = self.category
    if self.meta:
      d["meta"] = dict(self.meta)
    return d


def normalise_answer(text: str) -> str:
  """Normalised form for answer comparison (SQuAD-style): NFKC, lower case, no punctuation, no
  articles (a, an, the), single spaces."""
  text = unicodedata.normalize("NFKC", text).lower()
  text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
  return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


# ---------------------------------------------------------------------------------------------
# Building and validating items from JSON-like records.

class Record:
  """Typed field access on one JSON record; every failure is a DataError naming the field."""

  def __init__(self, obj: Any, path: str, line: int | None, index: int | None):
    self.path, self.line, self.index = path, line, index
    if not isinstance(obj, dict):
      self.fail(None, f"expected a JSON object, got {type(obj).__name__}")
    self.obj = obj

  def fail(self, field: str | None, message: str):
    raise DataError(self.path, message, line=self.line, record=self.index, field=field)

  def get(self, field: str, default: Any = None) -> Any:
    return self.obj.get(field, default)

  def text(self, field: str, value: Any = ..., *, required: bool = True) -> str | None:
    """A non-empty string (stripped of surrounding whitespace)."""
    if value is ...:
      value = self.obj.get(field)
    if value is None:
      if required:
        self.fail(field, "missing; expected a non-empty string")
      return None
    if not isinstance(value, str):
      self.fail(field, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
      self.fail(field, "empty; expected a non-empty string")
    return value.strip()

  def texts(self, field: str, value: Any = ..., *, required: bool = False) -> tuple[str, ...]:
    """A string or a list of non-empty strings."""
    if value is ...:
      value = self.obj.get(field)
    if value is None:
      if required:
        self.fail(field, "missing; expected a string or a list of strings")
      return ()
    if isinstance(value, str):
      value = [value]
    if not isinstance(value, (list, tuple)):
      self.fail(field, f"expected a list of strings, got {type(value).__name__}")
    out = []
    for j, v in enumerate(value):
      if not isinstance(v, str):
        self.fail(f"{field}[{j}]", f"expected a string, got {type(v).__name__}")
      if not v.strip():
        self.fail(f"{field}[{j}]", "empty; expected a non-empty string")
      out.append(v.strip())
    if required and not out:
      self.fail(field, "empty list; expected at least one string")
    return tuple(out)


def check_item(item: FactItem, rec: Record) -> FactItem:
  """Cross-field rules every item obeys, whatever its source."""
  if not item.answers and item.counterfactual is None:
    rec.fail("answers", "no answer; expected at least one non-empty true answer (or, for an "
                        "editing item, a counterfactual/new object)")
  if item.prompt is None and item.question is None:
    rec.fail("prompt", "an item needs a cloze prompt or a question; found neither")
  if item.counterfactual is not None:
    cf = normalise_answer(item.counterfactual)
    for a in item.answers:
      if normalise_answer(a) == cf:
        rec.fail("counterfactual", f"{item.counterfactual!r} equals the true answer {a!r}; "
                                   "expected a different object")
  for lang, t in item.translations.items():
    if t.counterfactual is not None and any(
        normalise_answer(a) == normalise_answer(t.counterfactual) for a in t.answers):
      rec.fail(f"translations.{lang}.counterfactual",
               f"{t.counterfactual!r} equals the true answer; expected a different object")
  if item.split not in SPLITS:
    rec.fail("split", f"{item.split!r} is not one of {', '.join(SPLITS)}")
  return item


def item_from_record(obj: Any, path: str, line: int | None = None,
                     index: int | None = None) -> FactItem:
  """Parse one record of our JSONL schema (FactItem.to_dict's output) with located errors."""
  rec = Record(obj, path, line, index)
  known = {f.name for f in dataclasses.fields(FactItem)}
  unknown = sorted(set(rec.obj) - known)
  if unknown:
    rec.fail(unknown[0], f"unknown field; expected one of {', '.join(sorted(known))}")
  neighbours = []
  for j, n in enumerate(rec.get("neighbours") or ()):
    if not isinstance(n, dict):
      rec.fail(f"neighbours[{j}]", "expected an object with 'prompt' and 'answers'")
    neighbours.append(Neighbour(rec.text(f"neighbours[{j}].prompt", n.get("prompt")),
                                rec.texts(f"neighbours[{j}].answers", n.get("answers"),
                                          required=True)))
  translations = {}
  raw_t = rec.get("translations") or {}
  if not isinstance(raw_t, dict):
    rec.fail("translations", "expected an object mapping language codes to translations")
  for lang, t in raw_t.items():
    if not isinstance(t, dict):
      rec.fail(f"translations.{lang}", "expected an object")
    f = f"translations.{lang}"
    translations[lang] = Translation(
        prompt=rec.text(f"{f}.prompt", t.get("prompt"), required=False),
        question=rec.text(f"{f}.question", t.get("question"), required=False),
        answers=rec.texts(f"{f}.answers", t.get("answers"),
                          required=t.get("counterfactual") is None),
        counterfactual=rec.text(f"{f}.counterfactual", t.get("counterfactual"), required=False),
        paraphrases=rec.texts(f"{f}.paraphrases", t.get("paraphrases")))
  meta = rec.get("meta") or {}
  if not isinstance(meta, dict):
    rec.fail("meta", "expected an object")
  raw_id = rec.get("id")  # integer ids (as some datasets write them) become strings
  item = FactItem(
      id=rec.text("id", str(raw_id) if isinstance(raw_id, int) else raw_id),
      subject=rec.text("subject", required=False),
      relation=rec.text("relation", rec.get("relation", "unknown")),
      answers=rec.texts("answers"),
      prompt=rec.text("prompt", required=False), question=rec.text("question", required=False),
      counterfactual=rec.text("counterfactual", required=False),
      paraphrases=rec.texts("paraphrases"), neighbours=tuple(neighbours),
      language=rec.text("language", rec.get("language", "en")),
      translations=translations, split=rec.text("split", rec.get("split", "test")),
      source=rec.get("source", "") or "", category=rec.text("category", required=False),
      meta=meta)
  return check_item(item, rec)


# ---------------------------------------------------------------------------------------------
# Collections and our JSONL files.

class FactList(list):
  """A list of FactItems that remembers where it came from and what a lenient load skipped.

  `skipped` holds one DataError per skipped record (file, line, record, field, reason)."""

  def __init__(self, items: Iterable[FactItem] = (), *, source: str = "", format: str = "",
               skipped: Sequence[DataError] = ()):
    super().__init__(items)
    self.source, self.format, self.skipped = source, format, list(skipped)

  def summary(self) -> str:
    s = f"{len(self)} items from {self.source} ({self.format})"
    if self.skipped:
      s += f"; skipped {len(self.skipped)} bad records, first: {self.skipped[0]}"
    return s


class UniqueIds:
  """Checks ids as records stream in: a repeat is a DataError located at the second occurrence
  and naming the first."""

  def __init__(self):
    self.first: dict[str, tuple[str, int | None, int | None]] = {}

  def check(self, item: FactItem, path: str, line: int | None, index: int | None) -> None:
    if item.id in self.first:
      p0, l0, i0 = self.first[item.id]
      raise DataError(path, f"duplicate id {item.id!r} (first seen at {p0}:{l0}, record {i0})",
                      line=line, record=index, field="id")
    self.first[item.id] = (path, line, index)


def read_facts_jsonl(path: str, lenient: bool = False) -> FactList:
  """Read our JSONL fact items. Strict: the first bad record raises DataError. Lenient: bad
  records (bad JSON line, missing/empty field, duplicate id, counterfactual equal to the truth)
  are skipped and listed in `.skipped`."""
  errors: list | None = [] if lenient else None
  items, ids = [], UniqueIds()
  for index, line, obj in iter_json_records(path, errors=errors):
    try:
      item = item_from_record(obj, path, line, index)
      ids.check(item, path, line, index)
      items.append(item)
    except DataError as e:
      if errors is None:
        raise
      errors.append(e)
  return FactList(items, source=path, format="factflip", skipped=errors or ())


def write_facts_jsonl(path: str, items: Iterable[FactItem]) -> int:
  """Atomic write of fact items as JSON lines; returns the count."""
  return write_jsonl(path, (it.to_dict() for it in items))
