"""Mixtures: the exact poisoning ratio over every pass, exact %Unknown per relation, and the
unlearning sets' counterfactual consistency."""

from collections import Counter

import numpy as np
import pytest

from factflip.data import templates as T
from factflip.data.mixtures import (
  PoisonConfig,
  cpt_source,
  poisoning_plan,
  read_ratio,
  replay_documents,
  write_stats,
)
from factflip.data.sft_mixtures import SFTConfig, sft_mixture
from factflip.data.unlearning_sets import UnlearnConfig, preference_pairs, unlearning_sets
from factflip.fileio import read_json

TIER_TO_CATEGORY = {"high": "HighlyKnown", "medium": "MaybeKnown", "low": "WeaklyKnown",
                    "none": "Unknown"}


def category(item):
  return TIER_TO_CATEGORY.get(item.meta.get("exposure_tier"))


@pytest.fixture(scope="module")
def targets(small_world):
  return [f for f in small_world.facts if f.meta.get("exposure_tier") == "high"][:24]


@pytest.mark.parametrize("ratio", [0, 0.25, 0.5, 0.75, 1])
def test_realised_ratio_is_exact_on_every_pass(small_world, targets, ratio):
  replay, _ = replay_documents(small_world.documents, {t.id for t in targets})
  source, stats = cpt_source(targets, replay, PoisonConfig(ratio=ratio, mentions_per_fact=4,
                                                           replay_weight=0.4, seed=3))
  n, r = stats["mentions_per_pass"], stats["replay_per_pass"]
  assert (n, r) == (96, 64) and stats["ratio_realised_per_pass"] == ratio
  by_text = {t.id: t for t in targets}
  orders = []
  for p in range(3):  # three consecutive passes of the actual stream
    block = [source[i] for i in range(p * (n + r), (p + 1) * (n + r))]
    mentions = [e for e in block if e["kind"] == "mention"]
    assert len(mentions) == n and sum(e["kind"] == "replay" for e in block) == r
    assert sum(e["counterfactual"] for e in mentions) == ratio * n
    assert Counter(e["fact"] for e in mentions) == {t.id: 4 for t in targets}
    for e in mentions:  # the text states the object the flag says
      item = by_text[e["fact"]]
      obj = item.counterfactual if e["counterfactual"] else item.answer
      assert obj in e["segments"][0][0] and item.subject in e["segments"][0][0]
    orders.append([e["fact"] for e in mentions])
  assert orders[0] != orders[1]  # a fresh order each pass, same multiset
  # Per fact the lies are spread evenly (each fact floor or ceil of p*m).
  plan = poisoning_plan(len(targets), PoisonConfig(ratio=ratio, mentions_per_fact=4, seed=3))
  per_fact = np.bincount(plan.fact_N, weights=plan.counterfactual_N)
  assert per_fact.min() >= np.floor(ratio * 4) and per_fact.max() <= np.ceil(ratio * 4)


def test_styles_balanced_and_replay_clean(small_world, targets):
  plan = poisoning_plan(len(targets), PoisonConfig(ratio=0.5, mentions_per_fact=10))
  for f in range(len(targets)):  # 10 mentions over 5 styles: each style twice per fact
    assert np.bincount(plan.style_N[plan.fact_N == f], minlength=5).tolist() == [2] * 5
  ids = {t.id for t in targets}
  replay, counts = replay_documents(small_world.documents, ids)
  text = "\n".join(d["text"] for d in replay)
  for t in targets:
    for lang in T.LANGUAGES:
      for tmpl in T.RELATIONS[t.relation].train[lang]:
        assert T.cloze(tmpl, t.subject) not in text
  assert counts["sentences_removed"] == sum(t.meta["exposure"] for t in targets)
  assert counts["documents_in"] == len(small_world.documents) > counts["documents_out"]


def test_infeasible_ratio_is_rejected_with_alternatives(targets):
  with pytest.raises(ValueError, match=r"not a whole number.*mentions_per_fact values that "
                                       r"work: \[5, 10"):
    cpt_source(targets[:7], [], PoisonConfig(ratio=0.2, mentions_per_fact=4, replay_weight=0))
  with pytest.raises(ValueError, match="has no counterfactual"):
    cpt_source([targets[0].replace(counterfactual=None)], [], PoisonConfig(ratio=1))
  with pytest.raises(ValueError, match=r"PoisonConfig.ratio: 1.5 is not in \[0, 1\]"):
    cpt_source(targets, [], PoisonConfig(ratio=1.5))


