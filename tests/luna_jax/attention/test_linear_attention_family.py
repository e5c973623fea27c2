"""Tests shared by the linear attention mechanisms (tiny shapes, fixed seeds, CPU).

Compilation dominates the runtime on CPU, so parameters are built once per configuration,
jitted functions are cached per (module, method), and keys use the "rbg" PRNG (cheap to compile).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import get_attention

B, N, D, H = 2, 12, 16, 2
CHUNK = 5   # does not divide N: exercises the internal padding of the chunked form
# Row 0: right padding; row 1: padding on both sides (no real key before position 3).
MASK = np.array([[1] * 10 + [0] * 2, [0] * 3 + [1] * 8 + [0]], bool)
RNGS = {"features": jax.random.key(7, impl="rbg")}   # only Performer reads it
X = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)
# Large values at the padded positions only: outputs at real positions must not change.
X_PADDED_NOISE = np.where(MASK[..., None], X, 5.0 * np.random.default_rng(1).standard_normal(
    X.shape)).astype(np.float32)

CONFIGS = [
    ("cheap_linear", {}),
    ("cheap_linear", {"normalization": "none", "gated": True}),
    ("cheap_linear", {"form": "paper"}),
    ("cheap_linear", {"form": "paper", "gated": True, "normalization": "length"}),
    ("linear_elu", {}),
    ("performer", {"num_features": 16}),
    ("performer", {"kernel": "relu"}),
    ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16}),
    ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16, "shared_mlp": False,
                        "envelope": "learned"}),
    ("cosformer", {"max_len": N}),
]
RMS_CONFIG = ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16,
                                 "rms_rescale": True})


def _id(config):
  name, kw = config
  return "-".join([name] + [f"{k}={v}" for k, v in kw.items()])


IDS = [_id(c) for c in CONFIGS]


@functools.lru_cache(maxsize=None)
def _variables(name, kw_items):
  """Parameters perturbed away from init (so zero-init gates/envelopes matter)."""
  module = get_attention(name)(num_heads=H, **dict(kw_items))
  rngs = {"params": jax.random.key(1, impl="rbg"), **RNGS}
  variables = jax.jit(module.init)(rngs, X, MASK)
  noise = np.random.default_rng(2)
  return jax.tree.map(
      lambda p: p + 0.1 * noise.standard_normal(p.shape).astype(np.float32), variables)


def _build(name, kw, **overrides):
  module = get_attention(name)(num_heads=H, **{**kw, **overrides})
  return module, _variables(name, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _jitted(module, method=None):
  """jit(module.apply) with the test rngs; compiling once is much cheaper than op-by-op."""
  return jax.jit(lambda variables, *args: module.apply(variables, *args, rngs=RNGS,
                                                       method=method))


def _apply(module, variables, x=X, mask=MASK):
  return np.asarray(_jitted(module)(variables, x, mask)[0].astype(jnp.float32))


def _explicit_reference(name, module, variables, x, mask, causal):
  """The same kernel as an explicit n x n computation, in float64 numpy."""
  phi_q, phi_k, v = (np.asarray(a, np.float64) for a in _jitted(
      module, type(module).features)(variables, x, mask))
  mask = np.asarray(mask)
  log_k = name == "performer" and module.kernel == "softmax"
  if not log_k:   # a dead (all-zero) feature map would make the comparison vacuous
    assert (phi_q[mask] != 0).mean() > 0.2 and (phi_k[mask] != 0).mean() > 0.2
  out = np.zeros(v.shape)
  for b in range(B):
    for h in range(H):
      for i in range(N):
        keep = mask[b] & (np.arange(N) <= i if causal else True)
        if not keep.any():
          continue
        kf = phi_k[b, keep, h]
        if log_k:   # the stabiliser is the max over the keys this query sees
          kf = np.exp(kf - kf.max())
        a = kf @ phi_q[b, i, h]          # [number of real keys]
        num = a @ v[b, keep, h]
        if name == "cheap_linear":
          out[b, i, h] = num / keep.sum() if module._normalization() == "length" else num
        elif name == "cosformer":
          out[b, i, h] = num / max(a.sum(), module.eps)
        else:
          out[b, i, h] = num / (a.sum() + module.eps)
  out_proj = variables["params"]["out"]
  return out.reshape(B, N, -1) @ np.asarray(out_proj["kernel"], np.float64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS + [RMS_CONFIG], ids=IDS + [_id(RMS_CONFIG)])
def test_equals_explicit_nxn_kernel_and_ignores_padding(name, kw, causal):
  if causal and kw.get("rms_rescale"):
    pytest.skip("rms_rescale is bidirectional only")
  module, variables = _build(name, kw, causal=causal, chunk_size=CHUNK)
  got = _apply(module, variables)
  want = _explicit_reference(name, module, variables, X, MASK, causal)
  np.testing.assert_allclose(got[MASK], want[MASK], rtol=1e-4, atol=1e-5)
  got_noise = _apply(module, variables, X_PADDED_NOISE)
  assert np.isfinite(got).all() and np.isfinite(got_noise).all()
  np.testing.assert_allclose(got_noise[MASK], got[MASK], atol=1e-5)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_causal_parallel_chunked_and_recurrent_agree(name, kw):
  module, variables = _build(name, kw, causal=True, chunk_size=0)
  parallel = _apply(module, variables)
  for chunk_size in (1, CHUNK):
    chunked = _apply(module.clone(chunk_size=chunk_size), variables)
    np.testing.assert_allclose(chunked[MASK], parallel[MASK], atol=1e-5,
                               err_msg=f"chunk_size={chunk_size}")
  cls = type(module)
  state = module.apply(variables, B, method=cls.init_state)
  sizes = {k: v.shape for k, v in state.items()}
  step = _jitted(module, cls.step)
  outs = []
  for t in range(N):
    y_t, state = step(variables, X[:, t], state, MASK[:, t])
    outs.append(np.asarray(y_t))
  assert {k: v.shape for k, v in state.items()} == sizes   # state size independent of N
  np.testing.assert_allclose(np.stack(outs, 1)[MASK], parallel[MASK], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_gradients_are_finite(name, kw, causal):
  module, variables = _build(name, kw, causal=causal, chunk_size=CHUNK)

  @jax.jit
  def grads(variables, x):
    return jax.grad(lambda v, x: jnp.sum(module.apply(v, x, MASK, rngs=RNGS)[0]**2),
                    argnums=(0, 1))(variables, x)

  g_vars, g_x = grads(variables, X)
  for g in jax.tree.leaves(g_vars) + [g_x]:
    assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.abs(g_vars["params"]["query"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g_x).sum()) > 0


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_jit_does_not_retrace(name, kw):
  module, variables = _build(name, kw, causal=True, chunk_size=CHUNK)
  traces = []

  @jax.jit
  def f(variables, x, key):
    traces.append(1)
    return module.apply(variables, x, MASK, rngs={"features": key})[0]

  y1 = f(variables, X, jax.random.key(0, impl="rbg"))
  y2 = f(variables, X + 1.0, jax.random.key(1, impl="rbg"))
  assert len(traces) == 1
  assert not np.allclose(np.asarray(y1), np.asarray(y2))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_bfloat16_runs_finite_and_close(name, kw, causal):
  module, variables = _build(name, kw, causal=causal, chunk_size=CHUNK)
  y32 = _apply(module, variables)
  y16 = _jitted(module.clone(dtype=jnp.bfloat16))(variables, X, MASK)[0]
  assert y16.dtype == jnp.bfloat16
  y16 = np.asarray(y16.astype(jnp.float32))
  assert np.isfinite(y16).all()
  assert np.abs(y16[MASK] - y32[MASK]).max() < 0.05 * np.abs(y32[MASK]).max()


def test_linear_elu_feature_map():
  module, variables = _build("linear_elu", {})
  phi_q, phi_k, _ = _jitted(module, type(module).features)(variables, X, MASK)
  q = (X @ variables["params"]["query"]["kernel"]).reshape(B, N, H, -1)
  np.testing.assert_allclose(phi_q, jax.nn.elu(q) + 1, atol=1e-6)
  assert float(phi_k.min()) > 0


def test_cheap_linear_summary_and_gate():
  module, variables = _build("cheap_linear", {"normalization": "none", "gated": True})
  module = module.clone(normalization="length")
  cls, p, dh = type(module), variables["params"], D // H
  gate = jax.nn.sigmoid(X @ p["gate"]["kernel"] + p["gate"]["bias"])
  k = (gate * (X @ p["key"]["kernel"])).reshape(B, N, H, dh)
  q = (X @ p["query"]["kernel"]).reshape(B, N, H, dh) * dh**-0.5
  phi_q, phi_k, _ = _jitted(module, cls.features)(variables, X, MASK)
  np.testing.assert_allclose(phi_k, k, atol=1e-5)
  np.testing.assert_allclose(phi_q, q, atol=1e-5)
  c = _jitted(module, cls.summary)(variables, X, MASK)
  assert c.shape == (B, H, dh, dh)   # fixed size whatever N is
  lookups = jnp.einsum("bnhk,bhkj->bnhj", q, c).reshape(B, N, D) @ p["out"]["kernel"]
  y = _apply(module, variables)
  np.testing.assert_allclose(y, lookups, atol=1e-5)
  # "length" divides by the number of real keys; "none" is the raw sum.
  raw = _apply(module.clone(normalization="none"), variables)
  np.testing.assert_allclose(raw / MASK.sum(1)[:, None, None], y, rtol=1e-4, atol=1e-6)


def test_cosformer_weights_are_cos_reweighted_relu_scores():
  module, variables = _build("cosformer", {"max_len": N})
  p = variables["params"]
  q, k, v = (np.asarray(X @ p[n]["kernel"], np.float64).reshape(B, N, H, -1)
             for n in ("query", "key", "value"))
  out = np.zeros(v.shape)
  pos = np.arange(N)
  for b in range(B):
    m = MASK[b].sum()   # bidirectional: M = number of real tokens
    cos = np.cos(np.pi / 2 * (pos[:, None] - pos[None, :]) / m) * MASK[b][None, :]
    w = np.einsum("ihk,jhk->hij", np.maximum(q[b], 0), np.maximum(k[b], 0)) * cos
    out[b] = np.einsum("hij,jhk->ihk", w, v[b]) / np.maximum(w.sum(-1), 1e-6).T[..., None]
  want = out.reshape(B, N, D) @ np.asarray(p["out"]["kernel"], np.float64)
  np.testing.assert_allclose(_apply(module, variables)[MASK], want[MASK], rtol=1e-4, atol=1e-5)
  state = module.apply(variables, B, method=type(module).init_state)
  with pytest.raises(ValueError, match="max_len"):
    module.clone(max_len=0).apply(variables, X[:, 0], state, method=type(module).step)


def test_learned_kernel_rms_rescale_rejects_causal():
  module, variables = _build(*RMS_CONFIG)
  with pytest.raises(ValueError, match="rms_rescale"):
    module.clone(causal=True).apply(variables, X, MASK)


@pytest.mark.parametrize("mode", ["eps", "floor", "none"])
def test_heads_first_bidirectional_equals_bidirectional(mode):
  """The learned kernel's [B, H, N, F] path: values and gradients of `bidirectional`, padded
  keys dropped through v and the key sum instead of zeroed features."""
  from luna_jax.attention import linear_common
  k = jax.random.split(jax.random.key(3), 3)
  q = jax.nn.relu(jax.random.normal(k[0], (B, H, N, 12)))
  kk = jax.nn.relu(jax.random.normal(k[1], (B, H, N, 12)))
  v = jax.random.normal(k[2], (B, N, H, 5))

  def loss(fn, layout):
    def f(q, kk, v):
      out = fn(*layout(q, kk), v, MASK, eps=1e-6, mode=mode)
      return (jnp.sin(out) * MASK[..., None, None]).sum()
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, kk, v)

  want = loss(linear_common.bidirectional, lambda a, b: (a.swapaxes(1, 2), b.swapaxes(1, 2)))
  got = loss(linear_common.bidirectional_heads_first, lambda a, b: (a, b))
  assert float(jnp.abs(want[1][1]).max()) > 0       # the key gradient is not vacuous
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(jnp.abs(b).max())))
