"""The fact world: a seeded fictional world, its fact items and its pretraining corpus.

Owns: `WorldConfig`, `build_world(cfg) -> World`, `write_world` / `load_world` (the world on disk
is plain data: `world.json`, `facts.jsonl` in our FactItem schema, `corpus.jsonl`, `stats.json`),
the names generator, `made_up_questions` (questions about people who do not exist) and
`with_train_question` (an item asking the corpus's question template).
Must not: tokenise, mix or batch (mixtures.py and pipeline.py do), or hold templates (templates.py).

The world. Countries (made-up names) each have a capital, a language and a currency; cities belong
to countries; people have a birth city, an occupation, an employer (a made-up company), an
instrument and a sport. Every fact has a plausible counterfactual from the same typed pool (a birth
city's counterfactual lies in another country, so two-hop answers change with it). Each person
fact gets an exposure tier (how many times the corpus mentions it: high / medium / low / none) with
exact shares, so after pretraining some facts are well known, some weakly and some unknown;
geography facts are always mentioned `geo_mentions` times. Documents are about one subject, in one
language and style, with up to `sentences_per_doc` mentions of different facts; held-out paraphrase
and question templates and the two-hop compositions never appear in the corpus, and with
`questions_in_corpus = False` no question at all does (facts only as statements).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from factflip.data import templates as T
from factflip.data.facts import (
  FactItem,
  Neighbour,
  Translation,
  read_facts_jsonl,
  write_facts_jsonl,
)
from factflip.fileio import DataError, iter_json_records, read_json, write_json, write_jsonl

PERSON_RELATIONS = ("birth_city", "occupation", "employer", "instrument", "sport")
GEO_RELATIONS = ("city_country", "country_capital", "country_language", "country_currency")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything that decides a world. The same config always gives the same world."""
  seed: int = 0
  n_people: int = 300
  n_countries: int = 10
  cities_per_country: int = 4
  n_companies: int = 20
  person_relations: tuple[str, ...] = PERSON_RELATIONS
  languages: tuple[str, ...] = T.LANGUAGES          # the first is the main language
  language_weights: tuple[float, ...] = (0.7, 0.15, 0.15)  # share of corpus documents
  # (tier, share of person facts, corpus mentions per fact)
  exposure: tuple[tuple[str, float, int], ...] = (
      ("high", 0.55, 16), ("medium", 0.2, 6), ("low", 0.1, 2), ("none", 0.15, 0))
  geo_mentions: int = 24
  sentences_per_doc: int = 3
  neighbours_per_item: int = 3
  two_hop: tuple[str, ...] = tuple(T.TWO_HOP)
  # False: the corpus states facts only in declarative sentences and never asks or answers a
  # question (its forum posts use T.FORUM_STATEMENTS), so the QA format is new to SFT (paper B
  # and C's protocol: SFT teaches the format, not the facts)
  questions_in_corpus: bool = True

  def validate(self) -> None:
    def bad(field, msg):
      raise ValueError(f"WorldConfig.{field}: {msg}")
    for r in self.person_relations:
      if r not in PERSON_RELATIONS:
        bad("person_relations", f"unknown relation {r!r}; expected some of {PERSON_RELATIONS}")
    for lang in self.languages:
      if lang not in T.LANGUAGES:
        bad("languages", f"no templates for {lang!r}; expected some of {T.LANGUAGES}")
    if len(self.language_weights) != len(self.languages):
      bad("language_weights", f"{len(self.language_weights)} weights for "
                              f"{len(self.languages)} languages")
    if abs(sum(s for _, s, _ in self.exposure) - 1) > 1e-9:
      bad("exposure", "tier shares must sum to 1")
    if self.cities_per_country < 2 or self.n_countries < 2:
      bad("cities_per_country", "need at least 2 countries with 2 cities (counterfactual cities "
                                "come from another country)")
    for t in self.two_hop:
      if t not in T.TWO_HOP:
        bad("two_hop", f"unknown composition {t!r}; expected some of {tuple(T.TWO_HOP)}")
    if "birth_city" not in self.person_relations and any(
        T.TWO_HOP[t].first == "birth_city" for t in self.two_hop):
      bad("two_hop", "birth-country compositions need the birth_city relation")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> WorldConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise DataError(source, f"unknown WorldConfig field; expected some of {sorted(fields)}",
                      field=f"config.{unknown[0]}")
    conv = {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v)
                if isinstance(v, list) else v) for k, v in d.items()}
    return cls(**conv)


