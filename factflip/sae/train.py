"""Training an SAE on a frozen model's activations: the config, the loop, the evaluation.

Owns: `base_config()` (every key an SAE run reads, with its default and meaning), `validate`,
`train_sae(config, workdir)` (resolve, stream activations, step, log, evaluate, checkpoint,
resume, write the SAE) and `ce_recovered` (the LM loss with the SAE's reconstruction spliced in).
Must not: define the SAE math or the losses (`sae.core`, `sae.losses`), or the token data
(`train.inputs` supplies the batches, as for any training run).

Workdir: config.json, metrics.jsonl (loss terms, explained variance, L0, dead share, and at
evaluation steps ce_clean, ce_sae, ce_zero, ce_recovered), tensorboard/, checkpoints/<step>/ (the
SAE parameters, Adam state, dead-latent counters, firing counts, step and activation scale; the
activation stream's state), sae/ (the final SAE in SAELens's layout: `load_sae` or SAELens's
`SAE.load_from_disk` open it; with its sparsity.safetensors, each latent's log10 firing
frequency over the training tokens of the last `loss.feature_sampling_window` steps, counted as
SAELens's trainer counts them). A rerun resumes from the newest checkpoint and sees the same
activation batches.

`normalize_activations = "expected_average_only_in"` trains on activations scaled by
s = √d_in / mean ‖x‖ (estimated over `norm_batches` batches before step 0) and folds s into the
saved SAE (W_enc · s, W_dec / s, b_dec / s; normalize "none"), as SAELens's trainer does.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from factflip import distributed
from factflip.configfile import ConfigError
from factflip.fileio import write_json
from factflip.models import attention
from factflip.models.hooks import Intervention, parse_hook_name, site_shape
from factflip.models.store import load_model
from factflip.models.transformer import forward
from factflip.sae.activations import ActivationStream, site_activations
from factflip.sae.architectures import ARCHITECTURES
from factflip.sae.core import SAE, SAEConfig, init_sae, make_sae
from factflip.sae.formats import save_sae
from factflip.sae.losses import (
  LossConfig,
  init_state,
  log_feature_sparsity,
  make_optimizer,
  make_train_step,
)
from factflip.sae.steering import sae_site, splice
from factflip.sharding import make_mesh
from factflip.train import config as train_config
from factflip.train import inputs
from factflip.train.metrics import MetricsWriter, Progress, format_duration


def base_config() -> ml_collections.ConfigDict:
  """Every key an SAE training run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.model = ""                   # the frozen model: a factflip/HF model dir or a training workdir
  c.hook_name = "blocks.0.hook_resid_post"   # TransformerLens name of the site (with its layer)
  c.seed = 0                     # SAE init and the activation shuffle
  c.steps = 1000                 # optimizer steps
  c.batch_tokens = 1024          # activations per step (SAELens train_batch_size_tokens)
  c.buffer_batches = 8           # token batches per shuffle window (SAELens n_batches_in_buffer)
  c.exclude_special_tokens = True   # never train on BOS / EOS / padding activations
  c.sae = ml_collections.ConfigDict()
  c.sae.architecture = "topk"    # standard | topk | jumprelu
  c.sae.d_sae = 0                # latents (0 = expansion_factor · d_in)
  c.sae.expansion_factor = 8
  c.sae.k = 32                   # topk: active latents per token
  c.sae.rescale_acts_by_decoder_norm = True   # topk (SAELens's training default)
  c.sae.apply_b_dec_to_input = True
  c.sae.normalize_activations = "none"   # none | expected_average_only_in (see docstring)
  c.sae.norm_batches = 16        # batches that estimate the expected_average_only_in scale
  c.sae.decoder_init_norm = 0.1  # W_dec rows start at this norm; W_enc = W_dec.T
  c.sae.jumprelu_init_threshold = 0.01   # jumprelu: the thresholds' start
  c.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.beta1 = 0.9
  c.optim.beta2 = 0.999
  c.optim.warm_up_steps = 0
  c.optim.decay_steps = 0
  c.optim.lr_end = 0.0
  c.optim.grad_clip = 1.0
  c.data = train_config.base_config().data   # the token data, as for any training run
  c.data.seq_len = 64            # context_size
  c.data.batch_size = 16         # sequences per model forward
  c.data.shards = 0              # input shards (0 = one per process)
  c.data.packing = "pack"
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 100             # steps between CE-recovered evaluations (0 = only at the end)
  c.eval.batches = 2             # token batches per evaluation (another shuffle of the data)
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 200
  c.checkpoint.keep = 2
  c.log_every = 25
  return c


