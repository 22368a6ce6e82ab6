"""The training loop: one function for pretraining, continual pretraining, SFT and unlearning,
on one CPU, a GPU node or a TPU pod.

Owns: `train(config, workdir)` — resolve and write the config, build the mesh, the model (random
init or a base model: a factflip/HF directory or another training workdir), the optimizer, the
sharded train state and the input shards; restore the newest valid checkpoint; run the jitted
step; log; evaluate; run the factual-integrity monitor every `monitor.every` steps (and stop
where a stop rule fires); checkpoint; save and stop cleanly on SIGTERM.
Must not: define objectives, optimizers, data mixtures or file formats (it composes them).

The host never waits on the device between steps: step t's metrics are read after step t+1 is
dispatched, and held-out losses are read when their step's row is written.

Workdir: config.json (the resolved config), model.json (the ModelConfig), data_stats.json,
metrics.jsonl, tensorboard/, checkpoints/<step>/ (see `checkpoint.py`); with the monitor on
(`monitor.every`), alerts.jsonl and monitor/reference.npz (see `monitor.py`). Step 0 (the
starting model) is checkpointed too, so studies can probe the base.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from factflip import sharding as sharding_lib
from factflip.configfile import load_config_file  # noqa: F401  (re-exported: its old home)
from factflip.data.tokenizer import has_tokenizer
from factflip.fileio import read_json, write_json
from factflip.models.config import ModelConfig, get_preset
from factflip.models.store import load_model
from factflip.models.transformer import init_params
from factflip.train import config as config_lib
from factflip.train import inputs, objectives
from factflip.train.callbacks import AtEvals, Callback
from factflip.train.checkpoint import Checkpointer, load_trained, valid_steps
from factflip.train.metrics import MetricsWriter, Progress, format_duration
from factflip.train.monitor import Monitor
from factflip.train.optim import make_optimizer, make_schedule
from factflip.train.step import (
  abstract_state,
  batch_sharding,
  init_state,
  make_train_step,
  state_shardings,
)


@dataclasses.dataclass
class TrainResult:
  workdir: str
  start_step: int                 # the step this invocation started from (0, or a restore)
  step: int                       # the last completed step
  losses: dict[int, float]        # loss of every step this invocation ran
  evals: dict[int, dict[str, float]]
  preempted: bool
  seconds: float
  model_config: ModelConfig
  stopped_by: str | None = None   # why a callback (the monitor's stop rule) ended the run early


# ---- configuration ------------------------------------------------------------------------------
def _is_train_workdir(path: str) -> bool:
  return os.path.exists(os.path.join(path, "config.json")) and os.path.exists(
      os.path.join(path, "model.json"))


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy with every default filled in: paths made absolute, the world and tokenizer of a
  base training workdir inherited, data.shards and optim.total_steps made explicit."""
  c = ml_collections.ConfigDict(config.to_dict())
  workdir = os.path.abspath(workdir)
  base = os.path.abspath(c.model.init_from) if c.model.init_from else ""
  c.model.init_from = base
  base_cfg = read_json(os.path.join(base, "config.json")) if base and _is_train_workdir(
      base) else None
  world_kind = config_lib.uses_world(c)
  if not c.data.world_dir and world_kind:
    c.data.world_dir = (base_cfg["data"]["world_dir"] if base_cfg and base_cfg["data"]["world_dir"]
                        else os.path.join(workdir, "world"))
  if not c.data.tokenizer_dir:
    if base_cfg:
      c.data.tokenizer_dir = base_cfg["data"]["tokenizer_dir"]
    elif base and has_tokenizer(base):   # an HF directory with tokenizer.json, or a GGUF file
      c.data.tokenizer_dir = base
    elif world_kind:
      c.data.tokenizer_dir = os.path.join(workdir, "tokenizer")
    else:
      raise config_lib.ConfigError("config", "data.tokenizer_dir",
                                   "empty, and model.init_from has no tokenizer.json (and is "
                                   "no GGUF file) to use")
  for k in ("world_dir", "tokenizer_dir", "path", "retain_path", "eval_path", "facts_path",
            "replay_path"):
    if c.data[k]:
      c.data[k] = os.path.abspath(c.data[k])
  for k in ("watch", "controls"):
    if c.monitor[k]:
      c.monitor[k] = os.path.abspath(c.monitor[k])
  c.data.shards = c.data.shards or jax.process_count()
  c.optim.total_steps = config_lib.total_steps(c)
  return c


def _objective(c) -> objectives.Objective:
  name = c.objective.name
  if name == "lm":
    return objectives.lm_objective()
  retain = bool(c.data.retain_path)
  if name == "sft":
    return objectives.sft_objective(c.objective.retain_weight, retain)
  if name == "gradient_ascent":
    return objectives.gradient_ascent_objective(c.objective.retain_weight, retain)
  if name == "dpo":
    return objectives.dpo_objective(c.objective.dpo_beta, c.objective.retain_weight, retain)
  return objectives.npo_objective(c.objective.npo_beta, c.objective.retain_weight,
                                  _max_segments(c), retain)