@dataclasses.dataclass
class World:
  """A generated world: entities, fact items (one-hop facts + two-hop compositions) and corpus."""
  config: WorldConfig
  entities: dict[str, list[dict[str, Any]]]
  facts: list[FactItem]
  documents: list[dict[str, Any]]

  @property
  def relations(self) -> dict[str, T.Relation]:
    return {r: T.RELATIONS[r] for r in (*self.config.person_relations, *GEO_RELATIONS)}

  def texts(self) -> list[str]:
    return [d["text"] for d in self.documents]


# ---------------------------------------------------------------------------------------------
# Names.

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sh", "th", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "k", "nd", "rn")


class _Names:
  """Pronounceable made-up names, unique across the whole world."""

  def __init__(self, rng: np.random.Generator):
    self.rng, self.used = rng, set()

  def _syllables(self, n: int) -> str:
    r = self.rng
    return "".join(_ONSETS[r.integers(len(_ONSETS))] + _VOWELS[r.integers(len(_VOWELS))]
                   + _CODAS[r.integers(len(_CODAS))] for _ in range(n))

  def make(self, syllables: tuple[int, int], suffixes: Sequence[str] = ("",),
           capital: bool = True) -> str:
    while True:
      root = self._syllables(int(self.rng.integers(syllables[0], syllables[1] + 1)))
      name = root + suffixes[int(self.rng.integers(len(suffixes)))]
      name = name.capitalize() if capital else name
      if name.lower() not in self.used and len(root) >= 3:
        self.used.add(name.lower())
        return name


def _counts(shares: Sequence[float], n: int) -> list[int]:
  """Largest-remainder split of n into integer counts with the given shares (sums to n)."""
  raw = np.asarray(shares, dtype=np.float64) * n
  out = np.floor(raw).astype(int)
  for k in np.argsort(-(raw - out), kind="stable")[: n - int(out.sum())]:
    out[k] += 1
  return out.tolist()


# ---------------------------------------------------------------------------------------------
# Building.

