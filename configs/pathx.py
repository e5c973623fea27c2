r"""Path-X (LRA Pathfinder at 128x128 = 16,384 tokens, curv_contour_length_14).

  python train.py --config=configs/pathx.py:luna,l=256 --workdir=runs/pathx_luna256 \
      --config.data_dir=/data/lra_release/pathfinder128
  python train.py --config=configs/pathx.py:quick --workdir=runs/pathx_quick   # generated
The Luna paper has no Path-X recipe: `luna` uses the Pathfinder recipe's model at 16K tokens;
the baselines use the LRA reference Path-X recipe (gradient clipping 1.0).
"""
import ml_collections

from configs import common
from configs.pathfinder import pathfinder_fields


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  if "small" in words:
    raise ValueError("configs/pathx.py: the small-model protocol has no Path-X recipe (its "
                     "table covers ListOps, Text, Retrieval, Image and Pathfinder-32)")
  c = common.base_config()
  c.task = "pathx"
  c.pathfinder = pathfinder_fields(128)
  c.seq_len = 128 * 128
  c.eval_every = c.checkpoint_every = 5000
  m = c.model
  m.attention, m.readout = attention, "mean"
  if attention == "luna":
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 128, 128, 4, 256
    m.dropout, m.attention_dropout = 0.2, 0.1
    c.batch_size, c.num_train_steps, c.warmup_steps = 64, 500_000, 2500
    c.learning_rate, c.weight_decay = 1e-3, 0.0
  else:
    common.lra_reference_model(c)       # sinusoidal positions (learn_pos_emb=False)
    c.schedule = "cosine"
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 32, 32, 2, 32
    m.qkv_dim = 16
    m.dropout = m.attention_dropout = 0.1
    common.mlp_dropout_as_block(c)
    c.batch_size, c.num_train_steps, c.warmup_steps = 64, 500_000, 2500
    c.learning_rate, c.weight_decay, c.grad_clip = 1e-3, 0.0, 1.0
  if "quick" in words:
    c.pathfinder.num_images = 400
    c.batch_size = 8
    c.num_train_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 50, 10, 50, 50
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 32, 64, 4, 64
    m.qkv_dim = 0
    m.proj_len = 16
  return common.finish(c, attention, words, kv)
