"""Paper A's continual-pretraining poisoning study, stage by stage (SCIENCE.md A).

Owns: paper A's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or the base's fact draw: `studies.sources`) a CPT run per cell (size,
seed, p), its probes, the results tables; the workdir layout below and the base-accuracy gate.
Must not: train (`factflip.train`), probe (`factflip.probes`) or plot (`poisoning_report.py`).

Two sources of facts and models. With `facts` empty (the default) the study generates the fact
world, pretrains each preset in `sizes` on it and poisons the world's facts. With `facts` set
to a facts file, each entry of `sizes` is a model directory (HF or factflip) used as the base
as it is; the targets and controls are drawn among the facts that base knows.

Workdir layout (every stage writes its DONE record last, with the fingerprint of the config
keys it read and of its upstream stages: `stage_*` below, rule in `studies.stages`; a stage
whose fingerprint matches is reused, one that differs is redone atomically):
  study.json                              the study config as run (`Study.open` reads it)
  world/, tokenizer/                      the fact world and its tokenizer (world studies)
  runs/<size>/seed<k>/pretrain/           the pretraining run (+ base.json: accuracy gate)
  runs/<size>/seed<k>/base/               facts studies: base.json, the base's preference on
                                          the candidates (candidates.csv), targets.jsonl,
                                          controls.jsonl, replay.jsonl, heldout.jsonl
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
<size> is the preset name, or for a model directory its base name (`size` in the tables).
flips.csv has the targets' prompt kinds plus `two_hop` / `two_hop_question`: compositions
whose first hop is a target (their counterfactual is the answer through the counterfactual
first hop), so accuracy there is two-hop reasoning accuracy. first_flips: per target item and
kind the first checkpoint at which it is counterfactual (−1: never); abruptness: the largest
single-interval rise of the flip-rate curve over its total rise (NaN: it never rose).

The factual-integrity monitor (`cpt.monitor.every` > 0: `factflip.train.monitor`) watches the
targets (set "watch") and the controls (set "control") during CPT, on the live parameters every
`cpt.monitor.every` steps (cpt_p<p>/alerts.jsonl; the watch files in cpt_p<p>/watch/). Its
rules must include flip:τ (the output flip, at the monitor's resolution). alerts.csv: per
watched prompt and rule, the first alert step, the step of its flip:τ alert (−1: none) and
lead time = flip step − alert step (NaN unless both; > 0: the rule warned before the output
flipped). monitor.csv per rule and set: prompts watched, alerted, flipped, detected (alerted
at or before the flip), the median lead time of the detected, false alarms (alerted, never
flipped; a control that flipped is collateral damage, and an alert on it a true one).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from factflip.fileio import read_json, write_csv, write_json
from factflip.probes.fact_preference import SCORER_VERSION
from factflip.studies import platform
from factflip.studies.checkpoints import CheckpointProbe, probe_checkpoints, table_path, table_steps
from factflip.studies.platform import StudyError, memo
from factflip.studies.stages import Stage, fingerprint

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
    "alerts": ["size", "seed", "p", "set", "item", "kind", "variant", "rule", "alert_step",
               "flip_step", "lead_time"],
    "monitor": ["size", "seed", "p", "rule", "set", "prompts", "alerted", "flipped",
                "detected", "median_lead", "false_alarms"],
}


def base_config():
  """Every key a poisoning study reads, with its default (configs/studies/poisoning.py starts
  from it): the keys every study has (`platform.common_config`) and paper A's own. `pretrain`
  and `cpt` are training configs with `factflip.train.config`'s schema."""
  from factflip.train import config as train_config
  c = platform.common_config()
  c.study = "poisoning"
  c.ratios = (0.0, 0.25, 0.5, 0.75, 1.0)   # poisoning ratios p
  c.min_base_accuracy = 0.8        # the base must know this share of targets (greedy, prompt);
  #                                  with `facts`, > 0 also makes the draw stop when the base
  #                                  knows fewer candidates than targets + controls
  c.cpt = train_config.base_config()        # continual pretraining per ratio (data.ratio is
  c.cpt.data.kind = "poison"                # set per run; dense checkpoints are the point)
  c.probe.kinds = ("prompt", "paraphrase", "question", "language", "neighbour")
  c.probe.n_control = 40           # non-target facts (collateral accuracy)
  c.probe.patch_sites = ("resid_pre", "attn_out", "mlp_out")
  c.probe.patch_windows = (1, 2)
  c.probe.patch_groups = ("subject", "last")
  c.probe.patch_every = 1          # patch every n-th checkpoint (1 = all); step 0 never
  c.probe.patch_stride = 1         # patch every n-th layer (0, n, 2n, ...; 1 = all)
  return c


