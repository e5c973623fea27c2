"""`train_and_evaluate(config, workdir)`: the LRA trainer (train.py, tests and notebooks call it).

Data parallel over every device of every host: one jitted step on a `Mesh` with a `data` axis,
the batch sharded over it and the state replicated. Checkpoints (orbax) hold the train state and
the grain iterator together, so a killed run resumes exactly; per-step randomness is
`fold_in(key, step)`. Validation every `eval_every` steps; the best-validation state is kept in
WORKDIR/best and evaluated on the test split at the end.

WORKDIR holds: metrics.jsonl (one JSON object per line), tb/ (TensorBoard events),
checkpoints/ (the latest `keep_checkpoints`), best/ (best validation), config.json, results.json.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

import lra_tasks
from luna_jax import input_pipeline, metrics as metrics_lib, models
from luna_jax.attention import ATTENTION_NAMES

RESULTS_FILE = "results.json"


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
      num_docs=task.num_docs)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any compute on a config that cannot work, naming the field."""
  m = config.model
  if m.attention not in ATTENTION_NAMES:
    raise ValueError(f"config.model.attention={m.attention!r} is not a known attention; "
                     f"valid names: {', '.join(ATTENTION_NAMES)}")
  n_dev = jax.device_count()
  if config.batch_size % n_dev:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{n_dev} devices; use a multiple of {n_dev}")
  if config.seq_len <= 0:
    raise ValueError(f"config.seq_len={config.seq_len} must be positive")
  max_len = m.get("max_len", 0)
  if max_len and config.seq_len > max_len:
    raise ValueError(f"config.seq_len={config.seq_len} is longer than the position table "
                     f"config.model.max_len={max_len}")
  heads = [("config.model.num_heads", m.num_heads)]
  if m.attention == "luna":
    heads.append(("config.model.num_pack_heads", m.num_pack_heads or m.num_heads))
  for field, h in heads:
    if h <= 0 or m.emb_dim % h:
      raise ValueError(f"config.model.emb_dim={m.emb_dim} is not divisible by {field}={h}")
  if m.attention == "luna" and m.get("qkv_dim", 0) not in (0, m.emb_dim):
    raise ValueError(f"config.model.qkv_dim={m.qkv_dim} must be 0 or emb_dim={m.emb_dim} for "
                     "luna (its packed context has no output projection)")
  qkv = m.get("qkv_dim", 0) or m.emb_dim
  if qkv % m.num_heads:
    raise ValueError(f"config.model.qkv_dim={qkv} is not divisible by "
                     f"config.model.num_heads={m.num_heads}")
  allowed_values = {"readout": models.READOUTS, "block": ("post_ln", "pre_ln"),
                    "positions": ("learned", "sinusoidal"), "embedding": ("tokens", "linear"),
                    "init": tuple(models.INITS), "dtype": ("float32", "bfloat16"),
                    "retrieval_combine": ("luna", "concat", "interact")}
  for field, allowed in allowed_values.items():
    if m[field] not in allowed:
      raise ValueError(f"config.model.{field}={m[field]!r}; expected one of {allowed}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"config.schedule={config.schedule!r}; expected one of {SCHEDULES}")
  if config.num_train_steps <= 0 or config.eval_every <= 0:
    raise ValueError("config.num_train_steps and config.eval_every must be positive")


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
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, config.num_train_steps)


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
  return tx


# ----------------------------------------------------------------------------- steps

def dummy_inputs(cfg: models.ModelConfig, seq_len: int, batch: int = 1) -> jnp.ndarray:
  shape = (batch, 2, seq_len) if cfg.num_docs == 2 else (batch, seq_len)
  return jnp.ones(shape, jnp.int32)


def init_state(config: ml_collections.ConfigDict, cfg: models.ModelConfig, key: jax.Array
               ) -> TrainState:
  model = models.Classifier(cfg)
  params = model.init(key, dummy_inputs(cfg, config.seq_len))["params"]
  if (reinit := models.INITS[config.model.init]) is not None:
    params = reinit(params, jax.random.fold_in(key, 1))
  return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config))


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


