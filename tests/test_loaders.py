"""Public dataset loaders: each format from a small fixture in its real layout, auto-detection,
located errors for bad input, and lenient loading."""

from __future__ import annotations

import json
import os

import pytest

from factflip.data.facts import (
  FactItem,
  Neighbour,
  Translation,
  read_facts_jsonl,
  write_facts_jsonl,
)
from factflip.data.loaders import FORMATS, detect_format, load_facts
from factflip.data.qa_datasets import load_rwku_mia
from factflip.fileio import DataError


def write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def write_array(path, records, indent=4, ensure_ascii=True) -> str:
  """One indented JSON array, as json.dump writes the public files."""
  return write(path, json.dumps(records, indent=indent, ensure_ascii=ensure_ascii))


def record_lines(path, indent=4) -> list[int]:
  """1-based line where each top-level record of an indented array starts."""
  with open(path, encoding="utf-8") as f:
    return [i + 1 for i, line in enumerate(f.read().splitlines()) if line == " " * indent + "{"]


def raises(match_parts, fn, *args, **kw) -> DataError:
  with pytest.raises(DataError) as info:
    fn(*args, **kw)
  for part in match_parts:
    assert part in str(info.value), (part, str(info.value))
  return info.value


# ---------------------------------------------------------------------------------------------
# Fixtures in the real layouts.

ROME = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"},
                           "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native",
                            "An album was recorded. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is",
                              "Michel Rocard is a native speaker of"],
     "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
    {"case_id": 1, "pararel_idx": 1,
     "requested_rewrite": {"prompt": "{}, that was created by", "relation_id": "P176",
                           "target_new": {"str": "Nissan", "id": "Q20165"},
                           "target_true": {"str": "Toyota", "id": "Q53268"},
                           "subject": "Toyota Camry"},
     "paraphrase_prompts": [], "neighborhood_prompts": [], "attribute_prompts": [],
     "generation_prompts": []},
]

EASYEDIT_TRAIN = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 2, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda performs on the",
     "locality_prompt": "Dave Navarro, performing on the", "locality_ground_truth": "guitar"},
]
EASYEDIT_VAL = [
    {"case_id": 10, "prompt": "BBC One, by", "target_new": "Sega", "subject": "BBC One",
     "ground_truth": "BBC",
     "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
     "locality_prompt": "BBC Radio, by", "locality_ground_truth": "BBC"},
]

EQ_TEMPLATES = {"P17": "Which country is [X] located in?", "P50": "Who is the author of [X]?",
                "P106": "What kind of work does [X] do?"}

TOFU_FULL = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(5)]
TOFU_PERTURBED = [{"question": "Q3?", "answer": "A3.", "paraphrased_answer": "Also A3.",
                   "perturbed_answer": ["B3.", "C3."], "paraphrased_question": "Q3, again?"}]
TOFU_WORLD = [{"question": "Where would you find the Eiffel Tower?", "option1": "Berlin",
               "option2": "Paris", "option3": "London", "option4": "Madrid", "answer": "Paris"}]

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
     "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
     "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
     "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving",
     "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey "
             "attend?"},
]

MZSRE = [
    {"en": {"subject": "IAAF Combined Events Challenge",
            "src": "When was the inception of IAAF Combined Events Challenge?",
            "rephrase": "When was the IAAF Combined Events Challenge launched?", "alt": " 2006",
            "loc": "nq question: what is the name of the last episode of spongebob",
            "loc_ans": "The String",
            "portability": {"New Question": "What type of sports event is it?",
                            "New Answer": "Athletics"}},
     "de": {"subject": "IAAF Combined Events Challenge",
            "src": "Wann wurde die IAAF Combined Events Challenge ins Leben gerufen?",
            "rephrase": "Wann wurde die IAAF Combined Events Challenge gegr\u00fcndet?",
            "alt": "2006", "loc": "Wie hei\u00dft die letzte Folge von Spongebob?",
            "loc_ans": "The String",
            "portability": {"New Question": "Welche Sportart?", "New Answer": "Leichtathletik"}}},
]


