"""Paper C's study: MoRFI — SAE latents that move monotonically with the share of Unknown facts in
the fine-tuning set, and steering along them to recover knowledge (SCIENCE.md C).

Owns: paper C's stages on top of paper B's (this Study subclasses `new_knowledge.Study`: the
SliCK categories, the %Unknown mixtures and one SFT run per mixture are B's stages, reused):
the SAE of the base model's site (trained here with `sae.train`, or loaded with `load_sae`), the
latents of every checkpoint of every mixture on held-out QA prompts, the monotonic-latent test and
steering of the 100%-Unknown model, then the results tables.
Must not: train, categorise, encode or steer itself (`sae`, `probes.morfi`, B's stages), or plot
(`report.py`); its results tables are `results.py`'s.

Workdir layout (B's layout up to the SFT runs, then):
  runs/<size>/seed<k>/sae/sae/            the SAE (SAELens layout); beside it the SAE's training
                                          run (checkpoints/, metrics.jsonl) when trained here
  runs/<size>/seed<k>/latents/<m>/latents.npz   per checkpoint step: latents [steps, P, d_sae]
                                          and the site's activations [steps, P, d_in] of the P
                                          held-out prompts
  runs/<size>/seed<k>/steering/           latents.csv (the test, per latent), steering.csv
                                          (accuracy per direction and α), answers.csv
  results/<table>.csv                     `results.COLUMNS`

Definitions: `probes.morfi`. The models compared are each mixture's last checkpoint (SFT to the
epoch cap); the trend across epochs is the 100%-Unknown run's checkpoints. Held-out prompts:
the in-distribution test facts' questions ("Q: <question>\\nA:", zero-shot). M_0 / M_100: the
last checkpoints of the lowest- and highest-share mixtures.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import jax
import numpy as np
import pandas as pd

from factflip.evals.qa import exact_match, few_shot_prompt
from factflip.fileio import atomic_path, write_csv, write_json
from factflip.models.store import model_config, valid_steps
from factflip.probes import morfi as M
from factflip.sae.formats import load_sae, save_sae
from factflip.sae.steering import sae_site
from factflip.sae.train import train_sae
from factflip.studies.morfi.results import COLUMNS, cell_tables, ranked_monotonic
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
  def sae_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "sae")

  def latents_dir(self, size: str, seed: int, mixture: str) -> str:
    return os.path.join(self.run_dir(size, seed, "latents"), mixture)

  def steering_dir(self, size: str, seed: int) -> str:
    return self.run_dir(size, seed, "steering")

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
  def stage_sae(self, size: str, seed: int) -> Stage:
    keys = self.keys("sae", seed=seed) if not self.c.sae.path else self.keys(
        "sae.path", "sae.hook_name", seed=seed, sae_files=file_stamp(self.c.sae.path))
    return Stage(f"sae {size} seed{seed}", self.sae_dir(size, seed), keys,
                 (self.source.base_stage(size, seed).fp,))

  @memo
  def stage_latents(self, size: str, seed: int, mixture: str) -> Stage:
    return Stage(f"latents {size} seed{seed} {mixture}", self.latents_dir(size, seed, mixture),
                 self.keys("morfi.positions", "probe.dtype", *self._fact_keys()),
                 (self.stage_sae(size, seed).fp, self.stage_sft(size, seed, mixture).fp))

  @memo
  def stage_steering(self, size: str, seed: int) -> Stage:
    ups = [self.stage_latents(size, seed, m).fp for m in mixture_names(self.c)]
    return Stage(f"steering {size} seed{seed}", self.steering_dir(size, seed),
                 self.keys("morfi", "probe.dtype", seed=seed), tuple(ups))

  @memo
  def stage_results(self) -> Stage:
    ups = [self.stage_steering(**cell).fp for cell in self.cells()]
    return Stage("results", os.path.join(self.wd, "results"),
                 self.keys("seeds", sizes=list(self.sizes)), tuple(ups))

  def specs(self) -> list[StageSpec]:
    b = {s.name: s for s in super().specs()}       # paper B's stages, reused as they are
    cell, run = ("size", "seed"), ("size", "seed", "mixture")
    S = StageSpec
    return [b["slick"], b["mixtures"], b["sft"],
            S("sae", cell, self.stage_sae, self.build_sae, hosts=SHARED),
            S("latents", run, self.stage_latents, self.build_latents),
            S("steering", cell, self.stage_steering, self.build_steering),
            S("results", (), self.stage_results, self.build_results)]

  # ---- the SAE ------------------------------------------------------------------------------
  def hook_name(self, size: str, seed: int) -> str:
    if self.c.sae.hook_name:
      return self.c.sae.hook_name
    n = model_config(self.base_path(size, seed)).n_layers
    return f"blocks.{n // 2}.hook_resid_post"

  def build_sae(self, out: str, size: str, seed: int) -> dict[str, Any]:
    if self.c.sae.path:
      sae = load_sae(self.c.sae.path, hook_name=self.c.sae.hook_name or None)
      if not sae.cfg.hook_name:
        raise StudyError(f"{self.c.sae.path}: the SAE names no hook; set sae.hook_name")
      if jax.process_index() == 0:     # a SHARED stage: every process runs this
        save_sae(sae, os.path.join(out, "sae"))
      return {"hook_name": sae.cfg.hook_name, "d_sae": sae.cfg.d_sae, "loaded": self.c.sae.path}
    c = mutable(self.c.sae.train)
    c.model = self.base_path(size, seed)
    c.hook_name = self.hook_name(size, seed)
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

  def sae(self, size: str, seed: int):
    return load_sae(os.path.join(self.sae_dir(size, seed), "sae"))

  # ---- latents ------------------------------------------------------------------------------
  def build_latents(self, out: str, size: str, seed: int, mixture: str) -> dict[str, Any]:
    sae = self.sae(size, seed)
    site, layer = sae_site(sae)
    _, prompts = self.prompts()
    tok = self.tokenizer(size)
    ckpts = self.checkpoints(size, seed, mixture)
    steps = valid_steps(ckpts)
    lat, act = [], []
    for step in steps:
      model = self.load(os.path.join(ckpts, str(step)))
      lat.append(M.latent_activations(model, tok, sae, prompts, self.c.morfi.positions))
      act.append(M.prompt_activations(model, tok, prompts, site, layer, self.c.morfi.positions))
    with atomic_path(os.path.join(out, "latents.npz")) as tmp, open(tmp, "wb") as f:
      np.savez(f, steps=np.asarray(steps), latents=np.stack(lat).astype(np.float32),
               activations=np.stack(act).astype(np.float32))
    return {"checkpoints": len(steps), "prompts": len(prompts)}

  def latents(self, size: str, seed: int, mixture: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(self.latents_dir(size, seed, mixture), "latents.npz")) as z:
      return {k: z[k] for k in z.files}

  # ---- the test and the steering ------------------------------------------------------------
  def build_steering(self, out: str, size: str, seed: int) -> dict[str, Any]:
    mc = self.c.morfi
    shares = self.shares()
    final = {name: self.latents(size, seed, name) for name, _ in shares}
    x = np.array([xv for _, xv in shares])
    acts = np.stack([final[name]["latents"][-1] for name, _ in shares], axis=1)   # [P, M, S]
    table = M.monotonic_latents(x, acts, n_boot=mc.bootstrap, confidence=mc.confidence,
                              mk_alpha=mc.mk_alpha, seed=seed, min_activation=mc.min_activation)
    top_name, low_name = shares[-1][0], shares[0][0]
    epochs = final[top_name]["latents"].mean(1)                    # [steps, S]: M_100's epochs
    if len(epochs) >= 3:
      table["rho_epochs"] = M.spearman_rows(np.arange(len(epochs)), epochs.T)
      table["mk_p_epochs"] = M.mann_kendall(epochs.T)["p"]
    else:
      table["rho_epochs"] = table["mk_p_epochs"] = np.nan
    write_csv(table, os.path.join(out, "latents.csv"))

    sae = self.sae(size, seed)
    site, layer = sae_site(sae)
    facts, prompts = self.prompts()
    h_top = final[top_name]["activations"][-1]
    h_low = final[low_name]["activations"][-1]
    unit = float(np.linalg.norm(h_top, axis=-1).mean())          # α's unit: mean ‖h‖ of M_100
    W = np.asarray(sae.W_dec, np.float32).reshape(sae.cfg.d_sae, -1)
    W = W / np.maximum(np.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
    mono = ranked_monotonic(table)
    chosen = [("latent", int(j), -1.0 if r > 0 else 1.0)
              for j, r in zip(mono.latent[:mc.top_latents], mono.rho[:mc.top_latents])]
    pool = table[table.alive & ~table.monotonic & table.rho.notna()]
    rng = np.random.default_rng(seed)
    controls = pool.iloc[rng.permutation(len(pool))[:mc.n_random]]
    chosen += [("control", int(j), -1.0 if r > 0 else 1.0)
               for j, r in zip(controls.latent, controls.rho)]
    dirs = [("none", -1, np.zeros(W.shape[1], np.float32), 0.0)]
    comp = M.composite_direction(h_low, h_top)
    for a in mc.alphas:
      dirs += [(kind, j, sign * W[j], a) for kind, j, sign in chosen]
      dirs.append(("composite", -1, comp, a))
    vectors = np.stack([v * a * unit for _, _, v, a in dirs])
    if sae.cfg.reshape_activations == "hook_z":
      vectors = vectors.reshape(len(vectors), -1, sae.cfg.d_head)
    tok = self.tokenizer(size)
    top_model = self.load(self._last_checkpoint(size, seed, top_name))
    answers = M.steered_answers(top_model, tok, prompts, vectors, site, layer,
                              max_new_tokens=mc.max_new_tokens, batch_rows=mc.batch_rows)
    low_model = self.load(self._last_checkpoint(size, seed, low_name))
    base = M.steered_answers(low_model, tok, prompts, vectors[:1], site, layer,
                           max_new_tokens=mc.max_new_tokens, batch_rows=mc.batch_rows)[0]
    right = np.array([[exact_match(a, f.answers) for a, f in zip(row, facts)]
                      for row in answers])
    right_low = np.array([exact_match(a, f.answers) for a, f in zip(base, facts)])
    rows = [{"kind": "M0", "latent": -1, "alpha": 0.0, **M.recovery(right_low, right[0],
                                                                   right_low)}]
    for (kind, j, _, a), r in zip(dirs, right):
      rows.append({"kind": kind, "latent": j, "alpha": a, **M.recovery(right_low, right[0], r)})
    steering = pd.DataFrame(rows)
    write_csv(steering, os.path.join(out, "steering.csv"))
    write_csv(pd.DataFrame({"item": [f.id for f in facts], "m0": base,
                            **{f"{k}:{j}:{a:g}": ans for (k, j, _, a), ans in zip(dirs, answers)}}),
              os.path.join(out, "answers.csv"))
    info = {"monotonic": int(table.monotonic.sum()), "alive": int(table.alive.sum()),
            "steered": [j for _, j, _ in chosen], "alpha_unit": unit}
    write_json(os.path.join(out, "info.json"), info)
    self.log(f"    {info['monotonic']} of {info['alive']} active latents monotonic in %Unknown; "
             f"M_100 accuracy {rows[1]['accuracy']:.2f}, M_0 {rows[0]['accuracy']:.2f}")
    return info

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
    for cell in self.cells():
      d = self.steering_dir(**cell)
      parts.append(cell_tables(
          cell, pd.read_csv(os.path.join(d, "latents.csv")),
          pd.read_csv(os.path.join(d, "steering.csv")),
          {x: self.latents(**cell, mixture=name)["latents"][-1] for name, x in self.shares()},
          self.c.morfi.top_latents))
    tables = {name: pd.concat([p[name] for p in parts], ignore_index=True)
              for name in COLUMNS}
    out_dir = out or os.path.join(self.wd, "results")
    for name, df in tables.items():
      write_csv(df, os.path.join(out_dir, f"{name}.csv"))
    return tables
