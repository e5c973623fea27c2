"""`train_and_evaluate(config, workdir)`: the LRA trainer (train.py, tests and notebooks call it).

Data parallel over every device of every host: one jitted step on a `Mesh` with a `data` axis,
the batch sharded over it and the state replicated. Checkpoints (orbax) hold the train state and
the grain iterator together, so a killed run resumes exactly; per-step randomness is
`fold_in(key, step)`. Validation every `eval_every` steps; the best-validation parameters are
kept and evaluated on the test split at the end. What the workdir holds, when a resume is
accepted and how damaged checkpoints are recovered is `luna_jax.workdir`.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

import lra_tasks
from luna_jax import input_pipeline, metrics as metrics_lib, models, runtime, transfer
from luna_jax import workdir as wd
from luna_jax.attention import ATTENTION_NAMES, get_attention
from luna_jax.workdir import ConfigError


class TrainState(train_state.TrainState):
  """Params + optimizer state + step (flax TrainState)."""


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


# ----------------------------------------------------------------------------- configuration

def model_config(config: ml_collections.ConfigDict, task: lra_tasks.TaskData
                 ) -> models.ModelConfig:
  """The static model description from `config.model` and the loaded task."""
  return models.ModelConfig.from_config(
      config.model, vocab_size=task.vocab_size, num_classes=task.num_classes,
      max_len=config.model.get("max_len", 0) or config.seq_len, pad_id=task.pad_id,
      num_docs=task.num_docs, readout_length=config.seq_len)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any compute on a config that cannot work, naming the field (ConfigError)."""
  for field, value in wd.flatten(config.to_dict()).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config.{field}={value} must be a finite number")
  m = config.model
  if m.attention not in ATTENTION_NAMES:
    raise ConfigError(f"config.model.attention={m.attention!r} is not a known attention; "
                      f"valid names: {', '.join(ATTENTION_NAMES)}")
  at_least = _AT_LEAST + ((("model.proj_len", 1),) if m.attention == "luna" else ())
  if config.get("init_from"):   # a converted model may be evaluated as it is (0 steps)
    at_least = tuple((f, 0 if f == "num_train_steps" else v) for f, v in at_least)
  for field, low in at_least:
    value = _get(config, field)
    if value is not None and value < low:
      raise ConfigError(f"config.{field}={value} must be >= {low}")
  if not config.get("save_best_after", 0.0) < 1.0:
    raise ConfigError(f"config.save_best_after={config.save_best_after} must be < 1 (a "
                      "fraction of num_train_steps)")
  for field in ("model.dropout", "model.attention_dropout", "model.activation_dropout"):
    if not 0.0 <= _get(config, field) < 1.0:
      raise ConfigError(f"config.{field}={_get(config, field)} must be in [0, 1)")
  if not config.learning_rate > 0:
    raise ConfigError(f"config.learning_rate={config.learning_rate} must be > 0")
  options = m.get(m.attention) or {}
  if "num_features" in options and options["num_features"] < 1:
    raise ConfigError(f"config.model.{m.attention}.num_features={options['num_features']} "
                      "must be >= 1")
  n_dev = jax.device_count()
  if config.batch_size % n_dev:
    raise ConfigError(f"config.batch_size={config.batch_size} is not divisible by the "
                      f"{n_dev} devices; use a multiple of {n_dev}")
  max_len = m.get("max_len", 0)
  if max_len and config.seq_len > max_len:
    raise ConfigError(f"config.seq_len={config.seq_len} is longer than the position table "
                      f"config.model.max_len={max_len}")
  heads = [("config.model.num_heads", m.num_heads)]
  if m.attention == "luna":
    heads.append(("config.model.num_pack_heads", m.num_pack_heads or m.num_heads))
  for field, h in heads:
    if h <= 0 or m.emb_dim % h:
      raise ConfigError(f"config.model.emb_dim={m.emb_dim} is not divisible by {field}={h}")
  if m.attention == "luna" and m.get("qkv_dim", 0) not in (0, m.emb_dim):
    raise ConfigError(f"config.model.qkv_dim={m.qkv_dim} must be 0 or emb_dim={m.emb_dim} "
                      "for luna (its packed context has no output projection)")
  qkv = m.get("qkv_dim", 0) or m.emb_dim
  if qkv % m.num_heads:
    raise ConfigError(f"config.model.qkv_dim={qkv} is not divisible by "
                      f"config.model.num_heads={m.num_heads}")
  allowed_values = {"readout": models.READOUTS, "block": ("post_ln", "pre_ln"),
                    "positions": ("learned", "sinusoidal"), "embedding": ("tokens", "linear", "patches"),
                    "init": tuple(models.INITS), "dtype": ("float32", "bfloat16"),
                    "retrieval_combine": ("luna", "concat", "interact")}
  for field, allowed in allowed_values.items():
    if m[field] not in allowed:
      raise ConfigError(f"config.model.{field}={m[field]!r}; expected one of {allowed}")
  if m.embedding == "patches" and m.get("patch_size", 0) < 1:
    raise ConfigError(f"config.model.embedding='patches' needs config.model.patch_size >= 1, "
                      f"got {m.get('patch_size', 0)}")
  if config.get("length_buckets", 0) > 1:
    for field in ("eval_stream", "test_drop_last"):
      if config.get(field, False):
        raise ConfigError(f"config.{field}=true reads the splits unbucketed; it cannot be "
                          f"combined with config.length_buckets={config.length_buckets}")
  if config.schedule not in SCHEDULES:
    raise ConfigError(f"config.schedule={config.schedule!r}; expected one of {SCHEDULES}")
  if config.schedule == "cosine" and 0 < config.num_train_steps <= max(config.warmup_steps, 1):
    raise ConfigError(f"config.num_train_steps={config.num_train_steps} must be more than "
                      f"config.warmup_steps={config.warmup_steps} (at least 1) for "
                      "config.schedule='cosine', which decays after the warmup")
  carries_p = getattr(get_attention(m.attention), "carries_p", False)
  if carries_p and m.block != "post_ln":
    raise ConfigError(f"config.model.block={m.block!r}, but {m.attention} runs its own post-LN "
                      "layer (P is updated per layer); set config.model.block=post_ln")


