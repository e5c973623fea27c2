r"""ListOps (LRA): Luna recipe of the Luna paper; LRA reference recipe for the baselines.

Quick run (built-in generated data, a few minutes on a laptop CPU):
  python train.py --config=configs/listops.py:quick --workdir=runs/listops_quick

Small-model protocol (the Nystromformer LRA code as it ran; configs/common.py; generated
full-size data when data_dir is empty; bracket-free tokens, 2,000 symbols + 48 zeros):
  python train.py --config=configs/listops.py:softmax,small --workdir=runs/listops_small_softmax
  python train.py --config=configs/listops.py:performer,small --workdir=runs/listops_small_performer
  python train.py --config=configs/listops.py:luna,small,l=16 --workdir=runs/listops_small_luna16
Skyformer protocol (the same model, 50,000 steps, value clipping; its paper's table):
  python train.py --config=configs/listops.py:softmax,skyformer --workdir=runs/listops_sky_softmax

Published recipes (official data in lra_release/listops-1000):
  python train.py --config=configs/listops.py:luna,l=256 --workdir=runs/listops_luna256 \
      --config.data_dir=/data/lra_release/listops-1000
  python train.py --config=configs/listops.py:softmax --workdir=runs/listops_softmax \
      --config.data_dir=/data/lra_release/listops-1000

Arguments: an attention name (luna [default], softmax, cheap_linear, linear_elu, performer,
learned_kernel, cosformer), `small` or `skyformer` (protocols), `quick`, and key=value items
(`l=16` sets model.proj_len). `listops.tokens` is the symbol set each protocol's published rows
read (lra_tasks/listops.py): luna_paper "fairseq", lra_reference/small/skyformer "no_brackets",
quick "brackets".
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  c = common.base_config()
  c.task = "listops"
  c.seq_len = 2001                     # 2000 tokens + CLS
  c.batch_size = 32
  c.num_train_steps = 5000
  c.warmup_steps = 1000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.listops = ml_collections.ConfigDict(dict(
      num_train=96_000, num_val=2_000, num_test=2_000, min_length=500, max_length=2000,
      max_depth=10, max_args=10, seed=0,
      tokens="no_brackets"))          # lra_tasks/listops.py, TOKEN_SETS
  m = c.model
  m.attention = attention
  m.readout = "cls"
  if attention == "luna":              # Luna paper (recipes-and-results.md)
    m.proj_len = 256
    m.num_layers, m.tie_layer_weights = 1, True
    m.emb_dim, m.mlp_dim, m.num_heads = 512, 2048, 8
    m.classifier_dim = 2048
    m.init = "bert"
    m.dropout = m.attention_dropout = 0.1
    c.learning_rate, c.weight_decay = 1e-4, 1e-4
    c.listops.tokens = "fairseq"       # fairseq-apollo: CLS, the symbols, EOS (<= 2001)
  else:                                # LRA reference recipe (the public pipeline of its
                                       # paper's time: bracket-free, the default above)
    common.lra_reference_model(c)
    m.num_layers, m.num_heads = 4, 8
    m.emb_dim, m.qkv_dim, m.mlp_dim, m.classifier_dim = 512, 512, 1024, 1024
    m.dropout = m.attention_dropout = 0.1
    common.mlp_dropout_as_block(c)
    c.learning_rate, c.weight_decay = 0.05, 0.1
    # LRA ran Performer on ListOps with FAVOR+ softmax features, very few of them.
    m.performer.update(kernel="softmax", num_features=2)
  for protocol in words & set(common.PROTOCOL_TASKS):   # 2,000 bracket-free symbols + 48 zeros
    common.small_protocol(c, protocol)

  if "quick" in words:                 # short generated ListOps, small model, CPU minutes
    c.seq_len = 128 - bool(words & set(common.PROTOCOL_TASKS))
    c.truncate_len = 0
    c.listops.tokens = "brackets"
    m.max_len = 0
    c.listops.update(num_train=20_000, num_val=500, num_test=1_000, min_length=20,
                     max_length=120, max_depth=4, max_args=5, seed=0)
    c.batch_size = 32
    c.num_train_steps = 800
    c.warmup_steps = 150
    c.eval_every = 200
    c.checkpoint_every = 200
    c.log_every = 50
    m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 64, 128, 4, 128
    m.qkv_dim = 0                      # attention at the model width (not the LRA 512)
    m.num_layers, m.tie_layer_weights = 2, False
    m.proj_len = 16
    m.init = "default"
    m.dropout = m.attention_dropout = 0.0
    c.weight_decay = 0.0
    c.learning_rate = 1e-3 if attention == "luna" else 0.05
  return common.finish(c, attention, words, kv)