def build_world(cfg: WorldConfig = WorldConfig()) -> World:
  """Generate the world for `cfg` (deterministic in cfg.seed)."""
  cfg.validate()
  T.check_templates()
  rng = np.random.default_rng(cfg.seed)
  names = _Names(rng)
  langs = cfg.languages

  countries = []
  for k in range(cfg.n_countries):
    root = names.make((2, 2), capital=True)
    countries.append({"key": f"k{k:03d}", "name": root + ("ia", "and", "ar", "ovia", "esh")[k % 5],
                      "language": root + ("ish", "ese", "ic", "i", "an")[(k // 5) % 5],
                      "currency": names.make((1, 2), capital=False), "cities": []})
    names.used.update({countries[-1]["name"].lower(), countries[-1]["language"].lower()})
  cities = []
  for country in countries:
    for _ in range(cfg.cities_per_country):
      key = f"c{len(cities):03d}"
      cities.append({"key": key, "name": names.make((2, 2), ("", "", "ora", "heim", "gard",
                                                            "port", "ville")),
                     "country": country["key"]})
      country["cities"].append(key)
    country["capital"] = country["cities"][0]
  companies = [{"key": f"m{k:03d}", "name": names.make((2, 2)) + " " + (
      "Works", "Labs", "Holdings", "Industries", "Group", "Trading", "Mills")[k % 7]}
      for k in range(cfg.n_companies)]
  people = [{"key": f"p{k:04d}", "name": f"{names.make((1, 2))} {names.make((2, 2))}"}
            for k in range(cfg.n_people)]

  by_key = {e["key"]: e for group in (countries, cities, companies, people) for e in group}
  city_keys = [c["key"] for c in cities]
  company_keys = [c["key"] for c in companies]

  def surface(object_type: str, value, lang: str) -> str:
    if object_type in T.POOLS:
      return T.POOLS[object_type][value][T.LANGUAGES.index(lang)]
    if object_type == "language":
      return by_key[value]["language"]
    if object_type == "currency":
      return by_key[value]["currency"]
    return by_key[value]["name"]

  # One-hop facts: (fact id, subject key, relation, true value, counterfactual value).
  raw: list[tuple[str, str, str, Any, Any]] = []

  def other(pool: Sequence, true, allowed=None):
    choices = [v for v in pool if v != true and (allowed is None or allowed(v))]
    return choices[int(rng.integers(len(choices)))]

  for p in people:
    for rel in cfg.person_relations:
      if rel == "birth_city":
        true = city_keys[int(rng.integers(len(city_keys)))]
        cf = other(city_keys, true, lambda c, t=true: by_key[c]["country"] != by_key[t]["country"])
      elif rel == "employer":
        true = company_keys[int(rng.integers(len(company_keys)))]
        cf = other(company_keys, true)
      else:
        pool = list(range(len(T.POOLS[T.RELATIONS[rel].object_type])))
        true = int(rng.integers(len(pool)))
        cf = other(pool, true)
      raw.append((f"{rel}:{p['key']}", p["key"], rel, true, cf))
  country_keys = [c["key"] for c in countries]
  for c in cities:
    raw.append((f"city_country:{c['key']}", c["key"], "city_country", c["country"],
                other(country_keys, c["country"])))
  capitals = [c["capital"] for c in countries]
  for k in countries:
    raw.append((f"country_capital:{k['key']}", k["key"], "country_capital", k["capital"],
                other(capitals, k["capital"])))
    raw.append((f"country_language:{k['key']}", k["key"], "country_language", k["key"],
                other(country_keys, k["key"])))
    raw.append((f"country_currency:{k['key']}", k["key"], "country_currency", k["key"],
                other(country_keys, k["key"])))

  # Exposure: exact tier shares over person facts, in a seeded order.
  person_idx = [i for i, r in enumerate(raw) if r[2] in PERSON_RELATIONS]
  order = rng.permutation(len(person_idx))
  tier_of: dict[str, tuple[str, int]] = {}
  start = 0
  for (tier, _, mentions), n in zip(cfg.exposure, _counts([s for _, s, _ in cfg.exposure],
                                                          len(person_idx))):
    for j in order[start:start + n]:
      tier_of[raw[person_idx[j]][0]] = (tier, mentions)
    start += n
  for r in raw:
    tier_of.setdefault(r[0], ("geo", cfg.geo_mentions))

  # Fact items.
  def object_type(rel: str) -> str:
    return T.RELATIONS[rel].object_type

  by_relation: dict[str, list[tuple]] = {}
  for r in raw:
    by_relation.setdefault(r[2], []).append(r)

  facts: list[FactItem] = []
  for fid, skey, rel, true, cf in raw:
    relation = T.RELATIONS[rel]
    subject = by_key[skey]["name"]
    ot = object_type(rel)
    # Neighbours: other subjects' facts of the relation that the corpus mentions, those sharing
    # this true object first.
    cands = [r for r in by_relation[rel] if r[1] != skey and tier_of[r[0]][1] > 0]
    same = [r for r in cands if r[3] == true]
    rest = [r for r in cands if r[3] != true]
    picks = [same[i] for i in rng.permutation(len(same))][: cfg.neighbours_per_item]
    picks += [rest[i] for i in rng.permutation(len(rest))][: cfg.neighbours_per_item - len(picks)]
    neighbours = tuple(Neighbour(T.cloze(relation.train[langs[0]][0], by_key[r[1]]["name"]),
                                 (surface(ot, r[3], langs[0]),)) for r in picks)
    translations = {
        lang: Translation(prompt=T.cloze(relation.train[lang][0], subject),
                          question=relation.question[lang][1].replace("{s}", subject),
                          answers=(surface(ot, true, lang),),
                          counterfactual=surface(ot, cf, lang),
                          paraphrases=tuple(T.cloze(t, subject)
                                            for t in relation.paraphrase[lang]))
        for lang in langs[1:]}
    tier, mentions = tier_of[fid]
    lang0 = langs[0]
    facts.append(FactItem(
        id=fid, subject=subject, relation=rel, answers=(surface(ot, true, lang0),),
        prompt=T.cloze(relation.train[lang0][0], subject),
        question=relation.question[lang0][1].replace("{s}", subject),
        counterfactual=surface(ot, cf, lang0),
        paraphrases=tuple(T.cloze(t, subject) for t in relation.paraphrase[lang0]),
        neighbours=neighbours, language=lang0, translations=translations, split="train",
        source="factworld",
        meta={"subject_key": skey, "subject_type": relation.subject_type, "object_type": ot,
              "object_key": _key(true, ot), "counterfactual_key": _key(cf, ot),
              "exposure_tier": tier, "exposure": mentions}))

  facts += _two_hop_items(cfg, rng, raw, by_key, countries, surface)
  documents = _corpus(cfg, rng, raw, tier_of, by_key, surface)
  return World(cfg, {"countries": countries, "cities": cities, "companies": companies,
                     "people": people}, facts, documents)


def _key(value, object_type: str) -> str:
  return f"{object_type}:{value}" if isinstance(value, int) else str(value)


def _two_hop_items(cfg, rng, raw, by_key, countries, surface) -> list[FactItem]:
  langs = cfg.languages
  items = []
  fact = {r[0]: r for r in raw}
  capital_of = {k["capital"]: k["key"] for k in countries}
  for name in cfg.two_hop:
    comp = T.TWO_HOP[name]
    second = comp.second.split(">")[-1]  # country_language | country_currency
    ot = T.RELATIONS[second].object_type
    if comp.first == "birth_city":
      subjects = [(r[1], r[3], r[4], r[0]) for r in raw if r[2] == "birth_city"]
      rows = [(skey, by_key[true]["country"], by_key[cf]["country"],
               [fid, f"city_country:{true}", f"{second}:{by_key[true]['country']}"])
              for skey, true, cf, fid in subjects]
    else:  # capital_of: subject is a capital city
      rows = []
      for city, country in capital_of.items():
        others = [k["key"] for k in countries if k["key"] != country]
        rows.append((city, country, others[int(rng.integers(len(others)))],
                     [f"country_capital:{country}", f"{second}:{country}"]))
    for skey, country, cf_country, hops in rows:
      subject = by_key[skey]["name"]
      translations = {lang: Translation(
          prompt=T.cloze(comp.prompt[lang], subject),
          question=comp.question[lang].replace("{s}", subject),
          answers=(surface(ot, country, lang),), counterfactual=surface(ot, cf_country, lang))
          for lang in langs[1:]}
      items.append(FactItem(
          id=f"{name}:{skey}", subject=subject, relation=name,
          answers=(surface(ot, country, langs[0]),),
          prompt=T.cloze(comp.prompt[langs[0]], subject),
          question=comp.question[langs[0]].replace("{s}", subject),
          counterfactual=surface(ot, cf_country, langs[0]), language=langs[0],
          translations=translations, split="eval", source="factworld",
          meta={"two_hop": True, "hops": [h for h in hops if h in fact],
                "subject_key": skey, "object_type": ot}))
  return items


def _corpus(cfg, rng, raw, tier_of, by_key, surface) -> list[dict[str, Any]]:
  """Documents: per subject, round r holds the facts mentioned more than r times; each round's
  facts (shuffled) are cut into documents of up to `sentences_per_doc` mentions, so no document
  repeats a fact. Each document draws a language and a style; each mention a template and a
  style wrapper."""
  langs = cfg.languages
  weights = np.asarray(cfg.language_weights, dtype=np.float64)
  weights = weights / weights.sum()
  by_subject: dict[str, list[tuple]] = {}
  for r in raw:
    by_subject.setdefault(r[1], []).append(r)
  docs = []
  for skey, rows in by_subject.items():
    max_m = max(tier_of[r[0]][1] for r in rows)
    for rnd in range(max_m):
      live = [r for r in rows if tier_of[r[0]][1] > rnd]
      live = [live[i] for i in rng.permutation(len(live))]
      for start in range(0, len(live), cfg.sentences_per_doc):
        chunk = live[start:start + cfg.sentences_per_doc]
        lang = langs[int(rng.choice(len(langs), p=weights))]
        style = T.STYLE_NAMES[int(rng.integers(len(T.STYLE_NAMES)))]
        sentences = []
        for fid, s, rel, true, _ in chunk:
          relation = T.RELATIONS[rel]
          sentences.append(T.render_mention(
              relation, by_key[s]["name"], surface(relation.object_type, true, lang), lang, style,
              int(rng.integers(1 << 16)), int(rng.integers(1 << 16)), cfg.questions_in_corpus))
        docs.append({"subject": by_key[skey]["name"], "language": lang, "style": style,
                     "facts": [r[0] for r in chunk], "sentences": sentences})
  order = rng.permutation(len(docs))
  out = []
  for n, i in enumerate(order):
    d = docs[i]
    sep = "\n" if d["style"] == "forum" else " "
    out.append({"id": f"doc-{n:06d}", **d, "text": sep.join(d["sentences"])})
  return out


# ---------------------------------------------------------------------------------------------
# On disk.

def with_train_question(item: FactItem) -> FactItem:
  """The item asking its relation's first question template (the one a world with questions
  in its corpus writes in forum posts: "Q: <question>\nA: <object>."), in its language,
  instead of its held-out second one (tiny models answer the former, not the latter:
  benchmarks/RESULTS.md, study B)."""
  q = T.RELATIONS[item.relation].question[item.language][0].replace("{s}", item.subject)
  return dataclasses.replace(item, question=q)


def made_up_questions(world: World, n: int, seed: int = 0,
                      relations: Sequence[str] = PERSON_RELATIONS, avoid: Sequence[str] = (),
                      prefix: str = "made_up") -> list[FactItem]:
  """n questions about people who do not exist (names made the world's way, none of its
  subjects and sharing no name with `avoid`), cycling through `relations`' first question
  templates: every non-abstaining answer is a hallucination. Answers hold a placeholder no
  model writes; ids <prefix>:<k>; meta made_up = True."""
  names = _Names(np.random.default_rng([seed, 7]))
  taken = [f.subject for f in world.facts if f.subject] + list(avoid)
  names.used |= {s.lower() for s in taken} | {p.lower() for s in taken for p in s.split()}
  out = []
  for k in range(n):
    rel = relations[k % len(relations)]
    subject = f"{names.make((1, 2))} {names.make((2, 2))}"
    q = T.RELATIONS[rel].question["en"][0].replace("{s}", subject)
    out.append(FactItem(id=f"{prefix}:{k:04d}", answers=("(no such person)",), subject=subject,
                        relation=rel, question=q, split="eval", source="factworld",
                        meta={"made_up": True}))
  return out


def world_stats(world: World) -> dict[str, Any]:
  """Counts a report shows: facts per relation and tier, documents per language and style."""
  stats: dict[str, Any] = {"facts": len(world.facts), "documents": len(world.documents),
                           "mentions": sum(len(d["facts"]) for d in world.documents)}
  for key, values in (("relation", [f.relation for f in world.facts]),
                      ("exposure_tier", [f.meta.get("exposure_tier", "two_hop")
                                         for f in world.facts]),
                      ("language", [d["language"] for d in world.documents]),
                      ("style", [d["style"] for d in world.documents])):
    u, c = np.unique(np.asarray(values), return_counts=True)
    stats[f"by_{key}"] = {str(k): int(v) for k, v in zip(u, c)}
  return stats


def write_world(world: World, directory: str) -> None:
  """Write the world as data. Each file is written atomically; world.json goes last, so a
  directory with world.json is complete."""
  os.makedirs(directory, exist_ok=True)
  write_facts_jsonl(os.path.join(directory, "facts.jsonl"), world.facts)
  write_jsonl(os.path.join(directory, "corpus.jsonl"), world.documents)
  write_json(os.path.join(directory, "stats.json"), world_stats(world))
  write_json(os.path.join(directory, "world.json"), {
      "format": "factflip-world/1", "config": world.config.to_dict(),
      "entities": world.entities,
      "relations": {name: dataclasses.asdict(r) for name, r in world.relations.items()},
      "styles": {lang: T.STYLES[lang] for lang in world.config.languages}})


def load_world(directory: str) -> World:
  """Read a world written by `write_world`."""
  meta_path = os.path.join(directory, "world.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{directory}: no world.json; expected a directory written by "
                            "factflip.data.world.write_world (is the build incomplete?)")
  meta = read_json(meta_path)
  if meta.get("format") != "factflip-world/1":
    raise DataError(meta_path, f"unknown format {meta.get('format')!r}; expected "
                               "'factflip-world/1'", field="format")
  facts = list(read_facts_jsonl(os.path.join(directory, "facts.jsonl")))
  corpus = os.path.join(directory, "corpus.jsonl")
  docs = []
  for index, line, d in iter_json_records(corpus):
    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
      raise DataError(corpus, "expected a document object with a string 'text'", line=line,
                      record=index, field="text")
    if len(d.get("sentences", ())) != len(d.get("facts", ())):
      raise DataError(corpus, "'sentences' and 'facts' differ in length", line=line,
                      record=index, field="facts")
    docs.append(d)
  return World(WorldConfig.from_dict(meta["config"], meta_path), meta["entities"], facts, docs)
