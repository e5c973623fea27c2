"""The project's dropout: hash-based masks with the right statistics, invariant to sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from luna_jax.attention import common


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5])
def test_keep_fraction_and_independence(rate):
  keep = np.asarray(common.dropout_keep(jax.random.key(0), (400, 500), rate))
  n = keep.size
  assert abs(keep.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
  # Neighbours (along both axes) are uncorrelated; so are two draws from different keys.
  k = keep.astype(np.float64) - keep.mean()
  for a, b in ((k[:, 1:], k[:, :-1]), (k[1:], k[:-1])):
    assert abs((a * b).mean()) / k.var() < 0.01
  other = np.asarray(common.dropout_keep(jax.random.key(1), (400, 500), rate)) - (1 - rate)
  assert abs((k * other).mean()) / k.var() < 0.01
  # Every row and column drops about the same fraction (no structure along any axis).
  assert np.abs(keep.mean(0) - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / 400)


def test_module_scales_kept_values_and_is_identity_when_deterministic():
  x = jnp.ones((64, 64))
  drop = common.Dropout(0.25)
  y = drop.apply({}, x, False, rngs={"dropout": jax.random.key(3)})
  vals = set(np.unique(np.asarray(y)).tolist())
  assert vals == {0.0, float(np.float32(1) / np.float32(0.75))}
  np.testing.assert_array_equal(drop.apply({}, x, True), x)
  assert float(common.Dropout(1.0).apply({}, x, False,
                                         rngs={"dropout": jax.random.key(3)}).max()) == 0.0
  g = jax.grad(lambda x: drop.apply({}, x, False, rngs={"dropout": jax.random.key(3)}).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(y))    # gradient goes through kept


def test_mask_is_the_same_on_one_and_eight_devices():
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (fake) devices")
  mesh = jax.sharding.Mesh(np.array(devices[:8]), ("data",))
  x = jnp.ones((16, 32, 8))
  fn = jax.jit(lambda x, k: common.Dropout(0.1).apply({}, x, False, rngs={"dropout": k}))
  one = fn(x, jax.random.key(7))
  sharded = fn(jax.device_put(x, NamedSharding(mesh, P("data"))), jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(sharded))
