"""Blocked softmax attention (attention/blocked.py) is the "xla" form's function, forward and
backward, with every mask and attention dropout, and never holds an N x N array."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import common
from luna_jax.attention.blocked import blocked_attention
from luna_jax.attention.luna import LunaAttention
from luna_jax.attention.softmax import SoftmaxAttention

H, K = 2, 8
RNG = np.random.default_rng(0)


def _xla_form(q, k, v, mask, causal, rate, seeds):
  """What SoftmaxAttention's "xla" path computes (common.softmax_attend on [B, H, T, S])."""
  t, s = q.shape[1], k.shape[1]
  scores = jnp.einsum("bqhk,bnhk->bhqn", q, k, preferred_element_type=jnp.float32) * K**-0.5
  keep = None if mask is None else mask[:, None, None, :]
  if causal:
    tril = jnp.tril(jnp.ones((t, s), bool))[None, None]
    keep = tril if keep is None else keep & tril
  return common.softmax_attend("bhqn,bnhk->bqhk", scores, keep, v, dropout_rate=rate,
                               dropout_seeds=seeds)


def _lengths_mask(lengths, n):
  return jnp.arange(n)[None] < jnp.asarray(lengths)[:, None]


N = 37   # not a multiple of any block size below
MASKS = {
    "none": None,
    "padding": _lengths_mask([N, 20], N),
    "short": _lengths_mask([14, 9], N),          # key blocks 2.. are padding in every example
    "blind": _lengths_mask([0, 20], N),          # example 0 sees no key: uniform rows
    "left": jnp.arange(N)[None] >= jnp.array([[0], [11]]),   # causal: rows < 11 see no key
}
CASES = [  # (mask, causal, dropout rate, block_size, query_block_size, T, batch_group)
    ("none", False, 0.0, 8, 0, N, 0),
    ("padding", False, 0.3, 8, 0, N, 1),
    ("padding", True, 0.3, 8, 10, N, 0),
    ("short", False, 0.0, 8, 0, N, 1),
    ("short", True, 0.3, 5, 7, N, 2),
    ("blind", False, 0.3, 8, 0, N, 1),
    ("blind", True, 0.0, 8, 10, N, 2),
    ("left", True, 0.3, 5, 7, N, 1),
    ("none", True, 0.0, 8, 10, N, 1),
    ("padding", False, 0.3, 8, 4, 13, 2),        # fewer queries than keys
]


@pytest.mark.parametrize("mask_name,causal,rate,block,qblock,t,group", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_equals_xla_form_forward_and_gradients(mask_name, causal, rate, block, qblock, t,
                                               group):
  mask = MASKS[mask_name]
  q = jnp.asarray(RNG.standard_normal((2, t, H, K)), jnp.float32)
  k, v = (jnp.asarray(RNG.standard_normal((2, N, H, K)), jnp.float32) for _ in range(2))
  w = jnp.asarray(RNG.standard_normal((2, t, H, K)), jnp.float32)
  seeds = common.dropout_seeds(jax.random.key(3)) if rate else None

  def loss(fn):
    def f(q, k, v):
      o = fn(q, k, v)
      return jnp.sum(o * w), o
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, want), want_grads = loss(lambda q, k, v: _xla_form(q, k, v, mask, causal, rate, seeds))(
      q, k, v)
  (_, got), got_grads = loss(lambda q, k, v: blocked_attention(
      q, k, v, mask, scale=K**-0.5, causal=causal, dropout_rate=rate, dropout_seeds=seeds,
      block_size=block, query_block_size=qblock, batch_group=group))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for name, g, g_want in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, g_want, atol=1e-5, rtol=0, err_msg=f"d{name}")
  if mask_name == "blind":   # the blind example's rows: mean of v over all keys, as in xla
    if rate == 0.0:
      np.testing.assert_allclose(got[0], jnp.broadcast_to(v[0].mean(0), got[0].shape),
                                 atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_module_blocked_equals_xla_with_dropout_and_parameter_gradients(causal):
  b, n, d = 2, 45, 16
  x = jnp.asarray(RNG.standard_normal((b, n, d)), jnp.float32)
  mask = _lengths_mask([n, 30], n)
  xla = SoftmaxAttention(num_heads=H, dropout_rate=0.2, causal=causal, use_bias=True)
  blk = xla.clone(implementation="blocked", block_size=16)
  params = xla.init(jax.random.key(0), x, mask)["params"]

  def grads(module, deterministic):
    def loss(params, x):
      y, _ = module.apply({"params": params}, x, mask, deterministic=deterministic,
                          rngs={"dropout": jax.random.key(5)})
      return jnp.mean(jnp.sin(y)), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

  for deterministic in (False, True):
    (_, y_want), g_want = grads(xla, deterministic)
    (_, y_got), g_got = grads(blk, deterministic)
    np.testing.assert_allclose(y_got, y_want, atol=1e-5, rtol=0)
    for (path, a), bb in zip(jax.tree_util.tree_leaves_with_path(g_got),
                             jax.tree.leaves(g_want)):
      np.testing.assert_allclose(a, bb, atol=1e-5, rtol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))


