"""Causal Luna (`LunarCausalAttention` of the official code, the MT decoder form).

Per head, with pq = Lin_pq(P) * dh**-0.5 [l, dh], kp = Lin_pc(X), q = Lin_q(X) * dh**-0.5 and
k = v = Lin_c(X) (tied) or k = Lin_k(X), v = Lin_v(X) (untied):

  Pi[t, j]    = log2(1 + 2**(kp_t . pq_j))            softplus with beta = ln 2      [N, l]
  S_t         = sum_{s<=t} k_s Pi[s]^T                 U_t = sum_{s<=t} v_s Pi[s]^T   [dh, l]
  A[t]        = softmax_j(q_t^T S_t / t)               (P-slot mask before the softmax)
  out_t       = Lin_out(U_t A[t] / t)                  (t counts from 1)

`__call__` is the parallel form (cumulative sums, memory linear in N); `init_state` / `step`
decode token by token with a state of fixed size (S, U: [B, H, dh, l], the step counter and the
projected P); `decode(module, variables, x, p)` runs `step` over a whole sequence. P is not updated.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import common

Array = jax.Array


def softplus_base2(z: Array) -> Array:
  """log2(1 + 2**z): softplus with beta = ln 2, computed stably."""
  return jax.nn.softplus(z * jnp.log(2.0)) / jnp.log(2.0)


class LunaCausalAttention(nn.Module):
  """Causal Luna attention; returns (y_BxNxD, None) like every mechanism."""
  num_heads: int
  tie_kv: bool = True
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    g = 2.0**-0.5
    proj = lambda name, gain=g: _LazyProj(name=name, gain=gain, dtype=self.dtype)
    self.pq_proj, self.pc_proj, self.q_proj = proj("pq_proj"), proj("pc_proj"), proj("q_proj")
    if self.tie_kv:
      self.c_proj = proj("c_proj")
    else:
      self.k_proj, self.v_proj = proj("k_proj"), proj("v_proj")
    self.out_proj = proj("out_proj", 1.0)

  def _heads(self, y: Array) -> Array:
    return common.split_heads(y, self.num_heads)

  def _project_p(self, p_BxLxD: Array) -> Array:
    pq_BxLxHxK = self._heads(self.pq_proj(p_BxLxD))
    return pq_BxLxHxK * pq_BxLxHxK.shape[-1]**-0.5

  def _token_side(self, x_BxNxD: Array):
    """q (scaled), k, v, kp per head: each [B, N, H, dh]."""
    q = self._heads(self.q_proj(x_BxNxD))
    q = q * q.shape[-1]**-0.5
    if self.tie_kv:
      k = v = self._heads(self.c_proj(x_BxNxD))
    else:
      k, v = self._heads(self.k_proj(x_BxNxD)), self._heads(self.v_proj(x_BxNxD))
    return q, k, v, self._heads(self.pc_proj(x_BxNxD))

  def __call__(self, x_BxNxD: Array, mask_BxN: Array | None = None, p_BxLxD: Array | None = None,
               p_mask_BxL: Array | None = None, *, deterministic: bool = True
               ) -> tuple[Array, None]:
    if p_BxLxD is None:
      raise ValueError("LunaCausalAttention needs the packed sequence p_BxLxD")
    pq_BxLxHxK = self._project_p(p_BxLxD)
    q, k, v, kp = self._token_side(x_BxNxD)
    f32 = lambda a: a.astype(jnp.float32)
    pi_BxNxHxL = softplus_base2(jnp.einsum("bnhk,blhk->bnhl", f32(kp), f32(pq_BxLxHxK)))
    if mask_BxN is not None:  # padded tokens add nothing to the running sums
      pi_BxNxHxL = common.zero_masked(pi_BxNxHxL, mask_BxN)
    t_N = jnp.arange(1, x_BxNxD.shape[1] + 1, dtype=jnp.float32)[None, :, None, None]
    s_BxNxHxKxL = jnp.cumsum(jnp.einsum("bnhk,bnhl->bnhkl", f32(k), pi_BxNxHxL), axis=1)
    scores_BxHxNxL = jnp.einsum("bnhk,bnhkl->bhnl", f32(q), s_BxNxHxKxL)
    scores_BxHxNxL = scores_BxHxNxL / jnp.swapaxes(t_N, 1, 2)
    p_mask = None if p_mask_BxL is None else p_mask_BxL[:, None, None, :]
    a_BxHxNxL = common.masked_softmax(scores_BxHxNxL, p_mask)
    self.sow("intermediates", "attn", a_BxHxNxL)
    if not deterministic and self.dropout_rate > 0.0:
      a_BxHxNxL = common.Dropout(self.dropout_rate)(a_BxHxNxL, deterministic=False)
    u_BxNxHxKxL = jnp.cumsum(jnp.einsum("bnhk,bnhl->bnhkl", f32(v), pi_BxNxHxL), axis=1)
    o_BxNxHxK = jnp.einsum("bnhkl,bhnl->bnhk", u_BxNxHxKxL, a_BxHxNxL) / t_N
    return self.out_proj(common.merge_heads(o_BxNxHxK.astype(self.dtype))), None

  def init_state(self, p_BxLxD: Array) -> dict[str, Array]:
    """Decoding state for a batch: running sums S, U [B, H, dh, l], counter t, projected P."""
    pq_BxLxHxK = self._project_p(p_BxLxD)
    b, l, h, k = pq_BxLxHxK.shape
    zeros = jnp.zeros((b, h, k, l), jnp.float32)
    return {"s": zeros, "u": zeros, "t": jnp.zeros((), jnp.float32),
            "pq": pq_BxLxHxK.astype(jnp.float32)}

  def step(self, x_BxD: Array, state: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """One decoding step: consumes token x_t, returns (y_t [B, D], new state)."""
    q, k, v, kp = (a[:, 0].astype(jnp.float32) for a in self._token_side(x_BxD[:, None]))
    pi_BxHxL = softplus_base2(jnp.einsum("bhk,blhk->bhl", kp, state["pq"]))
    s = state["s"] + jnp.einsum("bhk,bhl->bhkl", k, pi_BxHxL)
    u = state["u"] + jnp.einsum("bhk,bhl->bhkl", v, pi_BxHxL)
    t = state["t"] + 1.0
    a_BxHxL = jax.nn.softmax(jnp.einsum("bhk,bhkl->bhl", q, s) / t, axis=-1)
    o_BxHxK = jnp.einsum("bhkl,bhl->bhk", u, a_BxHxL) / t
    y_BxD = self.out_proj(o_BxHxK.reshape(o_BxHxK.shape[0], -1).astype(self.dtype))
    return y_BxD, {**state, "s": s, "u": u, "t": t}



def decode(module: LunaCausalAttention, variables: dict, x_BxNxD: Array, p_BxLxD: Array) -> Array:
  """Token-by-token decoding of a whole sequence with `step` under lax.scan: [B, N, D]."""
  state = module.apply(variables, p_BxLxD, method=LunaCausalAttention.init_state)

  def body(state, x_BxD):
    y_BxD, state = module.apply(variables, x_BxD, state, method=LunaCausalAttention.step)
    return state, y_BxD

  _, y_NxBxD = jax.lax.scan(body, state, jnp.swapaxes(x_BxNxD, 0, 1))
  return jnp.swapaxes(y_NxBxD, 0, 1)


class _LazyProj(nn.Module):
  """Square Dense whose width is the input's; official init (xavier(gain), torch-default bias,
  zero bias for out_proj). Params `kernel` [D, D] and `bias` [D] as in nn.Dense."""
  gain: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    kernel = self.param("kernel", common.xavier_uniform(self.gain), (d, d), jnp.float32)
    bias_init = (nn.initializers.zeros if self.name == "out_proj" else common.torch_linear_bias(d))
    bias = self.param("bias", bias_init, (d,), jnp.float32)
    return (jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype))
