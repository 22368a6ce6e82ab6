"""Paper A's continual-pretraining poisoning study, stage by stage (SCIENCE.md A).

Owns: the stages (world, pretrain, cpt, probe, results) of `configs/studies/poisoning.py`, the
workdir layout below, the base-accuracy gate, and the results tables.
Must not: train (`factflip.train`), probe (`factflip.probes`) or plot/report (`report.py`).

Workdir layout (every stage writes its DONE file last; a stage with one is skipped):
  world/, tokenizer/                      the fact world and its tokenizer
  runs/<size>/seed<k>/pretrain/           the pretraining run (+ base.json: accuracy gate)
  runs/<size>/seed<k>/cpt_p<p>/           one continual-pretraining run per ratio p
  runs/<size>/seed<k>/probes/p<p>/step_<n>.csv        preference rows (+ dll_l<ℓ> lens columns)
                                          of targets, controls and the targets' two-hop items
  runs/<size>/seed<k>/probes/p<p>/patch_<n>.csv       patching rows (flipped items' reversal)
  results/flips.csv, lens.csv, patching.csv, collateral.csv, first_flips.csv, abruptness.csv

Definitions (τ = config.tau): the reference state of an item is its state at the base model
(CPT step 0 = the pretrained model); flip rate(t) = #(correct at base and counterfactual at t)
/ #(correct at base); ambiguity rate(t) = share ambiguous at t; accuracy(t) = share whose
greedy answer is the true one; lens flip rate per layer uses ΔLL_ℓ with the same states
(targets, training prompt; layer L is the output);
reversal rate(site, window, layer, group) = share of the flipped items whose patched ΔLL > 0.
flips.csv has the targets' prompt kinds plus `two_hop` / `two_hop_question`: compositions
whose first hop is a target (their counterfactual is the answer through the counterfactual
first hop), so accuracy there is two-hop reasoning accuracy. first_flips: per target item and
kind the first checkpoint at which it is counterfactual (−1: never); abruptness: the largest
single-interval rise of the flip-rate curve over its total rise (NaN: it never rose).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd

from factflip.fileio import read_json, write_json

STAGES = ("world", "pretrain", "cpt", "probe", "results")
_RUN = ["size", "seed", "p", "step"]
COLUMNS = {
    "flips": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                     "correct_at_base"],
    "collateral": _RUN + ["kind", "flip_rate", "ambiguity_rate", "accuracy", "items",
                          "correct_at_base"],
    "lens": _RUN + ["layer", "flip_rate", "ambiguity_rate"],
    "patching": _RUN + ["site", "window", "layer", "position", "reversal_rate", "recovery",
                        "flipped_items"],
    "first_flips": ["size", "seed", "p", "item", "kind", "first_flip_step"],
    "abruptness": ["size", "seed", "p", "kind", "abruptness", "final_flip_rate"],
}


class StudyError(RuntimeError):
  """A study cannot go on as configured (e.g. the base model does not know the targets)."""


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs (training configs included, per size and
  ratio): ConfigError naming the source and key."""
  import jax

  from factflip.data.mixtures import PoisonConfig
  from factflip.models.config import presets
  from factflip.models.hooks import SITES
  from factflip.probes.fact_patching import GROUPS
  from factflip.probes.fact_preference import KINDS
  from factflip.train import config as train_config
  ConfigError = train_config.ConfigError

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  def subset(key, given, allowed):
    bad = [x for x in given if x not in allowed]
    need(given and not bad, key, f"{list(given)}; expected a non-empty list of {list(allowed)}")

  subset("sizes", list(c.sizes), list(presets()))
  need(len(c.seeds) > 0 and all(isinstance(k, int) for k in c.seeds), "seeds",
       f"{list(c.seeds)}; expected a non-empty list of integers")
  need(len(c.ratios) > 0 and all(0 <= p <= 1 for p in c.ratios)
       and len(set(c.ratios)) == len(c.ratios), "ratios",
       f"{list(c.ratios)}; expected distinct poisoning ratios in [0, 1]")
  need(c.tau >= 0, "tau", f"{c.tau}; expected >= 0 nats")
  need(0 <= c.min_base_accuracy <= 1, "min_base_accuracy",
       f"{c.min_base_accuracy}; expected a share in [0, 1]")
  subset("probe.kinds", list(c.probe.kinds), KINDS)
  subset("probe.patch_sites", list(c.probe.patch_sites), SITES)
  subset("probe.patch_groups", list(c.probe.patch_groups), GROUPS)
  need(len(c.probe.patch_windows) > 0 and min(c.probe.patch_windows) >= 1,
       "probe.patch_windows", f"{list(c.probe.patch_windows)}; expected windows >= 1")
  need(c.probe.patch_every >= 1, "probe.patch_every", f"{c.probe.patch_every}; expected >= 1")
  need(c.probe.n_control >= 0 and c.probe.batch_size >= 1, "probe",
       "n_control must be >= 0 and batch_size >= 1")
  need(c.cpt.data.kind == "poison", "cpt.data.kind", f"{c.cpt.data.kind!r}; expected 'poison'")
  for p in c.ratios:
    try:
      PoisonConfig(ratio=p, mentions_per_fact=c.cpt.data.mentions_per_fact,
                   replay_weight=c.cpt.data.replay_weight).validate(c.cpt.data.n_targets)
    except ValueError as e:
      raise ConfigError(source, "cpt.data.mentions_per_fact", str(e)) from None
  for stage in ("pretrain", "cpt"):
    sub = c[stage].copy_and_resolve_references()
    sub.model.preset = c.sizes[0]
    train_config.validate(sub, source=f"{source}: {stage}", n_devices=jax.device_count(),
                          n_processes=jax.process_count())