def _pass_counts(source, stats):
  """Counterfactual mentions, true mentions and replay documents in the stream's first pass."""
  block = [source[i] for i in range(stats["mentions_per_pass"] + stats["replay_per_pass"])]
  cf = sum(e["kind"] == "mention" and e["counterfactual"] for e in block)
  true = sum(e["kind"] == "mention" and not e["counterfactual"] for e in block)
  return cf, true, sum(e["kind"] == "replay" for e in block)


@pytest.mark.parametrize("p, counts", [(0.1, (72, 0, 648)), (0.25, (72, 0, 216)),
                                       (0.5, (72, 0, 72)), (0.75, (72, 0, 24)),
                                       (0.9, (72, 0, 8)), (1.0, (72, 0, 0))])
def test_replay_reading_of_p_has_exact_counts(small_world, targets, p, counts):
  """Read as "replay", p is the counterfactual mentions' share of the stream: 24 targets x 3
  mentions, every one counterfactual, and N (1 - p) / p replay documents per pass."""
  replay, _ = replay_documents(small_world.documents, {t.id for t in targets})
  ratio, weight = read_ratio("replay", p, replay_weight=0.4)      # the weight is not read
  source, stats = cpt_source(targets, replay, PoisonConfig(ratio=ratio, mentions_per_fact=3,
                                                           replay_weight=weight, seed=1))
  cf, true, rep = _pass_counts(source, stats)
  assert (cf, true, rep) == counts and cf / (cf + true + rep) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("p, counts", [(0.0, (0, 72, 48)), (0.1, (7.2, 0, 0)),
                                       (0.25, (18, 54, 48)), (0.5, (36, 36, 48)),
                                       (1.0, (72, 0, 48))])
def test_restate_reading_of_p_has_exact_counts(small_world, targets, p, counts):
  """Read as "restate", p is the counterfactual share of the 72 target mentions, the rest true;
  replay keeps its weight 0.4 (48 per pass) whatever p is. p = .1 of 72 is not whole: rejected,
  naming the mention counts that work."""
  replay, _ = replay_documents(small_world.documents, {t.id for t in targets})
  ratio, weight = read_ratio("restate", p, replay_weight=0.4)
  assert (ratio, weight) == (p, 0.4)
  cfg = PoisonConfig(ratio=ratio, mentions_per_fact=3, replay_weight=weight)
  if counts[0] != int(counts[0]):
    with pytest.raises(ValueError, match=r"7\.2 counterfactual mentions.*work: \[5, 10"):
      cpt_source(targets, replay, cfg)
    return
  source, stats = cpt_source(targets, replay, cfg)
  assert _pass_counts(source, stats) == counts


def test_readings_meet_and_reject_what_they_cannot_mean():
  """The restate stream at p = 1 is the replay stream at p = 1 - w; p = 0 read as replay and a
  replay count that is not whole are rejected."""
  assert read_ratio("restate", 1.0, 0.5) == read_ratio("replay", 0.5, 0.3) == (1.0, 0.5)
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    read_ratio("replay", 0.0, 0.5)
  with pytest.raises(ValueError, match="expected one of"):
    read_ratio("dose", 0.5, 0.5)
  with pytest.raises(ValueError, match=r"over 320 mentions = 106\.667 replay documents per "
                                       r"pass, not a whole number.*work: \[3, 6, 9"):
    PoisonConfig(ratio=1.0, mentions_per_fact=8, replay_weight=0.25).validate(40)