def validate(c, source: str = "study") -> None:
  """Check a study config before anything runs (training configs included, per size and
  ratio): ConfigError naming the source and key."""
  import jax

  from factflip.configfile import ConfigError
  from factflip.data.mixtures import PoisonConfig
  from factflip.models.hooks import STREAM_SITES
  from factflip.probes.fact_patching import GROUPS
  from factflip.probes.fact_preference import KINDS
  from factflip.train import config as train_config

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)

  def subset(key, given, allowed):
    bad = [x for x in given if x not in allowed]
    need(given and not bad, key, f"{list(given)}; expected a non-empty list of {list(allowed)}")

  platform.check_schema(c, base_config(), "poisoning", ("probe",), source)
  platform.validate_common(c, source, "a facts file or folder (`factflip facts --facts=PATH` "
                           "checks one)")
  if c.facts:
    need(c.facts_limit >= 0, "facts_limit", f"{c.facts_limit}; expected >= 0 (0 = all)")
  need(not c.replay or os.path.exists(c.replay), "replay",
       f"{c.replay!r} does not exist; expected a JSONL of {{\"text\"}} documents")
  need(len(c.ratios) > 0 and all(0 <= p <= 1 for p in c.ratios)
       and len(set(c.ratios)) == len(c.ratios), "ratios",
       f"{list(c.ratios)}; expected distinct poisoning ratios in [0, 1]")
  need(c.tau >= 0, "tau", f"{c.tau}; expected >= 0 nats")
  need(0 <= c.min_base_accuracy <= 1, "min_base_accuracy",
       f"{c.min_base_accuracy}; expected a share in [0, 1]")
  subset("probe.kinds", list(c.probe.kinds), KINDS)
  subset("probe.patch_sites", list(c.probe.patch_sites), STREAM_SITES)
  subset("probe.patch_groups", list(c.probe.patch_groups), GROUPS)
  need(len(c.probe.patch_windows) > 0 and min(c.probe.patch_windows) >= 1,
       "probe.patch_windows", f"{list(c.probe.patch_windows)}; expected windows >= 1")
  need(c.probe.patch_every >= 1, "probe.patch_every", f"{c.probe.patch_every}; expected >= 1")
  need(c.probe.patch_stride >= 1, "probe.patch_stride",
       f"{c.probe.patch_stride}; expected >= 1")
  need(c.probe.n_control >= 0 and c.probe.batch_size >= 1, "probe",
       "n_control must be >= 0 and batch_size >= 1")
  need(c.cpt.data.kind == "poison", "cpt.data.kind", f"{c.cpt.data.kind!r}; expected 'poison'")
  if c.cpt.monitor.every:
    from factflip.train.monitor import parse_rule
    need(any(r.name == "flip" and r.arg == c.tau for r in map(parse_rule, c.cpt.monitor.rules)),
         "cpt.monitor.rules", f"{list(c.cpt.monitor.rules)}; expected a flip:{c.tau:g} rule "
         "(the output flip at the study's tau, which lead times count to)")
  for p in c.ratios:
    try:
      PoisonConfig(ratio=p, mentions_per_fact=c.cpt.data.mentions_per_fact,
                   replay_weight=c.cpt.data.replay_weight).validate(c.cpt.data.n_targets)
    except ValueError as e:
      raise ConfigError(source, "cpt.data.mentions_per_fact", str(e)) from None
  for stage in ("cpt",) if c.facts else ("pretrain", "cpt"):
    sub = platform.mutable(c[stage])
    if c.facts:                  # what `cpt` sets per model (the files are written per run)
      sub.model.init_from, sub.data.facts_path = c.sizes[0], c.facts
      sub.data.replay_path = sub.data.eval_path = "runs/<size>/seed<k>/base/*.jsonl"
    else:
      sub.model.preset = c.sizes[0]
    if stage == "cpt" and sub.monitor.every:   # written per run by build_cpt
      sub.monitor.watch = "runs/<size>/seed<k>/cpt_p<p>/watch/targets.jsonl"
    train_config.validate(sub, source=f"{source}: {stage}", n_devices=jax.device_count(),
                          n_processes=jax.process_count())