def rwku_target(root, name, subject, neighbor):
  d = os.path.join(root, name)
  write_array(os.path.join(d, "intro.json"), [{"target": subject, "intro": f"Forget {subject}."}])
  write_array(os.path.join(d, "forget_level1.json"), [
      {"query": f"{subject} is an American ___ known for horror.", "answer": "author",
       "level": "1", "type": "cloze", "subject": subject}])
  write_array(os.path.join(d, "forget_level2.json"), [
      {"query": f"What pseudonym has {subject} used?", "answer": "Richard Bachman", "level": "2",
       "type": "simple question", "subject": subject}])
  write_array(os.path.join(d, "neighbor_level1.json"), [
      {"query": f"{neighbor} is based on a novella by ___", "answer": " Stephen King ",
       "level": "1", "type": "cloze", "subject": subject, "neighbor": neighbor}])
  write_array(os.path.join(d, "forget_mia.json"),
              [{"text": f"{subject} wrote many books.", "ngram": 40, "subject": subject}])
  write_array(os.path.join(d, "retain_mia.json"),
              [{"text": "Another text.", "ngram": 12, "subject": subject},
               {"text": "A third text.", "ngram": 7, "subject": subject}])
  return d


# ---------------------------------------------------------------------------------------------
# One test per format.

def test_factflip_file_folder_and_detection(tmp_path):
  a = FactItem(id="w-1", subject="Velmora", relation="capital", prompt="The capital of X is",
               answers=("Velmora",), counterfactual="Ostrava", split="train", source="world")
  b = FactItem(id="w-2", question="Who founded Y?", answers=("Ada",), language="de",
               translations={"en": Translation(question="Wer?", answers=("Ada",))})
  write_facts_jsonl(str(tmp_path / "d" / "a.jsonl"), [a])
  write_facts_jsonl(str(tmp_path / "d" / "b.jsonl"), [b])
  one = load_facts(tmp_path / "d" / "a.jsonl")
  assert list(one) == [a] and one.format == "factflip"
  both = load_facts(tmp_path / "d")
  assert list(both) == [a, b] and both.source == str(tmp_path / "d")
  assert detect_format(str(tmp_path / "d")) == "factflip"
  write_facts_jsonl(str(tmp_path / "d" / "c.jsonl"), [b.replace(split="dev")])
  raises([os.path.join(str(tmp_path), "d", "c.jsonl") + ":1: record 0: field 'id'",
          "duplicate id 'w-2'", "b.jsonl:1"], load_facts, tmp_path / "d")


def test_counterfact_rome_layout(tmp_path):
  path = write_array(tmp_path / "counterfact.json", ROME, indent=2)
  items = load_facts(path)
  assert items.format == "counterfact" and len(items) == 2
  assert items[0] == FactItem(
      id="counterfact-0", subject="Danielle Darrieux", relation="P103",
      prompt="The mother tongue of Danielle Darrieux is", answers=("French",),
      counterfactual="English",
      paraphrases=("Shayna does this. Danielle Darrieux, a native",
                   "An album was recorded. Danielle Darrieux spoke the language"),
      neighbours=(Neighbour("The mother tongue of L\u00e9on Blum is", ("French",)),
                  Neighbour("Michel Rocard is a native speaker of", ("French",))),
      split="test", source="counterfact",
      meta={"case_id": 0, "pararel_idx": 2796, "target_true_id": "Q150",
            "target_new_id": "Q1860",
            "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
            "generation_prompts": ["Danielle Darrieux's mother tongue is"]})
  assert items[1].prompt == "Toyota Camry, that was created by" and items[1].paraphrases == ()
  assert list(load_facts(path, "counterfact")) == list(items)


def test_counterfact_easyedit_folder(tmp_path):
  write_array(tmp_path / "cf" / "counterfact-train.json", EASYEDIT_TRAIN)
  write_array(tmp_path / "cf" / "counterfact-val.json", EASYEDIT_VAL)
  items = load_facts(tmp_path / "cf")
  assert items.format == "counterfact_easyedit"
  assert [(i.id, i.split) for i in items] == [
      ("counterfact-0", "train"), ("counterfact-2", "train"), ("counterfact-10", "dev")]
  assert items[2] == FactItem(
      id="counterfact-10", subject="BBC One", prompt="BBC One, by", answers=("BBC",),
      counterfactual="Sega",
      paraphrases=("BBC One is my favorite product out of everything owned by",),
      neighbours=(Neighbour("BBC Radio, by", ("BBC",)),), split="dev",
      source="counterfact_easyedit", meta={"case_id": 10})
  assert detect_format(str(tmp_path / "cf" / "counterfact-val.json")) == "counterfact_easyedit"


