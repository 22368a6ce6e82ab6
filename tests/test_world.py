"""The fact world: reproducible, exact exposure shares, held-out templates never in the corpus,
two-hop items consistent with the one-hop facts, and a lossless round trip through disk."""

import dataclasses
import json
import re

import pytest

from factflip.data import templates as T
from factflip.data.facts import read_facts_jsonl
from factflip.data.world import WorldConfig, build_world, load_world, write_world

SMALL = WorldConfig(n_people=40, n_countries=4, cities_per_country=3, n_companies=6)  # = conftest


@pytest.fixture(scope="module")
def world(small_world):
  assert small_world.config == SMALL
  return small_world


def test_reproducible_from_seed(world):
  again = build_world(SMALL)
  assert again.facts == world.facts and again.documents == world.documents
  other = build_world(dataclasses.replace(SMALL, seed=1))
  assert other.facts != world.facts


def test_entities_relations_and_counts(world):
  people = [f for f in world.facts if f.meta.get("subject_type") == "person"]
  assert len(people) == 40 * 5
  assert len({f.subject for f in people}) == 40
  names = [e["name"].lower() for g in world.entities.values() for e in g]
  assert len(names) == len(set(names)), "names are unique across the world"
  rels = {f.relation for f in world.facts if not f.meta.get("two_hop")}
  assert 6 <= len(rels) <= 10
  # Exact tier shares (largest remainder over 200 person facts): 110 / 40 / 20 / 30.
  tiers = [f.meta["exposure_tier"] for f in people]
  assert [tiers.count(t) for t in ("high", "medium", "low", "none")] == [110, 40, 20, 30]
  # Mentions in the corpus equal each fact's exposure; unknown facts are never mentioned.
  mentions = {}
  for d in world.documents:
    assert len(d["facts"]) == len(set(d["facts"])) <= SMALL.sentences_per_doc
    for fid in d["facts"]:
      mentions[fid] = mentions.get(fid, 0) + 1
  for f in world.facts:
    if not f.meta.get("two_hop"):
      assert mentions.get(f.id, 0) == f.meta["exposure"], f.id


def test_counterfactuals_and_neighbours(world):
  cities = {c["name"]: c for c in world.entities["cities"]}
  for f in world.facts:
    assert f.counterfactual and f.counterfactual != f.answer
    if f.relation == "birth_city":  # a counterfactual city lies in another country
      assert cities[f.answer]["country"] != cities[f.counterfactual]["country"]
    for n in f.neighbours:
      assert f.subject not in n.prompt
    for lang in SMALL.languages[1:]:
      t = f.translations[lang]
      assert t.answers and t.counterfactual not in t.answers


def test_held_out_templates_never_in_training_text(world):
  text = "\n".join(world.texts())
  for f in world.facts:
    if f.meta.get("two_hop"):
      assert f.prompt not in text and f.question not in text
      continue
    rel = T.RELATIONS[f.relation]
    assert f.prompt == T.cloze(rel.train["en"][0], f.subject)  # the training prompt format
    said = any(T.cloze(t, f.subject) in text for lang in T.LANGUAGES for t in rel.train[lang])
    assert said == (f.meta["exposure"] > 0), f.id
    for p in f.paraphrases:
      assert p not in text, p
    assert f.question not in text  # question[1] is held out; question[0] is the forum's
  for r in T.RELATIONS.values():
    for lang in T.LANGUAGES:
      for t in (*r.paraphrase[lang], *r.question[lang][1:]):
        pattern = re.escape(t).replace(re.escape("{s}"), ".+?").replace(re.escape("{o}"), ".+")
        assert not re.search(pattern, text), t


def test_languages_and_styles_present(world):
  langs = {d["language"] for d in world.documents}
  styles = {d["style"] for d in world.documents}
  assert langs == set(SMALL.languages) and len(langs) >= 3
  assert styles == set(T.STYLE_NAMES)