# Lower bounds of numeric fields (a missing field is not checked).
_AT_LEAST = (("num_train_steps", 1), ("eval_every", 1), ("log_every", 1),
             ("checkpoint_every", 1), ("keep_checkpoints", 1), ("batch_size", 1),
             ("seq_len", 1), ("warmup_steps", 0), ("eval_max_examples", 0),
             ("truncate_len", 0), ("grad_clip_value", 0.0), ("save_best_after", 0.0),
             ("grain_workers", 0), ("weight_decay", 0.0), ("grad_clip", 0.0),
             ("model.num_layers", 1), ("model.emb_dim", 1), ("model.mlp_dim", 1),
             ("model.num_heads", 1), ("model.num_pack_heads", 0), ("model.qkv_dim", 0),
             ("model.max_len", 0), ("model.classifier_dim", 1),
             ("model.classifier_layers", 0), ("model.redraw_every", 1))


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


SCHEDULES = ("inverse_sqrt", "rsqrt_lra", "cosine", "one_cycle")


def _one_cycle(config: ml_collections.ConfigDict, start: float, peak: float, end: float
               ) -> optax.Schedule:
  """torch OneCycleLR's linear two-phase shape: start -> peak over steps [0, warmup - 1], then
  peak -> end over [warmup - 1, num_train_steps - 1] (step = number of updates done)."""
  end1 = max(float(config.warmup_steps) - 1.0, 1e-9)
  end2 = max(float(config.num_train_steps) - 1.0, end1 + 1e-9)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    up = start + (peak - start) * s / end1
    down = peak + (end - peak) * (s - end1) / (end2 - end1)
    return jnp.where(s <= end1, up, down)
  return schedule


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """inverse_sqrt: fairseq's linear warmup from warmup_init_lr, then lr * sqrt(warmup / step).
  rsqrt_lra: the LRA reference base * min(1, step/warmup) / sqrt(max(step, warmup)).
  cosine: linear warmup then cosine decay to 0.
  one_cycle: torch OneCycleLR (linear anneal) as the Nystromformer LRA code runs it: from
  lr / div_factor up to lr at step warmup - 1, then down to lr / div_factor / final_div_factor
  at the last step."""
  lr, warmup = config.learning_rate, max(config.warmup_steps, 1)
  if config.schedule == "inverse_sqrt":
    init = config.warmup_init_lr

    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      return jnp.where(step < warmup, init + step * (lr - init) / warmup,
                       lr * jnp.sqrt(warmup / jnp.maximum(step, 1.0)))
    return schedule
  if config.schedule == "rsqrt_lra":
    return lambda step: (lr * jnp.minimum(1.0, step / warmup)
                         / jnp.sqrt(jnp.maximum(jnp.asarray(step, jnp.float32), warmup)))
  if config.schedule == "one_cycle":
    oc = config.one_cycle
    start = lr / oc.div_factor
    return _one_cycle(config, start, lr, start / oc.final_div_factor)
  # (A 0-step run, a converted model evaluated as it is, never uses it: any decay end will do.)
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup,
                                            max(config.num_train_steps, warmup + 1))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with the configured schedule; one_cycle with `one_cycle.cycle_momentum` also cycles
  Adam's beta1 inversely to the lr (max_momentum -> base_momentum -> max_momentum), as torch's
  OneCycleLR does by default."""
  lr = learning_rate_schedule(config)
  if config.schedule == "one_cycle" and config.one_cycle.cycle_momentum:
    oc = config.one_cycle
    b1 = _one_cycle(config, oc.max_momentum, oc.base_momentum, oc.max_momentum)
    tx = optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=config.adam_b2, eps=config.adam_eps,
        weight_decay=config.weight_decay)
  else:
    tx = optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                     weight_decay=config.weight_decay)
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  if config.get("grad_clip_value", 0.0) > 0:   # torch clip_grad_value_ (the Skyformer code)
    tx = optax.chain(optax.clip(config.grad_clip_value), tx)
  return tx


# ----------------------------------------------------------------------------- steps

def dummy_inputs(cfg: models.ModelConfig, seq_len: int, batch: int = 1) -> jnp.ndarray:
  shape = (batch, 2, seq_len) if cfg.num_docs == 2 else (batch, seq_len)
  return jnp.ones(shape, jnp.int32)


def init_state(config: ml_collections.ConfigDict, cfg: models.ModelConfig, key: jax.Array
               ) -> TrainState:
  return _init_state(config, models.Classifier(cfg), make_optimizer(config), key)


def _init_state(config: ml_collections.ConfigDict, model: models.Classifier,
                tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  params = model.init(key, dummy_inputs(model.cfg, config.seq_len))["params"]
  if (reinit := models.INITS[config.model.init]) is not None:
    params = reinit(params, jax.random.fold_in(key, 1))
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  # A strongly typed step, as a restored checkpoint has: fresh and resumed states then share
  # one compiled train step.
  return state.replace(step=jnp.zeros((), jnp.int32))


def step_rngs(key: jax.Array, step: jax.Array, redraw_every: int) -> dict[str, jax.Array]:
  """Per-step randomness from the step alone (identical after a resume)."""
  return {"dropout": jax.random.fold_in(jax.random.fold_in(key, 0), step),
          "features": jax.random.fold_in(jax.random.fold_in(key, 1),
                                         step // max(redraw_every, 1))}


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict[str, jnp.ndarray], key: jax.Array,
               redraw_every: int) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One AdamW step on the mean cross-entropy of the global batch."""
  rngs = step_rngs(key, state.step, redraw_every)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["inputs"], deterministic=False, rngs=rngs)
    loss = cross_entropy(logits, batch["targets"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  acc = (logits.argmax(-1) == batch["targets"]).mean()
  return new_state, {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads)}


def eval_step(params: Any, batch: dict[str, jnp.ndarray], key: jax.Array, step: jax.Array, *,
              apply_fn: Callable, redraw_every: int) -> dict[str, jnp.ndarray]:
  """Sums of loss, correct predictions and real examples over a padded batch. `step` is the
  number of updates that made `params`: the random features (Performer) are the draw of the
  last of them, update step - 1, i.e. the features these parameters were trained with."""
  rngs = {"features": step_rngs(key, jnp.maximum(step - 1, 0), redraw_every)["features"]}
  logits = apply_fn({"params": params}, batch["inputs"], deterministic=True, rngs=rngs)
  w = batch["weights"]
  return {"loss": (cross_entropy(logits, batch["targets"]) * w).sum(),
          "correct": ((logits.argmax(-1) == batch["targets"]) * w).sum(),
          "count": w.sum(), "class_counts": batch["class_counts"].sum(0)}


@functools.partial(jax.jit, static_argnames="fresh")
def _accumulate(acc: dict[str, jax.Array], m: dict[str, jax.Array], first_bad: jax.Array,
                step: int, fresh: bool) -> tuple[dict[str, jax.Array], jax.Array]:
  """Running sums of the step metrics (`m` itself if `fresh`) and the first step whose loss is
  not finite (-1: none so far), on device: one dispatch per step and no host sync."""
  acc = m if fresh else jax.tree.map(jnp.add, acc, m)
  return acc, jnp.where((first_bad < 0) & ~jnp.isfinite(m["loss"]), step, first_bad)


# ----------------------------------------------------------------------------- helpers

def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Starts jax.distributed for multi-process runs: explicit coordinator arguments, or
  auto-detection (TPU pod, Slurm, Open MPI) when LUNA_JAX_DISTRIBUTED=1. No-op otherwise."""
  if jax.distributed.is_initialized():
    return
  if coordinator_address or os.environ.get("LUNA_JAX_DISTRIBUTED", "") == "1":
    # CPU-only runs (tests, CPU clusters) need a collectives backend across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif os.environ.get("LUNA_JAX_DISTRIBUTED", "") == "1":
    jax.distributed.initialize()


class _Interrupted(Exception):
  """A SIGTERM/SIGINT during the final evaluation (`_StopFlag.raise_from_now`)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


class _StopFlag:
  """Set by SIGTERM/SIGINT so the loop can save and exit cleanly at a step boundary; after the
  loop (`raise_from_now`), a signal interrupts the final evaluation instead: its checkpoint is
  saved, and the rerun evaluates it."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}
    self._raising = False

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    if self._raising:
      self._raising = False        # once: the cleanup that follows is not interrupted
      raise _Interrupted(signum)

  def raise_from_now(self) -> None:
    """From now on a signal raises _Interrupted (at once if one came already)."""
    if self.signal is not None:
      raise _Interrupted(self.signal)
    self._raising = True

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def machine_description() -> dict[str, Any]:
  """What ran this: device kind and count, processes, CPU model, jax version."""
  return {"device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "cpu": runtime.cpu_model(),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "malloc": runtime.allocator(),
          "cpu_dispatch": runtime.cpu_dispatch(), "cpu_devices": runtime.cpu_devices_choice()}


def _peak_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def check_task(config: ml_collections.ConfigDict, task: lra_tasks.TaskData) -> None:
  """Fails before any compute on loaded data that cannot train: a length other than
  config.seq_len, or an empty split."""
  if task.seq_len != config.seq_len:
    raise ConfigError(f"config.seq_len={config.seq_len} but the task data has length "
                      f"{task.seq_len}")
  source = f"config.data_dir={config.data_dir!r}" if config.data_dir else "generated data"
  lra_tasks.common.check_splits(task, source)


def _say(message: str) -> None:
  """A console line from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)


