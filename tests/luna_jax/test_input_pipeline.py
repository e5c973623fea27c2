"""Length buckets: static shapes, every example once per epoch, exact, deterministic, resumable."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax import input_pipeline as ip
from luna_jax import models

N, PAD = 64, 0


def make_split(n=200, seed=0, docs=False):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, N + 1, n)
  records = []
  for i, length in enumerate(lengths):
    x = np.zeros((N,), np.int32)
    x[:length] = rng.integers(1, 15, length)
    if docs:
      y = np.zeros((N,), np.int32)
      y[:length // 2 + 1] = 7
      x = np.stack([x, y])
    records.append({"inputs": x, "targets": np.asarray(i % 3, np.int32)})
  return records, lengths


def test_bucket_lengths():
  assert ip.bucket_lengths(2000, 4) == (512, 1024, 1536, 2000)
  assert ip.bucket_lengths(2000, 1) == (2000,)
  assert ip.bucket_lengths(100, 3, multiple=64) == (64, 100)


def test_lengths_and_two_document_records():
  split, lengths = make_split()
  np.testing.assert_array_equal(ip.example_lengths(split, PAD), lengths)
  pairs, lengths2 = make_split(docs=True)
  np.testing.assert_array_equal(ip.example_lengths(pairs, PAD), lengths2)   # the longer doc


def test_epoch_covers_examples_once_in_static_cropped_shapes():
  split, lengths = make_split()
  buckets = ip.bucket_lengths(N, 4, multiple=8)
  it = ip.BucketedBatches(split, lengths, 8, seed=0, buckets=buckets)
  plan = it.plan(0)
  seen = np.concatenate([rows for _, rows in plan])
  assert len(set(seen.tolist())) == len(seen)                    # no example twice
  assert len(seen) > len(split) - 8 * len(buckets)               # at most a partial batch each
  for _ in range(len(plan)):
    batch = next(it)
    width = batch["inputs"].shape[1]
    assert width in buckets
    assert (batch["inputs"] != PAD).sum(1).max() <= width
  assert it.get_state() == {"epoch": 1, "position": 0}
  assert [len(r) for _, r in it.plan(1)] and not np.array_equal(
      np.concatenate([r for _, r in it.plan(1)]), seen)          # reshuffled next epoch


def test_deterministic_and_resumable():
  split, lengths = make_split()
  buckets = ip.bucket_lengths(N, 3, multiple=8)
  a = ip.BucketedBatches(split, lengths, 8, seed=5, buckets=buckets)
  first = [next(a) for _ in range(7)]
  state = a.get_state()
  rest = [next(a) for _ in range(30)]
  b = ip.BucketedBatches(split, lengths, 8, seed=5, buckets=buckets)
  b.set_state(state)
  for x, y in zip(rest, [next(b) for _ in range(30)]):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  c = ip.BucketedBatches(split, lengths, 8, seed=5, buckets=buckets)
  np.testing.assert_array_equal(next(c)["inputs"], first[0]["inputs"])


CFG = models.ModelConfig(vocab_size=16, num_classes=3, max_len=N, proj_len=4, num_layers=2,
                         emb_dim=16, num_heads=2, mlp_dim=32, classifier_dim=16)


@pytest.mark.parametrize("attention,readout", [("luna", "cls"), ("softmax", "mean"),
                                               ("learned_kernel", "mean_padded")])
def test_bucketed_batches_give_the_unbucketed_outputs(attention, readout):
  block = "post_ln" if attention == "luna" else "pre_ln"
  cfg = dataclasses.replace(CFG, attention=attention, readout=readout, block=block,
                            readout_length=N)
  split, lengths = make_split(64)
  model = models.Classifier(cfg)
  rngs = {"params": jax.random.key(0), "features": jax.random.key(1)}
  params = model.init(rngs, jnp.ones((1, N), jnp.int32))["params"]
  apply = jax.jit(lambda x: model.apply({"params": params}, x,
                                        rngs={"features": jax.random.key(1)}))
  buckets = ip.bucket_lengths(N, 4, multiple=8)
  total = 0
  for batch in ip.bucketed_eval_batches(split, lengths, 8, buckets):
    got = np.asarray(apply(jnp.asarray(batch["inputs"])))
    # The same examples at full length.
    full = np.stack([split[i]["inputs"] for i in range(len(split))])
    idx = [next(i for i in range(len(split)) if np.array_equal(
        full[i][:batch["inputs"].shape[1]], row) and lengths[i] <= batch["inputs"].shape[1])
           for row in batch["inputs"]]
    want = np.asarray(apply(jnp.asarray(full[idx])))
    keep = batch["weights"] > 0
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-6, rtol=1e-6)
    total += int(keep.sum())
  assert total == len(split)