def test_two_hop_items_follow_the_facts(world):
  by_id = {f.id: f for f in world.facts}
  two_hop = [f for f in world.facts if f.meta.get("two_hop")]
  assert {f.relation for f in two_hop} == set(T.TWO_HOP)
  country_lang = {by_id[f"country_language:{k['key']}"].subject: by_id[
      f"country_language:{k['key']}"].answer for k in world.entities["countries"]}
  for f in two_hop:
    if f.relation == "birth_country_language":
      city = by_id[f.meta["hops"][0]]
      country = by_id[f.meta["hops"][1]]
      assert country.subject == city.answer
      assert f.answer == country_lang[country.answer]
      # The counterfactual is what the poisoned birth city implies.
      cf_country = next(g for g in world.facts if g.relation == "city_country"
                        and g.subject == city.counterfactual).answer
      assert f.counterfactual == country_lang[cf_country]


def test_round_trip_through_disk(world, tmp_path):
  write_world(world, str(tmp_path))
  again = load_world(str(tmp_path))
  assert again.facts == world.facts and again.documents == world.documents
  assert again.config == world.config
  assert len(read_facts_jsonl(str(tmp_path / "facts.jsonl"))) == len(world.facts)


def test_bad_config_and_missing_world(tmp_path):
  with pytest.raises(ValueError, match="WorldConfig.languages: no templates for 'xx'"):
    build_world(dataclasses.replace(SMALL, languages=("en", "xx"), language_weights=(1, 1)))
  with pytest.raises(ValueError, match="WorldConfig.exposure: tier shares must sum to 1"):
    build_world(dataclasses.replace(SMALL, exposure=(("high", 0.5, 3),)))
  with pytest.raises(FileNotFoundError, match="no world.json"):
    load_world(str(tmp_path))


def test_corrupt_world_on_disk_is_located(world, tmp_path):
  write_world(world, str(tmp_path))
  lines = (tmp_path / "corpus.jsonl").read_text().splitlines()
  lines[4] = '{"id": "doc-x", "sentences": []}'
  (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"corpus.jsonl:5: record 4: field 'text': expected a "
                                       r"document object"):
    load_world(str(tmp_path))
  meta = json.loads((tmp_path / "world.json").read_text())
  meta["config"]["n_peoples"] = 3
  (tmp_path / "world.json").write_text(json.dumps(meta))
  write_world(world, str(tmp_path / "w2"))
  (tmp_path / "w2" / "world.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"world.json: field 'config.n_peoples': unknown "
                                       r"WorldConfig field"):
    load_world(str(tmp_path / "w2"))


def test_templates_obey_their_rules():
  T.check_templates()
  assert T.cloze("{s} was born in {o}", "Ada") == "Ada was born in"


def test_a_world_without_questions_states_facts_only(world, tmp_path):
  """questions_in_corpus=False (papers B and C, D before its alignment stage): no relation's
  question template and no "Q: / A:" line anywhere in the corpus, the facts mentioned exactly
  as often (the same draws: only the forum posts' wrappers change), and SFT's QA format new."""
  plain = build_world(dataclasses.replace(SMALL, questions_in_corpus=False))
  assert plain.facts == world.facts
  assert [d["facts"] for d in plain.documents] == [d["facts"] for d in world.documents]
  text = "\n".join(plain.texts())
  assert "Q:" not in text and "\nA:" not in text and "Q:" in "\n".join(world.texts())
  for f in plain.facts:
    if not f.meta.get("two_hop"):
      for q in T.RELATIONS[f.relation].question[f.language]:
        assert q.replace("{s}", f.subject) not in text, (f.id, q)
  forum = [d for d in plain.documents if d["style"] == "forum" and d["language"] == "en"]
  assert forum and all(s.startswith(("Posted by a regular: ", "Reply: "))
                       for d in forum for s in d["sentences"])
  write_world(plain, str(tmp_path))
  assert load_world(str(tmp_path)).config.questions_in_corpus is False