# ----------------------------------------------------------------------------- main loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       start_over: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest readable checkpoint); returns the
  results dict also written to WORKDIR/results.json. The run folder's rules (one writer, resume
  checks, recovery, what metrics and results derive from) are in `luna_jax.workdir`.
  `start_over`: with no readable training checkpoint, train from step 0 even if that replaces
  an earlier run's best/ and results.json (`workdir.check_start_over`)."""
  validate_config(config)
  workdir = wd.checked_workdir(workdir)
  with wd.WorkdirLock(workdir):
    return _train_and_evaluate(config, workdir, start_over)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        start_over: bool) -> dict[str, Any]:
  """train_and_evaluate in a checked workdir that this process holds."""
  changes = wd.resume_changes(workdir, config)     # before anything is written
  if config.get("init_from") and not wd.has_checkpoints(workdir):
    _check_source(config)     # once converted, the run has the parameters in its checkpoints
  task = lra_tasks.load_task(config)
  check_task(config, task)
  identity = wd.run_identity(task.provenance, jax.device_count())
  changes += wd.identity_changes(workdir, identity)
  cfg = model_config(config, task)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  wd.clean_tmp(workdir)

  mesh = data_mesh()
  data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  init_key, step_key = run_keys(config)
  programs = programs_of(config, cfg, mesh)
  abstract = programs.abstract
  state_sh = jax.tree.map(lambda _: repl, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_sh)
  buckets, lengths = _length_buckets(config, task)
  if buckets:
    train_iter = input_pipeline.BucketedBatches(task.splits["train"], lengths["train"],
                                                config.batch_size, config.seed, buckets)
  else:
    train_iter = input_pipeline.train_iterator(task.splits["train"], config.batch_size,
                                               config.seed, config.grain_workers)
  ckpts = wd.Checkpoints(workdir, keep=config.keep_checkpoints, every=config.checkpoint_every)
  writer = None
  try:
    restored = ckpts.restore_latest(target, train_iter.set_state)
    if restored is None:
      wd.check_start_over(workdir, start_over)
      first_step = 0
      state = programs.init(init_key)
      if config.get("init_from"):
        state = _convert_from(config, cfg, state, state_sh, workdir)
        # The converted parameters in the run's own checkpoint: it never needs the source again.
        ckpts.save(0, state, train_iter.get_state(), force=True)
        ckpts.wait()
    else:
      first_step, state = restored
      wd.check_steps(workdir, first_step, config.num_train_steps)
    wd.record_config(workdir, config, changes, first_step, identity)
    wd.start_at(workdir, first_step, config.num_train_steps)
    ckpts.prune_best_after(first_step)
    wd.sync("luna_jax_start")
    writer = metrics_lib.MetricWriter(workdir)
    num_params = models.count_params(state.params)
    # Model selection continues from the records the restored step has seen.
    best_val, _ = wd.best_validation(wd.read_metrics(workdir), first_step)
    finished_before = first_step >= config.num_train_steps
    if first_step == 0:
      _say(f"{config.task}: {cfg.attention} model with {num_params:,} parameters on "
           f"{jax.device_count()} device(s), {jax.process_count()} process(es); "
           f"workdir {workdir}")
      writer.write(0, {"num_params": num_params, "num_devices": jax.device_count()})
      writer.write_hparams(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))
    elif finished_before:
      _say(f"{workdir} already finished training at step {first_step}: evaluating its best "
           "checkpoint on the test split again")
    else:
      _say(f"resumed from step {first_step} ({workdir})")
    for c in changes:
      _say(f"resumed with a change: {c} (recorded in {wd.CONFIG_HISTORY_FILE})")

    p_train, p_eval = programs.train, programs.eval

    def evaluate(split: str, params: Any, step: int) -> dict[str, float]:
      return evaluate_split(config, task, p_eval, data_sh, split, params, step, step_key,
                            buckets, lengths)

    stop = _StopFlag()
    stop.install()
    progress = metrics_lib.Progress(config.num_train_steps, first_step)
    acc_metrics, acc_n = None, 0
    first_bad = -1            # first step whose loss was not finite (-1: none), kept on device
    step = first_step
    t_log = time.time()
    stopped_by = None
    try:
      while step < config.num_train_steps:
        batch = _global(next(train_iter), data_sh)
        state, m = p_train(state, batch, step_key)
        step += 1
        ckpts.check()          # a failed asynchronous save stops the run here
        acc_metrics, first_bad = _accumulate(m if acc_metrics is None else acc_metrics, m,
                                             first_bad, step, fresh=acc_metrics is None)
        acc_n += 1
        is_log = step % config.log_every == 0 or step == config.num_train_steps
        is_eval = step % config.eval_every == 0 or step == config.num_train_steps
        is_ckpt = step % config.checkpoint_every == 0
        progress.tick(step)
        if stop.signal is None and jax.process_count() > 1:
          if ckpts.mngr.reached_preemption(step):
            stop.signal = signal.SIGTERM
        stopping = stop.signal    # read once: a signal after this line stops the next step
        if is_log or is_eval or is_ckpt or stopping is not None:
          fb = int(first_bad)
          if fb >= 0:
            last = ckpts.latest_step()
            msg = f"training loss became NaN/Inf at step {fb}; stopping. " + (
                f"The last good checkpoint in {ckpts.dir} is kept (step {last})."
                if last is not None else "No checkpoint was saved before it.")
            if jax.process_index() == 0:   # marker read by luna_jax.experiments.results
              with open(wd.path(workdir, wd.FAILED_FILE), "w") as f:
                f.write(f"NonFiniteLossError: {msg}\n")
            raise NonFiniteLossError(msg)
        if is_log and acc_n:
          host = jax.device_get(acc_metrics)
          dt = time.time() - t_log
          rec = {f"train_{k}": float(v) / acc_n for k, v in host.items()}
          rec["learning_rate"] = float(learning_rate_schedule(config)(step - 1))
          if acc_n != (step - 1) % config.log_every + 1:   # since a resume, not log_every
            rec["averaged_steps"] = acc_n
          rec["steps_per_s"] = acc_n / dt
          rec["examples_per_s"] = acc_n * config.batch_size / dt
          if (peak := _peak_memory_bytes()) is not None:
            rec["peak_memory_bytes"] = peak
          writer.write(step, rec)
          progress.log(step, rec)
          acc_metrics, acc_n, t_log = None, 0, time.time()
        if is_eval:
          val = evaluate("validation", state.params, step)
          writer.write(step, val)
          progress.log(step, val)
          if val["val_accuracy"] > best_val:
            best_val = val["val_accuracy"]
            # The score counts from the start; best/ only after save_best_after (Skyformer).
            if step > config.get("save_best_after", 0.0) * config.num_train_steps:
              ckpts.save_best(step, state.params)
          t_log = time.time()
        ckpts.save(step, state, train_iter.get_state(),
                   force=stopping is not None or step == config.num_train_steps)
        if stopping is not None:
          stopped_by = signal.Signals(stopping).name
          break
      ckpts.wait()
    except BaseException:
      stop.restore()
      raise
    if stopped_by is not None:
      stop.restore()
      _say(f"received {stopped_by}: saved step {step}; rerun the same command to resume")

    results: dict[str, Any] = {
        "task": config.task, "attention": cfg.attention, "proj_len": cfg.proj_len,
        "seed": config.seed, "num_params": num_params, "step": step,
        "num_train_steps": config.num_train_steps, "finished": stopped_by is None,
        "protocol": config.get("protocol", "custom"), "data": dict(task.provenance),
        "dtype": cfg.dtype, "machine": machine_description()}
    if config.get("init_from"):
      results["init_from"] = wd.read_json(wd.path(workdir, wd.INIT_FROM_FILE))
    if stopped_by is None:
      try:
        stop.raise_from_now()
        results.update(_final_evaluation(ckpts, workdir, writer, evaluate, state, step,
                                         abstract, state_sh, progress))
      except _Interrupted as e:
        results["finished"] = False
        _say(f"received {e}: during the final evaluation; step {step} is saved, rerun the "
             "same command to evaluate it")
        return results
      finally:
        stop.restore()
      train_recs = [r for r in wd.read_metrics(workdir)
                    if isinstance(r.get("steps_per_s"), (int, float))]
      if train_recs:
        results["steps_per_s"] = float(np.median([r["steps_per_s"] for r in train_recs]))
      if jax.process_index() == 0:
        wd.write_json(wd.path(workdir, wd.RESULTS_FILE), results)
      _say(f"done: test accuracy {results['test_accuracy']:.4f} at step {results['best_step']} "
           f"(best validation {results['best_val_accuracy']:.4f}). Results: "
           f"{wd.path(workdir, wd.RESULTS_FILE)}; metrics: {wd.path(workdir, wd.METRICS_FILE)}; "
           f"curves: tensorboard --logdir {wd.path(workdir, wd.TB_DIR)}")
    return results
  finally:
    if writer is not None:
      writer.close()
    ckpts.close()