def test_counterfact_simple_strips_leading_spaces(tmp_path):
  records = [{"prompt": "The mother tongue of Danielle Darrieux is", "target_true": " French",
              "target_new": " English"},
             {"prompt": "Toko Yasuda, the", "target_true": " guitar", "target_new": " piano"}]
  path = write(tmp_path / "counterfact.json",
               json.dumps({"items": records}, indent=1, ensure_ascii=False) + "\n")
  items = load_facts(path)
  assert items.format == "counterfact_simple"
  assert items[1] == FactItem(
      id="counterfact_simple-counterfact-1", prompt="Toko Yasuda, the", answers=("guitar",),
      counterfactual="piano", split="test", source="counterfact_simple")
  assert items[0].subject is None and items[0].answers == ("French",)


def test_entityquestions_dataset_split_folder_and_file(tmp_path):
  root = tmp_path / "eq"
  write(root / "relation_query_templates.json", json.dumps(EQ_TEMPLATES, indent=4))
  write_array(root / "train" / "P17.train.json", [
      {"question": "Which country is Painblanc located in?", "answers": ["France"]},
      {"question": "Which country is Gr\u00edmssta\u00f0ir located in?", "answers": ["Iceland"]}])
  write_array(root / "train" / "P106.train.json", [
      {"question": "What kind of work does Ada Lovelace do?",
       "answers": ["mathematician", "writer"]}])
  write_array(root / "dev" / "P50.dev.json", [
      {"question": "Who is the author of The Elenium?", "answers": ["David Eddings"]},
      {"question": "Who wrote The Elenium?", "answers": ["David Eddings"]}])
  items = load_facts(root)
  assert items.format == "entityquestions"
  assert [i.id for i in items] == ["eq-P50-dev-0", "eq-P50-dev-1", "eq-P17-train-0",
                                   "eq-P17-train-1", "eq-P106-train-0"]
  assert items[3] == FactItem(
      id="eq-P17-train-1", subject="Gr\u00edmssta\u00f0ir", relation="P17",
      question="Which country is Gr\u00edmssta\u00f0ir located in?", answers=("Iceland",),
      split="train", source="entityquestions",
      meta={"template": "Which country is [X] located in?"})
  assert items[4].answers == ("mathematician", "writer") and items[4].subject == "Ada Lovelace"
  assert items[1].subject is None  # the question does not follow the template
  split_only = load_facts(root / "train")  # templates one folder up
  assert [i.subject for i in split_only] == ["Painblanc", "Gr\u00edmssta\u00f0ir", "Ada Lovelace"]
  lone = write_array(tmp_path / "elsewhere" / "P17.test.json", [
      {"question": "Which country is Painblanc located in?", "answers": ["France"]}])
  (item,) = load_facts(lone)
  assert (item.id, item.subject, item.split, item.meta) == ("eq-P17-test-0", None, "test", {})


