"""Tests shared by the linear attention mechanisms (tiny shapes, fixed seeds, CPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import get_attention

B, N, D, H = 2, 12, 16, 2
# Row 0: right padding; row 1: padding on both sides (no real key before position 3).
MASK = np.array([[1] * 10 + [0] * 2, [0] * 3 + [1] * 8 + [0]], bool)
RNGS = {"features": jax.random.key(7)}   # only Performer reads it

CONFIGS = [
    ("cheap_linear", {}),
    ("cheap_linear", {"normalization": "none", "gated": True}),
    ("linear_elu", {}),
    ("performer", {"num_features": 16}),
    ("performer", {"kernel": "relu"}),
    ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16}),
    ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16, "shared_mlp": False,
                        "envelope": "learned"}),
    ("cosformer", {"max_len": N}),
]
BIDIRECTIONAL_ONLY = [
    ("learned_kernel", {"num_features": 4, "num_outputs": 4, "hidden": 16, "rms_rescale": True}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CONFIGS]


def _inputs(seed: int = 0):
  x = jax.random.normal(jax.random.key(seed), (B, N, D), jnp.float32)
  return x, jnp.asarray(MASK)


def _build(name, kw, x, mask, **overrides):
  """Module and parameters perturbed away from init (so zero-init gates/envelopes matter)."""
  module = get_attention(name)(num_heads=H, **{**kw, **overrides})
  variables = jax.jit(module.init)({"params": jax.random.key(1), **RNGS}, x, mask)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  leaves = [p + 0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return module, jax.tree.unflatten(tree, leaves)


def _jitted(module, method=None):
  """jit(module.apply) with the test rngs; compiling once is much cheaper than op-by-op."""
  return jax.jit(lambda variables, *args: module.apply(variables, *args, rngs=RNGS,
                                                       method=method))


def _apply(module, variables, x, mask):
  return _jitted(module)(variables, x, mask)[0]


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
          out[b, i, h] = num / keep.sum() if module.normalization == "length" else num
        elif name == "cosformer":
          out[b, i, h] = num / max(a.sum(), module.eps)
        else:
          out[b, i, h] = num / (a.sum() + module.eps)
  out_proj = variables["params"]["out"]
  return out.reshape(B, N, -1) @ np.asarray(out_proj["kernel"], np.float64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_equals_explicit_nxn_kernel(name, kw, causal):
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=causal, chunk_size=5)
  got = np.asarray(_apply(module, variables, x, mask))
  want = _explicit_reference(name, module, variables, x, mask, causal)
  real = np.asarray(mask)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS + BIDIRECTIONAL_ONLY,
                         ids=IDS + ["learned_kernel-rms_rescale"])
def test_padding_invariance(name, kw, causal):
  if causal and kw.get("rms_rescale"):
    pytest.skip("rms_rescale is bidirectional only")
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=causal, chunk_size=4)
  noise = 5.0 * jax.random.normal(jax.random.key(3), x.shape)
  x2 = jnp.where(mask[..., None], x, noise)
  y1, y2 = (np.asarray(_apply(module, variables, xx, mask)) for xx in (x, x2))
  real = np.asarray(mask)
  assert np.isfinite(y1).all() and np.isfinite(y2).all()
  np.testing.assert_allclose(y1[real], y2[real], atol=1e-5)


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_causal_parallel_chunked_and_recurrent_agree(name, kw):
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=True, chunk_size=0)
  parallel = np.asarray(_apply(module, variables, x, mask))
  real = np.asarray(mask)
  for chunk_size in (1, 4, 5, 64):   # 5 does not divide N = 12; 64 > N
    chunked = np.asarray(_apply(module.clone(chunk_size=chunk_size), variables, x, mask))
    np.testing.assert_allclose(chunked[real], parallel[real], atol=1e-5,
                               err_msg=f"chunk_size={chunk_size}")
  cls = type(module)
  state = module.apply(variables, B, method=cls.init_state)
  sizes = {k: v.shape for k, v in state.items()}
  step = _jitted(module, cls.step)
  outs = []
  for t in range(N):
    y_t, state = step(variables, x[:, t], state, mask[:, t])
    outs.append(np.asarray(y_t))
  assert {k: v.shape for k, v in state.items()} == sizes   # state size independent of N
  np.testing.assert_allclose(np.stack(outs, 1)[real], parallel[real], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_gradients_are_finite(name, kw, causal):
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=causal, chunk_size=4)

  def loss(variables, x):
    return jnp.sum(_apply(module, variables, x, mask)**2)

  g_vars, g_x = jax.grad(loss, argnums=(0, 1))(variables, x)
  for g in jax.tree.leaves(g_vars) + [g_x]:
    assert np.isfinite(np.asarray(g)).all()
  assert float(jnp.abs(g_vars["params"]["query"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_jit_does_not_retrace(name, kw):
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=True, chunk_size=4)
  traces = []

  @jax.jit
  def f(variables, x, key):
    traces.append(1)
    return module.apply(variables, x, mask, rngs={"features": key})[0]

  y1 = f(variables, x, jax.random.key(0))
  y2 = f(variables, x + 1.0, jax.random.key(1))
  assert len(traces) == 1
  assert not np.allclose(np.asarray(y1), np.asarray(y2))


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name,kw", CONFIGS, ids=IDS)
def test_bfloat16_runs_finite_and_close(name, kw, causal):
  x, mask = _inputs()
  module, variables = _build(name, kw, x, mask, causal=causal, chunk_size=4)
  y32 = np.asarray(_apply(module, variables, x, mask))
  y16 = _apply(module.clone(dtype=jnp.bfloat16), variables, x, mask)
  assert y16.dtype == jnp.bfloat16
  y16 = np.asarray(y16.astype(jnp.float32))
  real = np.asarray(mask)
  assert np.isfinite(y16).all()
  scale = np.abs(y32[real]).max()
  assert np.abs(y16[real] - y32[real]).max() < 0.05 * scale


def test_linear_elu_feature_map():
  x, mask = _inputs()
  module, variables = _build("linear_elu", {}, x, mask)
  phi_q, phi_k, v = _jitted(module, type(module).features)(variables, x, mask)
  p = variables["params"]
  q = (x @ p["query"]["kernel"]).reshape(B, N, H, -1)
  np.testing.assert_allclose(phi_q, jax.nn.elu(q) + 1, atol=1e-6)
  assert float(phi_k.min()) > 0


def test_cheap_linear_summary_and_gate():
  x, mask = _inputs()
  module, variables = _build("cheap_linear", {"gated": True}, x, mask)
  cls = type(module)
  p = variables["params"]
  dh = D // H
  gate = jax.nn.sigmoid(x @ p["gate"]["kernel"] + p["gate"]["bias"])
  k = (gate * (x @ p["key"]["kernel"])).reshape(B, N, H, dh)
  q = (x @ p["query"]["kernel"]).reshape(B, N, H, dh) * dh**-0.5
  phi_q, phi_k, _ = _jitted(module, cls.features)(variables, x, mask)
  np.testing.assert_allclose(phi_k, k, atol=1e-5)
  np.testing.assert_allclose(phi_q, q, atol=1e-5)
  c = _jitted(module, cls.summary)(variables, x, mask)
  assert c.shape == (B, H, dh, dh)   # fixed size whatever N is
  lookups = jnp.einsum("bnhk,bhkj->bnhj", q, c).reshape(B, N, D) @ p["out"]["kernel"]
  np.testing.assert_allclose(_apply(module, variables, x, mask), lookups, atol=1e-5)
  # "length" divides by the number of real keys; "none" is the raw sum.
  raw = _apply(module.clone(normalization="none"), variables, x, mask)
  n_real = MASK.sum(1)[:, None, None]
  np.testing.assert_allclose(raw / n_real, _apply(module, variables, x, mask), rtol=1e-4,
                             atol=1e-6)


def test_cosformer_weights_are_cos_reweighted_relu_scores():
  x, mask = _inputs()
  module, variables = _build("cosformer", {}, x, mask)
  p = variables["params"]
  q, k, v = ((x @ p[n]["kernel"]).reshape(B, N, H, -1) for n in ("query", "key", "value"))
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros(v.shape)
  for b in range(B):
    m = MASK[b].sum()   # M = number of real tokens
    pos = np.arange(N)
    cos = np.cos(np.pi / 2 * (pos[:, None] - pos[None, :]) / m) * MASK[b][None, :]
    w = np.einsum("ihk,jhk->hij", np.maximum(q[b], 0), np.maximum(k[b], 0)) * cos
    out[b] = np.einsum("hij,jhk->ihk", w, v[b]) / np.maximum(w.sum(-1), 1e-6).T[..., None]
  want = out.reshape(B, N, D) @ np.asarray(p["out"]["kernel"], np.float64)
  got = np.asarray(_apply(module, variables, x, mask))
  np.testing.assert_allclose(got[MASK], want[MASK], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="max_len"):
    module.clone(max_len=0).apply(variables, x[:, 0], module.apply(
        variables, B, method=type(module).init_state), method=type(module).step)