def data_mesh() -> jax.sharding.Mesh:
  """Every device of every process on one "data" axis: the batch is split over it, the state is
  replicated."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


class Programs(NamedTuple):
  """The jitted programs of one run: `init(key)` -> replicated TrainState, its shapes
  (`abstract`), `train(state, batch, key)` (state donated) and `eval(params, batch, key, step)`."""
  init: Callable
  abstract: Any
  train: Callable
  eval: Callable


_PROGRAMS: dict[tuple[str, models.ModelConfig, jax.sharding.Mesh], Programs] = {}
_MAX_PROGRAMS = 4


def programs_of(config: ml_collections.ConfigDict, cfg: models.ModelConfig,
                mesh: jax.sharding.Mesh) -> Programs:
  """The programs of `config` on `mesh`, kept for the last few configs, so that another run of
  an identical config in this process (a notebook cell run again, a resumed or repeated run in
  tests and sweeps) reuses the compiled steps instead of tracing and compiling them again."""
  key = (wd.dumps(wd.config_dict(config), sort_keys=True), cfg, mesh)
  if key in _PROGRAMS:
    _PROGRAMS[key] = _PROGRAMS.pop(key)       # most recently used last
    return _PROGRAMS[key]
  data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  # One model and optimizer object: fresh and restored states then have equal tree structures
  # (apply_fn and tx are static fields), so `train` compiles once for both.
  init_fn = functools.partial(_init_state, config, models.Classifier(cfg), make_optimizer(config))
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  redraw = config.model.redraw_every
  programs = Programs(
      init=jax.jit(init_fn, out_shardings=repl),
      abstract=abstract,
      train=jax.jit(functools.partial(train_step, redraw_every=redraw),
                    in_shardings=(repl, data_sh, repl), out_shardings=(repl, repl),
                    donate_argnums=0),
      eval=jax.jit(functools.partial(eval_step, apply_fn=abstract.apply_fn,
                                     redraw_every=redraw),
                   in_shardings=(repl, data_sh, repl, repl), out_shardings=repl))
  _PROGRAMS[key] = programs
  while len(_PROGRAMS) > _MAX_PROGRAMS:
    del _PROGRAMS[next(iter(_PROGRAMS))]
  return programs


def _length_buckets(config: ml_collections.ConfigDict, task: lra_tasks.TaskData
                    ) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
  """(bucket lengths, real lengths per split) when config.length_buckets > 1 and the task pads;
  ((), {}) otherwise."""
  if config.get("length_buckets", 0) <= 1 or task.pad_id is None:
    return (), {}
  buckets = input_pipeline.bucket_lengths(config.seq_len, config.length_buckets)
  lengths = {name: input_pipeline.example_lengths(split, task.pad_id)
             for name, split in task.splits.items()}
  _say(f"length buckets {buckets}: " + ", ".join(
      f"{name} {np.bincount(np.searchsorted(buckets, ls), minlength=len(buckets)).tolist()}"
      for name, ls in lengths.items()))
  return buckets, lengths


def evaluate_split(config: ml_collections.ConfigDict, task: lra_tasks.TaskData,
                   eval_fn: Callable, data_sh: NamedSharding, split: str, params: Any,
                   step: int, step_key: jax.Array, buckets: tuple[int, ...] = (),
                   lengths: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Loss, accuracy, majority-class rate and example count of `params` (made by `step`
  updates) on `split`, read as `_eval_batches` says; `eval_fn` is `Programs.eval`."""
  sums = None
  for batch in _eval_batches(config, task, split, step, buckets, lengths or {}):
    batch["class_counts"] = np.eye(task.num_classes, dtype=np.float32)[batch["targets"]]
    batch["class_counts"] *= batch["weights"][:, None]
    out = eval_fn(params, _global(batch, data_sh), step_key, jnp.asarray(step))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ConfigError(f"the {split} split has {len(task.splits[split])} examples: not one "
                      f"batch of config.batch_size={config.batch_size} to evaluate (the last "
                      "partial batch is dropped with config.test_drop_last=true)")
  sums = jax.device_get(sums)
  count = max(float(sums["count"]), 1.0)
  name = split_name(split)
  return {f"{name}_loss": float(sums["loss"]) / count,
          f"{name}_accuracy": float(sums["correct"]) / count,
          f"{name}_majority_accuracy": float(sums["class_counts"].max()) / count,
          f"{name}_examples": int(sums["count"])}


