"""Paper A's continual-pretraining poisoning study, stage by stage (SCIENCE.md A).

Owns: paper A's stages on the study platform (`studies.platform`): after the fact source's
(world + pretraining, or the base's fact draw: `studies.sources`) a CPT run per cell (size,
seed, p), its probes, the results stage; the workdir layout below and the base-accuracy gate.
Must not: train (`factflip.train`), probe (`factflip.probes`), compute results from the probe
rows (`results.py`) or plot (`report.py`).

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
  runs/<size>/seed<k>/tuned_lens/         probe.lens "tuned": the base's tuned lens
                                          (tuned_lens.safetensors / .json), trained on the
                                          clean replay text, read at every checkpoint
  runs/<size>/seed<k>/cpt_p<p>/           one continual-pretraining run per ratio p
                                          (cpt_replay_p<p>/ when ratio_reading is "replay")
  runs/<size>/seed<k>/probes/p<p>/step_<n>.csv        preference rows (+ greedy_cf and the
                                          dll_l<ℓ> lens columns) of targets, controls and the
                                          targets' two-hop items (probes/replay_p<p>/: replay)
  runs/<size>/seed<k>/probes/p<p>/patch_<n>.csv       patching rows (flipped items' reversal)
  runs/<size>/seed<k>/probes/p<p>/attribution_<n>.csv direct logit attribution rows per target
                                          item, layer and head (probe.attribution), and
  runs/<size>/seed<k>/probes/p<p>/knockout_<n>.csv    the subject knockout's rows per target
                                          item and layer (probe.knockout_window), at the base
                                          and the patched checkpoints
  results/<table>.csv                     `results.COLUMNS`

<size> is the preset name, or for a model directory its base name (`size` in the tables).
p is read as `ratio_reading` says (`data.mixtures.read_ratio`): "restate", the counterfactual
share of the target mentions (the rest true restatements, replay at cpt.data.replay_weight), or
"replay", the counterfactual mentions' share of the stream (the rest replay text); streams.csv
has every run's stream under both readings.
flips.csv has the targets' prompt kinds plus `two_hop` / `two_hop_question`: compositions
whose first hop is a target (their counterfactual is the answer through the counterfactual
first hop), so accuracy there is two-hop reasoning accuracy.

The factual-integrity monitor (`cpt.monitor.every` > 0: `factflip.train.monitor`) watches the
targets (set "watch") and the controls (set "control") during CPT, on the live parameters every
`cpt.monitor.every` steps (cpt_p<p>/alerts.jsonl; the watch files in cpt_p<p>/watch/). Its
rules must include flip:τ (the output flip, at the monitor's resolution); alerts.csv and
monitor.csv (`results.monitor_tables`) count its alerts against that flip (a control that
flipped is collateral damage, and an alert on it a true one).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from factflip.data.facts import write_facts_jsonl
from factflip.data.loaders import load_facts
from factflip.data.mixtures import read_ratio, replay_documents
from factflip.data.pipeline import BatchConfig, make_batches
from factflip.evals.checkpoints import CheckpointProbe, probe_checkpoints, table_path, table_steps
from factflip.fileio import iter_json_records, read_json, write_csv, write_json
from factflip.probes.fact_heads import attribute_items, knockout_items
from factflip.probes.fact_patching import patch_items
from factflip.probes.fact_preference import SCORER_VERSION, preference, prompt_rows
from factflip.probes.tuned_lens import load_tuned_lens, save_tuned_lens, train_tuned_lens
from factflip.studies import platform
from factflip.studies.poisoning.results import (
  COLUMNS,
  head_tables,
  monitor_tables,
  run_tables,
  stream_row,
)
from factflip.studies.schema import mutable
from factflip.studies.stages import (
  MIRROR,
  SHARED,
  Stage,
  StageSpec,
  StudyError,
  fingerprint,
  memo,
  train_stage,
)
from factflip.train.inputs import read_texts
from factflip.train.monitor import parse_rule, read_alerts

# The probe tables' columns beyond the scorer's (a probe-stage key: a change redoes the probes):
# 2: greedy_cf (greedy decoding gives the counterfactual answer); 3: the attribution and
# knockout tables (probe.attribution, probe.knockout_window); 4: the knockout's p(cf) columns.
PROBE_TABLES = 4


class Study(platform.Study):
  """Paper A's study: the fact source's stages (world + pretraining, or the base's fact draw),
  then per cell (size, seed, p) a CPT run and its probes, then the results tables."""
  name = "poisoning"
  draw_keys: ClassVar[dict[str, str]] = {
      "n_targets": "cpt.data.n_targets", "n_control": "probe.n_control",
      "tier": "cpt.data.target_tier", "replay_weight": "cpt.data.replay_weight"}
  def grid(self) -> dict[str, list]:
    return {"p": [float(p) for p in self.c.ratios]}

  def ptag(self, p: float) -> str:
    """A ratio's directory tag: p0.50, or replay_p0.50 when p is read as "replay"."""
    reading = self.c.ratio_reading
    return f"{'' if reading == 'restate' else reading + '_'}p{p:.2f}"

  # ---- layout -----------------------------------------------------------------------------
  def cpt_dir(self, size: str, seed: int, p: float) -> str:
    """The CPT run at ratio p (checkpoints/, metrics.jsonl: `factflip.train`)."""
    return self.run_dir(size, seed, f"cpt_{self.ptag(p)}")

  def checkpoints(self, size: str, seed: int, p: float) -> str:
    """The checkpoints/ directory of the CPT run at ratio p (`<dir>/<step>` loads a model)."""
    return os.path.join(self.cpt_dir(size, seed, p), "checkpoints")

  def probe_dir(self, size: str, seed: int, p: float) -> str:
    return os.path.join(self.run_dir(size, seed, "probes"), self.ptag(p))

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
    # the restate reading's keys are those the runs had before ratio_reading existed
    reading = {} if self.c.ratio_reading == "restate" else {"ratio_reading":
                                                            self.c.ratio_reading}
    return Stage(f"cpt {size} seed{seed} {self.ptag(p)}", self.cpt_dir(size, seed, p),
                 self.keys("cpt", "replay", p=float(p), seed=seed, **reading),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_lens(self, size: str, seed: int) -> Stage:
    """probe.lens "tuned": the base's tuned lens, trained on the clean replay text (which
    depends on the target draw: the world's corpus without the targets' sentences)."""
    return Stage(f"tuned lens {size} seed{seed}", self.run_dir(size, seed, "tuned_lens"),
                 self.keys("probe.tuned_lens_steps", "probe.tuned_lens_lr", "cpt.data.seq_len",
                           "cpt.data.batch_size", "replay",
                           *self.source.draw_key_names("n_targets", "tier"), seed=seed),
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_probe(self, size: str, seed: int, p: float) -> Stage:
    ups = [self.stage_cpt(size, seed, p).fp, self.source.base_stage(size, seed).fp]
    if self.c.probe.lens == "tuned":
      ups.append(self.stage_lens(size, seed).fp)
    return Stage(f"probe {size} seed{seed} {self.ptag(p)}", self.probe_dir(size, seed, p),
                 self.keys("probe", scorer=SCORER_VERSION, tables=PROBE_TABLES), tuple(ups))

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_probe(**cell).fp for cell in self.cells(("size", "seed", "p"))]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("tau", "ratios", "ratio_reading", "seeds", sizes=list(self.sizes)),
                 tuple(ups))

  def specs(self) -> list[StageSpec]:
    cell = ("size", "seed", "p")
    S = StageSpec
    lens = ([S("lens", ("size", "seed"), self.stage_lens, self.build_lens)]
            if self.c.probe.lens == "tuned" else [])
    return lens + [S("cpt", cell, self.stage_cpt, self.build_cpt, hosts=SHARED),
                   S("probe", cell, self.stage_probe, self.build_probe, hosts=MIRROR),
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

  # ---- the tuned lens, cpt and probes -------------------------------------------------------
  def clean_texts(self, size: str, seed: int) -> list[str]:
    """The replay text of (size, seed)'s CPT runs: the world's corpus without the targets'
    sentences, or a facts source's replay file (`replay`, else the base stage's)."""
    if self.c.facts:
      return [d["text"] for d in read_texts(self.source.train_data(size, seed)["replay_path"])]
    ids = {t.id for t in self.targets(size, seed)}
    return [d["text"] for d in replay_documents(self.source.world()[0].documents, ids)[0]]

  def build_lens(self, out: str, size: str, seed: int) -> dict[str, Any]:
    """The base's tuned lens (`probes.tuned_lens`): probe.tuned_lens_steps steps of
    cpt.data.batch_size packed rows of cpt.data.seq_len tokens of the clean replay text."""
    texts = self.clean_texts(size, seed)
    if not texts:
      raise StudyError(f"{size} seed {seed}: no replay text to train the tuned lens on")
    d = self.c.cpt.data
    batches = make_batches([{"segments": ((t, True),)} for t in texts], self.tokenizer(size),
                           BatchConfig(seq_len=d.seq_len, batch_size=d.batch_size, seed=seed),
                           shard_index=0, shard_count=1)
    model = self.load(self.base_path(size, seed))
    steps = self.c.probe.tuned_lens_steps
    lens, losses = train_tuned_lens(model, iter(batches), steps,
                                    learning_rate=self.c.probe.tuned_lens_lr)
    save_tuned_lens(lens, out, info={"steps": steps, "documents": len(texts),
                                     "kl_first": losses[0], "kl_last": losses[-1]})
    self.log(f"    tuned lens: KL {losses[0]:.3f} -> {losses[-1]:.3f} over {steps} steps")
    return {"kl_first": round(losses[0], 4), "kl_last": round(losses[-1], 4)}

  def build_cpt(self, out: str, size: str, seed: int, p: float) -> dict[str, Any]:
    c = mutable(self.c.cpt)
    c.seed = seed
    c.data.ratio, c.data.replay_weight = read_ratio(self.c.ratio_reading, float(p),
                                                    c.data.replay_weight)
    c.model.init_from = self.base_path(size, seed)
    for k, v in self.source.train_data(size, seed).items():
      c.data[k] = v
    if c.monitor.every:                          # the monitor watches targets and controls
      c.monitor.watch, c.monitor.controls = (os.path.join(out, "watch", f"{name}.jsonl")
                                             for name in ("targets", "controls"))
      write_facts_jsonl(c.monitor.watch, self.targets(size, seed))
      write_facts_jsonl(c.monitor.controls, self.controls(size, seed))
    res = train_stage(c, out, "study.cpt")
    return {"step": res.step, "seconds": round(res.seconds, 1)}

  def build_probe(self, out: str, size: str, seed: int, p: float) -> dict[str, Any]:
    """Preference (+ logit lens) on targets, controls and two-hop items at every checkpoint
    (step_<n>.csv); cross-model patching (base → checkpoint) of the targets' prompts at every
    `patch_every`-th one but step 0 (patch_<n>.csv)."""
    tok = self.tokenizer(size)
    targets, controls = self.targets(size, seed), self.controls(size, seed)
    target_ids = {t.id for t in targets}
    two_hop = self.two_hop(size, seed)
    subject = {t.id: t.subject for t in targets}
    rows = [dict(r, subject=subject[r["item"]]) for r in prompt_rows(targets, kinds=("prompt",))]
    kinds = tuple(self.c.probe.kinds)
    lens = (True if self.c.probe.lens == "logit" else
            load_tuned_lens(self.stage_lens(size, seed).path))
    base = []                                  # loaded once, when a patch table is first due

    def prefs(model, step):
      df = self._preference_frame(model, tok, targets + controls, kinds, lens)
      df.insert(1, "set", np.where(df.item.isin(target_ids), "target", "control"))
      if two_hop:
        dt = self._preference_frame(model, tok, two_hop, ("prompt", "question"), lens)
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
    probes = [CheckpointProbe("step", prefs),
              CheckpointProbe("patch", patch, lambda i, step: step > 0 and i % every == 0)]
    heads_due = lambda i, step: i % every == 0
    if self.c.probe.attribution:
      probes.append(CheckpointProbe(
          "attribution", lambda model, step: pd.DataFrame(attribute_items(model, tok, rows)),
          heads_due))
    if self.c.probe.knockout_window:
      window = int(self.c.probe.knockout_window)
      probes.append(CheckpointProbe(
          "knockout", lambda model, step: pd.DataFrame(knockout_items(model, tok, rows, window)),
          heads_due))
    return probe_checkpoints(self.checkpoints(size, seed, p), out, probes, self.load, self.log,
                             f"probe {size} seed {seed} {self.ptag(p)}")

  def _preference_frame(self, model, tok, items, kinds, lens=True) -> pd.DataFrame:
    """`preference`'s table (item, kind, variant, prompt, true, cf, logp_true, logp_cf, dll,
    correct, greedy_cf) with `lens` (True: the logit lens; or a TunedLens) as columns dll_l0
    .. dll_lL (layer L = the output)."""
    table = preference(model, tok, items, kinds, self.c.probe.batch_size, lens=lens)
    layers = table.pop("dll_layers", np.zeros((len(table["dll"]), 0)))
    df = pd.DataFrame(table)
    for layer in range(layers.shape[1]):
      df[f"dll_l{layer}"] = layers[:, layer]
    return df

  # ---- results ------------------------------------------------------------------------------
  def build_results(self, out: str) -> dict[str, int]:
    return {name: len(df) for name, df in self.results(out).items()}

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables from the probe rows (`results.run_tables`, `results.monitor_tables`),
    written to `out` (default results/)."""
    tables: dict[str, list[dict]] = {name: [] for name in COLUMNS}
    for cell in self.cells(("size", "seed", "p")):
      d = self.probe_dir(**cell)
      steps = table_steps(d, "step")
      if not steps:
        raise StudyError(f"{d}: no step_<n>.csv probe tables; the probe stage writes them (is "
                         f"{self.checkpoints(**cell)} empty?)")
      frames = {s: self.probe_table(**cell, step=s) for s in steps}
      patches = {s: pd.read_csv(table_path(d, "patch", s)) for s in steps
                 if os.path.exists(table_path(d, "patch", s))}
      heads = {name: {s: pd.read_csv(table_path(d, name, s)) for s in table_steps(d, name)}
               for name in ("attribution", "knockout")}
      parts = [run_tables(cell, frames, patches, float(self.c.tau)),
               head_tables(cell, frames, heads["attribution"], heads["knockout"],
                           float(self.c.tau)),
               {"streams": [stream_row(cell, self.c.ratio_reading, read_json(os.path.join(
                   self.cpt_dir(**cell), "data_stats.json")))]}]
      if self.c.cpt.monitor.every:
        parts.append(self._monitor(cell))
      for part in parts:
        for name, rows in part.items():
          tables[name] += rows
    out_dir = out or os.path.join(self.wd, "results")
    out = {k: pd.DataFrame(v, columns=COLUMNS[k]) for k, v in tables.items()}
    for name, df in out.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return out

  def _monitor(self, cell: dict[str, Any]) -> dict[str, list[dict]]:
    """The monitor's watched prompts and alerts of one CPT run, as `results.monitor_tables`."""
    d = self.cpt_dir(**cell)
    m = self.c.cpt.monitor
    rules = [parse_rule(r) for r in m.rules]
    flip_rule = next(r.text for r in rules if r.name == "flip" and r.arg == self.c.tau)
    key = ["set", "item", "kind", "variant"]
    prompts = pd.DataFrame(
        [dict(r, set=set_) for set_, name in (("watch", "targets"), ("control", "controls"))
         for r in prompt_rows(load_facts(os.path.join(d, "watch", f"{name}.jsonl")),
                              tuple(m.kinds))], columns=key + ["prompt"])
    alerts = pd.DataFrame(read_alerts(os.path.join(d, "alerts.jsonl")),
                          columns=key + ["step", "rule"])
    alerts["variant"] = alerts.variant.astype(str)
    return monitor_tables(cell, prompts, alerts, [r.text for r in rules], flip_rule)

  def heldout(self) -> pd.DataFrame:
    """Held-out paraphrase answer NLL of every CPT run at its evaluations (metrics.jsonl)."""
    rows = []
    for cell in self.cells(("size", "seed", "p")):
      size, seed, p = cell["size"], cell["seed"], cell["p"]
      path = os.path.join(self.cpt_dir(size, seed, p), "metrics.jsonl")
      for _, _, r in iter_json_records(path):
        loss = r.get("heldout_answer_nll", r.get("eval_loss"))
        if loss is not None:
          rows.append({"size": size, "seed": seed, "p": p, "step": r["step"], "loss": loss})
    return pd.DataFrame(rows, columns=["size", "seed", "p", "step", "loss"])

  def base_accuracy(self) -> dict[str, Any]:
    """Per size/seed, the base's accuracy on the targets per prompt kind (base.json)."""
    return {f"{c['size']}/seed{c['seed']}": read_json(os.path.join(
        self.base_dir(c["size"], c["seed"]), "base.json"))["accuracy"] for c in self.cells()}
