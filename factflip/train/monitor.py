"""The factual-integrity monitor: a watch list of facts scored on the live parameters of a
running training job every k steps, with alert rules as data.

Owns: the rule grammar (`parse_rule`), `Monitor` (the watch list laid out once, scored by the
evals layer's teacher-forced scorer on the train state's parameters — no checkpoint written or
read —, rules fired once per prompt, `alerts.jsonl`, the reference values, stop rules) and
`read_alerts`.
Must not: train, or decide when it runs (the loop calls `observe` every `monitor.every` steps).

What is watched: the facts of `monitor.watch` (any `load_facts` file: set "watch") and of
`monitor.controls` (set "control": facts the training should leave alone, so their alerts are
false alarms), each with the prompts of `monitor.kinds` (the training prompt and held-out ones:
`probes.fact_preference.prompt_rows`). Per prompt, ΔLL = log p(true) − log p(counterfactual)
at the output and, when a lens_sign rule reads it, by the logit lens at every layer boundary
(0 = embeddings ... L = output), computed together by one compiled program per shape bucket
(`evals.loglik.score_layout`).

Rules (`monitor.rules`, strings NAME:ARG[@KIND[+KIND...]][!]), compared with the reference —
the values at the first observation of the run (step 0; kept in monitor/reference.npz so a
resumed run compares with the same start; a run that turns the monitor on when it resumes takes
its reference there):
  dll_drop:δ     output ΔLL fell by more than δ nats below the reference
  lens_sign:ℓ    the logit-lens ΔLL at layer boundary ℓ (negative: from the output, −1 = the
                 output, −2 = the residual stream before the last block) was > 0 at the
                 reference and is < 0 now
  flip:τ         the output flipped: ΔLL > τ at the reference and < −τ now (SCIENCE.md A)
  @KIND          only prompts of these kinds (default: every kind watched)
  !              stop training when the rule fires (checkpoint saved; a re-run stays stopped
                 while the rule is still a stop rule)
A rule fires once per prompt, at the first observation where it holds. alerts.jsonl: one JSON
object per alert {step, rule, set, item, kind, variant, value, reference, stop}; a resumed run
drops alerts past the step it resumes from, as metrics.jsonl does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from factflip import distributed
from factflip.configfile import ConfigError
from factflip.data.loaders import load_facts
from factflip.data.tokenizer import TokenIds
from factflip.evals.loglik import layout_pairs, score_layout
from factflip.evals.requests import answer_ids
from factflip.fileio import DataError, atomic_path
from factflip.probes.fact_preference import KINDS, flipped, prompt_rows
from factflip.train.callbacks import Callback

RULES = ("dll_drop", "lens_sign", "flip")
SETS = ("watch", "control")


@dataclasses.dataclass(frozen=True)
class Rule:
  text: str                     # as written in the config
  name: str                     # dll_drop | lens_sign | flip
  arg: float                    # δ, ℓ or τ
  kinds: tuple[str, ...]        # () = every kind watched
  stop: bool


def parse_rule(text: str, source: str = "config", key: str = "monitor.rules") -> Rule:
  """A Rule from NAME:ARG[@KIND[+KIND...]][!]; ConfigError naming the rule otherwise."""
  grammar = "NAME:ARG[@KIND[+KIND...]][!] with NAME one of " + ", ".join(RULES)
  body, stop = (text[:-1], True) if text.endswith("!") else (text, False)
  body, _, kinds = body.partition("@")
  name, sep, arg = body.partition(":")
  if not sep or name not in RULES:
    raise ConfigError(source, key, f"rule {text!r}; expected {grammar}")
  try:
    value = int(arg) if name == "lens_sign" else float(arg)
  except ValueError:
    raise ConfigError(source, key, f"rule {text!r}: {arg!r} is not "
                      + ("an integer layer" if name == "lens_sign" else "a number")) from None
  if name != "lens_sign" and value < 0:
    raise ConfigError(source, key, f"rule {text!r}: expected a threshold >= 0 nats")
  kinds_t = tuple(k for k in kinds.split("+") if k) if kinds else ()
  bad = [k for k in kinds_t if k not in KINDS]
  if bad or (kinds and not kinds_t):
    raise ConfigError(source, key, f"rule {text!r}: prompt kinds {bad or kinds!r}; expected "
                      f"some of {KINDS}")
  return Rule(text, name, float(value), kinds_t, stop)


def read_alerts(path: str) -> list[dict[str, Any]]:
  """The alerts of alerts.jsonl (a line cut off by a crash is skipped)."""
  out = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return out


class Monitor(Callback):
  """Built by the training loop from its resolved config (`monitor.*` keys), tokenizer, model
  config and workdir (every check before anything runs), `start(step)` takes up the run;
  `observe(step, params)` scores the watch list, fires the rules and
  returns scalars for metrics.jsonl / TensorBoard / the progress line; `stop` names the stop
  rule that fired (None while training may go on)."""

  def __init__(self, c, tokenizer, cfg, workdir: str):
    m = c.monitor
    self.every = int(m.every)
    self.cfg = cfg
    self.rules = [parse_rule(r) for r in m.rules]
    n_bounds = cfg.n_layers + 1
    for r in self.rules:
      if r.name == "lens_sign" and not -n_bounds <= r.arg < n_bounds:
        raise ConfigError("config", "monitor.rules",
                          f"rule {r.text!r}: layer {int(r.arg)} is outside the model's layer "
                          f"boundaries 0 .. {cfg.n_layers} (or -1 .. -{n_bounds})")
    rows = []
    for set_, key in zip(SETS, ("watch", "controls")):
      if m[key]:
        try:
          facts = load_facts(m[key])
        except DataError as e:
          raise ConfigError("config", f"monitor.{key}", f"{e}; expected a facts file (any "
                            "`factflip facts` format)") from None
        rows += [dict(r, set=set_) for r in prompt_rows(facts, tuple(m.kinds))]
    if not any(r["set"] == "watch" for r in rows):
      raise ConfigError("config", "monitor.watch",
                        f"{m.watch}: no fact with an answer and a counterfactual for the "
                        f"prompt kinds {list(m.kinds)}; nothing to watch")
    self.rows = rows
    enc = TokenIds(tokenizer)
    pairs = [answer_ids(enc, r["prompt"], a, f"{r['set']} {r['item']} {r['kind']}")
             for r in rows for a in (r["true"], r["cf"])]
    self.layout = layout_pairs(cfg, pairs, int(m.batch_size), exact=True)
    self.set_N = np.asarray([r["set"] for r in rows])
    self.kind_N = np.asarray([r["kind"] for r in rows])
    # the lens is computed only when a rule reads it (the output alone is ~2x cheaper)
    self.lens = any(r.name == "lens_sign" for r in self.rules)
    ident = json.dumps([[r[k] for k in ("set", "item", "kind", "variant", "prompt", "true",
                                          "cf")] for r in rows])
    self.ident = hashlib.sha256(ident.encode()).hexdigest()[:16]
    self.dir = os.path.join(workdir, "monitor")
    self.alerts_path = os.path.join(workdir, "alerts.jsonl")
    self.main = distributed.process_index() == 0
    self.ref_LxN, self.file, self.stop = None, None, None

  def start(self, start_step: int, params) -> dict[str, float] | None:
    """Take up the run at `start_step`: the reference, and the alerts up to that step (later
    ones, from a run that went further before it stopped, are dropped). Without a reference
    yet (a run's first start) the starting model is observed: it becomes the reference, and
    its scalars are returned for the log."""
    rows = self.rows
    self.ref_LxN = self._read_reference() if start_step > 0 else None
    kept = [a for a in read_alerts(self.alerts_path) if a["step"] <= start_step]
    if self.main:
      os.makedirs(self.dir, exist_ok=True)
      with atomic_path(self.alerts_path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(a) + "\n" for a in kept)
    index = {(r["set"], r["item"], r["kind"], r["variant"]): n for n, r in enumerate(rows)}
    by_text = {r.text: i for i, r in enumerate(self.rules)}
    self.fired = np.zeros((len(self.rules), len(rows)), bool)
    self.counts = {s: 0 for s in SETS}
    self.stop = None
    for a in kept:
      i, n = by_text.get(a["rule"]), index.get((a["set"], a["item"], a["kind"], a["variant"]))
      if i is not None and n is not None:
        self.fired[i, n] = True
        self.counts[a["set"]] += 1
        if self.rules[i].stop:
          self.stop = self.stop or f"{a['rule']} ({a['set']} {a['item']} {a['kind']}) at step " \
                                   f"{a['step']}"
    self.file = open(self.alerts_path, "a") if self.main else None
    return self.observe(start_step, params) if self.ref_LxN is None else None

  # ---- the reference ----------------------------------------------------------------------
  def _read_reference(self):
    path = os.path.join(self.dir, "reference.npz")
    if not os.path.exists(path):
      return None
    with np.load(path) as z:
      if str(z["ident"]) != self.ident:
        raise ConfigError("config", "monitor.watch",
                          f"{path} was taken on another watch list (its facts or prompt "
                          "kinds changed); start a new workdir or delete monitor/")
      dll_LxN = z["dll_LxN"]
    if not self.lens:
      return dll_LxN[-1:]              # the output row serves a monitor without lens rules
    if len(dll_LxN) == 1:
      raise ConfigError("config", "monitor.rules",
                        f"{path} holds the output ΔLL only (taken with no lens_sign rule); a "
                        "lens_sign rule needs the lens at the reference step: start a new "
                        "workdir or delete monitor/")
    return dll_LxN

  def _write_reference(self, step: int, dll_LxN: np.ndarray) -> None:
    if self.main:
      path = os.path.join(self.dir, "reference.npz")
      with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, dll_LxN=dll_LxN, step=step, ident=self.ident)

  # ---- observing --------------------------------------------------------------------------
  def due(self, step: int, last: int) -> bool:
    """Whether the loop observes after `step` (every `every` steps and at the run's last)."""
    return step % self.every == 0 or step == last

  def values(self, params) -> np.ndarray:
    """ΔLL of every watched prompt on these parameters: [L + 1, N] by the logit lens at every
    layer boundary (row L = the output) when a rule reads the lens, else [1, N] (the output)."""
    scores = score_layout(params, self.cfg, self.layout, lens=self.lens)
    lp_LxP = scores.lens if self.lens else scores.logprob[None]
    return (lp_LxP[:, 0::2] - lp_LxP[:, 1::2]).astype(np.float32)

  def observe(self, step: int, params) -> dict[str, float]:
    """Score the watch list, fire the rules, append their alerts; scalars for the logs."""
    dll_LxN = self.values(params)
    if self.ref_LxN is None:
      self.ref_LxN = dll_LxN
      self._write_reference(step, dll_LxN)
    ref_LxN, out_N, ref_N = self.ref_LxN, dll_LxN[-1], self.ref_LxN[-1]
    for i, rule in enumerate(self.rules):
      if rule.name == "dll_drop":
        hold_N, val_N, base_N = ref_N - out_N > rule.arg, out_N, ref_N
      elif rule.name == "flip":
        hold_N, val_N, base_N = flipped(ref_N, out_N, rule.arg), out_N, ref_N
      else:
        layer = int(rule.arg)
        val_N, base_N = dll_LxN[layer], ref_LxN[layer]
        hold_N = flipped(base_N, val_N, 0.0)          # the lens's sign flips (τ = 0)
      if rule.kinds:
        hold_N = hold_N & np.isin(self.kind_N, rule.kinds)
      new_N = hold_N & ~self.fired[i]
      self.fired[i] |= new_N
      for n in np.flatnonzero(new_N):
        r = self.rows[n]
        self.counts[r["set"]] += 1
        self._append({"step": int(step), "rule": rule.text, "set": r["set"], "item": r["item"],
                      "kind": r["kind"], "variant": r["variant"], "value": float(val_N[n]),
                      "reference": float(base_N[n]), "stop": rule.stop})
        if rule.stop and self.stop is None:
          self.stop = f"{rule.text} ({r['set']} {r['item']} {r['kind']}) at step {step}"
    out = {f"monitor/alerts_{s}": float(self.counts[s]) for s in SETS
           if (self.set_N == s).any()}
    for s in SETS:
      sel = self.set_N == s
      if sel.any():
        out[f"monitor/dll_{s}"] = float(out_N[sel].mean())
    return out

  def _append(self, alert: dict[str, Any]) -> None:
    if self.file is not None:
      self.file.write(json.dumps(alert) + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None


def validate(c, source: str, need) -> None:
  """The monitor keys of a training config (`need(ok, key, message)` raises)."""
  m = c.monitor
  need(m.every >= 0, "monitor.every", f"{m.every}; expected >= 0 steps (0 = off)")
  if not m.every:
    return
  need(bool(m.watch), "monitor.watch", "empty with monitor.every > 0; expected a facts file "
       "(any `factflip facts` format) to watch")
  kinds: Sequence[str] = list(m.kinds)
  need(bool(kinds) and all(k in KINDS for k in kinds), "monitor.kinds",
       f"{kinds}; expected a non-empty list of {list(KINDS)}")
  need(m.batch_size >= 1, "monitor.batch_size", f"{m.batch_size}; expected >= 1")
  for r in m.rules:
    parse_rule(r, source)
