"""cosFormer attention (Qin et al. 2022): ReLU features with a cos re-weighting.

  w_ij  = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)
  out_i = sum_j w_ij v_j / max(sum_j w_ij, eps)

cos(a - b) = cos a cos b + sin a sin b makes it linear: the features (2*dh wide) are
phi(x_i) = [relu(x_i) sin(pi i / 2M), relu(x_i) cos(pi i / 2M)], i the position in the padded
sequence (only differences i - j matter, so left or right padding both work).

M (choice): bidirectional, M = the number of real tokens of each sequence (at least 1), so
|i - j| < M for contiguous real tokens, the weights stay positive and the result does not depend
on the amount of padding. Causal, M = `max_len` if > 0, else the padded length N (the parallel
and chunked forms agree); `step` needs `max_len` > 0 (a stream does not know its length).
Positions beyond M make the cos negative; the denominator floor eps keeps it finite.
`dropout_rate` is unused: no attention matrix is ever formed.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import linear_common

Array = jax.Array
State = dict[str, Array]


def cos_features(x_BxNxHxK: Array, pos_BxN: Array, length_B: Array) -> Array:
  """[x sin(pi i / 2M), x cos(pi i / 2M)]: [B, N, H, 2K]."""
  angle_BxN = (jnp.pi / 2) * pos_BxN / length_B[:, None]
  angle = angle_BxN[:, :, None, None]
  return jnp.concatenate([x_BxNxHxK * jnp.sin(angle), x_BxNxHxK * jnp.cos(angle)], axis=-1)


class CosformerAttention(linear_common.LinearAttention):
  """Linear attention with ReLU features and cos(pi/2 (i - j) / M) locality re-weighting."""
  max_len: int = 0            # M in causal mode and step; 0 -> padded length (causal only)
  eps: float = 1e-6

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    b, n, d = x_BxNxD.shape
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = self._qkv(x_BxNxD)
    if state is not None:
      if self.max_len <= 0:
        raise ValueError("CosformerAttention.step needs max_len > 0")
      pos_BxN = state["t"][:, None]
      length_B = jnp.full((b,), self.max_len, jnp.float32)
    else:
      pos_BxN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), (b, n))
      if self.causal:
        length_B = jnp.full((b,), self.max_len if self.max_len > 0 else n, jnp.float32)
      else:
        length_B = (jnp.full((b,), n, jnp.float32) if mask_BxN is None
                    else jnp.maximum(mask_BxN.sum(axis=1), 1).astype(jnp.float32))
    phi_q_BxNxHxF = cos_features(jax.nn.relu(q_BxNxHxK.astype(jnp.float32)), pos_BxN, length_B)
    phi_k_BxNxHxF = cos_features(jax.nn.relu(k_BxNxHxK.astype(jnp.float32)), pos_BxN, length_B)
    if state is None:
      linear_common.sow_attention_map(self, phi_q_BxNxHxF, phi_k_BxNxHxF, mask_BxN,
                                      is_causal=self.causal, eps=self.eps, mode="floor")
    o_BxNxHxK, new_state = linear_common.attend(
        phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK, mask_BxN, state, is_causal=self.causal,
        chunk_size=self.chunk_size, eps=self.eps, mode="floor")
    if state is not None:
      new_state["t"] = state["t"] + 1.0
    y_BxNxD = self._out(o_BxNxHxK, d)
    return y_BxNxD, new_state, (phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)

  def _state_features(self, head_dim: int) -> int:
    return 2 * head_dim

  def init_state(self, batch_size: int) -> State:
    """Empty recurrent state plus the position of the next token."""
    state = super().init_state(batch_size)
    state["t"] = jnp.zeros((batch_size,), jnp.float32)   # position of the next token
    return state