def validate(c, source: str = "sae config") -> None:

  def need(ok, key, message):
    if not ok:
      raise ConfigError(source, key, message)
  need(bool(c.model), "model", "empty; expected the frozen model (a model dir or a training "
       "workdir)")
  try:
    _, layer = parse_hook_name(c.hook_name)
  except ValueError as e:
    raise ConfigError(source, "hook_name", str(e)) from None
  need(layer is not None, "hook_name", f"{c.hook_name!r} names no layer; expected e.g. "
       "'blocks.1.hook_resid_post'")
  need(c.sae.architecture in ARCHITECTURES, "sae.architecture",
       f"{c.sae.architecture!r}; expected one of {tuple(ARCHITECTURES)}")
  need(c.sae.normalize_activations in ("none", "expected_average_only_in"),
       "sae.normalize_activations", f"{c.sae.normalize_activations!r}; training supports none "
       "and expected_average_only_in")
  for key in ("steps", "batch_tokens", "buffer_batches", "sae.expansion_factor",
              "data.batch_size", "data.seq_len", "loss.feature_sampling_window"):
    node = c
    for part in key.split("."):
      node = node[part]
    need(isinstance(node, int) and node >= 1, key, f"{node!r}; expected an integer >= 1")
  n_proc = distributed.process_count()
  need((c.data.shards or n_proc) % n_proc == 0, "data.shards",
       f"{c.data.shards} input shards do not divide over {n_proc} processes")
  n_dev = len(distributed.devices())
  need(c.batch_tokens % n_dev == 0, "batch_tokens",
       f"{c.batch_tokens} does not divide over {n_dev} devices")
  need(c.optim.lr > 0, "optim.lr", f"{c.optim.lr}; expected > 0")


@dataclasses.dataclass
class SAETrainResult:
  workdir: str
  sae_path: str
  step: int
  metrics: dict[str, float]       # the last logged row
  evals: dict[int, dict[str, float]]
  seconds: float


def _model_and_tokenizer(c):
  from factflip.data.tokenizer import has_tokenizer, load_tokenizer
  model = load_model(c.model)
  tok_dir = c.data.tokenizer_dir or (c.model if has_tokenizer(c.model) else "")
  if not tok_dir:
    raise ConfigError("sae config", "data.tokenizer_dir", f"empty and {c.model} has no "
                      "tokenizer.json (and is no GGUF file); expected the model's tokenizer "
                      "directory")
  return model, load_tokenizer(tok_dir), tok_dir


def _token_batches(c, tok, seed_offset: int = 0, every_shard: bool = False):
  """Token batches of the SAE's data: this process's input shards (training: the processes'
  rows make the global batch), or with `every_shard` all of them on every process (the
  normalisation estimate and the evaluations, the same on every process)."""
  tc = train_config.base_config()
  tc.seed = c.seed + seed_offset
  tc.data = c.data
  world = None
  if train_config.uses_world(tc):
    world, _ = inputs.prepare_world(c.data.world_dir, c.data.tokenizer_dir, c.data.world_seed,
                                    c.data.vocab_size, c.data.world_people,
                                      c.data.world_questions)
  streams, _ = inputs.sources(tc, world)
  shards = c.data.shards or distributed.process_count()
  whole = {"process_index": 0, "process_count": 1} if every_shard else {}
  return inputs.ShardedBatches(streams, tok, train_config.batch_config(tc, shards), shards,
                               **whole)


def _sae_config(c, d_in: int, prepend_bos: bool = True) -> SAEConfig:
  """The SAE's config: the common fields, those of the architecture's own `cfg_fields`
  (topk: k, rescale_acts_by_decoder_norm) from `sae.<field>`, and SAELens's metadata
  (`prepend_bos`: the pipeline starts each document with the tokenizer's BOS, when it has one)."""
  s = c.sae
  own = {name: s[name] for name in ARCHITECTURES[s.architecture].cfg_fields}
  return SAEConfig(architecture=s.architecture, d_in=d_in,
                   d_sae=s.d_sae or s.expansion_factor * d_in, **own,
                   apply_b_dec_to_input=s.apply_b_dec_to_input, hook_name=c.hook_name,
                   metadata={"model_name": os.path.abspath(c.model),
                             "model_class_name": "factflip.Transformer",
                             "model_from_pretrained_kwargs": {},
                             "hook_head_index": None, "seqpos_slice": [None],
                             "context_size": c.data.seq_len, "prepend_bos": prepend_bos,
                             "exclude_special_tokens": bool(c.exclude_special_tokens),
                             "dataset_path": c.data.path or c.data.kind,
                             "trained_with": "factflip"})


