"""Linear Transformer attention (Katharopoulos et al. 2020, "Transformers are RNNs").

  phi(x) = elu(x) + 1
  out_i  = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps)

over the real keys (causal: real keys j <= i). phi is applied to the raw per-head projections.
`dropout_rate` is unused: no attention matrix is ever formed.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import linear_common

Array = jax.Array
State = dict[str, Array]


class LinearEluAttention(linear_common.LinearAttention):
  """Normalised linear attention with the elu + 1 feature map."""
  eps: float = 1e-6

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = self._qkv(x_BxNxD)
    phi_q_BxNxHxK = jax.nn.elu(q_BxNxHxK.astype(jnp.float32)) + 1.0
    phi_k_BxNxHxK = jax.nn.elu(k_BxNxHxK.astype(jnp.float32)) + 1.0
    if state is None:
      linear_common.sow_attention_map(self, phi_q_BxNxHxK, phi_k_BxNxHxK, mask_BxN,
                                      is_causal=self.causal, eps=self.eps, mode="eps")
    o_BxNxHxK, state = linear_common.attend(
        phi_q_BxNxHxK, phi_k_BxNxHxK, v_BxNxHxK, mask_BxN, state, is_causal=self.causal,
        chunk_size=self.chunk_size, eps=self.eps, mode="eps")
    y_BxNxD = self._out(o_BxNxHxK, x_BxNxD.shape[-1])
    return y_BxNxD, state, (phi_q_BxNxHxK, phi_k_BxNxHxK, v_BxNxHxK)
