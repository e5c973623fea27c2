"""Defaults shared by the task configs and the small argument language of `get_config(arg)`.

`arg` is a comma-separated list: bare words select variants (an attention name such as `luna`
or `softmax`; a protocol word, `small` or `skyformer`; `quick`, a CPU-minutes run); `key=value`
items set fields (`l=256` is short for `model.proj_len=256`). Example:
`get_config("luna,l=16,small")`.

Protocols (recorded in `config.protocol` and in results.json):
* `luna_paper`: `luna` without a protocol word: the Luna paper's recipe per task.
* `lra_reference`: every other mechanism without one: the LRA reference Transformer recipe.
* `small`: the Nystromformer LRA code as it ran (`small_protocol`), the protocol of the
  Nystromformer paper's LRA table. Every mechanism runs at the same sizes; Luna keeps its own
  layer (post-LN, P updated per layer) and adds its P and pack projections.
* `skyformer`: the Skyformer code's settings of the same model (`small_protocol`), the protocol
  of the Skyformer paper's table.
* `quick`: a short run on small generated data; not comparable with any published number.
"""
from __future__ import annotations

import ml_collections

from luna_jax.attention import ATTENTION_NAMES
from luna_jax.config_defaults import base_config  # noqa: F401  (task configs build on it)

ATTENTIONS = ATTENTION_NAMES
VARIANTS = ("small", "skyformer", "quick")
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
  protocols = sorted(words & {"small", "skyformer"})
  if len(protocols) > 1:
    raise ValueError(f"config argument {arg!r} names several protocols: {protocols}")
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


# Per task: batch, steps, warmup, evaluation cadence, peak lr, and the input as the code's
# pickles held it: `content` symbols/bytes (0: the whole image) zero-padded to `padded`, with a
# position table of `table` rows. Nystromformer: mlpen/Nystromformer LRA/code/lra_config.py and
# LRA/datasets/*.py (Text: 1,000 bytes + 24 zeros; its table follows the config's 4,000).
SMALL_TASKS = {
    "listops": dict(batch=32, steps=5000, warmup=1000, eval_every=50, eval_batches=62,
                    lr=1e-4, content=2000, padded=2048, table=2048),
    "text": dict(batch=32, steps=20000, warmup=8000, eval_every=500, eval_batches=781,
                 lr=1e-4, content=1000, padded=1024, table=4096),
    "retrieval": dict(batch=32, steps=30000, warmup=800, eval_every=300, eval_batches=565,
                      lr=1e-4, content=4000, padded=4096, table=4096),
    "image": dict(batch=256, steps=35000, warmup=175, eval_every=175, eval_batches=20,
                  lr=1e-4, content=0, padded=1024, table=1024),
    "pathfinder": dict(batch=256, steps=62400, warmup=312, eval_every=312, eval_batches=312,
                       lr=1e-4, content=0, padded=1024, table=1024),
}
# Skyformer: pkuzengqi/Skyformer src/config.py and src/preprocess/create_*.py (Text batch 16 as
# in its camera-ready commit 6ffd607 and paper, which the published rows ran; 32 at HEAD).
SKYFORMER_TASKS = {
    "listops": dict(batch=32, steps=50000, warmup=1000, eval_every=500, eval_batches=62,
                    lr=1e-4, content=2000, padded=2048, table=2048),
    "text": dict(batch=16, steps=50000, warmup=80, eval_every=500, eval_batches=200,
                 lr=1e-4, content=4000, padded=4096, table=4096),
    "retrieval": dict(batch=16, steps=50000, warmup=800, eval_every=1000, eval_batches=300,
                      lr=2e-4, content=4000, padded=4096, table=4096),
    "image": dict(batch=256, steps=50000, warmup=175, eval_every=50, eval_batches=20,
                  lr=1e-4, content=0, padded=1024, table=1024),
    "pathfinder": dict(batch=128, steps=50000, warmup=312, eval_every=500, eval_batches=156,
                       lr=2e-4, content=0, padded=1024, table=1024),
}
PROTOCOL_TASKS = {"small": SMALL_TASKS, "skyformer": SKYFORMER_TASKS}


