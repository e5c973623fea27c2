"""psi, LUNA's scalar MLP 1 -> hidden -> L (ReLU hidden layer), in closed piecewise-linear form.

psi's pre-activation outputs are a piecewise-linear function of the scalar input u:

  sum_j relu(w1_j u + b1_j) w2_jl + b2_l  =  u A_sl + C_sl      for u in segment s,
  A_sl = sum_j act_sj w1_j w2_jl,   C_sl = sum_j act_sj b1_j w2_jl + b2_l,

where the segments are cut by the hidden units' breakpoints t_j = -b1_j / w1_j and act_sj says
whether unit j is on in segment s (w1_j > 0: right of t_j; w1_j < 0: left of it; w1_j = 0: b1_j
> 0 everywhere). So psi costs `hidden` compares (which segment) and two L-value gathers per
input instead of a [hidden] activation: the [tokens, H, m, hidden] array of
the direct form never exists, in the forward or the backward pass. Values and gradients (w.r.t.
u and all of psi's parameters, through the [hidden + 1, L] tables) are those of the direct form
up to float32 rounding; on a breakpoint itself (u = t_j, where the unit's pre-activation is 0)
the value is the same and the gradient takes one side's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _tables(w1_J: Array, b1_J: Array, w2_JxL: Array, b2_L: Array,
            scale: float = 1.0) -> tuple[Array, Array, Array]:
  """(breakpoints [J], slopes A [J + 1, L], intercepts C [J + 1, L]) of one MLP, A and C times
  `scale` > 0."""
  j = w1_J.shape[0]
  t_J = jax.lax.stop_gradient(jnp.where(w1_J != 0, -b1_J / jnp.where(w1_J != 0, w1_J, 1.0),
                                        jnp.inf))
  order_J = jnp.argsort(t_J)
  rank_J = jnp.zeros((j,), jnp.int32).at[order_J].set(jnp.arange(j, dtype=jnp.int32))
  s_Sx1 = jnp.arange(j + 1, dtype=jnp.int32)[:, None]    # segment s: s breakpoints left of it
  act_SxJ = jnp.where(w1_J > 0, rank_J < s_Sx1, jnp.where(w1_J < 0, rank_J >= s_Sx1, b1_J > 0))
  act_SxJ = act_SxJ.astype(w1_J.dtype)
  a_SxL = act_SxJ @ (w1_J[:, None] * w2_JxL)
  c_SxL = act_SxJ @ (b1_J[:, None] * w2_JxL) + b2_L
  return t_J, a_SxL * scale, c_SxL * scale


def segments(u_XxM: Array, t_J: Array, parts: int = 2) -> Array:
  """#{j : t_j < u} per entry (int32), t [J] or per channel [M, J]: the J compares unrolled into
  elementwise loops (vectorised across entries; a binary search's gathers and a [.., J]
  reduction were 3-5x and 50x slower on XLA:CPU). They run as a `parts`-trip loop so that XLA
  stores the result: fused into the gather that reads it, they would be recomputed for each of
  the 2L values read (10x slower; XLA:CPU drops optimization barriers)."""
  j = t_J.shape[-1]
  per = -(-j // parts)
  t_PxJ = jnp.pad(t_J, [(0, 0)] * (t_J.ndim - 1) + [(0, per * parts - j)],
                  constant_values=jnp.inf)
  t_PxJ = jnp.moveaxis(t_PxJ.reshape(*t_J.shape[:-1], parts, per), -2, 0)

  def count(p, seg_XxM):
    t_Jp = t_PxJ[p]
    return seg_XxM + sum((u_XxM > t_Jp[..., i]).astype(jnp.int32) for i in range(per))

  return jax.lax.fori_loop(0, parts, count, jnp.zeros(u_XxM.shape, jnp.int32))


@jax.custom_vjp
def lookup(u_XxM: Array, idx_XxM: Array, a_SxL: Array, c_SxL: Array) -> Array:
  """relu(u a[idx] + c[idx]): [..., M, L] (X: any leading axes). Two L-wide gathers, fused with
  the ReLU that reads them (see `_lookup_fwd` for how that is kept). The custom backward keeps
  (u, idx) and the output (which the attention products keep anyway): the ReLU mask is out > 0,
  so only a[idx] is gathered again (fused with du, whose L terms it sums as one elementwise
  loop; a minor-axis reduction is slow on XLA:CPU), and the cotangents are scatter-added into
  the two tables."""
  return _lookup_fwd(u_XxM, idx_XxM, a_SxL, c_SxL)[0]


def _gather(tab_SxL: Array, idx_XxM: Array) -> Array:
  return tab_SxL.at[idx_XxM].get(mode="promise_in_bounds")


def _lookup_fwd(u_XxM, idx_XxM, a_SxL, c_SxL):
  # Computed in a 2-trip loop over halves of the entries: XLA then cannot recompute the output
  # from the gathers inside the backward's fusions (it did, which wrote the gathered [.., L]
  # arrays out and kept them for the backward); inside the loop each gather has one consumer
  # and is fused into it.
  parts = 2 if u_XxM.size % 2 == 0 else 1
  u_PxE, idx_PxE = u_XxM.reshape(parts, -1), idx_XxM.reshape(parts, -1)

  def half(p, out_PxExL):
    u_E, idx_E = u_PxE[p], idx_PxE[p]
    return out_PxExL.at[p].set(
        jax.nn.relu(u_E[:, None] * _gather(a_SxL, idx_E) + _gather(c_SxL, idx_E)))

  out_PxExL = jax.lax.fori_loop(0, parts, half, jnp.zeros(u_PxE.shape + a_SxL.shape[-1:],
                                                             a_SxL.dtype))
  out_XxMxL = out_PxExL.reshape(*u_XxM.shape, a_SxL.shape[-1])
  return out_XxMxL, (u_XxM, idx_XxM, a_SxL, out_XxMxL)


def _lookup_bwd(res, d_XxMxL):
  u_XxM, idx_XxM, a_SxL, out_XxMxL = res
  # Signed indices here, unsigned in the forward: gathers XLA cannot take for the forward's
  # (measured: psi's forward and backward 5 ms against 8 ms with the same indices).
  idx_XxM = idx_XxM.astype(jnp.int32)
  a_XxMxL = _gather(a_SxL, idx_XxM)
  d_XxMxL = jnp.where(out_XxMxL > 0, d_XxMxL, 0.0)
  du_XxM = sum(d_XxMxL[..., i] * a_XxMxL[..., i] for i in range(a_SxL.shape[-1]))
  da_SxL = jnp.zeros_like(a_SxL).at[idx_XxM].add(d_XxMxL * u_XxM[..., None],
                                                 mode="promise_in_bounds")
  dc_SxL = jnp.zeros_like(a_SxL).at[idx_XxM].add(d_XxMxL, mode="promise_in_bounds")
  return du_XxM, None, da_SxL, dc_SxL


lookup.defvjp(_lookup_fwd, _lookup_bwd)


def psi(u_XxM: Array, w1: Array, b1: Array, w2: Array, b2: Array, scale: float = 1.0
        ) -> Array:
  """scale * relu(sum_j relu(u w1_j + b1_j) w2_jl + b2_l): [..., M, L] (X: any leading axes).

  Shared MLP: w1, b1 [J], w2 [J, L], b2 [L]. One MLP per channel: the same with a leading
  [M] axis (channel m's segments are rows m (J + 1) .. of flat [M (J + 1), L] tables).
  `scale` > 0 is folded into the table (relu(x) s = relu(x s)): no separate multiply."""
  if not scale > 0:
    raise ValueError(f"psi's scale must be positive, got {scale}")
  # Unsigned segment indices: the gathers and scatters skip negative-index wrapping.
  if w1.ndim == 1:
    t_J, a_SxL, c_SxL = _tables(w1, b1, w2, b2, scale)
    return lookup(u_XxM, segments(u_XxM, t_J).astype(jnp.uint32), a_SxL, c_SxL)
  t_MxJ, a_MxSxL, c_MxSxL = jax.vmap(_tables, in_axes=(0, 0, 0, 0, None))(w1, b1, w2, b2, scale)
  m, s, l = a_MxSxL.shape
  idx_XxM = (jnp.arange(m, dtype=jnp.int32) * s + segments(u_XxM, t_MxJ)).astype(jnp.uint32)
  return lookup(u_XxM, idx_XxM, a_MxSxL.reshape(m * s, l), c_MxSxL.reshape(m * s, l))
