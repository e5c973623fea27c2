"""Performer: FAVOR+ approximates softmax attention; random-feature rng contract."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from luna_jax.attention.performer import PerformerAttention
from luna_jax.attention import performer
from luna_jax.attention.performer import orthogonal_random_features
from luna_jax.attention.softmax import SoftmaxAttention

B, N, D, H = 2, 16, 16, 2
MASK = jnp.asarray(np.array([[1] * 16, [1] * 11 + [0] * 5], bool))
# Mean |performer - softmax| over real positions for these inputs and keys, measured on CPU:
# m=16: 0.042, m=256: 0.015, m=4096: 0.0023 (causal: 0.050 / 0.019 / 0.0028), i.e. ~1/sqrt(m).
# Tolerance at m=4096: 0.006, and at least 8x below the m=16 error.
TOL_MANY_FEATURES = 0.006


def _x():
  return 0.5 * np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)


def _mean_error(num_features: int, causal: bool = False) -> float:
  x = _x()
  performer = PerformerAttention(num_heads=H, num_features=num_features, causal=causal)
  variables = jax.jit(performer.init)(jax.random.key(1, impl="rbg"), x, MASK)
  rngs = {"features": jax.random.key(7, impl="rbg")}
  approx = jax.jit(lambda v: performer.apply(v, x, MASK, rngs=rngs)[0])(variables)
  # Same parameter names, so the exact softmax attention uses the very same projections.
  exact = jax.jit(lambda v: SoftmaxAttention(num_heads=H, causal=causal).apply(
      v, x, MASK)[0])(variables)
  return float(jnp.abs(approx - exact)[MASK].mean())


def test_favor_approaches_softmax_as_features_grow():
  few, many = _mean_error(16), _mean_error(4096)
  assert many < TOL_MANY_FEATURES, many
  assert many < few / 8, (few, many)


def test_causal_favor_approaches_causal_softmax():
  assert _mean_error(4096, causal=True) < TOL_MANY_FEATURES


def test_orthogonal_random_features_blocks_are_orthogonal():
  w = np.asarray(orthogonal_random_features(jax.random.key(0), 20, 8))
  assert w.shape == (20, 8)
  for start in (0, 8):   # full blocks of d rows: mutually orthogonal directions
    block = w[start:start + 8]
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  norms = np.linalg.norm(w, axis=1)   # chi(8)-distributed, not all equal
  assert norms.std() > 0.1 and 1.0 < norms.mean() < 5.0
  # Directions are unbiased: without the sign fix of QR, the first row of every block has a
  # non-positive first coordinate (mean about -1.2 here).
  w = np.asarray(orthogonal_random_features(jax.random.key(1), 8 * 400, 8))
  assert abs(w[0::8, 0].mean()) < 0.25 and abs(w[:, 0].mean()) < 0.1


def test_feature_rng_contract():
  x = _x()
  module = PerformerAttention(num_heads=H, num_features=8)
  variables = jax.jit(module.init)(jax.random.key(1, impl="rbg"), x, MASK)

  def run(m, key=None):
    rngs = None if key is None else {"features": key}
    return np.asarray(m.apply(variables, x, MASK, rngs=rngs)[0])

  k1, k2 = jax.random.key(11, impl="rbg"), jax.random.key(12, impl="rbg")
  np.testing.assert_array_equal(run(module, k1), run(module, k1))     # explicit key: repeatable
  assert not np.allclose(run(module, k1), run(module, k2))           # new key: redrawn
  fixed = module.clone(redraw=False)
  np.testing.assert_array_equal(run(fixed, k1), run(fixed, k2))      # redraw=False ignores it
  np.testing.assert_array_equal(run(module), run(fixed, k1))         # no stream: same fixed W


def test_layers_get_different_features():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = PerformerAttention(num_heads=1, num_features=4, name="a")
      b = PerformerAttention(num_heads=1, num_features=4, name="b")
      return a(x)[0], b(x)[0], a.random_features(4), b.random_features(4)

  x = jnp.ones((1, 3, 4))
  for rngs in ({"params": jax.random.key(0)}, {"params": jax.random.key(0),
                                                "features": jax.random.key(3)}):
    _, _, wa, wb = Two().init_with_output(rngs, x)[0]
    assert not np.allclose(wa, wb)


def test_features_are_orthonormal_without_lapack():
  """W's blocks are orthonormal (Gram-Schmidt equals a sign-corrected QR), and the compiled
  program holds no LAPACK call: jaxlib's CPU QR deadlocked a Performer step split over several
  host devices (it waits for work queued on the intra-op pool its callers occupy)."""
  g = jax.random.normal(jax.random.key(0), (8, 32, 32))
  q = performer.orthonormalize_columns(g)
  np.testing.assert_allclose(jnp.einsum("gdk,gdl->gkl", q, q), np.broadcast_to(np.eye(32),
                             (8, 32, 32)), atol=2e-6)
  r = jnp.einsum("gdk,gdl->gkl", q, g)                 # R = Q^T g: upper triangular, diag > 0
  assert np.all(np.diagonal(r, axis1=1, axis2=2) > 0)
  np.testing.assert_allclose(np.tril(r, -1), 0.0, atol=2e-5)
  hlo = jax.jit(performer.orthogonal_random_features, static_argnums=(1, 2)).lower(
      jax.random.key(1), 256, 32).compile().as_text()
  assert "custom-call" not in hlo     # jnp.linalg.qr compiles to custom_call lapack_sgeqrf_ffi
