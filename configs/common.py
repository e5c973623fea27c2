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


def base_config() -> ml_collections.ConfigDict:
  """Fields every task config has (task files fill in the recipe)."""
  c = ml_collections.ConfigDict()
  c.task = ""
  c.data_dir = ""              # "" -> the task's built-in generated data (ListOps, Pathfinder)
  c.seq_len = 0                # full model input length, special tokens included
  c.truncate_len = 0           # >0: keep at most this many symbols/bytes, then zeros to seq_len
  c.black_is_padding = False   # pixel tasks: token 0 (black) is padding (lra_tasks.common)
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
  c.grad_clip = 0.0            # >0: clip the gradient's global norm (0 = no clipping)
  c.grad_clip_value = 0.0      # >0: clip each gradient entry to [-v, v] (torch clip_grad_value_)
  c.eval_every = 500
  c.eval_max_examples = 0      # 0 = the whole split
  c.eval_stream = False        # True: each validation reads the next eval_max_examples of an
                               # endless reshuffled stream (the small protocol's code)
  c.test_drop_last = False     # True: the test split without its last partial batch
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.save_best_after = 0.0      # best/ is written only after this fraction of num_train_steps
                               # (the best score is tracked from the start; Skyformer: 0.2)
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
                                           "redraw": True, "form": "favor"})
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