def test_attention_maps_still_come_from_the_xla_path():
  x = jnp.asarray(RNG.standard_normal((1, 20, 16)), jnp.float32)
  module = SoftmaxAttention(num_heads=H, implementation="blocked", block_size=8)
  variables = module.init(jax.random.key(0), x)
  (y, _), state = module.apply(variables, x, mutable=["intermediates"])
  assert state["intermediates"]["attn_weights"][0].shape == (1, H, 20, 20)
  np.testing.assert_allclose(y, module.apply(variables, x)[0], atol=1e-5)


def test_resolve_implementation_blocked_and_auto():
  assert common.resolve_implementation("blocked", jnp.float32, True, num_keys=8) == "blocked"
  with pytest.raises(ValueError, match="softmax"):   # Luna has no blocked form
    common.resolve_implementation("blocked", jnp.float32, False)
  if jax.default_backend() in ("cpu", "tpu"):
    big, small = common.BLOCKED_MIN_KEYS, common.BLOCKED_MIN_KEYS - 1
    for dropout in (False, True):
      assert common.resolve_implementation("auto", jnp.float32, dropout, num_keys=big) == "blocked"
      assert common.resolve_implementation("auto", jnp.float32, dropout, num_keys=small) == "xla"
    assert common.resolve_implementation("auto", jnp.float32, False) == "xla"   # Luna
  x = jnp.zeros((1, 8, 16))
  with pytest.raises(ValueError, match="softmax"):
    LunaAttention(num_heads=H, implementation="blocked").init(
        jax.random.key(0), x, None, jnp.zeros((1, 4, 16)))


# ------------------------------------------------------------------------------- memory

def _square_arrays(hlo: str, n: int) -> list[str]:
  """Array types in HLO text with two dimensions of size >= n."""
  found = []
  for dims in re.findall(r"[a-z]\d*\[([\d,]+)\]", hlo):
    sizes = [int(x) for x in dims.split(",") if x]
    if sum(s >= n for s in sizes) >= 2:
      found.append(dims)
  return found


@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_compile_without_an_n_by_n_array(causal):
  """Forward + backward of the module at N = 1024, block 128: no array in the compiled program
  has two N-sized dimensions, and XLA's temporaries are below half of one B x H x N x N float32
  array (measured: 0.43x, a few [B, H, N, block] tiles); the "xla" form, the control, has an
  N x N array and temporaries above it."""
  b, n, d = 1, 1024, 16
  x = jax.ShapeDtypeStruct((b, n, d), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, n), jnp.bool_)

  def compiled(implementation):
    module = SoftmaxAttention(num_heads=H, dropout_rate=0.1, causal=causal,
                              implementation=implementation, block_size=128)
    params = jax.eval_shape(module.init, jax.random.key(0), x, mask)["params"]

    def loss(params, x, mask):
      y, _ = module.apply({"params": params}, x, mask, deterministic=False,
                          rngs={"dropout": jax.random.key(1)})
      return jnp.sum(y)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, mask).compile()

  nxn_bytes = b * H * n * n * 4
  blocked = compiled("blocked")
  assert _square_arrays(blocked.as_text(), n) == []
  assert blocked.memory_analysis().temp_size_in_bytes < nxn_bytes / 2
  control = compiled("xla")
  assert _square_arrays(control.as_text(), n)
  assert control.memory_analysis().temp_size_in_bytes >= nxn_bytes


def test_data_parallel_batch_stays_sharded():
  """With the batch sharded over 8 devices (the trainer's data parallelism) every device loops
  over its own examples: no all-gather in the compiled forward + backward, same values."""
  devices = jax.devices()
  if len(devices) < 8:
    pytest.skip("needs 8 (fake) devices")
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = NamedSharding(mesh, P("data"))
  b, n = 16, 24
  q, k, v = (jnp.asarray(RNG.standard_normal((b, n, H, K)), jnp.float32) for _ in range(3))
  mask = _lengths_mask(RNG.integers(1, n + 1, size=b), n)
  seeds = common.dropout_seeds(jax.random.key(3))

  def grads(fn, **jit_kw):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2)),
                   **jit_kw)

  blocked = grads(lambda q, k, v: blocked_attention(
      q, k, v, mask, scale=K**-0.5, dropout_rate=0.2, dropout_seeds=seeds, block_size=8),
                  in_shardings=(data,) * 3, out_shardings=(data,) * 3)
  sharded = [jax.device_put(a, data) for a in (q, k, v)]
  assert "all-gather" not in blocked.lower(*sharded).compile().as_text()
  want = grads(lambda q, k, v: _xla_form(q, k, v, mask, False, 0.2, seeds))(q, k, v)
  for got, w in zip(blocked(*sharded), want):
    np.testing.assert_allclose(got, w, atol=1e-5, rtol=1e-5)