def _done(path: str) -> bool:
  return os.path.exists(os.path.join(path, "DONE"))


def _mark(path: str, info: dict[str, Any]) -> None:
  write_json(os.path.join(path, "DONE"), info)


def _write_csv(df: pd.DataFrame, path: str) -> None:
  """Atomic CSV write (a temporary name, then rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  df.to_csv(tmp, index=False)
  os.replace(tmp, path)


def _ptag(p: float) -> str:
  return f"p{p:.2f}"


class Study:
  """One study: its config, workdir and the runs it owns. `run()` goes through the stages."""

  def __init__(self, config, workdir: str, log=print, source: str = "study"):
    validate(config, source)
    self.c = config
    self.wd = os.path.abspath(workdir)
    self.log = log
    self.world_dir = os.path.join(self.wd, "world")
    self.tok_dir = os.path.join(self.wd, "tokenizer")
    self._world = None      # (world, tokenizer) once loaded
    self._targets = {}      # seed -> target facts

  # ---- layout -----------------------------------------------------------------------------
  def run_dir(self, size: str, seed: int, name: str) -> str:
    return os.path.join(self.wd, "runs", size, f"seed{seed}", name)

  def cells(self):
    for size in self.c.sizes:
      for seed in self.c.seeds:
        yield size, int(seed)

  # ---- stages -----------------------------------------------------------------------------
  def world(self):
    """(world, tokenizer), built into the workdir on first use and read from disk once."""
    from factflip.train.inputs import prepare_world
    if self._world is None:
      self._world = prepare_world(self.world_dir, self.tok_dir, self.c.world_seed,
                                  self.c.vocab_size, self.c.pretrain.data.world_people)
    return self._world

  def pretrain(self, size: str, seed: int) -> dict[str, Any]:
    from factflip.train.loop import train
    out = self.run_dir(size, seed, "pretrain")
    if not _done(out):
      c = self.c.pretrain.copy_and_resolve_references()
      c.seed = seed
      c.model.preset = size
      c.data.world_dir, c.data.tokenizer_dir = self.world_dir, self.tok_dir
      res = train(c, out, quiet=False, source="study.pretrain")
      _mark(out, {"step": res.step, "seconds": round(res.seconds, 1)})
    return self.base_gate(size, seed)

  def targets(self, seed: int):
    """The CPT run's target facts (the same draw `factflip.train` makes for data.kind poison)."""
    from factflip.train.inputs import poison_targets
    if seed not in self._targets:
      self._targets[seed] = poison_targets(self.world()[0], self.c.cpt.data.n_targets,
                                           self.c.cpt.data.target_tier, seed)
    return self._targets[seed]

  def controls(self, seed: int):
    """Non-target facts of the target tier (collateral accuracy), `probe.n_control` of them."""
    world, _ = self.world()
    ids = {t.id for t in self.targets(seed)}
    pool = [f for f in world.facts if f.meta.get("exposure_tier") == self.c.cpt.data.target_tier
            and f.counterfactual is not None and f.id not in ids]
    pick = np.random.default_rng(seed + 1).choice(len(pool), min(self.c.probe.n_control,
                                                                 len(pool)), replace=False)
    return [pool[i] for i in sorted(pick)]

  def two_hop(self, seed: int):
    """The world's two-hop items whose first hop is a target fact: poisoning the first hop
    should move them to their counterfactual (the composition through the counterfactual)."""
    world, _ = self.world()
    ids = {t.id for t in self.targets(seed)}
    return [f for f in world.facts if f.meta.get("two_hop") and f.meta["hops"][0] in ids
            and f.counterfactual is not None]

  def base_gate(self, size: str, seed: int) -> dict[str, Any]:
    """Closed-book accuracy of the pretrained model on the targets (prompt format, plus the
    other kinds for the report); below `min_base_accuracy` the study stops: the config is
    wrong (too little pretraining for this world and model)."""
    from factflip.models.store import load_model
    from factflip.probes.fact_preference import preference
    path = os.path.join(self.run_dir(size, seed, "pretrain"), "base.json")
    if os.path.exists(path):
      info = read_json(path)
    else:
      _, tok = self.world()
      model = load_model(self.run_dir(size, seed, "pretrain"))
      table = pd.DataFrame(preference(model, tok, self.targets(seed),
                                      kinds=("prompt", "paraphrase", "question", "language"),
                                      batch_size=self.c.probe.batch_size))
      acc = table.groupby("kind")["correct"].mean().to_dict()
      info = {"accuracy": {k: float(v) for k, v in acc.items()},
              "dll_positive": {k: float(v) for k, v in
                               (table.dll > 0).groupby(table.kind).mean().items()}}
      write_json(path, info)
    got = info["accuracy"]["prompt"]
    if got < self.c.min_base_accuracy:
      raise StudyError(
          f"{size} seed {seed}: the pretrained model knows {got:.0%} of the {len(self.targets(seed))}"
          f" target facts on the training prompt format (greedy), below min_base_accuracy "
          f"{self.c.min_base_accuracy:.0%}: the config is wrong (pretrain longer, a larger "
          f"model or a smaller world: pretrain.steps, sizes, pretrain.data.world_people)")
    return info

  def cpt(self, size: str, seed: int, p: float) -> str:
    from factflip.train.loop import train
    out = self.run_dir(size, seed, f"cpt_{_ptag(p)}")
    if not _done(out):
      c = self.c.cpt.copy_and_resolve_references()
      c.seed = seed
      c.data.ratio = float(p)
      c.model.init_from = self.run_dir(size, seed, "pretrain")
      res = train(c, out, quiet=False, source="study.cpt")
      _mark(out, {"step": res.step, "seconds": round(res.seconds, 1)})
    return out

  def probe(self, size: str, seed: int, p: float) -> None:
    """Preference (+ logit lens) on targets and controls at every checkpoint; cross-model
    patching (base → checkpoint) of the targets' prompts at every `patch_every`-th one."""
    from factflip.models.store import load_model
    from factflip.probes.fact_patching import patch_items
    from factflip.probes.fact_preference import prompt_rows
    from factflip.train.checkpoint import valid_steps
    run = self.run_dir(size, seed, f"cpt_{_ptag(p)}")
    out = os.path.join(self.run_dir(size, seed, "probes"), _ptag(p))
    if _done(out):
      return
    _, tok = self.world()
    targets, controls = self.targets(seed), self.controls(seed)
    target_ids = {t.id for t in targets}
    two_hop = self.two_hop(seed)
    base = load_model(self.run_dir(size, seed, "pretrain"))
    subject = {t.id: t.subject for t in targets}
    rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(targets, kinds=("prompt",))]
    steps = valid_steps(os.path.join(run, "checkpoints"))
    kinds = tuple(self.c.probe.kinds)
    t0 = time.time()
    for i, step in enumerate(steps):
      csv = os.path.join(out, f"step_{step:06d}.csv")
      pcsv = os.path.join(out, f"patch_{step:06d}.csv")
      patch = step > 0 and i % self.c.probe.patch_every == 0
      if os.path.exists(csv) and not (patch and not os.path.exists(pcsv)):
        continue                                   # this checkpoint was probed before a stop
      model = load_model(os.path.join(run, "checkpoints", str(step)))
      if not os.path.exists(csv):
        df = self._preference_frame(model, tok, targets + controls, kinds)
        df.insert(1, "set", np.where(df.item.isin(target_ids), "target", "control"))
        if two_hop:
          dt = self._preference_frame(model, tok, two_hop, ("prompt", "question"))
          dt.insert(1, "set", "two_hop")
          dt["kind"] = dt.kind.map({"prompt": "two_hop", "question": "two_hop_question"})
          df = pd.concat([df, dt], ignore_index=True)
        _write_csv(df, csv)
      if patch and not os.path.exists(pcsv):
        table = patch_items(model, base, tok, rows, sites=tuple(self.c.probe.patch_sites),
                            windows=tuple(self.c.probe.patch_windows),
                            groups=tuple(self.c.probe.patch_groups))
        _write_csv(pd.DataFrame(table), pcsv)
      rate = (i + 1) / max(time.time() - t0, 1e-9)
      self.log(f"    probe {size} seed {seed} {_ptag(p)}: checkpoint {i + 1}/{len(steps)} "
               f"(step {step}), {rate:.2f} ckpt/s, ETA {(len(steps) - i - 1) / rate:.0f} s")
    _mark(out, {"checkpoints": len(steps), "seconds": round(time.time() - t0, 1)})

  def _preference_frame(self, model, tok, items, kinds) -> pd.DataFrame:
    """`preference` with the logit lens as columns dll_l0 .. dll_lL."""
    from factflip.probes.fact_preference import preference
    tab = preference(model, tok, items, kinds=kinds, batch_size=self.c.probe.batch_size,
                     lens=True)
    lens = tab.pop("dll_layers")
    df = pd.DataFrame(tab)
    for layer in range(lens.shape[1]):
      df[f"dll_l{layer}"] = lens[:, layer]
    return df

  # ---- results ------------------------------------------------------------------------------
  def results(self) -> dict[str, pd.DataFrame]:
    from factflip.probes.fact_preference import abruptness, first_flip
    tables = {name: [] for name in COLUMNS}
    tau = float(self.c.tau)
    for size, seed in self.cells():
      for p in self.c.ratios:
        d = os.path.join(self.run_dir(size, seed, "probes"), _ptag(p))
        steps = sorted(int(f[5:11]) for f in os.listdir(d) if f.startswith("step_"))
        frames = {s: pd.read_csv(os.path.join(d, f"step_{s:06d}.csv"),
                                 keep_default_na=False) for s in steps}
        ref = frames[steps[0]]
        key = ["item", "kind", "variant"]
        for s, df in frames.items():
          m = df.merge(ref[key + ["dll"] + [c for c in ref if c.startswith("dll_l")]],
                       on=key, suffixes=("", "_base"))
          base_ok = m.dll_base > tau
          flipped = base_ok & (m.dll < -tau)
          m["flipped"] = flipped
          for (set_, kind), g in m.groupby(["set", "kind"]):
            n_ok = int((g.dll_base > tau).sum())
            tables["collateral" if set_ == "control" else "flips"].append({
                "size": size, "seed": seed, "p": p, "step": s, "kind": kind,
                "flip_rate": g.flipped.sum() / n_ok if n_ok else np.nan,
                "ambiguity_rate": float((g.dll.abs() <= tau).mean()),
                "accuracy": float(g.correct.astype(bool).mean()),
                "items": len(g), "correct_at_base": n_ok})
          tgt = m[(m.set == "target") & (m.kind == "prompt")]
          for c in [c for c in tgt if c.startswith("dll_l") and not c.endswith("_base")]:
            ok = tgt[c + "_base"] > tau
            tables["lens"].append({
                "size": size, "seed": seed, "p": p, "step": s, "layer": int(c[5:]),
                "flip_rate": float((ok & (tgt[c] < -tau)).sum() / max(ok.sum(), 1)),
                "ambiguity_rate": float((tgt[c].abs() <= tau).mean())})
          pcsv = os.path.join(d, f"patch_{s:06d}.csv")
          if os.path.exists(pcsv):
            pt = pd.read_csv(pcsv)
            flip_ids = set(m[(m.set == "target") & (m.kind == "prompt") & m.flipped].item)
            pt = pt[pt.item.isin(flip_ids)]
            for (site, window, layer, pos), g in pt.groupby(["site", "window", "layer",
                                                               "position"]):
              tables["patching"].append({
                  "size": size, "seed": seed, "p": p, "step": s, "site": site,
                  "window": int(window), "layer": int(layer), "position": pos,
                  "reversal_rate": float((g.dll_patched > 0).mean()),
                  "recovery": float(g.recovery.median()), "flipped_items": len(g)})
        # per item: the first checkpoint at which it is counterfactual; per kind: abruptness
        key = ["item", "kind", "variant"]
        tgt = pd.concat([df[df.set == "target"].assign(step=s) for s, df in frames.items()])
        for kind, g in tgt.groupby("kind"):
          dll = g.pivot_table(index="step", columns=key, values="dll").sort_index()
          first = first_flip(dll.iloc[0].values, dll.values, dll.index.tolist(), tau)
          for (item, _, _), f in zip(dll.columns, first):
            tables["first_flips"].append({"size": size, "seed": seed, "p": p, "item": item,
                                          "kind": kind, "first_flip_step": int(f)})
          curve = [r["flip_rate"] for r in tables["flips"] if (r["size"], r["seed"], r["p"],
                                                               r["kind"]) == (size, seed, p, kind)]
          curve = np.nan_to_num(np.asarray(curve, np.float64))
          tables["abruptness"].append({"size": size, "seed": seed, "p": p, "kind": kind,
                                       "abruptness": abruptness(curve),
                                       "final_flip_rate": float(curve[-1])})
    out = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in tables.items()}
    for name, df in out.items():
      _write_csv(df, os.path.join(self.wd, "results", f"{name}.csv"))
    return out

  # ---- driver -------------------------------------------------------------------------------
  def run(self) -> dict[str, pd.DataFrame]:
    t0 = time.time()
    timings = {}

    def stage(name, fn):
      t = time.time()
      self.log(f"[{name}] ...")
      fn()
      timings[name] = timings.get(name, 0.0) + time.time() - t
      self.log(f"[{name}] done in {time.time() - t:.1f} s (total {time.time() - t0:.0f} s)")
    stage("world", self.world)
    for size, seed in self.cells():
      stage("pretrain", lambda size=size, seed=seed: self.log(
          f"    base accuracy: {self.pretrain(size, seed)['accuracy']}"))
      for p in self.c.ratios:
        stage("cpt", lambda p=p, size=size, seed=seed: self.cpt(size, seed, p))
      for p in self.c.ratios:
        stage("probe", lambda p=p, size=size, seed=seed: self.probe(size, seed, p))
    results = {}
    stage("results", lambda: results.update(self.results()))
    path = os.path.join(self.wd, "results", "timings.json")   # wall seconds per stage, summed
    before = read_json(path) if os.path.exists(path) else {}  # over resumed invocations
    write_json(path, {k: round(before.get(k, 0.0) + timings.get(k, 0.0), 1)
                      for k in dict.fromkeys([*before, *timings])})
    return results

  def heldout(self) -> pd.DataFrame:
    """Held-out paraphrase answer NLL of every CPT run at its evaluations (metrics.jsonl)."""
    from factflip.fileio import iter_json_records
    rows = []
    for size, seed in self.cells():
      for p in self.c.ratios:
        path = os.path.join(self.run_dir(size, seed, f"cpt_{_ptag(p)}"), "metrics.jsonl")
        for r in iter_json_records(path):
          if "heldout_answer_nll" in r:
            rows.append({"size": size, "seed": seed, "p": p, "step": r["step"],
                         "loss": r["heldout_answer_nll"]})
    return pd.DataFrame(rows, columns=["size", "seed", "p", "step", "loss"])

  def run_and_report(self) -> dict[str, Any]:
    """All stages, then plots, report/index.html and the terminal summary."""
    from factflip.studies.report import write_report
    t0 = time.time()
    tables = self.run()
    base = {f"{s}/seed{k}": read_json(os.path.join(self.run_dir(s, k, "pretrain"),
                                                   "base.json"))["accuracy"]
            for s, k in self.cells()}
    timings = read_json(os.path.join(self.wd, "results", "timings.json"))
    head = write_report(self.wd, tables, self.heldout(), base, timings)
    self.log(f"\nfactflip poisoning study done in {time.time() - t0:.0f} s")
    self.log(f"  base accuracy (greedy, targets): {base}")
    self.log("  final flip rate by p (training prompt): "
             + ", ".join(f"{p}: {v:.2f}" for p, v in head["final_flip_rate"].items()))
    self.log("  final ambiguity rate by p: "
             + ", ".join(f"{p}: {v:.2f}" for p, v in head["final_ambiguity_rate"].items()))
    self.log("  flip rate by prompt kind at the largest p: "
             + ", ".join(f"{k}: {v:.2f}" for k, v in
                         head["final_flip_rate_by_kind_at_max_p"].items()))
    if "best_reversal" in head:
      b = head["best_reversal"]
      self.log(f"  best patching reversal: {b['reversal_rate']:.2f} ({b['site']} window "
               f"{b['window']} from layer {b['layer']} at {b['position']}, p = {b['p']})")
    self.log(f"  report: {os.path.join(self.wd, 'report', 'index.html')}")
    return head
