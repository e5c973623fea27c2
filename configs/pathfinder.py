r"""Pathfinder (LRA, 32x32 hard: curv_contour_length_14), mean readout, no padding.

Built-in data: with an empty data_dir, `pathfinder.num_images` images are generated once into
the cache ($LUNA_JAX_CACHE or ~/.cache/luna_jax) and reused.
  python train.py --config=configs/pathfinder.py:quick --workdir=runs/pathfinder_quick
  (a CPU-minutes check that the pipeline learns, NOT the LRA protocol: 20,000 generated 16x16
  images of our easy setting, 3-paddle contours and no distractors, seen as 16 patches of 4x4
  pixels by a 2-layer Luna; results/README.md has the measured run)
Official data (lra_release/pathfinder32):
  python train.py --config=configs/pathfinder.py:luna,l=256 --workdir=runs/pathfinder_luna256 \
      --config.data_dir=/data/lra_release/pathfinder32
  python train.py --config=configs/pathfinder.py:softmax --workdir=runs/pathfinder_softmax \
      --config.data_dir=/data/lra_release/pathfinder32
Small-model protocol (configs/common.py; black pixels are padding, as that code had them;
`skyformer` for the Skyformer protocol):
  python train.py --config=configs/pathfinder.py:softmax,small --workdir=runs/pathfinder_small \
      --config.data_dir=/data/lra_release/pathfinder32
Other difficulties: --config.pathfinder.difficulty=curv_contour_length_9 (or curv_baseline).
"""
import ml_collections

from configs import common


def pathfinder_fields(resolution: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      resolution=resolution, difficulty="curv_contour_length_14", split_seed=0,
      num_images=200_000, gen_seed=0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  attention, words, kv = common.parse_arg(arg)
  c = common.base_config()
  c.task = "pathfinder"
  c.pathfinder = pathfinder_fields(32)
  c.seq_len = 1024
  c.batch_size = 512
  c.eval_every = c.checkpoint_every = 1000
  m = c.model
  m.attention, m.readout = attention, "mean"
  if attention == "luna":
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 1, 128, 128, 4, 256
    m.dropout, m.attention_dropout = 0.2, 0.1
    c.num_train_steps, c.warmup_steps = 62500, 4000
    c.learning_rate, c.weight_decay = 1e-3, 0.0
  else:
    common.lra_reference_model(c)       # sinusoidal positions (learn_pos_emb=False)
    c.schedule = "cosine"
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 4, 32, 32, 4, 32
    m.qkv_dim = 16
    m.dropout, m.attention_dropout = 0.2, 0.1
    common.mlp_dropout_as_block(c)
    c.num_train_steps, c.warmup_steps = 62400, 312
    c.learning_rate, c.weight_decay = 1e-3, 0.0
  for protocol in words & set(common.PROTOCOL_TASKS):   # black pixels are padding there
    common.small_protocol(c, protocol)
  if "quick" in words:
    # 16x16 images of the easy 3-paddle setting (lra_tasks/pathfinder_drawing.py), 4x4 patches.
    c.pathfinder.update(resolution=16, difficulty="curv_contour_length_3", num_images=20_000)
    c.black_is_padding = False           # patches see every pixel
    c.seq_len = 256
    c.batch_size = 32
    c.num_train_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 4000, 200, 1000, 1000
    m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim = 2, 64, 128, 4, 64
    m.embedding, m.patch_size, m.positions = "patches", 4, "learned"
    m.dropout = m.attention_dropout = 0.0
    m.qkv_dim = 0
    m.proj_len = 16
    c.learning_rate = 1e-3
  return common.finish(c, attention, words, kv)