def _special_ids(tok) -> tuple[int, ...]:
  ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
  return tuple(sorted(i for i in ids if i is not None))


def ce_recovered(model, sae: SAE, token_batches, scale: float = 1.0) -> dict[str, float]:
  """The next-token loss (mean over the batches' trained targets) of the clean model, with the site
  replaced by the SAE's reconstruction (scaled inputs unscaled), and zero-ablated;
  ce_recovered = (ce_zero − ce_sae) / (ce_zero − ce_clean) (SAELens's ce_loss_score)."""
  site, layer = sae_site(sae)
  L = model.cfg.n_layers
  if scale != 1.0:
    sae = fold_scale(sae, scale)
  edits = {"clean": (), "sae": (splice(sae, L),),
           "zero": (Intervention(jnp.arange(L) == layer, jnp.ones((1,), bool),
                                 jnp.zeros((L, 1, 1, 1)), site=site, mode="replace"),)}
  sums = {k: 0.0 for k in edits}
  count = 0.0
  for b in token_batches:
    arrays = [jnp.asarray(b[k]) for k in ("inputs", "targets", "segment_ids", "positions")]
    weight = jnp.asarray((np.asarray(b["loss_mask"]) > 0) & (np.asarray(b["segment_ids"]) > 0))
    for name, ivs in edits.items():
      s, n = _ce(model.params(), model.cfg, *arrays, weight, ivs)
      sums[name] += float(s)
    count += float(n)
  out = {f"ce_{k}": v / max(count, 1.0) for k, v in sums.items()}
  gap = out["ce_zero"] - out["ce_clean"]
  out["ce_recovered"] = (out["ce_zero"] - out["ce_sae"]) / gap if gap else float("nan")
  return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ce(params, cfg, inputs_BxT, targets_BxT, segment_ids_BxT, positions_BxT, weight_BxT,
        interventions):
  logits = forward(params, cfg, inputs_BxT, attention.packed(segment_ids_BxT, positions_BxT),
                   interventions=interventions).logits
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.where(weight_BxT, nll, 0.0).sum(), weight_BxT.sum()


def fold_scale(sae: SAE, s: float) -> SAE:
  """An SAE trained on x · s as one that reads x (SAELens's fold_activation_norm_scaling_factor:
  W_enc · s, W_dec / s, b_dec / s; b_enc and the thresholds unchanged)."""
  cfg = dataclasses.replace(sae.cfg, normalize_activations="none")
  return sae.replace(W_enc=sae.W_enc * s, W_dec=sae.W_dec / s, b_dec=sae.b_dec / s, cfg=cfg)


def _estimate_scale(stream, n: int, d_in: int) -> float:
  norms = [np.linalg.norm(next(stream), axis=-1).mean() for _ in range(n)]
  return float(np.sqrt(d_in) / np.mean(norms))