def small_protocol(c: ml_collections.ConfigDict, protocol: str = "small") -> None:
  """The small-model protocol of the Nystromformer LRA code as it ran (`small`), or the
  Skyformer code's settings of the same model (`skyformer`); per-task values from
  `PROTOCOL_TASKS`, model and data handling as shared/reference/recipes-and-results.md lists.

  Both: pre-LN, 2 layers, width 64, FFN 128, 2 heads, learned positions, N(0, 0.02) embeddings,
  biases on q/k/v/out, dropout 0.1 everywhere, mean readout dividing by the padded length;
  AdamW (0.9, 0.999, eps 1e-6, no decay) with torch's OneCycleLR; evaluation on the next
  `eval_batches` batches of an endless reshuffled validation stream, the test split on the best
  checkpoint without its last partial batch; ListOps bracket-free (`listops.tokens`); black
  pixels as padding in Image and Pathfinder; Performer as performer-pytorch ran there
  (`form="nystromformer_lra"`, features drawn once). The original trained in fp16 with an fp32
  attention core: we keep `model.dtype` float32 (recorded in results.json); bfloat16 on a GPU is
  the closest choice. Embedding tables have fewer unused rows than theirs (vocabulary 32 or
  512 there), so `num_params` is smaller by those rows only.
  Skyformer adds: 50,000 steps, gradient value clipping at 1, the best checkpoint saved only
  after 20% of training, Performer with 128 features, Text at 4,000 bytes.
  Luna keeps its own layer (post-LN, P per layer) at the same sizes, l=16."""
  t = PROTOCOL_TASKS[protocol][c.task]
  m = c.model
  c.protocol = protocol
  m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads = 2, 64, 128, 2
  m.qkv_dim = 0
  m.num_pack_heads, m.tie_layer_weights, m.tie_kv = 0, False, False
  m.classifier_dim, m.classifier_layers, m.classifier_bias = 128, 1, True
  m.dropout = m.attention_dropout = m.activation_dropout = 0.1
  m.positions, m.readout, m.init = "learned", "mean_padded", "torch"
  m.embedding = "tokens"
  m.qkv_bias = True
  m.block = "post_ln" if m.attention == "luna" else "pre_ln"   # Luna keeps its own layer
  m.retrieval_combine = "interact"
  m.proj_len = 16
  m.performer.update(kernel="softmax", num_features=128 if protocol == "skyformer" else 256,
                     redraw=False, form="nystromformer_lra")
  c.seq_len, c.truncate_len, m.max_len = t["padded"], t["content"], t["table"]
  if "append_eos" in c:
    c.append_eos = False
  if "listops" in c:
    c.listops.tokens = "no_brackets"
  c.black_is_padding = c.task in ("image", "pathfinder")
  c.batch_size, c.num_train_steps, c.warmup_steps = t["batch"], t["steps"], t["warmup"]
  c.learning_rate, c.weight_decay, c.grad_clip = t["lr"], 0.0, 0.0
  c.adam_b1, c.adam_b2, c.adam_eps = 0.9, 0.999, 1e-6
  c.schedule = "one_cycle"
  c.eval_every, c.eval_max_examples = t["eval_every"], t["eval_batches"] * t["batch"]
  c.eval_stream = c.test_drop_last = True
  c.checkpoint_every = c.eval_every * max(1, 500 // c.eval_every)
  if protocol == "skyformer":
    c.grad_clip_value, c.save_best_after = 1.0, 0.2


# Fields a protocol leaves free: changing them keeps the protocol name (each published table
# varies them: projection length, seed, where the data is, how often to save, how to run).
PROTOCOL_KNOBS = ("model.proj_len", "seed", "data_dir", "checkpoint_every", "keep_checkpoints",
                  "log_every", "grain_workers", "model.remat", "model.luna.implementation",
                  "model.softmax.implementation", "model.softmax.block_size",
                  "model.softmax.query_block_size", "allow_resume_changes",
                  "allow_truncation")


# Knobs of some protocols only. `model.dtype` (compute precision; parameters, softmax and
# kernel features stay float32) for the two small-model protocols: their codes trained in fp16
# autocast with an fp32 attention core, so bfloat16 on a GPU is as close to them as float32
# (configs/PROTOCOLS.md, "Mixed precision"). The Luna paper's and LRA's recipes state no such
# thing, so there it stays a recipe field.
PROTOCOL_EXTRA_KNOBS = {"small": ("model.dtype",), "skyformer": ("model.dtype",)}


def mark_overrides(c: ml_collections.ConfigDict, keys) -> None:
  """A protocol changed by any override outside its knobs (PROTOCOL_KNOBS and
  PROTOCOL_EXTRA_KNOBS) becomes "custom"; so does an override of `protocol` itself: a label is
  earned by the recipe, never set by hand."""
  keys = list(keys)
  if c.protocol == "quick" and "protocol" not in keys:
    return
  knobs = PROTOCOL_KNOBS + PROTOCOL_EXTRA_KNOBS.get(c.protocol, ())
  if any(k not in knobs for k in keys):
    c.protocol = "custom"


def finish(c: ml_collections.ConfigDict, attention: str, words: set[str],
           kv: dict[str, str]) -> ml_collections.ConfigDict:
  """Sets the protocol name and applies the key=value overrides (last step of every config)."""
  if "quick" in words:
    c.protocol = "quick"
  elif not words & set(PROTOCOL_TASKS) and attention == "luna":
    c.protocol = "luna_paper"
  apply_overrides(c, kv)
  mark_overrides(c, kv)
  return c