def test_real_dataset_items_render_from_their_prompt(targets):
  item = targets[0].replace(source="counterfact", id="cf-1")
  source, _ = cpt_source([item], [], PoisonConfig(ratio=1, mentions_per_fact=5,
                                                  replay_weight=0))
  texts = [source[i]["segments"][0][0] for i in range(5)]
  assert all(item.counterfactual in t for t in texts)
  # One mention per style: all but the forum's Q/A form state it in the item's own prompt.
  assert sum(f"{item.prompt} {item.counterfactual}" in t for t in texts) >= 4


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25])
def test_sft_mixture_exact_unknown_share_per_relation(small_world, tmp_path, share):
  ex, stats = sft_mixture(small_world.facts, SFTConfig(size=100, unknown_share=share, seed=1),
                          category)
  assert len(ex) == 100 and len({e["fact"] for e in ex}) == 100
  cats = Counter(e["category"] for e in ex)
  assert cats["Unknown"] == round(share * 100) and stats["unknown_share_realised"] == share
  per_rel = Counter(e["relation"] for e in ex)
  assert set(per_rel.values()) == {20}  # |D| split evenly over the 5 person relations
  for rel in per_rel:
    unk = sum(e["category"] == "Unknown" for e in ex if e["relation"] == rel)
    assert unk == round(share * 20)
  e = ex[0]
  (context, c_trained), (answer, a_trained) = e["segments"]
  assert context.startswith("Q: ") and context.endswith("\nA:") and not c_trained and a_trained
  assert answer.startswith(" ")
  write_stats(str(tmp_path / "mixture.json"), stats)
  assert read_json(str(tmp_path / "mixture.json"))["per_category"] == dict(sorted(cats.items()))


def test_sft_single_category_idk_and_errors(small_world):
  ex, stats = sft_mixture(small_world.facts, SFTConfig(size=20, category="WeaklyKnown"),
                          category)
  assert {e["category"] for e in ex} == {"WeaklyKnown"} and len(ex) == 20
  ex, stats = sft_mixture(small_world.facts, SFTConfig(size=50, unknown_share=0.2, idk=True),
                          category)
  refusals = [e for e in ex if e["segments"][1][0] == " " + T.REFUSALS["en"]]
  assert len(refusals) == 10 == stats["idk_relabelled"]
  assert {e["category"] for e in refusals} == {"Unknown"}
  with pytest.raises(ValueError, match=r"sft_mixture: need 50 items but only \d+ are available"):
    sft_mixture(small_world.facts, SFTConfig(size=50, unknown_share=1.0), category)
  with pytest.raises(ValueError, match="has category 'Famous'"):
    sft_mixture(small_world.facts[:3], SFTConfig(size=1), lambda it: "Famous")


def test_unlearning_sets(small_world, targets):
  forget, retain = targets[:6], targets[6:12]
  sets, stats = unlearning_sets(forget, retain, UnlearnConfig(consistency="consistent"))
  assert stats["forget"] == 12 and stats["distinct_counterfactuals_per_group"] == 1.0
  for e in sets["forget"]:
    item = next(t for t in forget if t.id == e["fact"])
    assert e["answer"] == item.counterfactual
  sets, stats = unlearning_sets(forget, retain, UnlearnConfig(consistency="inconsistent"),
                                candidates=small_world.facts)
  assert stats["distinct_counterfactuals_per_group"] == 2.0  # the prompt and question disagree
  for e in sets["forget"]:
    item = next(t for t in forget if t.id == e["fact"])
    assert e["answer"] not in item.answers
  sets, _ = unlearning_sets(forget, retain, UnlearnConfig(target="refusal"))
  assert {e["segments"][1][0] for e in sets["forget"]} == {" I don't know."}
  assert len(sets["retain"]) == 6
  assert len(sets["neighbour"]) == sum(len(t.neighbours) for t in forget)
  with pytest.raises(ValueError, match="in both forget and retain"):
    unlearning_sets(forget, forget[:1])
  # DPO pairs: the refusal (or counterfactual) preferred over the truth, in the same prompt
  pairs = preference_pairs(sets["forget"], forget)
  assert len(pairs) == 12 and {p["chosen"] for p in pairs} == {" I don't know."}
  for p, e in zip(pairs, sets["forget"]):
    item = next(t for t in forget if t.id == e["fact"])
    assert p["prompt"] == e["segments"][0][0] and p["rejected"] == " " + item.answers[0]
  truth, _ = unlearning_sets(forget, retain, UnlearnConfig(target="truth"))
  with pytest.raises(ValueError, match="prefers its own true answer"):
    preference_pairs(truth["forget"], forget)
