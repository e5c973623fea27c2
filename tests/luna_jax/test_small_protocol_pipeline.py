"""The small protocol's data handling as the Nystromformer LRA code had it: an evaluation stream,
drop_last test batches, black pixels as padding with absolute positions, content cut and
zero-padded; and the Skyformer code's value clipping and late best checkpoint."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import listops as listops_config
from lra_tasks import byte_tokens, common
from luna_jax import input_pipeline as ip
from luna_jax import config_checks, models, optim, steps, trainer


def split_of(n: int) -> list[dict[str, np.ndarray]]:
  return [{"inputs": np.full((4,), i, np.int32), "targets": np.asarray(i % 2, np.int32)}
          for i in range(n)]


def ids(batches) -> list[list[int]]:
  return [b["inputs"][:, 0].tolist() for b in batches]


def test_each_evaluation_reads_the_next_batches_of_a_reshuffled_stream():
  split = split_of(10)                          # 3 full batches of 3 per epoch, 1 dropped
  first = ids(ip.eval_stream_batches(split, 3, seed=0, evaluation=1, num_batches=2))
  second = ids(ip.eval_stream_batches(split, 3, seed=0, evaluation=2, num_batches=2))
  third = ids(ip.eval_stream_batches(split, 3, seed=0, evaluation=3, num_batches=2))
  epoch0 = first + second[:1]
  assert len({i for b in epoch0 for i in b}) == 9          # an epoch: 9 distinct examples
  assert epoch0 != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]       # shuffled
  epoch1 = second[1:] + third
  assert sorted(map(sorted, epoch0)) != sorted(map(sorted, epoch1))   # reshuffled
  # A function of the evaluation number alone: a resumed run reads the same batches.
  assert ids(ip.eval_stream_batches(split, 3, seed=0, evaluation=2, num_batches=2)) == second
  assert ids(ip.eval_stream_batches(split, 3, seed=1, evaluation=1, num_batches=2)) != first
  for b in ip.eval_stream_batches(split, 3, seed=0, evaluation=1, num_batches=2):
    np.testing.assert_array_equal(b["weights"], [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="fewer than one batch"):
    next(ip.eval_stream_batches(split_of(2), 3, seed=0, evaluation=1, num_batches=1))


def test_test_batches_drop_the_last_partial_batch():
  split = split_of(2000)
  kept = sum(int(b["weights"].sum()) for b in ip.eval_batches(split, 32, drop_last=True))
  whole = sum(int(b["weights"].sum()) for b in ip.eval_batches(split, 32))
  assert (kept, whole) == (1984, 2000)                     # ListOps: 1,984 of 2,000


def test_trainer_picks_the_stream_batch_of_each_evaluation():
  c = listops_config.get_config("softmax,small")
  c.batch_size, c.eval_every, c.eval_max_examples = 3, 50, 6
  task = common.TaskData(name="listops", splits={"validation": split_of(10),
                                                 "test": split_of(10)},
                         vocab_size=17, num_classes=10, seq_len=4)
  at_100 = ids(steps.eval_batches(c, task, "validation", 100, (), {}))
  assert at_100 == ids(ip.eval_stream_batches(split_of(10), 3, c.seed, 2, 2))
  assert ids(steps.eval_batches(c, task, "validation", 101, (), {})) == ids(
      ip.eval_stream_batches(split_of(10), 3, c.seed, 3, 2))    # the final, off-cadence one
  assert len(ids(steps.eval_batches(c, task, "test", 100, (), {}))) == 3   # 9 of 10
  c.eval_stream = c.test_drop_last = False
  assert ids(steps.eval_batches(c, task, "validation", 100, (), {})) == [[0, 1, 2],
                                                                              [3, 4, 5]]
  assert len(ids(steps.eval_batches(c, task, "test", 100, (), {}))) == 4


def test_eval_stream_and_buckets_do_not_mix():
  c = listops_config.get_config("softmax,small")
  c.length_buckets = 4
  with pytest.raises(trainer.ConfigError, match="eval_stream"):
    config_checks.validate_config(c)


def test_value_clipping_clips_each_entry_before_adamw():
  c = listops_config.get_config("softmax,skyformer")
  params = {"w": jnp.zeros(3)}
  big, small = {"w": jnp.array([5.0, -0.5, -3.0])}, {"w": jnp.array([0.1, 0.1, 0.1])}

  def two_updates(tx, first):
    state = tx.init(params)
    _, state = tx.update(first, state, params)
    return tx.update(small, state, params)[0]["w"]

  clipped = two_updates(optim.make_optimizer(c), big)
  c.grad_clip_value = 0.0
  plain = optim.make_optimizer(c)
  np.testing.assert_allclose(clipped, two_updates(plain, {"w": jnp.array([1.0, -0.5, -1.0])}),
                             rtol=1e-6)
  assert not np.allclose(clipped, two_updates(plain, big), rtol=1e-3)


def test_black_pixels_are_padding_with_absolute_positions():
  cfg = models.ModelConfig(attention="softmax", num_layers=1, emb_dim=8, mlp_dim=16,
                           num_heads=2, vocab_size=16, num_classes=2, max_len=4, pad_id=0,
                           readout="mean_padded", block="pre_ln")
  enc = models.Encoder(cfg)
  inside = jnp.array([[5, 0, 7, 0]])
  trailing = jnp.array([[5, 7, 0, 0]])
  params = enc.init(jax.random.key(0), inside)
  # Same real tokens, same order: only the positions differ, so the outputs differ.
  assert not np.allclose(enc.apply(params, inside), enc.apply(params, trailing))
  # A masked pixel's value never matters.
  np.testing.assert_allclose(enc.apply(params, inside),
                             enc.apply(params, jnp.array([[5, 0, 7, 0]])))
  c = ml_collections.ConfigDict({"black_is_padding": True})
  assert common.pixel_pad_id(c) == 0
  c.black_is_padding = False
  assert common.pixel_pad_id(c) is None


def test_bytes_are_cut_to_the_limit_then_zero_padded():
  np.testing.assert_array_equal(
      byte_tokens.encode(b"abcdef", 8, cls=False, eos=False, limit=4),
      [98, 99, 100, 101, 0, 0, 0, 0])
  np.testing.assert_array_equal(byte_tokens.encode(b"abcdef", 8, cls=False, eos=False),
                                [98, 99, 100, 101, 102, 103, 0, 0])
  with pytest.raises(common.DataError, match="truncate_len=-1"):
    common.truncate_len(ml_collections.ConfigDict({"truncate_len": -1}))


def tiny_sky_config(steps: int = 4) -> ml_collections.ConfigDict:
  c = listops_config.get_config("softmax,skyformer")
  c.seq_len, c.truncate_len, c.model.max_len = 48, 40, 48
  c.listops.update(num_train=64, num_val=16, num_test=16, min_length=5, max_length=40,
                   max_depth=3, max_args=4)
  c.batch_size, c.num_train_steps, c.warmup_steps = 8, steps, 1
  c.eval_every = c.log_every = c.checkpoint_every = 1
  c.eval_max_examples = 16
  m = c.model
  m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim, m.num_layers = 16, 32, 2, 16, 1
  return c


def test_best_checkpoint_only_after_the_fraction(tmp_path):
  c = tiny_sky_config(steps=4)
  c.save_best_after = 0.5
  results = trainer.train_and_evaluate(c, str(tmp_path))
  assert results["best_step"] > 2                 # steps 1 and 2 may score, never saved
  saved = [int(p.name) for p in (tmp_path / "best").iterdir() if p.name.isdigit()]
  assert saved and min(saved) > 2
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["data"]["tokens"] == "no_brackets"
  assert 0.0 <= results["test_accuracy"] <= 1.0

