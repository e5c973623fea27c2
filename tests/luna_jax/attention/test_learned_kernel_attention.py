"""LUNA learned kernel: the feature map against a numpy re-implementation; RMS rescale."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention.learned_kernel import LearnedKernelAttention
from luna_jax.attention.learned_kernel import rms_factor

B, N, D, H = 2, 8, 16, 2
M, L, HID = 3, 2, 5
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], bool)
X = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)


def _numpy_phi(x_BxNxHxK, p, shared_mlp, envelope):
  """phi(x) = h(x)/sqrt(m) [psi_l(w_i . x + b_i)], x already scaled by dh**-0.25."""
  u = np.einsum("bnhk,mk->bnhm", x_BxNxHxK, p["feature_proj"]) + p["feature_bias"]
  out = np.zeros(u.shape + (L,))
  for i in range(M):
    if shared_mlp:
      w1, b1, w2, b2 = p["psi_w1"], p["psi_b1"], p["psi_w2"], p["psi_b2"]
    else:
      w1, b1, w2, b2 = p["psi_w1"][i], p["psi_b1"][i], p["psi_w2"][i], p["psi_b2"][i]
    hidden = np.maximum(u[..., i, None] * w1 + b1, 0.0)     # [B, N, H, HID]
    out[..., i, :] = np.maximum(hidden @ w2 + b2, 0.0)
  phi = out.reshape(*u.shape[:3], M * L) / np.sqrt(M)
  if envelope == "learned":
    z = x_BxNxHxK @ p["envelope_w"] + p["envelope_b"]
    phi = phi * np.log1p(np.exp(z))[..., None]
  return phi


@pytest.mark.parametrize("shared_mlp,envelope", [(True, "none"), (False, "learned")])
def test_feature_map_matches_numpy(shared_mlp, envelope):
  module = LearnedKernelAttention(num_heads=H, num_features=M, num_outputs=L, hidden=HID,
                                  shared_mlp=shared_mlp, envelope=envelope)
  variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), X, MASK)
  rng = np.random.default_rng(1)   # move zero-init parameters (bias, envelope) off zero
  variables = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32),
                           variables)
  phi_q, phi_k, _ = jax.jit(lambda v: module.apply(v, X, MASK, method=module.features))(
      variables)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  dh = D // H
  for name, got in (("query", phi_q), ("key", phi_k)):
    x = (X @ p[name]["kernel"]).reshape(B, N, H, dh) * dh**-0.25
    want = _numpy_phi(x, p, shared_mlp, envelope)
    assert (want > 0).mean() > 0.2   # not a dead feature map
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_rms_factor_ignores_padding_and_shrinks_only():
  u = np.random.default_rng(2).standard_normal((B, N, H, 4)).astype(np.float32)
  u[..., 0] *= 0.01   # rms 0.01 < 0.1: factor capped at 1
  u2 = u.copy()
  u2[~MASK] = 1e4     # padded entries must not change the statistic
  f1, f2 = np.asarray(rms_factor(jnp.asarray(u), MASK)), np.asarray(rms_factor(jnp.asarray(u2),
                                                                               MASK))
  np.testing.assert_allclose(f1, f2, rtol=1e-6)
  want = np.minimum(1.0, 0.1 / np.sqrt((u[MASK] ** 2).mean(axis=(0, 1))))
  np.testing.assert_allclose(f1, want, rtol=1e-5)
  assert f1[0] == 1.0 and (f1[1:] < 0.5).all()


def test_rms_rescale_changes_outputs_but_not_through_padding():
  module = LearnedKernelAttention(num_heads=H, num_features=M, num_outputs=L, hidden=HID)
  variables = jax.jit(module.init)(jax.random.key(0, impl="rbg"), X, MASK)
  rescaled = module.clone(rms_rescale=True)
  run = jax.jit(lambda x: rescaled.apply(variables, x, MASK)[0])
  x2 = np.where(MASK[..., None], X, 100.0).astype(np.float32)
  y, y2 = np.asarray(run(X)), np.asarray(run(x2))
  np.testing.assert_allclose(y[MASK], y2[MASK], atol=1e-5)
  y_plain = np.asarray(jax.jit(lambda x: module.apply(variables, x, MASK)[0])(X))
  assert not np.allclose(y[MASK], y_plain[MASK], atol=1e-4)   # the rescale is active


def test_chunked_feature_map_is_exact_and_never_holds_the_hidden_activation():
  from luna_jax.attention import get_attention
  lk = get_attention("learned_kernel")
  b, n, d, h = 2, 300, 32, 2
  x = jax.random.normal(jax.random.key(0), (b, n, d))
  mask = jnp.arange(n)[None] < jnp.array([[n], [200]])
  whole, chunked = lk(num_heads=h, feature_chunk=0), lk(num_heads=h, feature_chunk=64)
  v = whole.init(jax.random.key(1), x, mask)
  np.testing.assert_allclose(chunked.apply(v, x, mask)[0], whole.apply(v, x, mask)[0],
                             atol=1e-6)
  loss = lambda m: lambda v: (m.apply(v, x, mask)[0] ** 2).sum()
  for ga, gb in zip(jax.tree.leaves(jax.grad(loss(whole))(v)),
                    jax.tree.leaves(jax.grad(loss(chunked))(v))):
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-4 * float(jnp.abs(ga).max()))
  # The hidden activation of psi, [B, N, H, m, hidden] float32, for q and k at N = 4096:
  n_long = 4096
  hidden_bytes = 2 * b * n_long * h * 32 * 64 * 4
  grad = jax.jit(jax.grad(lambda v, xx: (chunked.apply(v, xx, None)[0] ** 2).sum()))
  temp = grad.lower(v, jnp.zeros((b, n_long, d))).compile().memory_analysis().temp_size_in_bytes
  assert temp < hidden_bytes / 4      # unchunked: more than hidden_bytes (790 MiB measured)


def _direct_psi(u_XxM, w1, b1, w2, b2, scale=1.0):
  """psi as the MLP it is (the implementation before scalar_mlp): the [.., M, hidden] activation."""
  h_XxMxJ = jax.nn.relu(u_XxM[..., None] * w1 + b1)
  spec = "...mj,jl->...ml" if w1.ndim == 1 else "...mj,mjl->...ml"
  return jax.nn.relu(jnp.einsum(spec, h_XxMxJ, w2) + b2) * scale


@pytest.mark.parametrize("scale", [1.0, 0.3])
@pytest.mark.parametrize("w1_zero", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_segment_lookup_psi_equals_the_mlp(shared, w1_zero, scale):
  from luna_jax.attention import scalar_mlp
  m, j, l = 6, 16, 3
  lead = () if shared else (m,)
  k = jax.random.split(jax.random.key(0), 6)
  u = 2.0 * jax.random.normal(k[0], (2, 3, 40, m))
  w1 = jax.random.uniform(k[1], lead + (j,), minval=-1, maxval=1)
  if w1_zero:   # units with w1 = 0 are constant: always on (b1 > 0) or always off
    w1 = w1.at[..., :4].set(0.0)
  b1 = jax.random.uniform(k[2], lead + (j,), minval=-1, maxval=1)
  w2 = jax.random.uniform(k[3], lead + (j, l), minval=-0.5, maxval=0.5)
  b2 = jax.random.uniform(k[4], lead + (l,), minval=-0.5, maxval=0.5)
  g = jax.random.normal(k[5], u.shape + (l,))
  loss = lambda f: lambda *a: (f(*a, scale=scale) * g).sum()
  args = (u, w1, b1, w2, b2)
  want = _direct_psi(*args, scale=scale)
  got = jax.jit(scalar_mlp.psi, static_argnames="scale")(*args, scale=scale)
  assert (want > 0).mean() > 0.2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gw = jax.grad(loss(_direct_psi), argnums=range(5))(*args)
  gg = jax.jit(jax.grad(loss(scalar_mlp.psi), argnums=range(5)))(*args)
  for a, b in zip(gg, gw):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("kw", [{}, {"shared_mlp": False, "envelope": "learned"},
                                {"rms_rescale": True}, {"causal": True, "feature_chunk": 16}])
def test_attention_outputs_and_gradients_equal_the_direct_mlp(monkeypatch, kw):
  """The whole module with psi as a segment lookup against psi as the MLP (float32)."""
  from luna_jax.attention import scalar_mlp
  b, n, d, h = 2, 48, 32, 2
  x = jax.random.normal(jax.random.key(0), (b, n, d))
  mask = jnp.arange(n)[None] < jnp.array([[n], [30]])
  module = LearnedKernelAttention(num_heads=h, num_features=8, num_outputs=4, hidden=16, **kw)
  v = module.init(jax.random.key(1), x, mask)
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)

  def run(v, x):
    y = module.apply(v, x, mask)[0]
    return (jnp.sin(y) * mask[..., None]).sum(), y

  def both():
    return jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))(v, x)

  (_, y_new), g_new = both()
  monkeypatch.setattr(scalar_mlp, "psi", _direct_psi)
  (_, y_old), g_old = both()
  np.testing.assert_allclose(y_new, y_old, rtol=1e-5, atol=1e-5)
  for a, b_ in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5 * float(jnp.abs(b_).max()))


def test_segment_lookup_psi_with_an_odd_number_of_entries():
  """105 entries: the forward's two-half loop falls back to one part."""
  from luna_jax.attention import scalar_mlp
  k = jax.random.split(jax.random.key(4), 6)
  u = 2.0 * jax.random.normal(k[0], (3, 5, 7))
  w1, b1 = (jax.random.uniform(k[i], (16,), minval=-1, maxval=1) for i in (1, 2))
  w2 = jax.random.uniform(k[3], (16, 3), minval=-0.5, maxval=0.5)
  b2 = jax.random.uniform(k[4], (3,), minval=-0.5, maxval=0.5)
  g = jax.random.normal(k[5], u.shape + (3,))
  args = (u, w1, b1, w2, b2)
  np.testing.assert_allclose(jax.jit(scalar_mlp.psi)(*args), _direct_psi(*args), rtol=1e-5,
                             atol=1e-6)
  loss = lambda f: lambda *a: (f(*a) * g).sum()
  gg = jax.jit(jax.grad(loss(scalar_mlp.psi), argnums=range(5)))(*args)
  gw = jax.grad(loss(_direct_psi), argnums=range(5))(*args)
  for a, b in zip(gg, gw):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