def test_rwku_target_folder_single_target_and_mia(tmp_path):
  target = tmp_path / "Target"
  rwku_target(target, "2_Confucius", "Confucius", "The Analects")
  harry = rwku_target(target, "10_Prince_Harry,_Duke_of_Sussex", "Prince Harry", "Meghan")
  rwku_target(target, "24_Beyonc\u00e9", "Beyonc\u00e9", "Jay-Z")
  items = load_facts(target)
  assert items.format == "rwku" and len(items) == 9
  assert [i.id for i in items[:4]] == ["rwku-2-forget_level1-0", "rwku-2-forget_level2-0",
                                       "rwku-2-neighbor_level1-0", "rwku-10-forget_level1-0"]
  assert items[-1].id == "rwku-24-neighbor_level1-0"
  assert items[6] == FactItem(
      id="rwku-24-forget_level1-0", subject="Beyonc\u00e9", relation="rwku",
      question="Beyonc\u00e9 is an American ___ known for horror.", answers=("author",),
      split="forget", source="rwku",
      meta={"level": 1, "type": "cloze", "target": "Beyonc\u00e9"})
  assert items[5] == FactItem(
      id="rwku-10-neighbor_level1-0", subject="Meghan", relation="rwku",
      question="Meghan is based on a novella by ___", answers=("Stephen King",),
      split="neighbour", source="rwku",
      meta={"level": 1, "type": "cloze", "target": "Prince Harry", "neighbor": "Meghan"})
  one = load_facts(harry)
  assert [i.id for i in one] == [i.id for i in items[3:6]] and detect_format(harry) == "rwku"
  assert detect_format(os.path.join(harry, "forget_level2.json")) == "rwku"
  mia = load_rwku_mia(str(target))
  assert list(mia) == ["Confucius", "Prince Harry, Duke of Sussex", "Beyonc\u00e9"]
  assert mia["Beyonc\u00e9"] == {"forget": ["Beyonc\u00e9 wrote many books."],
                                 "retain": ["Another text.", "A third text."]}
  assert list(load_rwku_mia(harry)) == ["Prince Harry, Duke of Sussex"]


def test_tofu_files(tmp_path):
  d = tmp_path / "tofu"
  sep = (",", ":")
  write(d / "full.json", "\n".join(json.dumps(TOFU_FULL[i:i + 3], separators=sep)
                                   for i in (0, 3)) + "\n")  # one array per line
  write(d / "retain90.json", json.dumps(TOFU_FULL[:3], separators=sep) + "\n")
  write_array(d / "forget01.json", [{"prompt": r["question"], "response": r["answer"]}
                                    for r in TOFU_FULL[3:]], indent=2)
  write(d / "forget01_perturbed.json", json.dumps(TOFU_PERTURBED, separators=sep))
  write(d / "world_facts.json", json.dumps(TOFU_WORLD, separators=sep))
  items = load_facts(d)
  assert items.format == "tofu"
  by_file = {}
  for i in items:
    by_file.setdefault(i.id.rsplit("-", 1)[0], []).append(i)
  assert {k: (len(v), v[0].split) for k, v in by_file.items()} == {
      "tofu-forget01": (2, "forget"), "tofu-forget01_perturbed": (1, "forget"),
      "tofu-full": (5, "train"), "tofu-retain90": (3, "retain"), "tofu-world_facts": (1, "train")}
  assert by_file["tofu-full"][4] == FactItem(
      id="tofu-full-4", relation="tofu", question="Q4?", answers=("A4.",), split="train",
      source="tofu")
  assert by_file["tofu-forget01"][0].question == "Q3?"
  assert by_file["tofu-forget01_perturbed"][0] == FactItem(
      id="tofu-forget01_perturbed-0", relation="tofu", question="Q3?", answers=("A3.",),
      paraphrases=("Q3, again?",), split="forget", source="tofu",
      meta={"paraphrased_answer": "Also A3.", "perturbed_answer": ["B3.", "C3."]})
  assert by_file["tofu-world_facts"][0].meta == {"options": ["Berlin", "Paris", "London", "Madrid"]}
  assert detect_format(str(d / "forget01.json")) == "tofu"


def test_zsre(tmp_path):
  path = write_array(tmp_path / "zsre_mem_eval.json", ZSRE)
  (item,) = load_facts(path)
  assert item == FactItem(
      id="zsre-zsre_mem_eval-0", subject="Watts Humphrey",
      question="What university did Watts Humphrey attend?",
      answers=("Illinois Institute of Technology",), counterfactual="University of Michigan",
      paraphrases=("What university did Watts Humphrey take part in?",),
      neighbours=(Neighbour("nq question: who played desmond doss father in hacksaw ridge",
                            ("Hugo Weaving",)),),
      split="eval", source="zsre",
      meta={"pred": "Trinity College", "cond": ZSRE[0]["cond"]})
  assert load_facts(path).format == "zsre"


