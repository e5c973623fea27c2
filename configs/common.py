"""Defaults shared by the task configs and the small argument language of `get_config(arg)`.

`arg` is a comma-separated list: bare words select variants (an attention name such as `luna`
or `softmax`, or `quick`); `key=value` items set fields (`l=256` is short for
`model.proj_len=256`). Example: `get_config("luna,l=16,quick")`.
"""
from __future__ import annotations

import ml_collections

from luna_jax.attention import ATTENTION_NAMES

ATTENTIONS = ATTENTION_NAMES
SHORTHANDS = {"l": "model.proj_len", "layers": "model.num_layers", "seed": "seed",
              "lr": "learning_rate", "steps": "num_train_steps", "bs": "batch_size"}


def parse_arg(arg: str | None) -> tuple[str, set[str], dict[str, str]]:
  """Splits `arg` into (attention name, variant words, key=value overrides)."""
  words, kv = set(), {}
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" in item:
      k, v = item.split("=", 1)
      kv[SHORTHANDS.get(k, k)] = v
    else:
      words.add(item)
  attention = [w for w in words if w in ATTENTIONS]
  if len(attention) > 1:
    raise ValueError(f"config argument {arg!r} names several attentions: {attention}")
  unknown = words - set(ATTENTIONS) - {"quick"}
  if unknown:
    raise ValueError(f"config argument {arg!r}: unknown variant(s) {sorted(unknown)}; "
                     f"expected an attention ({', '.join(ATTENTIONS)}), 'quick' or key=value")
  return (attention[0] if attention else "luna"), words - set(attention), kv


def apply_overrides(config: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """Sets dotted `key=value` items, converting each value to the field's type."""
  for key, raw in kv.items():
    node, *path = [config] + key.split(".")
    *parents, leaf = path
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"config argument sets unknown field {key!r}")
    old = node[leaf]
    if isinstance(old, bool):
      value = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float, str)):
      value = type(old)(raw)
    else:
      value = raw
    node[leaf] = value


def base_config() -> ml_collections.ConfigDict:
  """Fields every task config has (task files fill in the recipe)."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.data_dir = ""              # "" -> the task's built-in generated data (ListOps, Pathfinder)
  c.seq_len = 0                # full model input length, special tokens included
  c.batch_size = 32            # global batch size (all devices of all hosts)
  c.num_train_steps = 5000
  c.warmup_steps = 1000
  c.learning_rate = 1e-4       # peak learning rate
  c.schedule = "inverse_sqrt"  # inverse_sqrt (Luna/fairseq) | rsqrt_lra | cosine
  c.warmup_init_lr = 1e-7
  c.weight_decay = 0.0         # decoupled (optax.adamw), applied to every parameter
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-8
  c.grad_clip = 0.0            # 0 = no clipping
  c.eval_every = 500
  c.eval_max_examples = 0      # 0 = the whole split
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.seed = 0
  c.grain_workers = 0          # >0 uses grain multiprocessing (needs absl flags: train.py)

  m = c.model = ml_collections.ConfigDict()
  m.attention = "luna"
  m.proj_len = 256
  m.num_layers = 1
  m.emb_dim = 128
  m.num_heads = 4
  m.num_pack_heads = 0         # 0 -> num_heads
  m.mlp_dim = 256
  m.tie_kv = False
  m.tie_layer_weights = False
  m.dynamic_projection = True
  m.dropout = 0.1
  m.attention_dropout = 0.1
  m.activation_dropout = 0.0
  m.block = "post_ln"          # non-Luna blocks: post_ln | pre_ln (LRA reference)
  m.positions = "learned"      # learned | sinusoidal
  m.embedding = "tokens"       # tokens | linear (pixel values through a Dense)
  m.readout = "cls"            # cls | mean
  m.classifier_dim = 256
  m.retrieval_combine = "luna" # luna: [doc2, doc1] | interact: [u, v, u*v, u-v]
  m.init = "default"           # default (official per-module init) | bert (N(0, 0.02))
  m.dtype = "float32"          # float32 | bfloat16 compute (params and softmax stay float32)
  m.remat = False
  m.redraw_every = 1000        # random-feature redraw interval (Performer)
  # Mechanism-specific options, passed to the attention module as keyword arguments
  # (defaults = the modules' defaults; see each module's docstring).
  m.luna = ml_collections.ConfigDict({"use_flash": False})
  m.softmax = ml_collections.ConfigDict({"implementation": "xla"})
  m.cheap_linear = ml_collections.ConfigDict({"normalization": "length", "gated": False})
  m.linear_elu = ml_collections.ConfigDict({"eps": 1e-6})
  m.performer = ml_collections.ConfigDict({"num_features": 256, "kernel": "softmax",
                                           "redraw": True})
  m.learned_kernel = ml_collections.ConfigDict({
      "num_features": 32, "num_outputs": 4, "hidden": 64, "shared_mlp": True,
      "envelope": "none", "rms_rescale": False})
  m.cosformer = ml_collections.ConfigDict({})
  return c


def lra_reference_model(c: ml_collections.ConfigDict) -> None:
  """The LRA reference Transformer block conventions used for the non-Luna baselines."""
  c.model.block = "pre_ln"
  c.model.positions = "sinusoidal"
  c.adam_eps = 1e-9
  c.schedule = "rsqrt_lra"