def run_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(initialisation key, key of the per-step randomness: dropout, random features) of a run."""
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  return init_key, step_key


def _eval_batches(config: ml_collections.ConfigDict, task: lra_tasks.TaskData, split: str,
                  step: int, buckets: tuple[int, ...], lengths: dict[str, np.ndarray]
                  ) -> Iterator[dict[str, np.ndarray]]:
  """The batches that evaluate `split` at `step`. Validation: the first `eval_max_examples`
  examples (0: all), or with `eval_stream` the next eval_max_examples // batch_size batches of
  a reshuffled stream (evaluation ceil(step / eval_every)). Test: the whole split, less its last
  partial batch with `test_drop_last`."""
  data = task.splits[split]
  if split == "validation" and config.get("eval_stream", False):
    num = max(1, (config.eval_max_examples or len(data)) // config.batch_size)
    return input_pipeline.eval_stream_batches(data, config.batch_size, config.seed,
                                              -(-step // config.eval_every), num)
  cap = config.eval_max_examples if split == "validation" else 0
  if buckets:
    return input_pipeline.bucketed_eval_batches(data, lengths[split], config.batch_size,
                                                buckets, cap)
  drop_last = split == "test" and bool(config.get("test_drop_last", False))
  return input_pipeline.eval_batches(data, config.batch_size, cap, drop_last)


def _check_source(config: ml_collections.ConfigDict) -> None:
  """config.init_from names a run whose model can become this one (before anything else)."""
  source = os.path.abspath(config.init_from)
  try:
    src_config = wd.load_config(source)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
  transfer.check_compatible(src_config, config, source)


def _convert_from(config: ml_collections.ConfigDict, cfg: models.ModelConfig, state: TrainState,
                  state_sh: Any, workdir: str) -> TrainState:
  """The initial state with every matching parameter taken from config.init_from's best
  checkpoint (luna_jax/transfer.py); writes WORKDIR/init_from.json (what was copied,
  initialised and dropped, and the source's numbers)."""
  source = os.path.abspath(config.init_from)
  try:
    src_config, src_params, src_step = wd.load_params(source, "best")
  except (FileNotFoundError, wd.CheckpointError) as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
  params, report = transfer.transfer(src_params, jax.device_get(state.params),
                                     target_is_luna=models.carries_p(cfg))
  state = state.replace(params=jax.device_put(params, state_sh.params))
  src_results = wd.read_json(wd.path(source, wd.RESULTS_FILE)) or {}
  info = {**wd.best_identity(source), "attention": src_config.model.attention,
          "test_accuracy": src_results.get("test_accuracy"),
          "summary": report.summary(), **report.to_dict()}
  if jax.process_index() == 0:
    wd.write_json(wd.path(workdir, wd.INIT_FROM_FILE), info)
  _say(f"{report.summary()} (from {source}, step {src_step})")
  return state


def _final_evaluation(ckpts: wd.Checkpoints, workdir: str, writer: metrics_lib.MetricWriter,
                      evaluate: Callable, state: TrainState, step: int, abstract: Any,
                      state_sh: Any, progress: metrics_lib.Progress) -> dict[str, Any]:
  """Test metrics of the best checkpoint that exists (best/, else the final parameters, which
  then become best/); best_step and best_val_accuracy describe that same checkpoint."""
  if ckpts.best_step() is None:
    _say(f"no best-validation checkpoint in {ckpts.best_dir}: keeping the step-{step} "
         "parameters as the best")
    ckpts.save_best(step, state.params)
  best_step = ckpts.best_step()
  params_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract.params, state_sh.params)
  best_params = ckpts.restore_best(params_target)
  val = next((r for r in wd.read_metrics(workdir)
              if r.get("step") == best_step and "val_accuracy" in r), None)
  if val is None:           # no record of it (metrics.jsonl deleted): evaluate again
    val = evaluate("validation", best_params, best_step)
    if best_step == step:
      writer.write(step, val)
  test = evaluate("test", best_params, best_step)
  if jax.process_index() == 0:
    wd.write_params_file(workdir, best_params, best_step)
  writer.write(step, {**test, "test_at_step": best_step})
  progress.log(step, {**test, "best_step": float(best_step)})
  return {"best_val_accuracy": val["val_accuracy"], "best_step": best_step, **test}


def split_name(split: str) -> str:
  return {"validation": "val"}.get(split, split)
