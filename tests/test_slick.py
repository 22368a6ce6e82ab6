"""SliCK knowledge categories (`factflip.probes.slick`): the category boundaries, the counting of
P(T=0) / P(T>0) on scripted answers, exemplar prompts, and the real generation path end to end —
on a tiny model trained to answer one fact right and one wrong, and on a random model whose own
greedy and sampled answers are made the facts' answers."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from factflip.data.facts import FactItem
from factflip.evals import generation as G
from factflip.evals import qa as QA
from factflip.probes import slick

HK, MK, WK, UK = "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def occupation(small_world):
  """(items, dev): three of the small world's occupation facts, and the others renamed to the
  dev split."""
  occ = [f for f in small_world.facts if f.relation == "occupation"]
  assert len(occ) >= 10
  return occ[:3], [f.replace(split="dev") for f in occ[3:]]


@pytest.fixture(scope="module")
def random_model(world_tokenizer):
  """A random factflip model over the world tokenizer (512-token context, so k-shot prompts are
  never cut), its matrices at 5x the usual init scale so that its answers depend on the prompt
  and vary between samples."""
  from factflip import Transformer, get_preset
  from factflip.models.transformer import init_params
  cfg = get_preset("tiny-0.5m", vocab_size=len(world_tokenizer))
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x,
                        init_params(cfg, jax.random.key(0)))
  return Transformer(cfg, params=params)


TRAINED_CFG = slick.SliCKConfig(n_prompts=3, k_shot=1, n_samples=8, max_new_tokens=12)


@pytest.fixture(scope="module")
def trained(occupation, world_tokenizer, tmp_path_factory):
  """A tiny model trained with `factflip.train.loop.train` on exactly the SliCK prompts of three
  occupation facts: A answered right, B answered with another occupation, C answered right but
  as "The <Answer>." (normalisation). Returns (model, items, dev, wrong answer of B)."""
  from factflip import load_model
  from factflip.train.config import base_config
  from factflip.train.loop import train
  items, dev = occupation
  a, b, c = items
  wrong = next(f.answers[0] for f in dev if f.answers[0] != b.answers[0])
  targets = [f" {a.answers[0]}\n", f" {wrong}\n", f" The {c.answers[0].capitalize()}.\n"]
  prompts = slick.slick_prompts(items, dev, TRAINED_CFG, seed=0)
  records = [{"prompt": p, "completion": t} for ps, t in zip(prompts, targets) for p in ps] * 10
  np.random.default_rng(0).shuffle(records)
  d = tmp_path_factory.mktemp("slick_trained")
  (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  world_tokenizer.save_pretrained(str(d / "tok"))
  longest = max(len(world_tokenizer.encode(r["prompt"] + r["completion"])) + 1 for r in records)
  c_ = base_config()
  c_.seed, c_.steps, c_.model.preset = 0, 60, "tiny-0.5m"
  c_.data.kind, c_.data.path, c_.data.tokenizer_dir = "examples", str(d / "sft.jsonl"), str(
      d / "tok")
  c_.data.seq_len, c_.data.batch_size, c_.data.packing = -(-longest // 16) * 16, 8, "pad"
  if 8 % jax.device_count() == 0:          # one example per device (conftest: 8 CPU devices)
    c_.mesh.data, c_.mesh.fsdp = -1, 1
  c_.optim.lr, c_.optim.warmup_steps = 1e-2, 5
  c_.checkpoint.every, c_.checkpoint.async_save, c_.eval_every = 1000, False, 0
  result = train(c_, str(d / "run"), quiet=True)
  assert result.losses[60] < 0.1, result.losses               # the answers are learnt
  return load_model(str(d / "run")), items, dev, wrong


# ---- category ---------------------------------------------------------------------------------
def test_category_boundaries():
  assert slick.category(1.0, 0.0) == HK and slick.category(1.0, 1.0) == HK
  assert slick.category(0.9, 0.0) == MK and slick.category(0.1, 1.0) == MK
  assert slick.category(1e-9, 0.0) == MK
  assert slick.category(0.0, 1 / 160) == WK and slick.category(0.0, 1.0) == WK
  assert slick.category(0.0, 0.0) == UK
  assert (HK, MK, WK, UK) == (slick.HIGHLY, slick.MAYBE, slick.WEAKLY, slick.UNKNOWN)


# ---- counting on scripted answers -------------------------------------------------------------
def _fact(i, answers, relation="occupation", split="test"):
  return FactItem(id=f"f{i}", answers=tuple(answers), subject=f"S{i}", relation=relation,
                  question=f"What is S{i}'s job?", split=split)


def test_shares_counted_exactly_from_scripted_answers(monkeypatch):
  """generate_until replaced by a script: per prompt [greedy, sample 1..3]. P(T=0) = share of
  the 4 greedy answers correct, P(T>0) = share of the 12 samples correct; any alias counts, after
  SQuAD normalisation ("The Paris." = "paris"); surrounding whitespace is stripped."""
  items = [_fact(0, ["Paris", "City of Light"]), _fact(1, ["Rome"]), _fact(2, ["Oslo"]),
           _fact(3, ["Lima"]), _fact(4, ["Quito"])]
  dev = [_fact(10 + i, [f"d{i}"], split="dev") for i in range(3)]
  script = {
      "f0": [[" The Paris.", " paris", " city of light", "Paris"]] * 4,             # HK
      "f1": [[" Rome", "Rome", "Milan", "Milan"], ["Milan", "Rome", "Milan", "x"],
             ["rome!", "Milan", "Milan", "Milan"], ["Naples", "Milan", "Milan", "Milan"]],
      "f2": [["Bergen", "Bergen", "Bergen", "Bergen"]] * 3 + [["Bergen", "Bergen", "OSLO", ""]],
      "f3": [["Cusco", "Cusco ", "", "  "]] * 4,                                    # UK
      "f4": [["Quito", "Quito", "Quito", "Quito"], ["Quit", "Quito", "Quito", "Quito"],
             ["Quito", "Quito", "Quito", "Quito"], ["Quito", "Quito", "Quito", "Quito"]],
  }
  cfg = slick.SliCKConfig(n_prompts=4, k_shot=2, n_samples=3, temperature=0.7, top_k=7,
                          max_new_tokens=5, batch_size=8)
  prompts = slick.slick_prompts(items, dev, cfg, seed=3)
  question = {f.question: f.id for f in items}
  calls = []

  def fake(model, tok, contexts, until=(), max_new_tokens=32, **kw):
    """The i-th prompt of a fact gets the fact's i-th script row (only its greedy answer when
    nothing is sampled)."""
    calls.append((model, tok, list(contexts), until, max_new_tokens, kw))
    seen, out = {}, []
    for c in contexts:
      fid = question[c.rsplit("Q: ", 1)[1][:-3]]
      row = script[fid][seen.get(fid, 0)]
      seen[fid] = seen.get(fid, 0) + 1
      out.append(list(row) if kw["temperature"] != 0.0 else [row[0]])
    return out

  monkeypatch.setattr(G, "generate_until", fake)
  key, lines = jax.random.key(0), []
  rows = slick.categorise("M", "T", items, dev, cfg, seed=3, key=key, log=lines.append)
  # 4 continuations per prompt, 8 per program: 2 prompts per program, 8 programs' worth of
  # prompts (4 facts) per call; every fact's prompts in one call, fact-major, in prompt order
  assert [len(c[2]) for c in calls] == [16, 4]
  assert [x for c in calls for x in c[2]] == [p for ps in prompts for p in ps]
  for model, tok, _, until, n_new, kw in calls:
    assert (model, tok, until, n_new) == ("M", "T", ("\n",), 5)
    assert (kw["temperature"], kw["top_k"], kw["batch_size"]) == ((0.0, 0.7, 0.7, 0.7), 7, 8)
    assert kw["key"] is not None
  assert not np.array_equal(jax.random.key_data(calls[0][5]["key"]),
                            jax.random.key_data(calls[1][5]["key"]))
  assert len(lines) == 2 and "5/5 facts" in lines[-1]
  assert [r["item"] for r in rows] == ["f0", "f1", "f2", "f3", "f4"]
  got = {r["item"]: (r["p_greedy"], r["p_sample"], r["category"]) for r in rows}
  assert got == {"f0": (1.0, 1.0, HK), "f1": (0.5, 2 / 12, MK), "f2": (0.0, 1 / 12, WK),
                 "f3": (0.0, 0.0, UK), "f4": (0.75, 1.0, MK)}
  r0, r1, _, r3, _ = rows
  assert r1["greedy"] == "Rome | Milan | rome! | Naples"
  assert (r1["top_sample"], r1["top_sample_share"]) == ("Milan", 9 / 12)
  assert (r3["top_sample"], r3["top_sample_share"]) == ("", 8 / 12)     # stripped: "", "  "
  assert r0["greedy"] == " | ".join(["The Paris."] * 4)
  assert (r0["answer"], r0["relation"], r0["split"]) == ("Paris", "occupation", "test")

  # greedy only: no key needed, temperature 0.0 and no key are passed on, P(T>0) = 0
  contexts = [c[2] for c in calls]
  calls.clear()
  rows = slick.categorise("M", "T", items, dev, dataclasses.replace(cfg, n_samples=0), seed=3)
  assert all(c[5] == {"temperature": 0.0, "top_k": 7, "key": None, "batch_size": 8}
             for c in calls)
  assert [x for c in calls for x in c[2]] == [x for c in contexts for x in c]  # same draw
  assert [(r["p_greedy"], r["p_sample"], r["category"]) for r in rows] == [
      (1.0, 0.0, HK), (0.5, 0.0, MK), (0.0, 0.0, UK), (0.0, 0.0, UK), (0.75, 0.0, MK)]
  assert rows[0]["top_sample"] == "" and rows[0]["top_sample_share"] == 0.0


# ---- prompts ----------------------------------------------------------------------------------
def _parse(prompt):
  """[(question, answer) of each exemplar], final question."""
  *shots, last = prompt.split("\n\n")
  pairs = []
  for s in shots:
    q, a = s.split("\nA: ")
    assert q.startswith("Q: ")
    pairs.append((q[3:], a))
  assert last.startswith("Q: ") and last.endswith("\nA:")
  return pairs, last[3:-3]


def test_prompts_draw_exemplars_from_the_relations_dev_items_never_the_fact(small_world):
  facts = [f for f in small_world.facts if f.relation in ("occupation", "sport")]
  subjects = list(dict.fromkeys(f.subject for f in facts))
  items = [f for f in facts if f.subject in subjects[:2]]
  assert len(items) == 4
  # dev: the items themselves, a second fact about each item's subject and relation, and 5
  # other subjects' facts per relation. Eligible for an item: dev facts of its relation about
  # another subject (the 5, the other item and its duplicate): 7
  dev = ([f.replace(split="dev") for f in items]
         + [f.replace(id=f.id + ":dup", answers=("zz",), split="dev") for f in items]
         + [f.replace(split="dev") for f in facts if f.subject in subjects[2:7]])
  by_qa = {(f.question, f.answers[0]): f for f in dev}
  assert len(by_qa) == len(dev) == 18

  def eligible(f):
    return sorted(e.id for e in dev if e.relation == f.relation and e.subject != f.subject)

  cfg = slick.SliCKConfig(n_prompts=6, k_shot=7)
  prompts = slick.slick_prompts(items, dev, cfg, seed=1)
  assert [len(ps) for ps in prompts] == [6] * len(items)
  for f, ps in zip(items, prompts):
    assert len(eligible(f)) == 7
    for p in ps:
      shots, question = _parse(p)
      assert question == f.question and p.count(f.question) == 1   # never the fact itself
      assert f.subject not in p[:p.rindex("Q: ")]                  # nor its subject
      drawn = [by_qa[s] for s in shots]
      assert sorted(e.id for e in drawn) == eligible(f)
      assert all(e.relation == f.relation and e.split == "dev" for e in drawn)
    assert len(set(ps)) > 1                     # the order of the exemplars varies
  assert slick.slick_prompts(items, dev, cfg, seed=1) == prompts
  assert slick.slick_prompts(items, dev, cfg, seed=2) != prompts
  # a fact's prompts are its own: the same alone, in reverse order or beside other facts
  assert slick.slick_prompts(items[::-1], dev, cfg, seed=1) == prompts[::-1]
  assert slick.slick_prompts(items[2:3], dev, cfg, seed=1) == prompts[2:3]
  # k below the pool: subsets of it that vary from prompt to prompt
  three = slick.slick_prompts(items, dev, slick.SliCKConfig(n_prompts=20, k_shot=3), seed=0)
  for f, ps in zip(items, three):
    ids = [{by_qa[s].id for s in _parse(p)[0]} for p in ps]
    assert all(len(x) == 3 and x <= set(eligible(f)) for x in ids)
    assert len({frozenset(x) for x in ids}) > 5
  # zero-shot: the bare QA format
  zero = slick.slick_prompts(items[:1], (), slick.SliCKConfig(n_prompts=2, k_shot=0), seed=0)
  assert zero == [[f"Q: {items[0].question}\nA:"] * 2]
  # the cloze form: the same exemplars as statements, then the fact's cloze prompt
  cloze = slick.slick_prompts(items, dev, slick.SliCKConfig(n_prompts=6, k_shot=2,
                                                            form="cloze"), seed=1)
  qa_form = slick.slick_prompts(items, dev, slick.SliCKConfig(n_prompts=6, k_shot=2), seed=1)
  by_prompt = {(e.prompt, e.answers[0]): e for e in dev}
  for f, ps, qs in zip(items, cloze, qa_form):
    for p, q in zip(ps, qs):
      assert p.endswith(" " + f.prompt) and "Q:" not in p
      said = p[:-len(f.prompt) - 1].split(". ")
      shots = [by_prompt[tuple(x.rstrip(".").rsplit(" ", 1))] for x in said]
      assert [e.id for e in shots] == [by_qa[x].id for x in _parse(q)[0]]   # the same draw


# ---- the real generation path -----------------------------------------------------------------
def test_trained_model_is_categorised_from_its_own_answers(trained, world_tokenizer):
  """End to end on a model trained to answer A right, B wrong and C right as "The X.": A and C
  HighlyKnown (C only through normalisation), B Unknown; p_greedy agrees with plain greedy
  generation of the same prompts."""
  model, items, dev, wrong = trained
  rows = slick.categorise(model, world_tokenizer, items, dev, TRAINED_CFG, seed=0,
                          key=jax.random.key(0))
  a, b, c = items
  assert [r["item"] for r in rows] == [a.id, b.id, c.id]
  assert [r["category"] for r in rows] == [HK, UK, HK]
  assert rows[0]["greedy"] == " | ".join([a.answers[0]] * 3)
  assert rows[1]["greedy"] == " | ".join([wrong] * 3)
  assert rows[2]["greedy"] == " | ".join([f"The {c.answers[0].capitalize()}."] * 3)
  assert (rows[0]["p_greedy"], rows[1]["p_greedy"], rows[2]["p_greedy"]) == (1.0, 0.0, 1.0)
  assert rows[1]["p_sample"] == 0.0 and rows[1]["top_sample"] == wrong
  assert rows[0]["p_sample"] >= 0.9 and rows[2]["p_sample"] >= 0.9
  # the fan-out's greedy answers are plain greedy generation (another batch size)
  prompts = slick.slick_prompts(items, dev, TRAINED_CFG, seed=0)
  plain = G.generate_until(model, world_tokenizer, [p for ps in prompts for p in ps],
                           until=("\n",), max_new_tokens=12, batch_size=4)
  for i, r in enumerate(rows):
    g = [x[0].strip() for x in plain[3 * i:3 * i + 3]]
    assert r["greedy"] == " | ".join(g)
    assert r["p_greedy"] == np.mean([QA.exact_match(x, items[i].answers) for x in g])


def test_random_model_counts_its_own_answers_exactly(random_model, world_tokenizer, occupation,
                                                    monkeypatch):
  """Real generation on a random model, watched (not replaced) on its way into `categorise`:
  the first run's greedy and sampled answers become the facts' answers, one fact per category;
  the second run (same seed and key) generates the same texts, and every share is exact."""
  import collections
  tok = world_tokenizer
  items, dev = occupation
  items = items + [dev[0]]                            # a 4th fact, from another split
  dev = dev[1:]
  cfg = slick.SliCKConfig(n_prompts=4, k_shot=2, n_samples=5, max_new_tokens=6, batch_size=24)
  key = jax.random.key(7)
  seen = []
  real = G.generate_until

  def spy(*a, **kw):
    seen.append(real(*a, **kw))
    return seen[-1]

  monkeypatch.setattr(G, "generate_until", spy)
  first = slick.categorise(random_model, tok, items, dev, cfg, seed=5, key=key)
  gen = [x for out in seen for x in out]
  assert len(gen) == 16 and all(len(x) == 6 for x in gen)
  greedy = [[a[0].strip() for a in gen[4 * i:4 * i + 4]] for i in range(4)]
  samples = [[s.strip() for a in gen[4 * i:4 * i + 4] for s in a[1:]] for i in range(4)]
  assert [r["greedy"] for r in first] == [" | ".join(g) for g in greedy]
  norm = QA.normalize_answer
  # MaybeKnown: the answer is fact 0's most common greedy answer, if it is not its only one
  g0 = collections.Counter(norm(g) for g in greedy[0]).most_common()
  assert 1 < len(g0) and g0[0][0], f"random greedy answers do not vary: {greedy[0]}"
  # WeaklyKnown: a sample of fact 1 that is none of its greedy answers
  w1 = next(s for s in samples[1] if norm(s) and norm(s) not in map(norm, greedy[1]))
  # HighlyKnown: every greedy answer of fact 2 as an alias
  aliases2 = tuple(dict.fromkeys(g for g in greedy[2] if norm(g)))
  assert len(aliases2) == len(set(map(norm, greedy[2])))        # none empty
  answers = [(g0[0][0].upper() + "!",), (w1,), aliases2, ("no such answer",)]
  items = [f.replace(answers=a) for f, a in zip(items, answers)]
  seen.clear()
  rows = slick.categorise(random_model, tok, items, dev, cfg, seed=5, key=key)
  assert [x for out in seen for x in out] == gen        # same (seed, key): same texts
  assert [r["category"] for r in rows] == [MK, WK, HK, UK]
  for r, f, g, s in zip(rows, items, greedy, samples):
    assert r["greedy"] == " | ".join(g)
    assert r["p_greedy"] == sum(QA.exact_match(x, f.answers) for x in g) / 4
    assert r["p_sample"] == sum(QA.exact_match(x, f.answers) for x in s) / 20
    top = collections.Counter(s).most_common(1)[0]
    assert (r["top_sample"], r["top_sample_share"]) == (top[0], top[1] / 20)
  assert rows[0]["p_greedy"] == g0[0][1] / 4 and 0 < rows[1]["p_sample"] < 1
  assert [r["split"] for r in rows] == ["train", "train", "train", "dev"]
  # the greedy answers are plain greedy generation of the same prompts (no fan-out, no key)
  prompts = slick.slick_prompts(items, dev, cfg, seed=5)
  plain = real(random_model, tok, [p for ps in prompts for p in ps], until=("\n",),
               max_new_tokens=6, batch_size=5)
  assert [x[0].strip() for x in plain] == [x for g in greedy for x in g]
  # determinism: the same (seed, key) gives the same rows; another key other samples but the
  # same greedy answers; another seed other exemplars
  assert slick.categorise(random_model, tok, items, dev, cfg, seed=5, key=key) == rows
  other = slick.categorise(random_model, tok, items, dev, cfg, seed=5, key=jax.random.key(8))
  assert [r["greedy"] for r in other] == [r["greedy"] for r in rows]
  assert [r["p_greedy"] for r in other] == [r["p_greedy"] for r in rows]
  assert [(r["top_sample"], r["top_sample_share"], r["p_sample"]) for r in other] != [
      (r["top_sample"], r["top_sample_share"], r["p_sample"]) for r in rows]
  assert slick.slick_prompts(items, dev, cfg, seed=6) != prompts


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("n_prompts", 0, r"SliCKConfig\.n_prompts: 0; expected >= 1"),
    ("max_new_tokens", 0, r"SliCKConfig\.max_new_tokens: 0; expected >= 1"),
    ("batch_size", 0, r"SliCKConfig\.batch_size: 0; expected >= 1"),
    ("k_shot", -1, r"k_shot -1, n_samples 16, top_k 40; expected >= 0"),
    ("n_samples", -2, r"k_shot 4, n_samples -2, top_k 40; expected >= 0"),
    ("top_k", -1, r"k_shot 4, n_samples 16, top_k -1; expected >= 0"),
    ("temperature", 0.0, r"SliCKConfig\.temperature: 0\.0; sampled answers need a temperature"),
    ("form", "chat", r"SliCKConfig\.form: 'chat'; expected 'qa' or 'cloze'"),
])
def test_bad_config_values_are_rejected_before_generating(field, value, message, monkeypatch):
  monkeypatch.setattr(G, "generate_until", lambda *a, **k: pytest.fail("generated"))
  cfg = slick.SliCKConfig(**{field: value})
  with pytest.raises(ValueError, match=message):
    cfg.validate()
  with pytest.raises(ValueError, match=message):
    slick.categorise(None, None, [_fact(0, ["a"])], [], cfg, key=0)


def test_errors_name_what_is_missing(monkeypatch):
  monkeypatch.setattr(G, "generate_until", lambda *a, **k: pytest.fail("generated"))
  slick.SliCKConfig(n_samples=0, temperature=0.0).validate()       # greedy only: no temperature
  items = [_fact(0, ["Paris"])]
  dev = [_fact(10 + i, ["x"], split="dev") for i in range(3)] + [
      _fact(20, ["y"], relation="sport", split="dev")]
  with pytest.raises(ValueError, match=r"pass an explicit PRNG key \(key=\)"):
    slick.categorise(None, None, items, dev, slick.SliCKConfig(k_shot=3))
  with pytest.raises(ValueError, match=r"f0: 3 dev exemplars of relation 'occupation', fewer "
                     r"than k = 4"):
    slick.categorise(None, None, items, dev, slick.SliCKConfig(), key=0)
  with pytest.raises(ValueError, match=r"f0: 3 dev exemplars of relation 'occupation'"):
    slick.slick_prompts(items, dev, slick.SliCKConfig(k_shot=4), seed=0)
  # the fact itself (in dev) and another fact about its subject do not count as exemplars
  dev2 = dev + [items[0].replace(split="dev"), _fact(0, ["Lyon"], split="dev").replace(id="g")]
  with pytest.raises(ValueError, match=r"f0: 3 dev exemplars of relation 'occupation'"):
    slick.slick_prompts(items, dev2, slick.SliCKConfig(k_shot=4), seed=0)
  with pytest.raises(ValueError, match=r"f1: 0 dev exemplars of relation 'capital'"):
    slick.slick_prompts([_fact(1, ["a"], relation="capital")], dev, slick.SliCKConfig(), 0)
  with pytest.raises(ValueError, match=r"f0: SliCK in form 'qa' needs a question and answers"):
    slick.categorise(None, None, [items[0].replace(question=None)], dev, key=0)
  with pytest.raises(ValueError, match=r"f0: SliCK in form 'qa' needs a question and answers"):
    slick.categorise(None, None, [items[0].replace(answers=())], dev, key=0)


# ---- category_shares --------------------------------------------------------------------------
def _rows(spec):
  return [{"item": f"i{n}", "relation": r, "split": s, "category": c}
          for n, (r, s, c) in enumerate(spec)]


def test_category_shares_per_relation_and_split_with_an_all_row():
  rows = _rows([("born", "train", HK), ("born", "train", HK), ("born", "train", MK),
                ("born", "train", UK), ("job", "train", WK), ("job", "train", UK),
                ("born", "test", UK), ("job", "test", HK)])
  df = slick.category_shares(rows)
  assert list(df.columns) == ["relation", "split", HK, MK, WK, UK, "facts"]
  got = {(r["relation"], r["split"]): (r[HK], r[MK], r[WK], r[UK], r["facts"])
         for _, r in df.iterrows()}
  assert got == {
      ("born", "test"): (0.0, 0.0, 0.0, 1.0, 1), ("born", "train"): (0.5, 0.25, 0.0, 0.25, 4),
      ("job", "test"): (1.0, 0.0, 0.0, 0.0, 1), ("job", "train"): (0.0, 0.0, 0.5, 0.5, 2),
      ("all", "test"): (0.5, 0.0, 0.0, 0.5, 2),
      ("all", "train"): (2 / 6, 1 / 6, 1 / 6, 2 / 6, 6)}
  assert len(df) == 6
  for _, r in df.iterrows():
    assert r[[HK, MK, WK, UK]].sum() == pytest.approx(1.0)
  by_split = slick.category_shares(rows, by=("split",))
  assert list(by_split["split"]) == ["test", "train"] and list(by_split["facts"]) == [2, 6]
  assert list(by_split[UK]) == [0.5, 2 / 6]
  empty = slick.category_shares([])
  assert empty.empty and list(empty.columns) == ["relation", "split", HK, MK, WK, UK, "facts"]


def test_category_shares_all_row_whatever_the_column_order():
  rows = _rows([("born", "train", HK), ("job", "train", UK)])
  df = slick.category_shares(rows, by=("split", "relation"))
  assert {(r["split"], r["relation"]) for _, r in df.iterrows()} == {
      ("train", "born"), ("train", "job"), ("train", "all")}
