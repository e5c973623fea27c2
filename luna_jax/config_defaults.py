"""Every config field with its default: what the library reads (`base_config()`). The task
configs (`configs/`) start from it and fill in each protocol's recipe; the resume check
(`luna_jax.resume_rules`) compares a stored config against these defaults for fields it lacks."""
from __future__ import annotations

import ml_collections


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
  c.allow_resume_changes = False  # resume with a changed schedule (luna_jax/resume_rules.py)
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
