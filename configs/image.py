r"""Image (LRA grayscale CIFAR-10, 1024 pixel tokens; no pixel is ever padding).

Needs the TFDS `cifar10` dataset prepared as array_record (README, "Official data"):
  python train.py --config=configs/image.py:luna,l=256 --workdir=runs/image_luna256 \
      --config.data_dir=/data/tfds
  python train.py --config=configs/image.py:softmax --workdir=runs/image_softmax \
      --config.data_dir=/data/tfds
Small-model protocol (1,024 pixel tokens, mean readout; configs/common.py):
  python train.py --config=configs/image.py:softmax,small --workdir=runs/image_small \
      --config.data_dir=/data/tfds
`--config.model.embedding=linear` feeds normalised pixel values through a Dense instead of a
token table. The LRA baselines use lr 5e-4 (LRA base_cifar10_config), qkv_dim 64 at width 128.
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  c = common.base_config()
  c.task = "image"
  c.seq_len = 1025                     # CLS + 32 x 32 pixels
  c.batch_size = 256
  c.num_train_steps = 35000
  c.eval_every = c.checkpoint_every = 1000
  m = c.model
  m.attention, m.readout = attention, "cls"
  if attention == "luna":
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 64, 128, 8, 128
    m.dropout, m.attention_dropout = 0.3, 0.1
    c.warmup_steps, c.learning_rate, c.weight_decay = 4000, 5e-3, 0.0
  else:
    common.lra_reference_model(c)
    m.positions = "learned"
    c.schedule = "cosine"
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 128, 128, 8, 128
    m.qkv_dim = 64
    m.dropout, m.attention_dropout = 0.3, 0.2
    common.mlp_dropout_as_block(c)
    c.warmup_steps, c.learning_rate, c.weight_decay = 175, 5e-4, 0.0
  for protocol in words & set(common.PROTOCOL_TASKS):   # black pixels are padding there
    common.small_protocol(c, protocol)
  if "quick" in words:
    c.batch_size = 32
    c.num_train_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 300, 50, 100, 100
    c.eval_max_examples = 1000
    m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim, m.proj_len = 32, 64, 4, 64, 16
    m.qkv_dim = 0
    c.learning_rate = 1e-3
  return common.finish(c, attention, words, kv)
