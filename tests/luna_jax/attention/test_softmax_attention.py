"""Softmax attention: matches jax.nn.dot_product_attention; implementation choice; registry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax import attention
from luna_jax.attention.softmax import SoftmaxAttention
from luna_jax.attention.common import resolve_implementation

B, N, D, H = 2, 10, 16, 2
MASK = np.array([[1] * 10, [1] * 6 + [0] * 4], bool)
X = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)


def _reference(params, x, mask, causal, implementation=None):
  """Same projections, attention by jax.nn.dot_product_attention."""
  q, k, v = (x @ params[n]["kernel"] for n in ("query", "key", "value"))
  q, k, v = (a.reshape(B, N, H, D // H) for a in (q, k, v))
  o = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[:, None, None, :],
                                   is_causal=causal, implementation=implementation)
  return o.reshape(B, N, D) @ params["out"]["kernel"]


@pytest.mark.parametrize("causal", [False, True])
def test_xla_matches_dot_product_attention(causal):
  module = SoftmaxAttention(num_heads=H, causal=causal)
  variables = module.init(jax.random.key(0, impl="rbg"), X, MASK)
  y, ctx = module.apply(variables, X, MASK)
  assert ctx is None
  want = _reference(variables["params"], X, MASK, causal)
  np.testing.assert_allclose(np.asarray(y)[MASK], np.asarray(want)[MASK], atol=1e-5)
  # padded keys get zero weight: changing them leaves real positions unchanged
  x2 = np.where(MASK[..., None], X, 7.0).astype(np.float32)
  np.testing.assert_allclose(np.asarray(module.apply(variables, x2, MASK)[0])[MASK],
                             np.asarray(y)[MASK], atol=1e-5)


def test_attention_dropout():
  module = SoftmaxAttention(num_heads=H, dropout_rate=0.5)
  variables = module.init(jax.random.key(0, impl="rbg"), X, MASK)
  y_det = module.apply(variables, X, MASK)[0]
  y_plain = SoftmaxAttention(num_heads=H).apply(variables, X, MASK)[0]
  np.testing.assert_allclose(y_det, y_plain, atol=1e-6)
  y_drop = module.apply(variables, X, MASK, deterministic=False,
                        rngs={"dropout": jax.random.key(1, impl="rbg")})[0]
  assert not np.allclose(y_drop, y_det, atol=1e-3)


def test_auto_never_picks_cudnn_off_gpu():
  if jax.default_backend() != "gpu":
    for dtype in (jnp.float32, jnp.bfloat16):
      assert resolve_implementation("auto", dtype, dropout_active=False) == "xla"
  assert resolve_implementation("auto", jnp.bfloat16, dropout_active=True) == "xla"
  assert resolve_implementation("auto", jnp.float32, dropout_active=False) == "xla"
  assert resolve_implementation("cudnn", jnp.bfloat16, dropout_active=False) == "cudnn"
  with pytest.raises(ValueError, match="valid"):
    resolve_implementation("flash", jnp.float32, dropout_active=False)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_xla_on_gpu(causal):
  xla = SoftmaxAttention(num_heads=H, causal=causal, dtype=jnp.bfloat16)
  variables = xla.init(jax.random.key(0), X, MASK)
  y_xla = xla.apply(variables, X, MASK)[0].astype(jnp.float32)
  for impl in ("cudnn", "auto"):
    y = xla.clone(implementation=impl).apply(variables, X, MASK)[0].astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(y)[MASK], np.asarray(y_xla)[MASK], atol=3e-2)


def test_get_attention_registry():
  for name in attention.ATTENTION_NAMES:
    if name != "luna":   # written elsewhere
      cls = attention.get_attention(name)
      assert cls.__name__.endswith("Attention")
  with pytest.raises(ValueError, match="valid names: .*softmax.*performer"):
    attention.get_attention("no_such_attention")
