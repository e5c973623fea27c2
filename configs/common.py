"""Defaults shared by the task configs and the small argument language of `get_config(arg)`.

`arg` is a comma-separated list: bare words select variants (an attention name such as `luna`
or `softmax`; `small`, the small-model protocol; `quick`, a CPU-minutes run); `key=value` items
set fields (`l=256` is short for `model.proj_len=256`). Example: `get_config("luna,l=16,small")`.

Protocols (recorded in `config.protocol` and in results.json):
* `luna_paper`: `luna` without `small`: the Luna paper's recipe per task.
* `lra_reference`: every other mechanism without `small`: the LRA reference Transformer recipe.
* `small`: the small-model protocol of the Nystromformer LRA code (also used by Skyformer and
  LUNA): pre-LN, 2 layers, width 64, FFN 128, 2 heads, learned positions, mean pooling, AdamW
  (0.9, 0.999, eps 1e-6, no decay), torch OneCycleLR linear schedule. Every mechanism runs at the
  same sizes; Luna keeps its own layer (post-LN, P updated per layer) and adds its P and pack
  projections.
* `quick`: a short run on small generated data; not comparable with any published number.
"""
from __future__ import annotations

import ml_collections

from luna_jax.attention import ATTENTION_NAMES

ATTENTIONS = ATTENTION_NAMES
VARIANTS = ("small", "quick")
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
  unknown = words - set(ATTENTIONS) - set(VARIANTS)
  if unknown:
    raise ValueError(f"config argument {arg!r}: unknown variant(s) {sorted(unknown)}; "
                     f"expected an attention ({', '.join(ATTENTIONS)}), "
                     f"{' or '.join(map(repr, VARIANTS))}, or key=value")
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
  c.schedule = "inverse_sqrt"  # inverse_sqrt (Luna/fairseq) | rsqrt_lra | cosine | one_cycle
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
  c.length_buckets = 0         # >1: batches from that many length buckets (padded tasks; exact,
                               # but length-homogeneous batches, so the protocol becomes custom)
  c.init_from = ""             # a trained run's workdir: start from its best parameters
                               # (post-hoc conversion, luna_jax/transfer.py)
  c.allow_resume_changes = False  # resume with a changed schedule (luna_jax/workdir.py)
  c.allow_truncation = True    # False: refuse ListOps rows longer than seq_len (else counted)
  c.protocol = "custom"        # luna_paper | lra_reference | small | quick (set by the variant)
  # torch OneCycleLR defaults (schedule "one_cycle"); cycle_momentum cycles Adam's beta1.
  c.one_cycle = ml_collections.ConfigDict(dict(
      div_factor=25.0, final_div_factor=1e4, cycle_momentum=True, base_momentum=0.85,
      max_momentum=0.95))

  m = c.model = ml_collections.ConfigDict()
  m.attention = "luna"
  m.proj_len = 256
  m.num_layers = 1
  m.emb_dim = 128
  m.num_heads = 4
  m.num_pack_heads = 0         # 0 -> num_heads
  m.mlp_dim = 256
  m.qkv_dim = 0                # attention width (all heads); 0 -> emb_dim (Luna: must be)
  m.qkv_bias = False           # biases on the non-Luna q/k/v/out projections
  m.max_len = 0                # position table length; 0 -> seq_len
  m.tie_kv = False
  m.tie_layer_weights = False
  m.dynamic_projection = True
  m.dropout = 0.1
  m.attention_dropout = 0.1
  m.activation_dropout = 0.0
  m.block = "post_ln"          # post_ln (Luna: always) | pre_ln (LRA reference, small protocol)
  m.positions = "learned"      # learned | sinusoidal
  m.embedding = "tokens"       # tokens | linear (pixel values through a Dense) | patches
  m.patch_size = 0             # embedding="patches": side of the square patches
  m.readout = "cls"            # cls | first | mean | mean_padded (luna_jax/models.py)
  m.classifier_dim = 256
  m.classifier_layers = 1      # hidden layers of the head (widths C, C/2, ...)
  m.classifier_bias = False    # bias on the head's last Dense
  m.retrieval_combine = "luna" # luna: [doc2, doc1] | concat: [u, v] | interact: [u, v, u*v, u-v]
  m.init = "default"           # default (per-module init) | bert (N(0, 0.02)) | torch (nn.Linear)
  m.dtype = "float32"          # float32 | bfloat16 compute (params and softmax stay float32)
  m.remat = False
  m.redraw_every = 1000        # random-feature redraw interval (Performer)
  # Mechanism-specific options, passed to the attention module as keyword arguments
  # (defaults = the modules' defaults; see each module's docstring).
  m.luna = ml_collections.ConfigDict({"implementation": "xla"})
  # softmax: "blocked" (and "auto" on CPU/TPU from common.BLOCKED_MIN_KEYS keys) takes
  # block_size keys and query_block_size queries (0: all) per step (attention/blocked.py).
  m.softmax = ml_collections.ConfigDict({"implementation": "xla", "block_size": 128,
                                         "query_block_size": 0})
  m.cheap_linear = ml_collections.ConfigDict({"form": "transformer", "normalization": "auto",
                                              "gated": False})
  m.linear_elu = ml_collections.ConfigDict({"eps": 1e-6})
  m.performer = ml_collections.ConfigDict({"num_features": 256, "kernel": "softmax",
                                           "redraw": True})
  m.learned_kernel = ml_collections.ConfigDict({
      "num_features": 32, "num_outputs": 4, "hidden": 64, "shared_mlp": True,
      "envelope": "none", "rms_rescale": False})
  m.cosformer = ml_collections.ConfigDict({})
  return c