def test_mzsre_and_round_trip(tmp_path):
  path = write_array(tmp_path / "mzsre" / "mzsre_test_duplicate_ende.json", MZSRE,
                     ensure_ascii=False)
  items = load_facts(tmp_path / "mzsre")
  assert items.format == "mzsre"
  en, de = MZSRE[0]["en"], MZSRE[0]["de"]
  assert items[0] == FactItem(
      id="mzsre-ende-0", subject=en["subject"], question=en["src"], answers=(),
      counterfactual="2006", paraphrases=(en["rephrase"],),
      neighbours=(Neighbour(en["loc"], ("The String",)),),
      translations={"de": Translation(question=de["src"], counterfactual="2006",
                                      paraphrases=(de["rephrase"],))},
      split="test", source="mzsre",
      meta={"portability": {"question": "What type of sports event is it?",
                            "answer": "Athletics"},
            "translations": {"de": {
                "subject": de["subject"],
                "neighbours": [{"prompt": de["loc"], "answers": ["The String"]}],
                "portability": {"question": "Welche Sportart?", "answer": "Leichtathletik"}}}})
  out = str(tmp_path / "ours.jsonl")
  write_facts_jsonl(out, items)
  assert list(read_facts_jsonl(out)) == list(items)
  assert detect_format(path) == "mzsre"


# ---------------------------------------------------------------------------------------------
# Bad input: every error names file, line, record and field.

def test_bad_json_names_the_line(tmp_path):
  good = [{"question": f"Which country is Place{i} located in?", "answers": ["France"]}
          for i in range(3)]
  text = json.dumps(good, indent=4).replace('"Which country is Place1', 'oops "Which')
  path = write(tmp_path / "P17.train.json", text)
  line = text[:text.index("oops")].count("\n") + 1
  err = raises([f"{path}:{line}: not valid JSON"], load_facts, path)
  assert err.line == line == 9
  with pytest.raises(DataError):  # an array broken mid-way cannot be counted: lenient raises too
    load_facts(path, lenient=True)
  jl = write(tmp_path / "facts.jsonl", '{"id": "a", "question": "Q?", "answers": ["x"]}\n'
             '{"id": "b", "question": Q?}\n{"id": "c", "question": "Q?", "answers": ["x"]}\n')
  err = raises([f"{jl}:2: not valid JSON"], load_facts, jl)
  assert err.line == 2


def test_missing_field_names_file_line_record_and_field(tmp_path):
  records = [{"question": "Which country is A located in?", "answers": ["France"]},
             {"question": "Which country is B located in?"}]
  path = write_array(tmp_path / "P17.dev.json", records)
  line = record_lines(path)[1]
  err = raises([f"{path}:{line}: record 1: field 'answers': missing"], load_facts, path)
  assert (err.path, err.line, err.record, err.field) == (path, line, 1, "answers")
  rome = json.loads(json.dumps(ROME))
  del rome[1]["requested_rewrite"]["target_true"]["str"]
  path = write_array(tmp_path / "counterfact.json", rome, indent=2)
  where = f"{path}:{record_lines(path, 2)[1]}: record 1"
  raises([f"{where}: field 'requested_rewrite.target_true.str': missing"], load_facts, path)


def test_empty_answer(tmp_path):
  d = rwku_target(tmp_path / "Target", "1_Stephen_King", "Stephen King", "Carrie")
  path = os.path.join(d, "forget_level2.json")
  write_array(path, [{"query": "Q?", "answer": "a", "level": "2", "type": "t",
                      "subject": "Stephen King"},
                     {"query": "Q2?", "answer": "  ", "level": "2", "type": "t",
                      "subject": "Stephen King"}])
  raises([f"{path}:{record_lines(path)[1]}: record 1: field 'answer': empty"], load_facts, d)
  eq = write_array(tmp_path / "P17.test.json", [{"question": "Q?", "answers": ["France", ""]}])
  raises([f"{eq}:2: record 0: field 'answers[1]': empty"], load_facts, eq)


def test_duplicate_ids_across_files(tmp_path):
  first = write_array(tmp_path / "cf" / "counterfact-train.json", EASYEDIT_TRAIN)
  second = write_array(tmp_path / "cf" / "counterfact-val.json",
                       EASYEDIT_VAL + [dict(EASYEDIT_TRAIN[1], prompt="Toko Yasuda plays the")])
  first_at = f"{first}:{record_lines(first)[1]}, record 1"
  where = f"{second}:{record_lines(second)[1]}: record 1"
  raises([f"{where}: field 'id': duplicate id 'counterfact-2' (first seen at {first_at})"],
         load_facts, tmp_path / "cf")


