"""The jitted programs of a run: the train step (`train_step`: one AdamW update on a global
batch), the eval step (`eval_step`: sums over a padded batch), the state they act on
(`TrainState`), the data mesh, `Programs`/`programs_of` (the compiled steps of one config, cached),
and `evaluate_split` (the eval step over a split, as the config reads it)."""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

import lra_tasks
from luna_jax import input_pipeline, models, resume_rules
from luna_jax import workdir as wd
from luna_jax.optim import make_optimizer
from luna_jax.workdir import ConfigError


class TrainState(train_state.TrainState):
  """Params + optimizer state + step (flax TrainState)."""


def model_config(config: ml_collections.ConfigDict, task: lra_tasks.TaskData
                 ) -> models.ModelConfig:
  """The static model description from `config.model` and the loaded task."""
  return models.ModelConfig.from_config(
      config.model, vocab_size=task.vocab_size, num_classes=task.num_classes,
      max_len=config.model.get("max_len", 0) or config.seq_len, pad_id=task.pad_id,
      num_docs=task.num_docs, readout_length=config.seq_len)


def dummy_inputs(cfg: models.ModelConfig, seq_len: int, batch: int = 1) -> jnp.ndarray:
  """Ones of the model's input shape: [batch, seq_len], or [batch, 2, seq_len] for two documents."""
  shape = (batch, 2, seq_len) if cfg.num_docs == 2 else (batch, seq_len)
  return jnp.ones(shape, jnp.int32)


def init_state(config: ml_collections.ConfigDict, cfg: models.ModelConfig, key: jax.Array
               ) -> TrainState:
  """A fresh (unjitted, unsharded) train state of `cfg` with `config`'s optimizer."""
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
  """Per-example softmax cross-entropy of logits [..., C] in float32 against integer targets [...]."""
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
def accumulate_metrics(acc: dict[str, jax.Array], m: dict[str, jax.Array], first_bad: jax.Array,
                step: int, fresh: bool) -> tuple[dict[str, jax.Array], jax.Array]:
  """Running sums of the step metrics (`m` itself if `fresh`) and the first step whose loss is
  not finite (-1: none so far), on device: one dispatch per step and no host sync."""
  acc = m if fresh else jax.tree.map(jnp.add, acc, m)
  return acc, jnp.where((first_bad < 0) & ~jnp.isfinite(m["loss"]), step, first_bad)


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
  key = (wd.dumps(resume_rules.config_dict(config), sort_keys=True), cfg, mesh)
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


def run_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(initialisation key, key of the per-step randomness: dropout, random features) of a run."""
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  return init_key, step_key


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's part of a batch as global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def length_buckets(config: ml_collections.ConfigDict, task: lra_tasks.TaskData
                   ) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
  """(bucket lengths, real lengths per split) when config.length_buckets > 1 and the task pads;
  ((), {}) otherwise."""
  if config.get("length_buckets", 0) <= 1 or task.pad_id is None:
    return (), {}
  buckets = input_pipeline.bucket_lengths(config.seq_len, config.length_buckets)
  return buckets, {name: input_pipeline.example_lengths(split, task.pad_id)
                   for name, split in task.splits.items()}


def evaluate_split(config: ml_collections.ConfigDict, task: lra_tasks.TaskData,
                   eval_fn: Callable, data_sh: NamedSharding, split: str, params: Any,
                   step: int, step_key: jax.Array, buckets: tuple[int, ...] = (),
                   lengths: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """Loss, accuracy, majority-class rate and example count of `params` (made by `step`
  updates) on `split`, read as `eval_batches` says; `eval_fn` is `Programs.eval`."""
  sums = None
  for batch in eval_batches(config, task, split, step, buckets, lengths or {}):
    batch["class_counts"] = np.eye(task.num_classes, dtype=np.float32)[batch["targets"]]
    batch["class_counts"] *= batch["weights"][:, None]
    out = eval_fn(params, global_batch(batch, data_sh), step_key, jnp.asarray(step))
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


def eval_batches(config: ml_collections.ConfigDict, task: lra_tasks.TaskData, split: str,
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


def split_name(split: str) -> str:
  """The metric prefix of a split: val, test, train."""
  return {"validation": "val"}.get(split, split)