def _max_segments(c) -> int:
  return 1 if c.data.packing == "pad" else c.data.seq_len


# ---- the model ----------------------------------------------------------------------------------
def _base_model(c, tok, mesh) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params or None): the preset for a random init (with the tokenizer's BOS,
  EOS and pad ids, so generation stops where training ended an example), or a base model's
  params placed in their shardings."""
  over = config_lib.model_overrides(c)
  path = c.model.init_from
  vocab_size = len(tok)
  if not path:
    special = {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
               "eos_token_ids": () if tok.eos_token_id is None else (tok.eos_token_id,)}
    return get_preset(c.model.preset, vocab_size=vocab_size, **special, **over), None
  if _is_train_workdir(path):
    model, step = load_trained(path, c.model.init_step, mesh, dtype=c.model.param_dtype)
    if jax.process_index() == 0:
      print(f"base model: {path} step {step}", flush=True)
  else:
    model = load_model(path, dtype=c.model.param_dtype, mesh=mesh)
  mcfg, params = model.cfg.replace(**over), model.params()
  if mcfg.vocab_size < vocab_size:
    raise config_lib.ConfigError("config", "model.init_from",
                                 f"{path} has vocab_size {mcfg.vocab_size} but the tokenizer "
                                 f"{c.data.tokenizer_dir} has {vocab_size} tokens")
  return mcfg, params


# ---- preemption ---------------------------------------------------------------------------------
class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and returns. With several
  processes, JAX's preemption sync point makes every process stop at the same step."""

  def __init__(self):
    self.flag = False
    self.old = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self.old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service not running
        return False
    return self.flag

  def restore(self):
    if self.old is not None:
      signal.signal(signal.SIGTERM, self.old)


# ---- the loop -----------------------------------------------------------------------------------
def _to_global(tree, sharding):
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def _tokens(batch) -> int:
  """Token slots in a (possibly nested: forget/retain) batch."""
  return int(sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(batch)
                 if path[-1].key == "inputs"))


