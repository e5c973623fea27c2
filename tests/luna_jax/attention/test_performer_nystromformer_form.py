"""Performer `form="nystromformer_lra"`: FAVOR+ as the Nystromformer LRA code ran it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import performer


def torch_semantics(q, k, v, mask, w):
  """The same computation written as the original's statements read, in float64 numpy:
  the wrapper's q, k / dh**0.25 and masking, then softmax_kernel and linear_attention."""
  q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
  b, n, h, dh = q.shape
  keep = np.asarray(mask, np.float64)[:, :, None, None]
  q = q / dh**0.25
  k = k / dh**0.25 * keep
  v = v * keep
  ratio, norm = w.shape[0]**-0.5, dh**-0.25

  def kernel(data, is_query):
    dash = np.einsum("bnhd,fd->bnhf", norm * data, w)
    diag = (data**2).sum(-1, keepdims=True) / 2.0 * norm**2
    stab = dash.max(-1, keepdims=True) if is_query else dash.max()
    return ratio * (np.exp(dash - diag - stab) + 1e-4)

  qp, kp = kernel(q, True), kernel(k, False)
  d_inv = 1.0 / np.einsum("bnhf,bhf->bnh", qp, kp.sum(1))
  context = np.einsum("bnhf,bnhe->bhfe", kp, v)
  return np.einsum("bhfe,bnhf,bnh->bnhe", context, qp, d_inv)


def inputs(key, b=2, n=7, h=2, dh=4, m=16):
  kq, kk, kv, kw = jax.random.split(key, 4)
  q, k, v = (jax.random.normal(x, (b, n, h, dh)) for x in (kq, kk, kv))
  mask = jnp.arange(n)[None, :] < jnp.array([n, n - 3])[:, None]
  return q, k, v, mask, performer.orthogonal_random_features(kw, m, dh)


def test_matches_the_original_statements():
  q, k, v, mask, w = inputs(jax.random.key(0))
  out, _, _ = performer.nystromformer_lra_attention(q, k, v, mask, w)
  np.testing.assert_allclose(out, torch_semantics(q, k, v, mask, w), rtol=2e-5, atol=1e-6)


def test_padded_keys_stay_in_the_normaliser():
  """Unlike `favor`, a padded key changes the real queries' outputs (it adds
  m**-0.5 (exp(-c) + 1e-4) per feature to the denominator)."""
  q, k, v, mask, w = inputs(jax.random.key(1))
  out, _, _ = performer.nystromformer_lra_attention(q, k, v, mask, w)
  cut, _, _ = performer.nystromformer_lra_attention(q[1:, :4], k[1:, :4], v[1:, :4], None, w)
  assert np.abs(np.asarray(out[1, :4]) - np.asarray(cut[0])).max() > 1e-4
  # Every example shares one key max: with example 1's keys larger, example 0's output moves.
  k = k.at[1].multiply(3.0)
  out, _, _ = performer.nystromformer_lra_attention(q, k, v, mask, w)
  alone, _, _ = performer.nystromformer_lra_attention(q[:1], k[:1], v[:1], mask[:1], w)
  assert not np.allclose(np.asarray(out[0]), np.asarray(alone[0]), rtol=0, atol=1e-7)


def test_estimates_softmax_at_temperature_dh_not_sqrt_dh(monkeypatch):
  """The double dh**-0.25 scaling: with many features (and the in-feature 1e-4 set aside, which
  with 8,192 features and one global key max would dominate) the output approaches
  softmax(q k^T / dh) V, and not softmax(q k^T / sqrt(dh)) V."""
  monkeypatch.setattr(performer, "TORCH_FEATURE_EPS", 0.0)
  b, n, h, dh, m = 1, 5, 1, 4, 8192
  q, k, v, _, _ = inputs(jax.random.key(2), b, n, h, dh, 4)
  q, k = 1.5 * q, 1.5 * k
  w = performer.orthogonal_random_features(jax.random.key(3), m, dh)
  out, _, _ = performer.nystromformer_lra_attention(q, k, v, None, w)
  s = jnp.einsum("bnhd,bjhd->bhnj", q, k)
  exact = {t: jnp.einsum("bhnj,bjhd->bnhd", jax.nn.softmax(s / t, -1), v)
           for t in (dh, dh**0.5)}
  err = {t: float(jnp.abs(out - e).max()) for t, e in exact.items()}
  assert err[dh] < 0.4 * err[dh**0.5], err       # measured 0.19 against 0.63


def test_module_form_needs_no_redraw_and_refuses_causal():
  x = jax.random.normal(jax.random.key(4), (2, 9, 8))
  mask = jnp.arange(9)[None, :] < jnp.array([9, 5])[:, None]
  mod = performer.PerformerAttention(num_heads=2, num_features=8, redraw=False,
                                     form="nystromformer_lra")
  params = mod.init(jax.random.key(5), x, mask)
  y1, _ = mod.apply(params, x, mask, rngs={"features": jax.random.key(6)})
  y2, _ = mod.apply(params, x, mask, rngs={"features": jax.random.key(7)})
  np.testing.assert_array_equal(y1, y2)      # features drawn once: no rng changes them
  y_favor, _ = performer.PerformerAttention(num_heads=2, num_features=8, redraw=False).apply(
      params, x, mask)
  assert not np.allclose(y1, y_favor)        # a different function from our FAVOR+
  with pytest.raises(ValueError, match="nystromformer_lra"):
    performer.PerformerAttention(num_heads=2, num_features=8, causal=True,
                                 form="nystromformer_lra").init(jax.random.key(5), x)
