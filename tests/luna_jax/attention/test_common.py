"""common.softmax_attend and common.softmax_last: the same values and gradients as the plain
composition that autodiff differentiates, and a smaller backward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from luna_jax.attention import common


def _plain(spec, scores, key_mask, v, rate, seeds):
  """The composition softmax_attend replaces: masked softmax, Dropout's mask, einsum."""
  a = jax.nn.softmax(jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
  if seeds is not None:
    a = jnp.where(common.keep_from_seeds(seeds, a.shape, rate), a / (1 - rate), 0.0)
  return jnp.einsum(spec, a, v)


CASES = {  # spec, scores shape, key-mask shape, v shape
    "heads": ("bhts,bshk->bthk", (2, 3, 5, 7), (2, 1, 1, 7), (2, 7, 3, 4)),
    "block diagonal unpack": ("bnhl,bhld->bnd", (2, 9, 2, 4), (2, 1, 1, 4), (2, 2, 4, 6)),
    "pack": ("bmn,bnd->bmd", (2, 4, 11), (2, 1, 11), (2, 11, 6)),
}


@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_softmax_attend_matches_autodiff_of_the_plain_composition(case, rate):
  spec, s_shape, m_shape, v_shape = CASES[case]
  ks = jax.random.split(jax.random.key(0), 4)
  scores = 3 * jax.random.normal(ks[0], s_shape)
  v = jax.random.normal(ks[1], v_shape)
  key_mask = jax.random.bernoulli(ks[2], 0.7, m_shape).at[..., 0].set(True)
  seeds = common.dropout_seeds(ks[3]) if rate else None
  w = jax.random.normal(jax.random.key(5), jax.eval_shape(
      lambda: _plain(spec, scores, key_mask, v, rate, seeds)).shape)

  def loss(fn):
    return lambda s, v: jnp.sum(w * fn(s, v))

  ours = lambda s, v: common.softmax_attend(spec, s, key_mask, v, dropout_rate=rate,
                                            dropout_seeds=seeds)
  ref = lambda s, v: _plain(spec, s, key_mask, v, rate, seeds)
  np.testing.assert_allclose(ours(scores, v), ref(scores, v), atol=1e-6, rtol=1e-6)
  g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(scores, v)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(scores, v)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
  # Masked keys get no gradient; with dropout some weights really were dropped.
  assert float(jnp.abs(jnp.where(key_mask, 0.0, g_ours[0])).max()) == 0.0
  if rate:
    assert not np.allclose(ours(scores, v), _plain(spec, scores, key_mask, v, 0.0, None))


def test_dropout_module_and_its_seeds_give_the_same_mask():
  x = jnp.ones((6, 50))
  drop = common.Dropout(0.4)
  y = drop.apply({}, x, False, rngs={"dropout": jax.random.key(3)})
  seeds = drop.apply({}, rngs={"dropout": jax.random.key(3)}, method=common.Dropout.seeds)
  np.testing.assert_array_equal(np.asarray(y) > 0,
                                np.asarray(common.keep_from_seeds(seeds, x.shape, 0.4)))


def test_softmax_last_gradient_and_smaller_backward_pass():
  x = 4 * jax.random.normal(jax.random.key(1), (3, 64, 64))
  w = jax.random.normal(jax.random.key(2), x.shape)
  g = jax.grad(lambda x: jnp.sum(w * common.softmax_last(x)))(x)
  g_ref = jax.grad(lambda x: jnp.sum(w * jax.nn.softmax(x, axis=-1)))(x)
  np.testing.assert_allclose(g, g_ref, atol=1e-6, rtol=1e-5)