def _rate(v) -> str:
  """A headline share for the terminal: 2 decimals, or n/a where undefined (null)."""
  return "n/a" if v is None else f"{v:.2f}"


def _ptag(p: float) -> str:
  return f"p{p:.2f}"


class Study(platform.Study):
  """Paper A's study: the fact source's stages (world + pretraining, or the base's fact draw),
  then per cell (size, seed, p) a CPT run and its probes, then the results tables."""
  name = "poisoning"
  title = "continual-pretraining poisoning study"
  draw_keys: ClassVar[dict[str, str]] = {
      "n_targets": "cpt.data.n_targets", "n_control": "probe.n_control",
      "tier": "cpt.data.target_tier", "replay_weight": "cpt.data.replay_weight"}
  base_config = staticmethod(base_config)
  validate = staticmethod(validate)

  def grid(self) -> dict[str, list]:
    return {"p": [float(p) for p in self.c.ratios]}

  # ---- layout -----------------------------------------------------------------------------
  def cpt_dir(self, size: str, seed: int, p: float) -> str:
    """The CPT run at ratio p (checkpoints/, metrics.jsonl: `factflip.train`)."""
    return self.run_dir(size, seed, f"cpt_{_ptag(p)}")

  def checkpoints(self, size: str, seed: int, p: float) -> str:
    """The checkpoints/ directory of the CPT run at ratio p (`<dir>/<step>` loads a model)."""
    return os.path.join(self.cpt_dir(size, seed, p), "checkpoints")

  def probe_dir(self, size: str, seed: int, p: float) -> str:
    return os.path.join(self.run_dir(size, seed, "probes"), _ptag(p))

  def probe_table(self, size: str, seed: int, p: float, step: int) -> pd.DataFrame:
    """The probe rows of one checkpoint (preference + logit lens; see the layout above)."""
    return pd.read_csv(table_path(self.probe_dir(size, seed, p), "step", step),
                       keep_default_na=False)

  def tables(self) -> dict[str, pd.DataFrame]:
    """The results tables (results/<name>.csv) as written by the results stage."""
    return {name: pd.read_csv(os.path.join(self.wd, "results", f"{name}.csv"))
            for name in COLUMNS}

  def targets(self, size: str, seed: int):
    """The CPT run's target facts (the fact source's draw: `studies.sources`)."""
    return self.source.targets(size, seed)

  def controls(self, size: str, seed: int):
    """Non-target facts (collateral accuracy), `probe.n_control` of them."""
    return self.source.controls(size, seed)

  def two_hop(self, size: str, seed: int):
    """Compositions whose first hop is a target (world studies; none for a facts file)."""
    return self.source.two_hop(size, seed)

  # ---- stages and their fingerprints (factflip.studies.stages) ------------------------------
  def gate_fingerprint(self, size: str, seed: int) -> str:
    """What base.json (the base's accuracy on the targets) was computed with."""
    return fingerprint(self.keys(*self.source.draw_key_names("n_targets", "tier"),
                                 "probe.batch_size", "probe.dtype", scorer=SCORER_VERSION),
                       (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_cpt(self, size: str, seed: int, p: float) -> Stage:
    return Stage(f"cpt {size} seed{seed} {_ptag(p)}", self.cpt_dir(size, seed, p),
                 self.keys("cpt", "replay", p=float(p), seed=seed),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_probe(self, size: str, seed: int, p: float) -> Stage:
    return Stage(f"probe {size} seed{seed} {_ptag(p)}", self.probe_dir(size, seed, p),
                 self.keys("probe", scorer=SCORER_VERSION), (self.stage_cpt(size, seed, p).fp,
                                      self.source.base_stage(size, seed).fp))

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_probe(**cell).fp for cell in self.cells(("size", "seed", "p"))]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("tau", "ratios", "seeds", sizes=list(self.sizes)), tuple(ups))

  def specs(self) -> list[platform.StageSpec]:
    cell = ("size", "seed", "p")
    S = platform.StageSpec
    return [S("cpt", cell, self.stage_cpt, self.build_cpt, hosts=platform.SHARED),
            S("probe", cell, self.stage_probe, self.build_probe, hosts=platform.MIRROR),
            S("results", (), self.stage_results, self.build_results)]

  # ---- the base gate ------------------------------------------------------------------------
  def draw_needs_known(self) -> bool:
    """A facts file's draw stops when the base knows fewer candidates than it draws, unless
    min_base_accuracy is 0 (a base that knows none of its targets is then accepted)."""
    return self.c.min_base_accuracy > 0

  def base_ready(self, size: str, seed: int) -> None:
    self.log(f"    base accuracy: {self.base_gate(size, seed)['accuracy']}")

  def base_gate(self, size: str, seed: int) -> dict[str, Any]:
    """Closed-book accuracy of the base on the targets (prompt format, plus the other kinds
    for the report), in base.json; below `min_base_accuracy` the study stops: the config is
    wrong (too little pretraining for this world and model, or a base that knows too few)."""
    from factflip.probes.fact_preference import preference
    path = os.path.join(self.base_dir(size, seed), "base.json")
    fp = self.gate_fingerprint(size, seed)
    info = read_json(path) if os.path.exists(path) else {}
    if info.get("fingerprint") != fp:
      model = self.load(self.base_path(size, seed))
      table = pd.DataFrame(preference(model, self.tokenizer(size), self.targets(size, seed),
                                      kinds=("prompt", "paraphrase", "question", "language"),
                                      batch_size=self.c.probe.batch_size))
      # per kind, and per language as "language:<code>"
      group = np.where(table.kind == "language", "language:" + table.variant.astype(str),
                       table.kind)
      info = {name: {k: float(v) for k, v in pd.concat([
                  col.groupby(table.kind).mean(), col.groupby(group).mean()]).items()}
              for name, col in (("accuracy", table.correct.astype(float)),
                                ("dll_positive", (table.dll > 0).astype(float)))}
      info["fingerprint"] = fp
      write_json(path, info)
    got = info["accuracy"]["prompt"]
    if got < self.c.min_base_accuracy:
      raise StudyError(
          f"{size} seed {seed}: the base model knows {got:.0%} of the "
          f"{len(self.targets(size, seed))} target facts on the training prompt format "
          f"(greedy), below min_base_accuracy {self.c.min_base_accuracy:.0%}: the config is "
          f"wrong ({self.source.gate_hint}; or fewer targets: {self.draw_keys['n_targets']})")
    return info

  # ---- cpt and probes -----------------------------------------------------------------------
  def build_cpt(self, out: str, size: str, seed: int, p: float) -> dict[str, Any]:
    c = platform.mutable(self.c.cpt)
    c.seed = seed
    c.data.ratio = float(p)
    c.model.init_from = self.base_path(size, seed)
    for k, v in self.source.train_data(size, seed).items():
      c.data[k] = v
    if c.monitor.every:                          # the monitor watches targets and controls
      from factflip.data.facts import write_facts_jsonl
      c.monitor.watch, c.monitor.controls = (os.path.join(out, "watch", f"{name}.jsonl")
                                             for name in ("targets", "controls"))
      write_facts_jsonl(c.monitor.watch, self.targets(size, seed))
      write_facts_jsonl(c.monitor.controls, self.controls(size, seed))
    res = platform.train_stage(c, out, "study.cpt")
    return {"step": res.step, "seconds": round(res.seconds, 1)}

  def build_probe(self, out: str, size: str, seed: int, p: float) -> dict[str, Any]:
    """Preference (+ logit lens) on targets, controls and two-hop items at every checkpoint
    (step_<n>.csv); cross-model patching (base → checkpoint) of the targets' prompts at every
    `patch_every`-th one but step 0 (patch_<n>.csv)."""
    from factflip.probes.fact_patching import patch_items
    from factflip.probes.fact_preference import prompt_rows
    tok = self.tokenizer(size)
    targets, controls = self.targets(size, seed), self.controls(size, seed)
    target_ids = {t.id for t in targets}
    two_hop = self.two_hop(size, seed)
    subject = {t.id: t.subject for t in targets}
    rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(targets, kinds=("prompt",))]
    kinds = tuple(self.c.probe.kinds)
    base = []                                  # loaded once, when a patch table is first due

    def prefs(model, step):
      df = self._preference_frame(model, tok, targets + controls, kinds)
      df.insert(1, "set", np.where(df.item.isin(target_ids), "target", "control"))
      if two_hop:
        dt = self._preference_frame(model, tok, two_hop, ("prompt", "question"))
        dt.insert(1, "set", "two_hop")
        dt["kind"] = dt.kind.map({"prompt": "two_hop", "question": "two_hop_question"})
        df = pd.concat([df, dt], ignore_index=True)
      return df

    def patch(model, step):
      if not base:
        base.append(self.load(self.base_path(size, seed)))
      return pd.DataFrame(patch_items(
          model, base[0], tok, rows, sites=tuple(self.c.probe.patch_sites),
          windows=tuple(self.c.probe.patch_windows), groups=tuple(self.c.probe.patch_groups),
          layers=range(0, model.cfg.n_layers, self.c.probe.patch_stride),
          devices=self.probe_devices()))

    every = self.c.probe.patch_every
    return probe_checkpoints(
        self.checkpoints(size, seed, p), out,
        [CheckpointProbe("step", prefs),
         CheckpointProbe("patch", patch, lambda i, step: step > 0 and i % every == 0)],
        self.load, self.log, f"probe {size} seed {seed} {_ptag(p)}")

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
  def build_results(self, out: str) -> dict[str, int]:
    return {name: len(df) for name, df in self.results(out).items()}

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables from the probe rows, written to `out` (default results/)."""
    from factflip.probes.fact_preference import (CORRECT, abruptness, ambiguity_rate,
                                                 first_flip, flip_rate, flipped, states)
    from factflip.probes.patching import reversal_rate
    tables = {name: [] for name in COLUMNS}
    tau = float(self.c.tau)
    for cell in self.cells(("size", "seed", "p")):
      size, seed, p = cell["size"], cell["seed"], cell["p"]
      d = self.probe_dir(size, seed, p)
      steps = table_steps(d, "step")
      if not steps:
        raise StudyError(f"{d}: no step_<n>.csv probe tables; the probe stage writes them (is "
                         f"{self.checkpoints(size, seed, p)} empty?)")
      frames = {s: self.probe_table(size, seed, p, s) for s in steps}
      ref = frames[steps[0]]
      key = ["item", "kind", "variant"]
      for s, df in frames.items():
        m = df.merge(ref[key + ["dll"] + [c for c in ref if c.startswith("dll_l")]],
                     on=key, suffixes=("", "_base"))
        m["flipped"] = flipped(m.dll_base.values, m.dll.values, tau)
        for (set_, kind), g in m.groupby(["set", "kind"]):
          n_ok = int((states(g.dll_base.values, tau) == CORRECT).sum())
          tables["collateral" if set_ == "control" else "flips"].append({
              "size": size, "seed": seed, "p": p, "step": s, "kind": kind,
              "flip_rate": float(flip_rate(g.dll_base.values, g.dll.values, tau)),
              "ambiguity_rate": float(ambiguity_rate(g.dll.values, tau)),
              "accuracy": float(g.correct.astype(bool).mean()),
              "items": len(g), "correct_at_base": n_ok})
        tgt = m[(m.set == "target") & (m.kind == "prompt")]
        for c in [c for c in tgt if c.startswith("dll_l") and not c.endswith("_base")]:
          tables["lens"].append({
              "size": size, "seed": seed, "p": p, "step": s, "layer": int(c[5:]),
              "flip_rate": float(flip_rate(tgt[c + "_base"].values, tgt[c].values, tau)),
              "ambiguity_rate": float(ambiguity_rate(tgt[c].values, tau))})
        pcsv = table_path(d, "patch", s)
        if os.path.exists(pcsv):
          pt = pd.read_csv(pcsv)
          flip_ids = set(m[(m.set == "target") & (m.kind == "prompt") & m.flipped].item)
          pt = pt[pt.item.isin(flip_ids)]
          for (site, window, layer, pos), g in pt.groupby(["site", "window", "layer",
                                                             "position"]):
            tables["patching"].append({
                "size": size, "seed": seed, "p": p, "step": s, "site": site,
                "window": int(window), "layer": int(layer), "position": pos,
                "reversal_rate": float(reversal_rate(g.dll_patched.values,
                                                     np.ones(len(g), bool))),
                "recovery": float(g.recovery.median()), "flipped_items": len(g)})
      # per item: the first checkpoint at which it is counterfactual; per kind: abruptness
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
      if self.c.cpt.monitor.every:
        self._monitor_rows(tables, size, seed, p)
    out_dir = out or os.path.join(self.wd, "results")
    out = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in tables.items()}
    for name, df in out.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return out

  def _monitor_rows(self, tables, size: str, seed: int, p: float) -> None:
    """alerts.csv and monitor.csv rows of one CPT run (definitions: the module docstring)."""
    from factflip.data.loaders import load_facts
    from factflip.probes.fact_preference import prompt_rows
    from factflip.train.monitor import parse_rule, read_alerts
    d = self.cpt_dir(size, seed, p)
    m = self.c.cpt.monitor
    rules = [parse_rule(r) for r in m.rules]
    flip_rule = next(r.text for r in rules if r.name == "flip" and r.arg == self.c.tau)
    key = ["set", "item", "kind", "variant"]
    prompts = pd.DataFrame(
        [dict(r, set=set_) for set_, name in (("watch", "targets"), ("control", "controls"))
         for r in prompt_rows(load_facts(os.path.join(d, "watch", f"{name}.jsonl")),
                              tuple(m.kinds))], columns=key + ["prompt"])[key]
    alerts = pd.DataFrame(read_alerts(os.path.join(d, "alerts.jsonl")),
                          columns=key + ["step", "rule"])
    alerts["variant"] = alerts.variant.astype(str)
    first = {tuple(k): int(v) for k, v in alerts.groupby(key + ["rule"]).step.min().items()}
    rows = []
    for rule in rules:
      for k in prompts.itertuples(index=False, name=None):
        a, f = first.get(k + (rule.text,), -1), first.get(k + (flip_rule,), -1)
        rows.append(dict(zip(key, k), size=size, seed=seed, p=p, rule=rule.text, alert_step=a,
                         flip_step=f, lead_time=float(f - a) if a >= 0 and f >= 0 else np.nan))
    tables["alerts"] += rows
    for (rule, set_), g in pd.DataFrame(rows).groupby(["rule", "set"], sort=False):
      alerted, flipped = g.alert_step >= 0, g.flip_step >= 0
      detected = alerted & flipped & (g.alert_step <= g.flip_step)
      tables["monitor"].append({
          "size": size, "seed": seed, "p": p, "rule": rule, "set": set_, "prompts": len(g),
          "alerted": int(alerted.sum()), "flipped": int(flipped.sum()),
          "detected": int(detected.sum()),
          "median_lead": float(g.lead_time[detected].median()) if detected.any() else np.nan,
          "false_alarms": int((alerted & ~flipped).sum())})

  def heldout(self) -> pd.DataFrame:
    """Held-out paraphrase answer NLL of every CPT run at its evaluations (metrics.jsonl)."""
    from factflip.fileio import iter_json_records
    rows = []
    for cell in self.cells(("size", "seed", "p")):
      size, seed, p = cell["size"], cell["seed"], cell["p"]
      path = os.path.join(self.cpt_dir(size, seed, p), "metrics.jsonl")
      for _, _, r in iter_json_records(path):
        loss = r.get("heldout_answer_nll", r.get("eval_loss"))
        if loss is not None:
          rows.append({"size": size, "seed": seed, "p": p, "step": r["step"], "loss": loss})
    return pd.DataFrame(rows, columns=["size", "seed", "p", "step", "loss"])

  # ---- report -------------------------------------------------------------------------------
  def report(self, tables, out_dir):
    from factflip.studies import poisoning_report
    base = {f"{c['size']}/seed{c['seed']}": read_json(os.path.join(
        self.base_dir(c["size"], c["seed"]), "base.json"))["accuracy"] for c in self.cells()}
    return (poisoning_report.headline(tables, base),
            poisoning_report.figures(tables, self.heldout(), out_dir))

  def summary(self, head: dict[str, Any]) -> list[str]:
    lines = [f"base accuracy (greedy, targets): {head['base_accuracy']}",
             "final flip rate by p (training prompt; mean over sizes and seeds): "
             + ", ".join(f"{p}: {_rate(v)}" for p, v in head["final_flip_rate"].items())]
    for size, rates in head.get("final_flip_rate_by_size", {}).items():
      lines.append(f"  {size}: " + ", ".join(f"{p}: {_rate(v)}" for p, v in rates.items()))
    lines += ["final ambiguity rate by p: "
              + ", ".join(f"{p}: {_rate(v)}" for p, v in head["final_ambiguity_rate"].items()),
              "flip rate by prompt kind at the largest p: "
              + ", ".join(f"{k}: {_rate(v)}" for k, v in
                          head["final_flip_rate_by_kind_at_max_p"].items())]
    for rule, m in head.get("monitor", {}).items():
      lead = "n/a" if m["median_lead"] is None else f"{m['median_lead']:g} steps"
      lines.append(f"monitor {rule}: {m['detected']}/{m['flipped']} flipped target prompts "
                   f"alerted by their flip at the largest p (median lead {lead}); false alarms: "
                   f"controls {_rate(m['control_false_alarm_rate'])}, targets at p = 0 "
                   f"{_rate(m['p0_target_alarm_rate'])}")
    if "best_reversal" in head:
      b = head["best_reversal"]
      lines.append(f"best patching reversal: {_rate(b['reversal_rate'])} ({b['site']} window "
                   f"{b['window']} from layer {b['layer']} at {b['position']}, p = {b['p']})")
      lines.append("  best per site: " + ", ".join(
          f"{site} {_rate(r['reversal_rate'])} (recovery {r['recovery']:.2f}, window "
          f"{r['window']} from layer {r['layer']} at {r['position']})"
          for site, r in head.get("best_reversal_by_site", {}).items()))
    return lines
