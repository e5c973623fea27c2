r"""Text (LRA byte-level IMDB): Luna recipe for `luna`, LRA reference recipe for the baselines.

Needs the TFDS `imdb_reviews` dataset prepared as array_record (README, "Official data"):
  python train.py --config=configs/text.py:luna,l=256 --workdir=runs/text_luna256 \
      --config.data_dir=/data/tfds
  python train.py --config=configs/text.py:softmax --workdir=runs/text_softmax \
      --config.data_dir=/data/tfds
Small-model protocol (1,000 bytes + 24 zeros, no CLS or EOS, mean readout; configs/common.py)
and the Skyformer protocol (4,000 bytes + 96 zeros, batch 16):
  python train.py --config=configs/text.py:softmax,small --workdir=runs/text_small_softmax \
      --config.data_dir=/data/tfds
  python train.py --config=configs/text.py:softmax,skyformer --workdir=runs/text_sky_softmax \
      --config.data_dir=/data/tfds
Quick (short reviews, small model, CPU minutes):
  python train.py --config=configs/text.py:quick --workdir=runs/text_quick \
      --config.data_dir=/data/tfds
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  c = common.base_config()
  c.task = "text"
  c.seq_len = 4002                     # 4000 bytes + CLS + EOS
  c.append_eos = True
  c.batch_size = 32
  c.num_train_steps, c.warmup_steps = 20000, 8000
  c.eval_every = c.checkpoint_every = 1000
  m = c.model
  m.attention, m.readout = attention, "cls"
  if attention == "luna":
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads = 4, 256, 1024, 4
    m.classifier_dim, m.init = 1024, "bert"
    m.dropout = m.attention_dropout = 0.3
    c.learning_rate, c.weight_decay = 5e-5, 1e-4
  else:
    common.lra_reference_model(c)
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 4, 256, 1024, 4, 1024
    m.qkv_dim = 256
    m.dropout = m.attention_dropout = 0.1
    common.mlp_dropout_as_block(c)
    c.learning_rate, c.weight_decay = 0.05, 0.1
  for protocol in words & set(common.PROTOCOL_TASKS):   # small: 1,000 bytes + 24 zeros
    common.small_protocol(c, protocol)
  if "quick" in words:
    c.seq_len, c.truncate_len = 256, 0
    m.max_len = 0
    c.num_train_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 300, 50, 100, 100
    c.eval_max_examples = 1000
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 64, 128, 4, 128
    m.qkv_dim = 0                      # attention at the model width (not the LRA 512)
    m.proj_len, m.init = 16, "default"
    m.dropout = m.attention_dropout = 0.1
    c.learning_rate = 1e-3 if attention == "luna" else 0.05
  return common.finish(c, attention, words, kv)