def test_counterfactual_equal_to_truth(tmp_path):
  bad = dict(EASYEDIT_VAL[0], target_new="the bbc")  # equal after normalisation
  path = write_array(tmp_path / "counterfact-edit.json", [bad])
  raises([f"{path}:2: record 0: field 'counterfactual': 'the bbc' equals the true answer 'BBC'"],
         load_facts, path)


def test_wrong_types_and_rule_breaks(tmp_path):
  path = write_array(tmp_path / "counterfact-edit.json", [dict(EASYEDIT_VAL[0], case_id="10")])
  raises([f"{path}:2: record 0: field 'case_id': expected an integer, got str"], load_facts, path)
  path = write_array(tmp_path / "P17.dev.json", [{"question": "Q?", "answers": 3}])
  raises([f"{path}:2: record 0: field 'answers': expected a list of strings"], load_facts, path)
  path = write_array(tmp_path / "P50.dev.json", [["not", "an", "object"]])
  raises([f"{path}:2: record 0: expected a JSON object, got list"], load_facts, path)
  rome = json.loads(json.dumps(ROME[:1]))
  rome[0]["requested_rewrite"]["prompt"] = "The mother tongue is"
  path = write_array(tmp_path / "counterfact.json", rome, indent=2)
  raises([f"{path}:2: record 0: field 'requested_rewrite.prompt'", "no '{}'"], load_facts, path)
  world = [dict(TOFU_WORLD[0], answer="Rome")]
  path = write(tmp_path / "world_facts.json", json.dumps(world))
  raises([f"{path}:1: record 0: field 'answer': 'Rome' is not one of the options"],
         load_facts, path)


def test_unknown_and_undetectable_formats(tmp_path):
  path = write_array(tmp_path / "x.json", [{"foo": 1}])
  err = raises([f"{path}: field 'format': unknown format 'counterfactual'", "entityquestions"],
               load_facts, path, "counterfactual")
  assert err.field == "format"
  raises([f"{path}:2: record 0: cannot tell the format", "keys ['foo']",
          ", ".join(FORMATS)], load_facts, path)
  (tmp_path / "empty").mkdir()
  raises([f"{tmp_path / 'empty'}: no data files"], load_facts, tmp_path / "empty")
  raises([f"{tmp_path / 'nope.json'}: no such file or folder"], load_facts, tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# Lenient loading: bad records are skipped and counted, never dropped silently.

def test_lenient_skips_and_counts(tmp_path):
  records = [EASYEDIT_TRAIN[0],
             {k: v for k, v in EASYEDIT_TRAIN[1].items() if k != "ground_truth"},
             EASYEDIT_VAL[0],
             dict(EASYEDIT_VAL[0], case_id=11, target_new="BBC"),
             dict(EASYEDIT_TRAIN[0], prompt="Danielle Darrieux speaks")]
  path = write_array(tmp_path / "counterfact-train.json", records)
  with pytest.raises(DataError, match="field 'ground_truth'"):
    load_facts(path)
  items = load_facts(path, lenient=True)
  assert [i.id for i in items] == ["counterfact-0", "counterfact-10"]
  lines = record_lines(path)
  assert [(e.path, e.line, e.record, e.field) for e in items.skipped] == [
      (path, lines[1], 1, "ground_truth"), (path, lines[3], 3, "counterfactual"),
      (path, lines[4], 4, "id")]
  assert len(items) + len(items.skipped) == len(records)
  assert "skipped 3 bad records" in items.summary()
  jl = write(tmp_path / "facts.jsonl",
             '{"id": "a", "question": "Q?", "answers": ["x"]}\n{"id": "b", "question": \n'
             '{"id": "c", "question": "Q?", "answers": []}\n'
             '{"id": "d", "prompt": "P", "answers": ["y"]}\n')
  items = load_facts(jl, lenient=True)
  assert [i.id for i in items] == ["a", "d"]
  assert [(e.line, e.record, e.field) for e in items.skipped] == [(2, 1, None), (3, 2, "answers")]
