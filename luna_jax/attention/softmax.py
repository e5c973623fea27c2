"""Softmax (dot-product) attention, the quadratic baseline: softmax(Q K^T / sqrt(dh) + mask) V.

`implementation` (`common.resolve_implementation`): "xla" (default; builds the [B, H, N, N]
scores), "cudnn" (GPU), "blocked" (`blocked.blocked_attention`: the same function as "xla",
attention dropout included, over `block_size` keys and `query_block_size` queries at a time,
never an N x N array, forward or backward) or "auto". Attention-map inspection (a mutable
"intermediates" collection) always takes the "xla" path.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import blocked, common

Array = jax.Array
class SoftmaxAttention(nn.Module):
  """Multi-head softmax attention with key-padding and optional causal masks."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  use_bias: bool = False
  causal: bool = False
  implementation: str = "xla"
  qkv_dim: int = 0             # width of q/k/v (all heads); 0 -> D
  block_size: int = 128        # "blocked": keys per step
  query_block_size: int = 0    # "blocked": queries per step; 0 -> all N

  @nn.compact
  def __call__(self, x_BxNxD: Array, mask_BxN: Array | None = None, p_BxLxD: Array | None = None,
               p_mask_BxL: Array | None = None, *, deterministic: bool = True
               ) -> tuple[Array, None]:
    """Returns (y_BxNxD, None); `p_*` are ignored."""
    del p_BxLxD, p_mask_BxL
    b, n, d = x_BxNxD.shape
    e = self.qkv_dim or d

    def proj(name, features, fan_in):
      return common.projection(features, name, use_bias=self.use_bias, gain=1.0, fan_in=fan_in,
                               dtype=self.dtype)

    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = (
        common.split_heads(proj(name, e, d)(x_BxNxD), self.num_heads)
        for name in ("query", "key", "value"))
    dropout_active = not deterministic and self.dropout_rate > 0.0
    impl = common.resolve_implementation(self.implementation, self.dtype, dropout_active,
                                         num_keys=n)
    if self.is_mutable_collection("intermediates"):
      impl = "xla"   # inspection needs the weights, which the fused kernel does not return
    if impl == "cudnn" and dropout_active:
      raise ValueError("implementation='cudnn' has no attention dropout; use 'xla' or 'auto'")

    # The same seeds (the same Dropout_0 rng) on the "xla" and "blocked" paths.
    seeds = common.Dropout(self.dropout_rate).seeds() if dropout_active else None
    if impl == "cudnn":
      o_BxNxHxK = common.fused_attention(q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask_BxN,
                                         scale=q_BxNxHxK.shape[-1]**-0.5, is_causal=self.causal)
    elif impl == "blocked":
      o_BxNxHxK = blocked.blocked_attention(
          q_BxNxHxK, k_BxNxHxK, v_BxNxHxK.astype(self.dtype), mask_BxN,
          scale=q_BxNxHxK.shape[-1]**-0.5, causal=self.causal, dropout_rate=self.dropout_rate,
          dropout_seeds=seeds, block_size=self.block_size,
          query_block_size=self.query_block_size)
    else:
      keep_Bx1x1xN = None if mask_BxN is None else mask_BxN[:, None, None, :].astype(bool)
      keep_Bx1xNxN = keep_Bx1x1xN   # True = attend; broadcasts against [B, H, N, N]
      if self.causal:
        causal_1x1xNxN = jnp.tril(jnp.ones((n, n), bool))[None, None]
        keep_Bx1xNxN = (causal_1x1xNxN if keep_Bx1x1xN is None
                        else keep_Bx1x1xN & causal_1x1xNxN)
      dh = q_BxNxHxK.shape[-1]
      scores_BxHxNxN = jnp.einsum("bqhk,bnhk->bhqn", q_BxNxHxK, k_BxNxHxK,
                                  preferred_element_type=jnp.float32) * dh**-0.5
      if self.is_mutable_collection("intermediates"):
        self.sow("intermediates", "attn_weights",
                 common.masked_softmax(scores_BxHxNxN, keep_Bx1xNxN))
      o_BxNxHxK = common.softmax_attend("bhqn,bnhk->bqhk", scores_BxHxNxN, keep_Bx1xNxN,
                                        v_BxNxHxK.astype(self.dtype),
                                        dropout_rate=self.dropout_rate, dropout_seeds=seeds)
    y_BxNxD = proj("out", d, e)(common.merge_heads(o_BxNxHxK.astype(self.dtype)))
    return y_BxNxD, None