def train(config: ml_collections.ConfigDict, workdir: str, *,
          callbacks: Sequence[Callback | Callable] = (), source: str = "config",
          stop_after: int | None = None, quiet: bool = False) -> TrainResult:
  """Run (or resume) the training job `config` in `workdir` until config.steps.

  callbacks: `Callback`s, or functions (step, params) -> scalars run at every evaluation step
  (`AtEvals`); with `monitor.every` the factual-integrity monitor is one more. stop_after:
  return after that many steps of this invocation (tests; a checkpoint is saved first).
  Returns what ran; everything else is in the workdir."""
  t_start = time.time()
  config_lib.validate(config, source=source, n_devices=jax.device_count(),
                      n_processes=jax.process_count())
  c = resolve(config, workdir)
  workdir = os.path.abspath(workdir)
  say = (lambda *a: None) if quiet or jax.process_index() else functools.partial(print, flush=True)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), c.to_dict())

  mesh = sharding_lib.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  world = None
  if config_lib.uses_world(c):
    world, tok = inputs.prepare_world(c.data.world_dir, c.data.tokenizer_dir, c.data.world_seed,
                                      c.data.vocab_size, c.data.world_people,
                                      c.data.world_questions)
  else:
    from factflip.data.tokenizer import load_tokenizer
    tok = load_tokenizer(c.data.tokenizer_dir)
  mcfg, base_params = _base_model(c, tok, mesh)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "model.json"), mcfg.to_dict())

  tx = make_optimizer(config_lib.optim_config(c))
  schedule = make_schedule(config_lib.optim_config(c))
  shardings = state_shardings(mcfg, tx, mesh)
  key = jax.random.key(c.seed)
  streams, stats = inputs.sources(c, world)
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, "data_stats.json"), stats)
  bcfg = config_lib.batch_config(c, c.data.shards)
  data = inputs.ShardedBatches(streams, tok, bcfg, c.data.shards, c.accum_steps)
  eval_name, eval_ex = inputs.eval_examples(c, world)
  eval_data = (inputs.eval_batches(eval_ex, tok, dataclasses.replace(bcfg, seed=c.seed + 7),
                                   c.data.shards, c.data.eval_batches)
               if c.eval_every and c.data.eval_batches else [])

  callbacks = [cb if isinstance(cb, Callback) else AtEvals(cb, c.eval_every)
               for cb in callbacks]
  if c.monitor.every:
    callbacks.append(Monitor(c, tok, mcfg, workdir))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint.every,
                      keep=c.checkpoint.keep, keep_period=c.checkpoint.keep_period,
                      async_save=c.checkpoint.async_save)
  abstract = abstract_state(mcfg, tx, mesh)
  restored = ckpt.restore(abstract, data)
  if restored is None:
    start, state = 0, init_state(mcfg, tx, key, mesh, params=base_params)
    ckpt.save(0, state, data, force=True)
  else:
    start, state = restored
    say(f"resumed from {ckpt.directory}/{start}")

  objective = _objective(c)
  step_fn = make_train_step(mcfg, tx, objective, c.accum_steps, state_sharding=shardings)
  b_sh = batch_sharding(mesh, accumulate=c.accum_steps > 1)
  e_sh = batch_sharding(mesh)
  ref_params = None                  # the frozen reference model, for objectives that read it
  if objective.prepare is not None:
    ref_params = base_params if base_params is not None else jax.jit(
        functools.partial(init_params, mcfg), out_shardings=shardings.params)(key)

  eval_fn = jax.jit(lambda p, b: objectives.lm(p, mcfg, b)[:2])
  writer = MetricsWriter(workdir, resume_step=start)
  first = {}
  for cb in callbacks:
    first.update(cb.start(start, state.params) or {})
  if first:
    writer.write(start, first)
  stopped_by = next((cb.stop for cb in callbacks if cb.stop), None)
  progress = Progress(start, c.steps)
  preempt = _Preemption()
  last = c.steps if stop_after is None else min(c.steps, start + stop_after)
  losses: dict[int, float] = {}
  evals: dict[int, dict[str, float]] = {}
  pending: list[tuple[int, dict, dict, int]] = []   # (step, device metrics, eval values, tokens)
  t_last, tok_since = time.perf_counter(), 0
  preempted = False
  if stopped_by:
    say(f"stopped by {stopped_by} before any step (a stop rule that fired earlier: remove its "
        "'!' to train on)")
    last = start
  say(f"training {mcfg.num_params():,} parameters on {jax.device_count()} devices "
      f"(mesh {dict(mesh.shape)}), steps {start} -> {c.steps}, workdir {workdir}")

  def flush(entry):
    nonlocal t_last, tok_since
    step, m, ev, ntok = entry
    m = jax.device_get(m)
    losses[step] = float(m["loss"])
    tok_since += ntok
    row_due = step % c.log_every == 0 or step == last or ev
    if ev:
      ev = {k: (float(v[0]) / max(float(v[1]), 1.0) if isinstance(v, tuple) else v)
            for k, v in jax.device_get(ev).items()}
      evals[step] = ev
    if not row_due:
      return
    now = time.perf_counter()
    tps = tok_since / max(now - t_last, 1e-9)
    t_last, tok_since = now, 0
    terms = {k.replace("/", "_"): float(v) for k, v in m.items() if k.startswith("loss/")}
    row = {"loss": m["loss"], "lr": float(schedule(step - 1)), "tokens_per_s": tps,
           "grad_norm": m["grad_norm"], "trained_tokens": m["count"], **terms, **(ev or {})}
    writer.write(step, row)
    extra = " | ".join(f"{k} {v:.4g}" if k.startswith("monitor/") else f"{k} {v:.4f}"
                       for k, v in (ev or {}).items() if isinstance(v, float))
    say(progress.line(step, float(m["loss"]), tps, extra))

  try:
    for t in range(start, last):
      local = next(data)
      batch = _to_global(local, b_sh)
      state, metrics = step_fn(state, batch, ref_params)
      done = t + 1
      if pending:                  # step t's metrics, read now that t+1 is queued
        flush(pending.pop())
      ev = {}
      if c.eval_every and (done % c.eval_every == 0 or done == c.steps):
        for i, eb in enumerate(eval_data):
          s, n = eval_fn(state.params, _to_global(eb, e_sh))
          prev = ev.get(eval_name, (0.0, 0.0))
          ev[eval_name] = (prev[0] + s, prev[1] + n)
      for cb in callbacks:
        if cb.due(done, c.steps):
          ev.update(cb.observe(done, state.params) or {})
      pending.append((done, metrics, ev, _tokens(local) * max(jax.process_count(), 1)))
      stopped_by = next((cb.stop for cb in callbacks if cb.stop), None)
      if stopped_by:
        flush(pending.pop())
        ckpt.save(done, state, data, force=True)
        say(f"stopped by {stopped_by}")
        break
      if preempt.reached(done):
        flush(pending.pop())
        ckpt.save(done, state, data, force=True)
        preempted = True
        say(f"SIGTERM: saved step {done}; rerun the same command to resume")
        break
      ckpt.save(done, state, data)
    else:
      if pending:
        flush(pending.pop())
      if last > start:
        ckpt.save(last, state, data, force=True)
    ckpt.wait()
  finally:
    preempt.restore()
    writer.close()
    for cb in callbacks:
      cb.close()
    ckpt.close()
  end = max(losses) if losses else start
  say(f"done: step {end}, {format_duration(time.time() - t_start)} "
      f"(checkpoints: {valid_steps(ckpt.directory, warn=False)[-3:]} ...)")
  return TrainResult(workdir, start, end, losses, evals, preempted, time.time() - t_start, mcfg,
                     stopped_by)
