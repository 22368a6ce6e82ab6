"""Paper C's study: MoRFI — SAE latents that move monotonically with the share of Unknown facts in
the fine-tuning set, and steering along them to recover knowledge (SCIENCE.md C).

Owns: paper C's stages on top of paper B's (this Study subclasses `new_knowledge.Study`: the
SliCK categories, the %Unknown mixtures and one SFT run per mixture are B's stages, reused):
the SAE of the base model's site (trained here with `sae.train`, or loaded with `load_sae`), the
latents of every checkpoint of every mixture on held-out QA prompts; per (size, seed) the
monotonic-latent test across mixtures and across the 100%-Unknown run's epochs, its
label-permutation null, the cloze check (M_0's and M_100's ΔLL on the test facts) and the
100%-Unknown model steered and clamped at each latent's own scale; then the results tables.
Must not: train, categorise, encode or steer itself (`sae`, `probes.morfi`, B's
stages), or plot (`report.py`); its results tables are `results.py`'s.

Workdir layout (B's layout up to the SFT runs, then):
  runs/<size>/seed<k>/sae/sae/            the SAE (SAELens layout); beside it the SAE's training
                                          run (checkpoints/, metrics.jsonl) when trained here
  runs/<size>/seed<k>/latents/<m>/latents.npz   per checkpoint step: latents [steps, P, d_sae]
                                          and the site's activations [steps, P, d_in] of the P
                                          held-out prompts
  runs/<size>/seed<k>/steering/           latents.csv (the tests, per latent), null.csv (the
                                          count per label permutation), steering.csv (accuracy
                                          per direction and α), answers.csv, cloze.csv (per
                                          test fact), info.json
  results/<table>.csv                     `results.COLUMNS`

Definitions: `probes.morfi` and `results`. The models compared are each mixture's last
checkpoint (SFT to the epoch cap); the trend across epochs is the 100%-Unknown run's
checkpoints. Held-out prompts: the in-distribution test facts' questions ("Q: <question>\\nA:",
zero-shot); the cloze check scores the same facts' cloze prompts. M_0 / M_100: the last
checkpoints of the lowest- and highest-share mixtures. Steering strengths α are multiples of
each direction's own M_0 − M_100 difference: a latent's mean activation difference (through the
SAE's decoder, `sae.steering.latent_vectors`), the composite's mean(h|M_0) − mean(h|M_100); clamps set
latents to max(0, a(M_100) + α·d) with the error term kept (`probes.morfi.clamped_answers`); random
non-trending control latents are steered with the mean norm of the steered latents' vectors (the
composite's when no latent is monotonic).
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import jax
import numpy as np
import pandas as pd

from factflip.evals.qa import exact_match, few_shot_prompt
from factflip.fileio import atomic_path, write_csv, write_json
from factflip.models.hooks import hook_name as tl_hook_name
from factflip.models.hooks import parse_hook_name
from factflip.models.store import model_config, valid_steps
from factflip.probes import morfi as M
from factflip.probes.fact_preference import SCORER_VERSION, score
from factflip.sae.formats import load_sae, save_sae
from factflip.sae.steering import latent_vectors, sae_site
from factflip.sae.train import train_sae
from factflip.studies.morfi.results import (
  COLUMNS,
  cell_tables,
  clamp_values,
  label_permutation_null,
  ranked_monotonic,
)
from factflip.studies.new_knowledge.config import mixture_names, unknown_share
from factflip.studies.new_knowledge.study import Study as NewKnowledgeStudy
from factflip.studies.schema import mutable
from factflip.studies.sources import file_stamp
from factflip.studies.stages import SHARED, Stage, StageSpec, StudyError, memo


class Study(NewKnowledgeStudy):
  """Paper C's study: B's stages up to SFT, then per (size, seed) the SAE, per (size, seed,
  mixture) the latents of every checkpoint, per (size, seed) the test and the steering, then
  the results."""
  name = "morfi"
  draw_keys: ClassVar[dict[str, str]] = {}

  # ---- layout -----------------------------------------------------------------------------
  # layer -1: the one SAE site (sae.hook_name, or the middle layer); else a layer of the sweep
  # (sae.layers), in directories of its own
  def _at(self, name: str, layer: int) -> str:
    return name if layer < 0 else f"{name}_l{layer}"

  def sae_dir(self, size: str, seed: int, layer: int = -1) -> str:
    return self.run_dir(size, seed, self._at("sae", layer))

  def latents_dir(self, size: str, seed: int, mixture: str, layer: int = -1) -> str:
    return os.path.join(self.run_dir(size, seed, self._at("latents", layer)), mixture)

  def steering_dir(self, size: str, seed: int, layer: int = -1) -> str:
    return self.run_dir(size, seed, self._at("steering", layer))

  def grid(self) -> dict[str, list]:
    """B's mixtures, and the SAE's layers: [-1] (the one site) unless sae.layers sweeps."""
    return {**super().grid(), "layer": [int(l) for l in self.c.sae.layers] or [-1]}

  def tables(self) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(os.path.join(self.wd, "results", f"{name}.csv"))
            for name in COLUMNS}

  def shares(self) -> list[tuple[str, float]]:
    """(mixture, X) in increasing X."""
    return sorted(((m, unknown_share(m)) for m in mixture_names(self.c)), key=lambda t: t[1])

  def prompts(self) -> tuple[list, list[str]]:
    """The held-out facts (in-distribution test split) and their zero-shot QA prompts."""
    facts = [f for f in self.facts() if f.split == "test" and f.meta["distribution"] == "in"]
    if not facts:
      raise StudyError("no in-distribution test facts to probe")
    return facts, [few_shot_prompt(f, ()) for f in facts]

  # ---- stages -----------------------------------------------------------------------------
  @memo
  def stage_sae(self, size: str, seed: int, layer: int = -1) -> Stage:
    keys = self.keys("sae", seed=seed) if not self.c.sae.path else self.keys(
        "sae.path", "sae.hook_name", seed=seed, sae_files=file_stamp(self.c.sae.path))
    del keys["sae.layers"]                 # the sweep: each layer's stage has its own
    if layer >= 0:
      keys["layer"] = layer
    return Stage(f"sae {size} seed{seed}{self._named(layer)}", self.sae_dir(size, seed, layer),
                 keys, (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_latents(self, size: str, seed: int, mixture: str, layer: int = -1) -> Stage:
    return Stage(f"latents {size} seed{seed} {mixture}{self._named(layer)}",
                 self.latents_dir(size, seed, mixture, layer),
                 self.keys("morfi.positions", "probe.dtype", *self._fact_keys()),
                 (self.stage_sae(size, seed, layer).fp, self.stage_sft(size, seed, mixture).fp))

  @memo
  def stage_steering(self, size: str, seed: int, layer: int = -1) -> Stage:
    ups = [self.stage_latents(size, seed, m, layer).fp for m in mixture_names(self.c)]
    return Stage(f"steering {size} seed{seed}{self._named(layer)}",
                 self.steering_dir(size, seed, layer),
                 self.keys("morfi", "probe.dtype", "probe.batch_size", seed=seed,
                           scorer=SCORER_VERSION), tuple(ups))

  @staticmethod
  def _named(layer: int) -> str:
    return "" if layer < 0 else f" layer{layer}"

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_steering(**cell).fp for cell in self.cells(self.CELL)]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("seeds", "tau", sizes=list(self.sizes)), tuple(ups))

  CELL = ("size", "seed", "layer")            # an SAE site of a base

  def specs(self) -> list[StageSpec]:
    b = {s.name: s for s in super().specs()}       # paper B's stages, reused as they are
    cell, run = self.CELL, ("size", "seed", "mixture", "layer")
    S = StageSpec
    return [b["slick"], b["mixtures"], b["sft"],
            S("sae", cell, self.stage_sae, self.build_sae, hosts=SHARED),
            S("latents", run, self.stage_latents, self.build_latents),
            S("steering", cell, self.stage_steering, self.build_steering),
            S("results", (), self.stage_results, self.build_results)]

  # ---- the SAE ------------------------------------------------------------------------------
  def hook_name(self, size: str, seed: int, layer: int = -1) -> str:
    """sae.hook_name, or the middle layer's resid_post; at a layer of the sweep, the same site
    at that layer."""
    name = self.c.sae.hook_name
    if not name:
      n = model_config(self.base_path(size, seed)).n_layers
      name = f"blocks.{n // 2}.hook_resid_post"
    if layer < 0:
      return name
    site, _ = parse_hook_name(name)
    return tl_hook_name(site, layer)

  def build_sae(self, out: str, size: str, seed: int, layer: int = -1) -> dict[str, Any]:
    if self.c.sae.path:
      sae = load_sae(self.c.sae.path, hook_name=self.c.sae.hook_name or None)
      if not sae.cfg.hook_name:
        raise StudyError(f"{self.c.sae.path}: the SAE names no hook; set sae.hook_name")
      if jax.process_index() == 0:     # a SHARED stage: every process runs this
        save_sae(sae, os.path.join(out, "sae"))
      return {"hook_name": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae, "loaded": self.c.sae.path}
    c = mutable(self.c.sae.train)
    c.model = self.base_path(size, seed)
    c.hook_name = self.hook_name(size, seed, layer)
    c.seed = seed
    if not self.c.facts:
      c.data.kind = "world"
      c.data.world_dir = self.source.world_dir
      c.data.tokenizer_dir = self.source.tok_dir
    res = train_sae(c, out, quiet=False, source="study.sae.train")   # writes out/sae
    last = res.evals[max(res.evals)] if res.evals else {}
    self.log(f"    SAE on {c.hook_name}: explained variance "
             f"{res.metrics.get('explained_variance', float('nan')):.3f}, L0 "
             f"{res.metrics.get('l0', float('nan')):.1f}, CE recovered "
             f"{last.get('ce_recovered', float('nan')):.3f}")
    return {"hook_name": c.hook_name, "explained_variance": res.metrics.get("explained_variance"),
            "l0": res.metrics.get("l0"), "ce_recovered": last.get("ce_recovered")}

  def sae(self, size: str, seed: int, layer: int = -1):
    return load_sae(os.path.join(self.sae_dir(size, seed, layer), "sae"))

  # ---- latents ------------------------------------------------------------------------------
  def build_latents(self, out: str, size: str, seed: int, mixture: str,
                    layer: int = -1) -> dict[str, Any]:
    sae = self.sae(size, seed, layer)
    site, at = sae_site(sae)
    _, prompts = self.prompts()
    tok = self.tokenizer(size)
    ckpts = self.checkpoints(size, seed, mixture)
    steps = valid_steps(ckpts)
    lat, act = [], []
    for step in steps:
      model = self.load(os.path.join(ckpts, str(step)))
      lat.append(M.latent_activations(model, tok, sae, prompts, self.c.morfi.positions))
      act.append(M.prompt_activations(model, tok, prompts, site, at, self.c.morfi.positions))
    with atomic_path(os.path.join(out, "latents.npz")) as tmp, open(tmp, "wb") as f:
      np.savez(f, steps=np.asarray(steps), latents=np.stack(lat).astype(np.float32),
               activations=np.stack(act).astype(np.float32))
    return {"checkpoints": len(steps), "prompts": len(prompts)}

  def latents(self, size: str, seed: int, mixture: str, layer: int = -1) -> dict[str, np.ndarray]:
    with np.load(os.path.join(self.latents_dir(size, seed, mixture, layer), "latents.npz")) as z:
      return {k: z[k] for k in z.files}

  # ---- the tests, the cloze check and the steering ----------------------------------------
  def build_steering(self, out: str, size: str, seed: int, layer: int = -1) -> dict[str, Any]:
    mc = self.c.morfi
    shares = self.shares()
    final = {name: self.latents(size, seed, name, layer) for name, _ in shares}
    top_name, low_name = shares[-1][0], shares[0][0]
    table, null = self._latent_tests(out, shares, final, seed)
    m0 = table[f"mean_{shares[0][1]:g}"].to_numpy()                 # [S]: M_0's, M_100's
    m100 = table[f"mean_{shares[-1][1]:g}"].to_numpy()              # mean activation

    sae = self.sae(size, seed, layer)
    site, at = sae_site(sae)
    facts, prompts = self.prompts()
    h_top = final[top_name]["activations"][-1]
    h_low = final[low_name]["activations"][-1]
    unit = float(np.linalg.norm(h_top, axis=-1).mean())          # mean ‖h‖ of M_100: rel_norm
    mono = ranked_monotonic(table)
    steered = [int(j) for j in mono.latent[:mc.top_latents]]
    own = latent_vectors(sae, h_top, steered, table.delta_m0_m100.to_numpy()[steered])
    comp = h_low.astype(np.float64).mean(0) - h_top.astype(np.float64).mean(0)
    pool = table[table.alive & ~table.monotonic & table.rho.notna()]
    rng = np.random.default_rng(seed)
    controls = pool.iloc[rng.permutation(len(pool))[:mc.n_random]]
    ctrl = latent_vectors(sae, h_top, controls.latent, np.where(controls.rho > 0, -1.0, 1.0))
    ctrl_norm = (np.linalg.norm(own, axis=-1).mean() if len(own) else np.linalg.norm(comp))
    ctrl = ctrl / np.maximum(np.linalg.norm(ctrl, axis=-1, keepdims=True), 1e-12) * ctrl_norm
    adds = [("none", -1, 0.0, np.zeros_like(comp, np.float32))]
    for a in mc.alphas:
      adds += [("latent", j, a, a * v) for j, v in zip(steered, own)]
      adds.append(("composite", -1, a, a * comp))
      adds += [("control", int(j), a, a * v) for j, v in zip(controls.latent, ctrl)]
    vectors = np.stack([v for *_, v in adds]).astype(np.float32)
    if sae.cfg.reshape_activations == "hook_z":
      vectors = vectors.reshape(len(vectors), -1, sae.cfg.d_head)
    tok = self.tokenizer(size)
    gen = {"max_new_tokens": mc.max_new_tokens, "batch_rows": mc.batch_rows}
    top_model = self.load(self._last_checkpoint(size, seed, top_name))
    answers = M.steered_answers(top_model, tok, prompts, vectors, site, at, **gen)
    dirs = [(kind, j, a, float(np.linalg.norm(v)) / unit) for kind, j, a, v in adds]
    # clamps: each steered latent alone, then every monotonic latent at once (error term kept)
    sets = [("clamp", j, [j]) for j in steered]
    if len(mono):
      sets.append(("clamp_all", -1, [int(j) for j in mono.latent]))
    for kind, j, js in sets:
      vals = np.stack([clamp_values(m100[js], m0[js] - m100[js], a) for a in mc.alphas])
      answers += M.clamped_answers(top_model, tok, prompts, sae, js, vals, site, at, **gen)
      dirs += [(kind, j, a, np.nan) for a in mc.alphas]
    low_model = self.load(self._last_checkpoint(size, seed, low_name))
    base = M.steered_answers(low_model, tok, prompts, vectors[:1], site, at, **gen)[0]
    right = np.array([[exact_match(a, f.answers) for a, f in zip(row, facts)]
                      for row in answers])
    right_low = np.array([exact_match(a, f.answers) for a, f in zip(base, facts)])
    rows = [{"kind": "M0", "latent": -1, "alpha": 0.0, "rel_norm": 0.0,
             **M.recovery(right_low, right[0], right_low)}]
    for (kind, j, a, norm), r in zip(dirs, right):
      rows.append({"kind": kind, "latent": j, "alpha": a, "rel_norm": norm,
                   **M.recovery(right_low, right[0], r)})
    steering = pd.DataFrame(rows)
    write_csv(steering, os.path.join(out, "steering.csv"))
    write_csv(pd.DataFrame({"item": [f.id for f in facts], "m0": base,
                            **{f"{k}:{j}:{a:g}": ans for (k, j, a, _), ans in zip(dirs, answers)}}),
              os.path.join(out, "answers.csv"))
    cloze = self._cloze(low_model, top_model, tok, facts, prompts, right_low, right[0])
    write_csv(cloze, os.path.join(out, "cloze.csv"))
    info = {"hook_name": sae.cfg.hook_name, "layer": at,
            "monotonic": int(table.monotonic.sum()), "alive": int(table.alive.sum()),
            "steered": steered, "controls": [int(j) for j in controls.latent],
            "clamped_all": len(mono), "rel_norm_unit": unit,
            "null_p": None if null is None else float(null.pvalue)}
    write_json(os.path.join(out, "info.json"), info)
    self.log(f"    {info['monotonic']} of {info['alive']} active latents monotonic in %Unknown"
             + ("" if null is None else f" (label-permutation null: mean "
                f"{null.null_distribution.mean():.1f}, p {null.pvalue:.3f})")
             + f"; M_100 accuracy {rows[1]['accuracy']:.2f}, M_0 {rows[0]['accuracy']:.2f}")
    return info

  def _latent_tests(self, out: str, shares, final, seed: int):
    """The monotonic test across mixtures (with each latent's own scale, delta_m0_m100) and
    across the 100%-Unknown run's epochs (latents.csv), and its label-permutation null
    (null.csv; None with morfi.permutations = 0)."""
    mc = self.c.morfi
    x = np.array([xv for _, xv in shares])
    acts = np.stack([final[name]["latents"][-1] for name, _ in shares], axis=1)   # [P, M, S]
    test = {"n_boot": mc.bootstrap, "confidence": mc.confidence, "mk_alpha": mc.mk_alpha,
            "min_activation": mc.min_activation}
    table = M.monotonic_latents(x, acts, seed=seed, **test)
    table["delta_m0_m100"] = table[f"mean_{x[0]:g}"] - table[f"mean_{x[-1]:g}"]
    table = table.join(self._epoch_test(final[shares[-1][0]], seed, test))
    write_csv(table, os.path.join(out, "latents.csv"))
    null = (label_permutation_null(x, acts, mc.permutations, seed=seed, **test)
            if mc.permutations else None)
    if null is not None and int(null.statistic) != int(table.monotonic.sum()):
      raise StudyError(f"the permutation null's observed count {null.statistic} is not the "
                       f"test's {int(table.monotonic.sum())}")
    write_csv(pd.DataFrame({"count": [] if null is None else null.null_distribution.astype(int)}),
              os.path.join(out, "null.csv"))
    return table, null

  def _epoch_test(self, run: dict[str, np.ndarray], seed: int, test: dict[str, Any]):
    """The monotonic test across the checkpoints (epochs) of one run: rho_epochs, its interval,
    mk_p_epochs, monotonic_epochs, direction_epochs per latent (NaN / False with < 3)."""
    steps, lat = run["steps"], run["latents"]                   # [E], [E, P, S]
    names = {"rho": "rho_epochs", "rho_low": "rho_epochs_low", "rho_high": "rho_epochs_high",
             "mk_p": "mk_p_epochs", "monotonic": "monotonic_epochs",
             "direction": "direction_epochs"}
    if len(steps) < 3:
      S = lat.shape[-1]
      return pd.DataFrame({"rho_epochs": np.nan, "rho_epochs_low": np.nan,
                           "rho_epochs_high": np.nan, "mk_p_epochs": np.nan,
                           "monotonic_epochs": False, "direction_epochs": ""}, index=range(S))
    t = M.monotonic_latents(steps, lat.transpose(1, 0, 2), seed=seed, **test)
    return t[list(names)].rename(columns=names)

  def _cloze(self, low_model, top_model, tok, facts, prompts, qa_m0, qa_m100) -> pd.DataFrame:
    """Per test fact, M_0's and M_100's log p(true) and ΔLL (true against counterfactual; NaN
    without one) on its cloze prompt (`prompt`: "cloze"), or on its QA prompt where it has
    none ("question"), beside their closed-book exact match."""
    rows = [(f.prompt or p, "cloze" if f.prompt else "question", f.answers[0],
             f.counterfactual) for f, p in zip(facts, prompts)]
    out = pd.DataFrame({"item": [f.id for f in facts], "prompt": [r[1] for r in rows],
                        "qa_m0": qa_m0, "qa_m100": qa_m100})
    cf = [i for i, r in enumerate(rows) if r[3]]
    texts = [r[0] for r in rows] + [rows[i][0] for i in cf]
    answers = [r[2] for r in rows] + [rows[i][3] for i in cf]
    for name, model in (("m0", low_model), ("m100", top_model)):
      lp = score(model, tok, texts, answers, self.c.probe.batch_size)
      out[f"logp_true_{name}"] = lp[:len(rows)]
      dll = np.full(len(rows), np.nan)
      dll[cf] = lp[cf] - lp[len(rows):]
      out[f"dll_{name}"] = dll
    return out[["item", "prompt", "dll_m0", "dll_m100", "logp_true_m0", "logp_true_m100",
                "qa_m0", "qa_m100"]]

  def _last_checkpoint(self, size: str, seed: int, mixture: str) -> str:
    d = self.checkpoints(size, seed, mixture)
    steps = valid_steps(d)
    if not steps:
      raise StudyError(f"{d}: no checkpoints")
    return os.path.join(d, str(steps[-1]))

  # ---- results ------------------------------------------------------------------------------
  def build_results(self, out: str) -> dict[str, int]:
    return {name: len(df) for name, df in self.results(out).items()}

  def results(self, out: str | None = None) -> dict[str, pd.DataFrame]:
    """The results tables (`results.py`) from the steering stages' outputs, written to `out`
    (default results/)."""
    parts = []
    for cell in self.cells(self.CELL):
      d = self.steering_dir(**cell)
      with open(os.path.join(d, "info.json")) as f:
        info = json.load(f)
      null_p = info.get("null_p")
      parts.append(cell_tables(
          dict(cell, layer=info["layer"]), pd.read_csv(os.path.join(d, "latents.csv")),
          pd.read_csv(os.path.join(d, "steering.csv")),
          {x: self.latents(**cell, mixture=name)["latents"][-1] for name, x in self.shares()},
          self.c.morfi.top_latents, cloze=pd.read_csv(os.path.join(d, "cloze.csv")),
          null_counts=pd.read_csv(os.path.join(d, "null.csv"))["count"].to_numpy(),
          null_p=np.nan if null_p is None else null_p, tau=self.c.tau))
    tables = {name: pd.concat([p[name] for p in parts], ignore_index=True)
              for name in COLUMNS}
    tables["cloze"] = tables["cloze"].drop_duplicates(["size", "seed"], ignore_index=True)
    out_dir = out or os.path.join(self.wd, "results")
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables
