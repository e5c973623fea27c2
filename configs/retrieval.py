r"""Retrieval (LRA ACL Anthology document matching): two documents through one encoder.

Needs lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv (README, "Official data"):
  python train.py --config=configs/retrieval.py:luna,l=256 --workdir=runs/retrieval_luna256 \
      --config.data_dir=/data/lra_release/tsv_data
  python train.py --config=configs/retrieval.py:softmax --workdir=runs/retrieval_softmax \
      --config.data_dir=/data/lra_release/tsv_data
Small-model and Skyformer protocols (4,000 bytes + 96 zeros per document, [u, v, u*v, u-v];
configs/common.py):
  python train.py --config=configs/retrieval.py:softmax,small --workdir=runs/retrieval_small \
      --config.data_dir=/data/lra_release/tsv_data
Luna combines the two documents as [v, u] (paper era); the LRA baselines read each document's
first position (no CLS, no EOS) and combine [u, v] through Dense(512) -> ReLU -> Dense(256) ->
ReLU -> Dense(2); `--config.model.retrieval_combine=interact` uses [u, v, u*v, u-v].
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  c = common.base_config()
  c.task = "retrieval"
  c.seq_len = 4002                     # per document: 4000 bytes + CLS + EOS
  c.append_eos = True
  c.batch_size = 32
  c.eval_every = c.checkpoint_every = 1000
  m = c.model
  m.attention, m.readout = attention, "cls"
  m.retrieval_combine = "luna"
  if attention == "luna":
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 4, 128, 512, 4, 512
    m.dropout = m.attention_dropout = 0.1
    c.num_train_steps, c.warmup_steps = 20000, 8000
    c.learning_rate, c.weight_decay = 5e-4, 1e-4
  else:
    common.lra_reference_model(c)
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 4, 128, 512, 4, 512
    m.qkv_dim = 128
    m.dropout = m.attention_dropout = 0.1
    common.mlp_dropout_as_block(c)
    m.readout, m.retrieval_combine, m.classifier_layers = "first", "concat", 2
    c.seq_len, c.append_eos = 4000, False
    c.num_train_steps, c.warmup_steps = 5000, 8000   # as published (warmup > steps)
    c.learning_rate, c.weight_decay = 0.05, 0.1
  for protocol in words & set(common.PROTOCOL_TASKS):   # 4,000 bytes + 96 zeros per document
    common.small_protocol(c, protocol)
  if "quick" in words:
    c.seq_len, c.truncate_len = 256, 0
    m.max_len = 0
    c.num_train_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 300, 50, 100, 100
    c.eval_max_examples = 1000
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 64, 128, 4, 128
    m.qkv_dim = 0                      # attention at the model width (not the LRA 512)
    m.proj_len = 16
    c.learning_rate = 1e-3 if attention == "luna" else 0.05
  return common.finish(c, attention, words, kv)
