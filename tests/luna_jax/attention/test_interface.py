"""The one interface: every mechanism projects to qkv_dim and back, with or without biases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import ATTENTION_NAMES, get_attention

B, N, D, E, H = 2, 9, 24, 12, 2
X = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)
MASK = np.arange(N)[None] < np.array([[N], [6]])
P = np.random.default_rng(1).standard_normal((B, 4, D)).astype(np.float32)


@pytest.mark.parametrize("name", [n for n in ATTENTION_NAMES if n != "luna"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_qkv_dim_projects_to_e_and_back(name, use_bias):
  module = get_attention(name)(num_heads=H, qkv_dim=E, use_bias=use_bias)
  variables = module.init({"params": jax.random.key(0), "features": jax.random.key(1)}, X, MASK)
  p = variables["params"]
  first = p["query"]["kernel"]
  assert first.shape == (D, E) and p["out"]["kernel"].shape == (E, D)
  assert ("bias" in p["query"]) == use_bias == ("bias" in p["out"])
  y, _ = module.apply(variables, X, MASK, rngs={"features": jax.random.key(1)})
  assert y.shape == (B, N, D) and np.isfinite(np.asarray(y)).all()
  # The default qkv_dim (0) is the model width.
  wide = get_attention(name)(num_heads=H).init(
      {"params": jax.random.key(0), "features": jax.random.key(1)}, X, MASK)
  assert wide["params"]["query"]["kernel"].shape == (D, D)


def test_luna_requires_qkv_dim_equal_to_width():
  luna = get_attention("luna")
  y, p_ctx = luna(num_heads=H, qkv_dim=D).init_with_output(jax.random.key(0), X, MASK, P)[0]
  assert y.shape == (B, N, D) and p_ctx.shape == (B, 4, D)
  with pytest.raises(ValueError, match="qkv_dim"):
    luna(num_heads=H, qkv_dim=E).init(jax.random.key(0), X, MASK, P)


def test_cheap_linear_paper_form_symmetric_summary_and_constant_cost_lookups():
  cheap = get_attention("cheap_linear")
  module = cheap(num_heads=H, form="paper")
  variables = module.init(jax.random.key(0), X, MASK)
  p = variables["params"]
  assert set(p) == {"query", "state", "out"}         # one projection is key and value
  c = module.apply(variables, X, MASK, method=type(module).summary)
  np.testing.assert_allclose(c, jnp.swapaxes(c, -1, -2), atol=1e-6)   # C = sum h h^T
  eig = np.linalg.eigvalsh(np.asarray(c, np.float64))
  assert eig.min() > -1e-5                            # and positive semi-definite
  # No normaliser and no scaling: y = out(C q).
  q = (X @ p["query"]["kernel"]).reshape(B, N, H, -1)
  want = jnp.einsum("bnhk,bhkj->bnhj", q, c).reshape(B, N, -1) @ p["out"]["kernel"]
  y, _ = module.apply(variables, X, MASK)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  # A lookup reads the fixed-size summary: its cost does not depend on the summarised length.
  lookup = type(module).lookup
  np.testing.assert_allclose(module.apply(variables, c, X, method=lookup), y, rtol=1e-4,
                             atol=1e-5)

  def lookup_flops(n):
    long_x = np.random.default_rng(2).standard_normal((B, n, D)).astype(np.float32)
    c_n = module.apply(variables, long_x, None, method=type(module).summary)
    assert c_n.shape == c.shape                        # fixed size whatever n is
    fn = jax.jit(lambda v, c_, x: module.apply(v, c_, x, method=lookup))
    return fn.lower(variables, c_n, X[:, :1]).compile().cost_analysis()["flops"]

  assert lookup_flops(16) == lookup_flops(4096)


def test_cheap_linear_forms_default_normalisation():
  cheap = get_attention("cheap_linear")
  assert cheap(num_heads=H)._normalization() == "length"
  assert cheap(num_heads=H, form="paper")._normalization() == "none"
  with pytest.raises(ValueError, match="form"):
    cheap(num_heads=H, form="nope").init(jax.random.key(0), X, MASK)


def test_registry_holds_every_mechanism_and_only_bidirectional_ones_are_encoders():
  from luna_jax import attention
  from luna_jax.attention.luna_causal import LunaCausalAttention
  assert attention.get_attention("luna_causal") is LunaCausalAttention
  assert "luna_causal" not in ATTENTION_NAMES and "luna" in ATTENTION_NAMES
  assert getattr(get_attention("luna"), "carries_p", False)
  assert not any(getattr(get_attention(n), "carries_p", False)
                 for n in ATTENTION_NAMES if n != "luna")
  with pytest.raises(ValueError, match="luna_causal"):   # the message lists every name
    get_attention("nope")