class _StopFlag:
  """Set by SIGTERM/SIGINT so the loop can save and exit cleanly at a step boundary."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def machine_description() -> dict[str, Any]:
  """What ran this: device kind and count, processes, CPU model, jax version."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return {"device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "cpu": cpu, "cpu_count": os.cpu_count(),
          "jax": jax.__version__}


def _peak_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _dump_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------- main loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the results dict
  also written to WORKDIR/results.json."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  task = lra_tasks.load_task(config)
  cfg = model_config(config, task)
  if task.seq_len != config.seq_len:
    raise ValueError(f"config.seq_len={config.seq_len} but the task data has length "
                     f"{task.seq_len}")
  _dump_config(config, workdir)
  if jax.process_index() == 0 and os.path.exists(os.path.join(workdir, "FAILED")):
    os.remove(os.path.join(workdir, "FAILED"))   # a rerun replaces the old verdict

  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  key = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(key)
  init_fn = functools.partial(init_state, config, cfg)
  abstract = jax.eval_shape(init_fn, init_key)
  state_sh = jax.tree.map(lambda _: repl, abstract)
  state = jax.jit(init_fn, out_shardings=state_sh)(init_key)
  num_params = models.count_params(state.params)

  redraw = config.model.redraw_every
  p_train = jax.jit(functools.partial(train_step, redraw_every=redraw),
                    in_shardings=(state_sh, data_sh, repl), out_shardings=(state_sh, repl),
                    donate_argnums=0)
  p_eval = jax.jit(functools.partial(eval_step, apply_fn=state.apply_fn, redraw_every=redraw),
                   in_shardings=(state_sh.params, data_sh, repl, repl), out_shardings=repl)

  train_iter = input_pipeline.train_iterator(task.splits["train"], config.batch_size,
                                             config.seed, config.grain_workers)
  policies = ocp.checkpoint_managers
  ckpt_opts = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, enable_async_checkpointing=True,
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(config.checkpoint_every),
          policies.PreemptionCheckpointingPolicy()]))
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=ckpt_opts)
  best_mngr = ocp.CheckpointManager(
      os.path.join(workdir, "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False))
  writer = metrics_lib.MetricWriter(workdir)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_sh)

  first_step = 0
  best_val, best_step = -1.0, -1
  if (latest := mngr.latest_step()) is not None:
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data_iter=ocp.args.JsonRestore()))
    state = restored.state
    train_iter.set_state(restored.data_iter)
    first_step = int(state.step)
    writer.truncate_after(first_step)
    logging.info("resumed from step %d", first_step)
    print(f"resumed from step {first_step} ({workdir})", flush=True)
  for rec in metrics_lib.read_metrics(workdir):
    if "val_accuracy" in rec and rec["val_accuracy"] > best_val:
      best_val, best_step = rec["val_accuracy"], rec["step"]

  if first_step == 0:
    print(f"{config.task}: {cfg.attention} model with {num_params:,} parameters on "
          f"{jax.device_count()} device(s), {jax.process_count()} process(es); "
          f"workdir {workdir}", flush=True)
    writer.write(0, {"num_params": num_params, "num_devices": jax.device_count()})
    writer.write_hparams(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))

  def evaluate(split: str, params: Any, step: int) -> dict[str, float]:
    sums = None
    # eval_max_examples caps model selection only; the test split is always evaluated whole.
    cap = config.eval_max_examples if split == "validation" else 0
    for batch in input_pipeline.eval_batches(task.splits[split], config.batch_size, cap):
      batch["class_counts"] = np.eye(task.num_classes, dtype=np.float32)[batch["targets"]]
      batch["class_counts"] *= batch["weights"][:, None]
      out = p_eval(params, _global(batch, data_sh), step_key, jnp.asarray(step))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = max(float(sums["count"]), 1.0)
    name = split_name(split)
    return {f"{name}_loss": float(sums["loss"]) / count,
            f"{name}_accuracy": float(sums["correct"]) / count,
            f"{name}_majority_accuracy": float(sums["class_counts"].max()) / count}

  def save(step: int, force: bool = False) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(train_iter.get_state())), force=force)

  stop = _StopFlag()
  stop.install()
  progress = metrics_lib.Progress(config.num_train_steps, first_step)
  acc_metrics, acc_n = None, 0
  first_bad = None
  step = first_step
  t_log = time.time()
  stopped_by = None
  try:
    while step < config.num_train_steps:
      batch = _global(next(train_iter), data_sh)
      state, m = p_train(state, batch, step_key)
      step += 1
      acc_metrics = m if acc_metrics is None else jax.tree.map(jnp.add, acc_metrics, m)
      acc_n += 1
      # Track the first non-finite step on device (no host sync per step).
      bad = ~jnp.isfinite(m["loss"])
      first_bad = (jnp.where(bad, step, -1) if first_bad is None
                   else jnp.where((first_bad < 0) & bad, step, first_bad))
      is_log = step % config.log_every == 0 or step == config.num_train_steps
      is_eval = step % config.eval_every == 0 or step == config.num_train_steps
      is_ckpt = step % config.checkpoint_every == 0
      progress.tick(step)
      if stop.signal is None and jax.process_count() > 1:
        if mngr.reached_preemption(step):
          stop.signal = signal.SIGTERM
      if is_log or is_eval or is_ckpt or stop.signal is not None:
        fb = int(first_bad)
        if fb >= 0:
          msg = (f"training loss became NaN/Inf at step {fb}; stopping. The last good checkpoint "
                 f"in {os.path.join(workdir, 'checkpoints')} is kept (step {mngr.latest_step()}).")
          if jax.process_index() == 0:   # marker read by luna_jax.results
            with open(os.path.join(workdir, "FAILED"), "w") as f:
              f.write(f"NonFiniteLossError: {msg}\n")
          raise NonFiniteLossError(msg)
      if is_log and acc_n:
        host = jax.device_get(acc_metrics)
        dt = time.time() - t_log
        rec = {f"train_{k}": float(v) / acc_n for k, v in host.items()}
        rec["learning_rate"] = float(learning_rate_schedule(config)(step - 1))
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
          best_val, best_step = val["val_accuracy"], step
          best_mngr.save(step, args=ocp.args.StandardSave(state.params), force=True)
          best_mngr.wait_until_finished()
        t_log = time.time()
      save(step, force=stop.signal is not None or step == config.num_train_steps)
      if stop.signal is not None:
        stopped_by = signal.Signals(stop.signal).name
        print(f"received {stopped_by}: saved step {step}; rerun the same command to resume",
              flush=True)
        break
  finally:
    mngr.wait_until_finished()
    stop.restore()

  results: dict[str, Any] = {
      "task": config.task, "attention": cfg.attention, "proj_len": cfg.proj_len,
      "seed": config.seed, "num_params": num_params, "step": step,
      "num_train_steps": config.num_train_steps, "finished": stopped_by is None,
      "best_val_accuracy": best_val, "best_step": best_step,
      "protocol": config.get("protocol", "custom"), "data": dict(task.provenance),
      "dtype": cfg.dtype, "machine": machine_description()}
  if stopped_by is None:
    if best_step >= 0 and best_mngr.latest_step() is not None:
      params_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract.params, state_sh.params)
      best_params = best_mngr.restore(best_mngr.latest_step(),
                                      args=ocp.args.StandardRestore(params_target))
    else:
      best_params = state.params
    test = evaluate("test", best_params, best_step)
    writer.write(step, {**test, "test_at_step": best_step})
    progress.log(step, {**test, "best_step": float(best_step)})
    results.update(test)
    train_recs = [r for r in metrics_lib.read_metrics(workdir) if "steps_per_s" in r]
    if train_recs:
      results["steps_per_s"] = float(np.median([r["steps_per_s"] for r in train_recs]))
    if jax.process_index() == 0:
      with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=2)
  writer.close()
  mngr.close()
  best_mngr.close()
  return results


def split_name(split: str) -> str:
  return {"validation": "val"}.get(split, split)
