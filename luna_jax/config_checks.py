"""Config checks before any compute: `validate_config` (the config alone) and `check_task` (the
config against the loaded data). Each failure is a ConfigError naming the field."""
from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

import lra_tasks
from luna_jax import models, resume_rules
from luna_jax.attention import ATTENTION_NAMES, get_attention
from luna_jax.optim import SCHEDULES
from luna_jax.workdir import ConfigError


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any compute on a config that cannot work, naming the field (ConfigError)."""
  for field, value in resume_rules.flatten(config.to_dict()).items():
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


def check_task(config: ml_collections.ConfigDict, task: lra_tasks.TaskData) -> None:
  """Fails before any compute on loaded data that cannot train: a length other than
  config.seq_len, or an empty split."""
  if task.seq_len != config.seq_len:
    raise ConfigError(f"config.seq_len={config.seq_len} but the task data has length "
                      f"{task.seq_len}")
  source = f"config.data_dir={config.data_dir!r}" if config.data_dir else "generated data"
  lra_tasks.common.check_splits(task, source)
