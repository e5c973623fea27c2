"""The optimizer and its learning-rate schedules: AdamW with `config.schedule` (`SCHEDULES`),
gradient clipping, and torch OneCycleLR's momentum cycle."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

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