def train_sae(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
              stop_after: int | None = None, source: str = "sae config") -> SAETrainResult:
  """Train (or resume) the SAE of `config` in `workdir`; returns what ran. `stop_after`: return
  after that many steps of this invocation (a checkpoint is saved first; tests)."""
  from factflip.train.checkpoint import Checkpointer
  t_start = time.time()
  validate(config, source)
  c = config.copy_and_resolve_references()
  workdir = os.path.abspath(workdir)
  main = distributed.process_index() == 0          # writes and reports
  say = (lambda *a: None) if quiet or not main else functools.partial(print, flush=True)
  model, tok, c.data.tokenizer_dir = _model_and_tokenizer(c)
  os.makedirs(workdir, exist_ok=True)
  if main:
    write_json(os.path.join(workdir, "config.json"), c.to_dict())
  acts_fn = site_activations(model, c.hook_name)
  feature = site_shape(model.cfg, parse_hook_name(c.hook_name)[0])
  d_in = int(np.prod(feature))
  cfg = _sae_config(c, d_in, prepend_bos=tok.bos_token_id is not None)
  if len(feature) == 2:                     # z [heads, d_head]: trained on the flat heads
    cfg = dataclasses.replace(cfg, reshape_activations="hook_z", d_head=feature[-1])
  lc = LossConfig(**c.loss.to_dict())
  tx = make_optimizer(c.optim.lr, c.steps, beta1=c.optim.beta1, beta2=c.optim.beta2,
                      warm_up_steps=c.optim.warm_up_steps, decay_steps=c.optim.decay_steps,
                      lr_end=c.optim.lr_end, grad_clip=c.optim.grad_clip)
  flat_cfg = dataclasses.replace(cfg, reshape_activations="none", d_head=0)   # trains on [N, d_in]
  exclude = _special_ids(tok) if c.exclude_special_tokens else ()
  # each process its share of every step's activations, from its own input shards
  stream = ActivationStream(_token_batches(c, tok), acts_fn,
                            batch_tokens=c.batch_tokens // distributed.process_count(),
                            buffer_batches=c.buffer_batches,
                            seed=c.seed + 1000 * distributed.process_index(),
                            exclude_ids=exclude)
  mesh = make_mesh(-1, 1, 1, devices=distributed.devices())
  x_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  arch = ARCHITECTURES[cfg.architecture]
  init = {name: c.sae[p.train_key] for name, p in arch.extra_params.items() if p.train_key}

  def fresh_state(scale):
    sae = init_sae(flat_cfg, jax.random.key(c.seed), decoder_norm=c.sae.decoder_init_norm,
                   **init)
    return dict(init_state(sae, tx), scale=jnp.float32(scale))

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), c.checkpoint.every,
                      keep=c.checkpoint.keep, async_save=False)
  abstract = jax.eval_shape(lambda: fresh_state(1.0))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          abstract)
  restored = ckpt.restore(abstract, stream)
  if restored is None:
    scale = 1.0
    if c.sae.normalize_activations == "expected_average_only_in":
      norm_stream = ActivationStream(_token_batches(c, tok, seed_offset=11, every_shard=True),
                                     acts_fn,
                                     batch_tokens=c.batch_tokens,
                                     buffer_batches=c.buffer_batches, seed=c.seed + 11,
                                     exclude_ids=exclude)
      scale = _estimate_scale(norm_stream, c.sae.norm_batches, d_in)
    start, state = 0, jax.device_put(fresh_state(scale), replicated)
  else:
    start, state = restored
    say(f"resumed from {ckpt.directory}/{start}")
  scale = float(state["scale"])
  step_fn = make_train_step(flat_cfg, lc, tx)
  eval_stream = _token_batches(c, tok, seed_offset=7, every_shard=True)   # another shuffle
  eval_batches = [next(eval_stream) for _ in range(c.eval.batches)]

  def current_sae(state):
    p = jax.device_get(state["params"])
    if arch.project is not None:                 # as the next step would see them (θ >= 0)
      p = arch.project(p)
    return make_sae(cfg, {k: np.asarray(v) for k, v in p.items()})

  writer = MetricsWriter(workdir, resume_step=start)
  progress = Progress(start, c.steps)
  last = c.steps if stop_after is None else min(c.steps, start + stop_after)
  evals: dict[int, dict[str, float]] = {}
  row: dict[str, float] = {}
  t_last, n_since = time.perf_counter(), 0
  say(f"training a {cfg.architecture} SAE (d_in {d_in}, d_sae {cfg.d_sae}) on "
      f"{c.hook_name} of {c.model}: steps {start} -> {c.steps}, {c.batch_tokens} activations "
      f"per step, workdir {workdir}")
  try:
    for t in range(start, last):
      x = jax.make_array_from_process_local_data(
          x_sharding, np.asarray(next(stream), np.float32) * np.float32(scale))
      state, metrics = step_fn(state, x)
      done = t + 1
      n_since += c.batch_tokens
      ev = {}
      if (c.eval.every and done % c.eval.every == 0) or done == c.steps:
        ev = ce_recovered(model, current_sae(state), eval_batches, scale)
        evals[done] = ev
      if done % c.log_every == 0 or done == last or ev:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        tps = n_since / max(now - t_last, 1e-9)
        t_last, n_since = now, 0
        row = {**m, "activations_per_s": tps, **ev}
        writer.write(done, row)
        extra = (f"EV {m['explained_variance']:.3f} | L0 {m['l0']:.1f} | dead "
                 f"{m['dead_share']:.2f}" + (f" | CE recovered {ev['ce_recovered']:.3f}"
                                             if ev else ""))
        say(progress.line(done, m["loss"], tps, extra))
      ckpt.save(done, state, stream)
    ckpt.save(last, state, stream, force=True)
    ckpt.wait()
  finally:
    writer.close()
    ckpt.close()
  sae_path = os.path.join(workdir, "sae")
  if last == c.steps:
    final = current_sae(state)
    if scale != 1.0:
      final = fold_scale(final, scale)
    if main:
      save_sae(final, sae_path, sparsity=np.asarray(log_feature_sparsity(state)))
  say(f"done: step {last}, {format_duration(time.time() - t_start)}"
      + (f"; SAE written to {sae_path}" if last == c.steps else ""))
  return SAETrainResult(workdir, sae_path, last, row, evals, time.time() - t_start)

