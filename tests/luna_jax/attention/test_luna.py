"""Luna attention (bidirectional and causal): parity with the official vectors, masks, init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax import convert
from luna_jax.attention.luna import LunaAttention
from luna_jax.attention.luna_causal import LunaCausalAttention, decode

B, N, L, D, H = 2, 12, 4, 16, 4


def _inputs(seed=0):
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (B, N, D))
  p = jax.random.normal(kp, (B, L, D))
  mask = jnp.arange(N)[None, :] < jnp.array([[N], [N - 5]])
  return x, p, mask


@pytest.fixture(scope="module")
def vectors(fixtures_dir):
  with np.load(fixtures_dir / "luna_vectors.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def causal_vectors(fixtures_dir):
  with np.load(fixtures_dir / "luna_causal_vectors.npz") as f:
    return {k: f[k] for k in f.files}


def test_parity_with_official_bidirectional(vectors):
  errors = convert.check_bidirectional(vectors)
  expected = {"out", "pcontext", "unpack_attn_probs", "out_case2", "pcontext_case2",
              "tied_out", "tied_pcontext", "layer_x_out", "layer_p_out"}
  assert expected <= set(errors)
  assert max(errors.values()) < 1e-5, errors


def test_parity_with_official_causal(causal_vectors):
  errors = convert.check_causal(causal_vectors)
  assert set(errors) == {f"{p}{n}" for p in ("tied_", "untied_")
                         for n in ("out", "attn_probs", "out_incremental")}
  assert max(errors.values()) < 1e-5, errors


def test_pack_ignores_padded_tokens():
  x, p, mask = _inputs()
  attn = LunaAttention(num_heads=H)
  params = attn.init(jax.random.key(1), x, mask, p)
  y, yp = attn.apply(params, x, mask, p)
  x2 = jnp.where(mask[..., None], x, 100.0 * jax.random.normal(jax.random.key(9), x.shape))
  y2, yp2 = attn.apply(params, x2, mask, p)
  np.testing.assert_allclose(yp2, yp, atol=1e-5)
  np.testing.assert_allclose(y2[mask], y[mask], atol=1e-5)
  # Sanity: changing a real token does change the packed context.
  _, yp3 = attn.apply(params, x.at[1, 0].add(1.0), mask, p)
  assert np.abs(yp3[1] - yp[1]).max() > 1e-4


def test_slot_mask_removes_slots_from_unpack():
  x, p, mask = _inputs()
  attn = LunaAttention(num_heads=H)
  params = attn.init(jax.random.key(1), x, mask, p)
  p_mask = jnp.array([[True] * L, [True, True, False, False]])
  (y, _), st = attn.apply(params, x, mask, p, p_mask, mutable=["intermediates"])
  a = st["intermediates"]["unpack_attn"][0]           # [B, H, N, L]
  np.testing.assert_allclose(a[1, :, :, 2:], 0.0, atol=0)
  np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
  # Masked slots = sliced slots for example 1.
  y_sliced, _ = attn.apply(params, x[1:], mask[1:], p[1:, :2])
  np.testing.assert_allclose(y[1], y_sliced[0], atol=1e-5)


@pytest.mark.parametrize("pheads", [1, 2])
def test_pack_heads_may_differ(pheads):
  x, p, mask = _inputs()
  attn = LunaAttention(num_heads=H, num_pack_heads=pheads)
  params = attn.init(jax.random.key(1), x, mask, p)
  (_, yp), st = attn.apply(params, x, mask, p, mutable=["intermediates"])
  assert st["intermediates"]["pack_attn"][0].shape == (B, pheads, L, N)
  assert yp.shape == (B, L, D)


def test_tied_has_five_projections_and_untied_seven():
  x, p, mask = _inputs()
  untied = LunaAttention(num_heads=H).init(jax.random.key(0), x, mask, p)["params"]
  tied = LunaAttention(num_heads=H, tie_kv=True).init(jax.random.key(0), x, mask, p)["params"]
  assert sorted(untied) == sorted(f"{n}_proj" for n in ("pq", "pk", "pv", "q", "k", "v", "out"))
  assert sorted(tied) == sorted(f"{n}_proj" for n in ("pq", "pc", "q", "c", "out"))


def test_official_init_bounds():
  x, p, mask = _inputs()
  params = LunaAttention(num_heads=H).init(jax.random.key(0), x, mask, p)["params"]
  xavier = np.sqrt(6.0 / (2 * D))
  q = np.asarray(params["q_proj"]["kernel"])
  assert np.abs(q).max() <= xavier * 2**-0.5 + 1e-7
  assert np.abs(q).max() > 0.8 * xavier * 2**-0.5        # uses the range, not a tiny init
  out = np.asarray(params["out_proj"]["kernel"])
  assert np.abs(out).max() > xavier * 2**-0.5             # gain 1 for the output projection
  np.testing.assert_array_equal(params["out_proj"]["bias"], 0.0)
  assert np.abs(params["q_proj"]["bias"]).max() <= 1 / np.sqrt(D)


def test_attention_dropout_active_only_in_training():
  x, p, mask = _inputs()
  attn = LunaAttention(num_heads=H, dropout_rate=0.5)
  params = attn.init(jax.random.key(0), x, mask, p)
  y_eval, _ = attn.apply(params, x, mask, p)
  y_eval2, _ = attn.apply(params, x, mask, p)
  y_train, _ = attn.apply(params, x, mask, p, deterministic=False,
                          rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(y_eval, y_eval2)
  assert np.abs(y_train - y_eval).max() > 1e-3


def test_bfloat16_compute_keeps_float32_softmax():
  x, p, mask = _inputs()
  attn = LunaAttention(num_heads=H, dtype=jnp.bfloat16)
  params = attn.init(jax.random.key(0), x, mask, p)
  (y, _), st = attn.apply(params, x, mask, p, mutable=["intermediates"])
  assert y.dtype == jnp.bfloat16
  assert st["intermediates"]["pack_attn"][0].dtype == jnp.float32
  y32, _ = LunaAttention(num_heads=H).apply(params, x, mask, p)
  assert np.abs(np.asarray(y, np.float32) - y32).max() < 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_causal_parallel_equals_incremental_and_is_causal(tied):
  x, p, _ = _inputs()
  attn = LunaCausalAttention(num_heads=H, tie_kv=tied)
  params = attn.init(jax.random.key(0), x, None, p)
  y, _ = attn.apply(params, x, None, p)
  y_inc = decode(attn, params, x, p)
  np.testing.assert_allclose(y, y_inc, atol=1e-5)
  # Changing a future token leaves earlier outputs unchanged.
  y2, _ = attn.apply(params, x.at[:, 7].add(3.0), None, p)
  np.testing.assert_allclose(y2[:, :7], y[:, :7], atol=1e-5)
  assert np.abs(y2[:, 7:] - y[:, 7:]).max() > 1e-4
  state = attn.apply(params, p, method=LunaCausalAttention.init_state)
  assert state["s"].shape == (B, H, D // H, L)            # fixed size, independent of N


def test_key_length_attention_equals_masked_einsum():
  """The fused path's lengths logic (XLA's implementation on CPU; cuDNN on GPU)."""
  from luna_jax.attention import common
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, t, H, 8)).astype(np.float32))
             for t in (5, 9, 9))
  keep = jnp.arange(9)[None] < jnp.array([[9], [6]])
  got = common.fused_attention(q, k, v, keep, scale=0.5, implementation=None)
  s = jnp.einsum("bthk,bshk->bhts", q, k) * 0.5
  a = common.masked_softmax(s, keep[:, None, None, :])
  np.testing.assert_allclose(got, jnp.einsum("bhts,bshk->bthk", a, v), atol=1e-5)
  # On CPU "auto" is the einsum path; "cudnn" is refused with attention dropout.
  assert common.resolve_implementation("auto", jnp.bfloat16, False) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  x, p, mask = _inputs()
  with pytest.raises(ValueError, match="dropout"):
    LunaAttention(num_heads=H, implementation="cudnn", dropout_rate=0.1).init(
        {"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, mask, p,
        deterministic=False)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_path_equals_reference_in_bfloat16():
  x, p, mask = _inputs()
  ref = LunaAttention(num_heads=H, dtype=jnp.bfloat16)
  params = ref.init(jax.random.key(1), x, mask, p)
  y, yp = ref.apply(params, x, mask, p)
  y2, yp2 = LunaAttention(num_heads=H, dtype=jnp.bfloat16, implementation="cudnn").apply(
      params, x, mask, p)
  tol = 3e-2   # bfloat16 inputs; both paths accumulate in float32
  np.testing.assert_allclose(np.asarray(yp2, np.float32), np.asarray(yp, np.float32), atol=tol)
  np.testing.assert_allclose(np.asarray(y2, np.float32)[mask], np.asarray(y, np.float32)[mask],
                             atol=tol)


class _PerHeadLuna(LunaAttention):
  BLOCK_DIAGONAL_MAX_SLOTS = 0       # always the per-head einsum form


@pytest.mark.parametrize("pack_heads,tie", [(0, False), (2, True)])
def test_block_diagonal_form_equals_per_head_form(pack_heads, tie):
  x, p, mask = _inputs()
  p_mask = jnp.array([[True] * L, [True, True, True, False]])
  fast = LunaAttention(num_heads=H, num_pack_heads=pack_heads, tie_kv=tie, dropout_rate=0.2)
  slow = _PerHeadLuna(num_heads=H, num_pack_heads=pack_heads, tie_kv=tie, dropout_rate=0.2)
  assert fast._block_diagonal(H, L, True) and not slow._block_diagonal(H, L, True)
  params = fast.init(jax.random.key(1), x, mask, p)
  (y1, p1), s1 = fast.apply(params, x, mask, p, p_mask, mutable=["intermediates"])
  (y2, p2), s2 = slow.apply(params, x, mask, p, p_mask, mutable=["intermediates"])
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  np.testing.assert_allclose(p1, p2, atol=1e-5)
  for name in ("pack_attn", "unpack_attn"):   # the sown maps have the same layout and values
    np.testing.assert_allclose(s1["intermediates"][name][0], s2["intermediates"][name][0],
                               atol=1e-6)

  def loss(module, prm):
    y, yp = module.apply(prm, x, mask, p, p_mask)
    return (y ** 2).sum() + (yp ** 2).sum()

  for g1, g2 in zip(jax.tree.leaves(jax.grad(lambda v: loss(fast, v))(params)),
                    jax.tree.leaves(jax.grad(lambda v: loss(slow, v))(params))):
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4)
