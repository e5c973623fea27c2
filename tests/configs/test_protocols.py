"""The recipes behind the numbers: LRA reference baselines (parameter counts by hand from the LRA
configs), the small-model protocol for every task and mechanism, and protocol bookkeeping."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from configs import common
from lra_tasks import byte_tokens
from lra_tasks import listops
from luna_jax import config_checks, models, optim
from luna_jax.attention import ATTENTION_NAMES

TASKS5 = ("listops", "text", "retrieval", "image", "pathfinder")


def get(task: str, arg: str):
  return importlib.import_module(f"configs.{task}").get_config(arg)


def task_facts(task: str, config) -> dict:
  """What the task loader would report (vocabulary, classes, padding), without any data."""
  cls = config.model.readout == "cls"
  if task == "listops":
    return dict(vocab_size=listops.VOCAB_SIZE, num_classes=10, pad_id=0, num_docs=1)
  if task in ("text", "retrieval"):
    eos = bool(config.get("append_eos", cls))
    return dict(vocab_size=byte_tokens.vocab_size(cls=cls, eos=eos), num_classes=2, pad_id=0,
                num_docs=2 if task == "retrieval" else 1)
  return dict(vocab_size=256 + cls, num_classes=10 if task == "image" else 2, pad_id=None,
              num_docs=1)


def param_shapes(task: str, config):
  cfg = models.ModelConfig.from_config(config.model, max_len=config.model.max_len or
                                       config.seq_len, **task_facts(task, config))
  shape = (1, 2, config.seq_len) if cfg.num_docs == 2 else (1, config.seq_len)
  return jax.eval_shape(lambda: models.Classifier(cfg).init(
      jax.random.key(0), jnp.ones(shape, jnp.int32)))["params"], cfg


def lra_block(e: int, qkv: int, mlp: int) -> int:
  """One LRA pre-LN block: LN (2e), q/k/v/out without bias (4 e qkv), LN (2e), MLP with biases."""
  return 2 * e + 4 * e * qkv + 2 * e + (e * mlp + mlp) + (mlp * e + e)


def head(inputs: int, hidden: int, classes: int) -> int:
  """Dense(hidden) -> ReLU -> Dense(classes), both with bias."""
  return inputs * hidden + hidden + hidden * classes + classes


# The LRA reference Transformer per task, by hand from the LRA configs (recipes-and-results.md):
# layers x block + final LN + token table (+ learned positions) + classifier head.
LRA_REFERENCE_COUNTS = {
    # 4 x (512/512/1024), vocab 16 (15 symbols + pad + our CLS), sinusoidal, head 1024 -> 10.
    "listops": 4 * lra_block(512, 512, 1024) + 2 * 512 + 16 * 512 + head(512, 1024, 10),
    # 4 x (256/256/1024), 259 byte ids (256 + pad + CLS + EOS), sinusoidal, head 1024 -> 2.
    "text": 4 * lra_block(256, 256, 1024) + 2 * 256 + 259 * 256 + head(256, 1024, 2),
    # 4 x (128/128/512), 257 byte ids (no CLS/EOS), dual head over [u, v]: 256 -> 512 -> 256 -> 2.
    "retrieval": (4 * lra_block(128, 128, 512) + 2 * 128 + 257 * 128
                  + (256 * 512 + 512) + (512 * 256 + 256) + (256 * 2 + 2)),
    # 1 x (128/64/128), 257 pixel ids (256 + CLS), learned positions 1025 x 128, head 128 -> 10.
    "image": (lra_block(128, 64, 128) + 2 * 128 + 257 * 128 + 1025 * 128
              + head(128, 128, 10)),
    # 4 x (32/16/32), 256 pixel ids, sinusoidal, mean pooling, head 32 -> 2.
    "pathfinder": 4 * lra_block(32, 16, 32) + 2 * 32 + 256 * 32 + head(32, 32, 2),
    # 1 x (32/16/32), 256 pixel ids, sinusoidal, mean pooling, head 32 -> 2.
    "pathx": lra_block(32, 16, 32) + 2 * 32 + 256 * 32 + head(32, 32, 2),
}


@pytest.mark.parametrize("task", sorted(LRA_REFERENCE_COUNTS))
def test_softmax_baseline_parameter_count_matches_the_lra_reference(task):
  config = get(task, "softmax")
  assert config.protocol == "lra_reference"
  params, _ = param_shapes(task, config)
  ours, ref = models.count_params(params), LRA_REFERENCE_COUNTS[task]
  assert abs(ours - ref) <= 0.10 * ref, (task, ours, ref)


@pytest.mark.parametrize("task", ["image", "pathfinder", "pathx"])
def test_qkv_dim_separate_from_width(task):
  config = get(task, "softmax")
  params, _ = param_shapes(task, config)
  layer = params["encoder"]["layers_0"]["self_attn"]
  e, q = config.model.emb_dim, config.model.qkv_dim
  assert (e, q) == {"image": (128, 64), "pathfinder": (32, 16), "pathx": (32, 16)}[task]
  assert layer["query"]["kernel"].shape == (e, q) and layer["out"]["kernel"].shape == (q, e)


def test_lra_reference_details():
  assert get("image", "softmax").learning_rate == 5e-4
  for task in ("pathfinder", "pathx"):
    c = get(task, "softmax")
    assert c.model.positions == "sinusoidal"
    params, _ = param_shapes(task, c)
    assert "embed_positions" not in params["encoder"]      # no learned table
  for task in TASKS5 + ("pathx",):
    c = get(task, "softmax")
    assert c.model.activation_dropout == c.model.dropout > 0    # dropout after the GELU
    assert c.model.performer.kernel == ("softmax" if task == "listops" else "relu")
  assert get("image", "softmax").model.activation_dropout == 0.3
  assert get("listops", "performer").model.performer.num_features == 2


def test_retrieval_baseline_head_and_first_position():
  c = get("retrieval", "softmax")
  assert c.model.readout == "first" and not c.append_eos and c.seq_len == 4000
  params, cfg = param_shapes("retrieval", c)
  assert cfg.vocab_size == 257                             # no CLS, no EOS ids
  assert params["classifier_hidden"]["kernel"].shape == (256, 512)     # [u, v]
  assert params["classifier_hidden_1"]["kernel"].shape == (512, 256)
  assert params["classifier_out"]["kernel"].shape == (256, 2)
  assert "bias" in params["classifier_out"]


def test_luna_recipes_unchanged():
  c = get("listops", "luna,l=16")
  assert c.protocol == "luna_paper" and c.model.readout == "cls" and c.seq_len == 2001
  assert not c.model.classifier_bias and c.schedule == "inverse_sqrt"
  assert (c.model.emb_dim, c.model.mlp_dim, c.model.num_heads) == (512, 2048, 8)


# task -> (batch, steps, warmup, eval every, eval batches, lr, kept symbols/bytes, padded
# length, position table): the Nystromformer LRA code (lra_config.py, datasets/*.py).
SMALL_TABLE = {
    "listops": (32, 5000, 1000, 50, 62, 1e-4, 2000, 2048, 2048),
    "text": (32, 20000, 8000, 500, 781, 1e-4, 1000, 1024, 4096),
    "retrieval": (32, 30000, 800, 300, 565, 1e-4, 4000, 4096, 4096),
    "image": (256, 35000, 175, 175, 20, 1e-4, 0, 1024, 1024),
    "pathfinder": (256, 62400, 312, 312, 312, 1e-4, 0, 1024, 1024),
}
# The Skyformer code (src/config.py; Text batch 16 of its camera-ready commit).
SKYFORMER_TABLE = {
    "listops": (32, 50000, 1000, 500, 62, 1e-4, 2000, 2048, 2048),
    "text": (16, 50000, 80, 500, 200, 1e-4, 4000, 4096, 4096),
    "retrieval": (16, 50000, 800, 1000, 300, 2e-4, 4000, 4096, 4096),
    "image": (256, 50000, 175, 50, 20, 1e-4, 0, 1024, 1024),
    "pathfinder": (128, 50000, 312, 500, 156, 2e-4, 0, 1024, 1024),
}


@pytest.mark.parametrize("protocol, table", [("small", SMALL_TABLE),
                                             ("skyformer", SKYFORMER_TABLE)])
@pytest.mark.parametrize("task", TASKS5)
@pytest.mark.parametrize("attention", ATTENTION_NAMES)
def test_small_protocol_for_every_task_and_mechanism(task, attention, protocol, table):
  c = get(task, f"{attention},{protocol}")
  config_checks.validate_config(c)
  batch, steps, warmup, every, batches, lr, content, seq_len, positions = table[task]
  assert c.protocol == protocol
  assert (c.batch_size, c.num_train_steps, c.warmup_steps, c.eval_every) == (batch, steps,
                                                                             warmup, every)
  assert c.eval_max_examples == batches * batch
  assert (c.truncate_len, c.seq_len, c.model.max_len) == (content, seq_len, positions)
  assert c.eval_stream and c.test_drop_last           # next batches of a stream; drop_last
  assert c.black_is_padding == (task in ("image", "pathfinder"))
  assert c.get("append_eos", False) is False
  if task == "listops":
    assert c.listops.tokens == "no_brackets"
  m = c.model
  assert (m.num_layers, m.emb_dim, m.mlp_dim, m.num_heads) == (2, 64, 128, 2)
  assert (m.positions, m.readout, m.init) == ("learned", "mean_padded", "torch")
  assert m.block == ("post_ln" if attention == "luna" else "pre_ln")   # Luna keeps its layer
  assert m.dropout == m.attention_dropout == m.activation_dropout == 0.1
  assert (m.classifier_dim, m.classifier_bias) == (128, True)
  assert (m.performer.kernel, m.performer.form, m.performer.redraw) == (
      "softmax", "nystromformer_lra", False)
  assert m.performer.num_features == (128 if protocol == "skyformer" else 256)
  assert (c.learning_rate, c.weight_decay, c.adam_b1, c.adam_b2, c.adam_eps) == (
      lr, 0.0, 0.9, 0.999, 1e-6)
  assert c.schedule == "one_cycle" and c.one_cycle.cycle_momentum
  sky = protocol == "skyformer"
  assert (c.grad_clip, c.grad_clip_value, c.save_best_after) == (0.0, 1.0 if sky else 0.0,
                                                                 0.2 if sky else 0.0)
  if task == "retrieval":
    assert m.retrieval_combine == "interact"


def test_one_protocol_word_at_most():
  with pytest.raises(ValueError, match="several protocols"):
    get("listops", "softmax,small,skyformer")


def test_small_protocol_luna_adds_only_p_and_pack_projections():
  softmax, _ = param_shapes("listops", get("listops", "softmax,small"))
  luna, _ = param_shapes("listops", get("listops", "luna,small"))
  proj = 64 * 64 + 64
  # Per layer Luna has 7 projections (pq, pk, pv, q, k, v, out) against softmax's 4, and three
  # LayerNorms against two; per encoder it has P (16 x 64) and the x and P embedding
  # LayerNorms where the pre-LN encoder has one final LayerNorm.
  extra = 2 * (3 * proj + 2 * 64) + (16 * 64 + 2 * 2 * 64 - 2 * 64)
  assert models.count_params(luna) - models.count_params(softmax) == extra


def test_protocol_names_and_overrides():
  assert get("listops", "luna,l=16").protocol == "luna_paper"
  assert get("listops", "luna,l=256,seed=3").protocol == "luna_paper"   # free knobs
  assert get("text", "softmax").protocol == "lra_reference"
  assert get("listops", "cheap_linear,small").protocol == "small"
  assert get("listops", "luna,skyformer").protocol == "skyformer"
  assert get("listops", "quick").protocol == "quick"
  assert get("listops", "softmax,small,lr=3e-4").protocol == "custom"
  c = get("listops", "luna,small")
  common.mark_overrides(c, ["data_dir", "model.proj_len"])
  assert c.protocol == "small"
  common.mark_overrides(c, ["model.num_layers"])
  assert c.protocol == "custom"
  # bfloat16 compute is a knob of the small-model protocols only (their codes ran fp16).
  assert get("listops", "softmax,small,model.dtype=bfloat16").protocol == "small"
  assert get("listops", "luna,skyformer,model.dtype=bfloat16").protocol == "skyformer"
  assert get("listops", "luna,l=16,model.dtype=bfloat16").protocol == "custom"
  # A label is earned by the recipe, never set by hand.
  assert get("listops", "softmax,small,steps=3,protocol=small").protocol == "custom"
  assert get("listops", "softmax,protocol=small").protocol == "custom"
  assert get("listops", "quick,protocol=small").protocol == "custom"
  with pytest.raises(ValueError, match="Path-X"):
    get("pathx", "luna,small")


def test_one_cycle_schedule_and_momentum_follow_torch():
  c = get("listops", "softmax,small")
  lr = optim.learning_rate_schedule(c)
  peak, start = 1e-4, 1e-4 / 25
  end = start / 1e4
  assert float(lr(0)) == pytest.approx(start)
  assert float(lr(499.5)) == pytest.approx(start + (peak - start) * 499.5 / 999)
  assert float(lr(999)) == pytest.approx(peak)
  assert float(lr(4999)) == pytest.approx(end, rel=1e-3)
  assert float(lr(3000)) == pytest.approx(peak + (end - peak) * (3000 - 999) / (4999 - 999))
  tx = optim.make_optimizer(c)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  grads = {"w": jnp.ones(3)}
  used = []          # the beta1 each update used (optax records it in the state)
  for _ in range(3):
    _, state = tx.update(grads, state, params)
    used.append(float(state.hyperparams["b1"]))
  # torch: 0.95 at step 0, falling linearly to 0.85 at step warmup - 1 while the lr rises.
  assert used == pytest.approx([0.95 - 0.1 * k / 999 for k in range(3)], abs=1e-7)
  assert used[1] < used[0]