def lra_reference_model(c: ml_collections.ConfigDict) -> None:
  """The LRA reference Transformer conventions used for the non-Luna baselines (task configs set
  sizes, rates and schedules after calling this)."""
  c.protocol = "lra_reference"
  c.model.block = "pre_ln"
  c.model.positions = "sinusoidal"
  c.model.classifier_bias = True
  c.adam_eps = 1e-9
  c.schedule = "rsqrt_lra"
  c.model.performer.kernel = "relu"   # LRA ran the generalized ReLU kernel (ListOps: FAVOR+)


def mlp_dropout_as_block(c: ml_collections.ConfigDict) -> None:
  """LRA reference MLP: dropout after the GELU at the block's dropout rate."""
  c.model.activation_dropout = c.model.dropout


def small_protocol(c: ml_collections.ConfigDict, *, batch: int, steps: int, warmup: int,
                   eval_every: int, eval_batches: int, max_len: int) -> None:
  """The small-model protocol (module docstring); per-task values from its table.

  Evaluation: `eval_batches` batches of the validation split every `eval_every` steps (the
  first eval_batches * batch examples, in order); the test split is evaluated whole."""
  m = c.model
  c.protocol = "small"
  m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads = 2, 64, 128, 2
  m.qkv_dim = 0
  m.num_pack_heads, m.tie_layer_weights, m.tie_kv = 0, False, False
  m.classifier_dim, m.classifier_layers, m.classifier_bias = 128, 1, True
  m.dropout = m.attention_dropout = m.activation_dropout = 0.1
  m.positions, m.readout, m.init = "learned", "mean_padded", "torch"
  m.embedding = "tokens"
  m.max_len = max_len
  m.qkv_bias = True
  m.block = "post_ln" if m.attention == "luna" else "pre_ln"   # Luna keeps its own layer
  m.retrieval_combine = "interact"
  m.performer.kernel = "relu"      # the protocol's performer-256 config names the relu kernel
  c.batch_size, c.num_train_steps, c.warmup_steps = batch, steps, warmup
  c.learning_rate, c.weight_decay, c.grad_clip = 1e-4, 0.0, 0.0
  c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-6
  c.schedule = "one_cycle"
  c.eval_every, c.eval_max_examples = eval_every, eval_batches * batch
  c.checkpoint_every = eval_every * max(1, 500 // eval_every)


# Fields a protocol leaves free: changing them keeps the protocol name (each published table
# varies them: projection length, seed, where the data is, how often to save, how to run).
PROTOCOL_KNOBS = ("model.proj_len", "seed", "data_dir", "checkpoint_every", "keep_checkpoints",
                  "log_every", "grain_workers", "model.remat", "model.luna.implementation",
                  "model.softmax.implementation", "model.softmax.block_size",
                  "model.softmax.query_block_size", "protocol", "allow_resume_changes",
                  "allow_truncation")


def mark_overrides(c: ml_collections.ConfigDict, keys) -> None:
  """A protocol changed by any override outside PROTOCOL_KNOBS becomes "custom"."""
  if c.protocol != "quick" and any(k not in PROTOCOL_KNOBS for k in keys):
    c.protocol = "custom"


def finish(c: ml_collections.ConfigDict, attention: str, words: set[str],
           kv: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets the protocol name and applies the key=value overrides (last step of every config)."""
  if "quick" in words:
    c.protocol = "quick"
  elif "small" not in words and attention == "luna":
    c.protocol = "luna_paper"
  apply_overrides(c, kv)
  mark_overrides(c, kv)
  return c
