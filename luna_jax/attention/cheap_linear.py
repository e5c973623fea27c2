"""Cheap linear attention (de Brebisson & Vincent 2016): content attention without the softmax.

Per head, with scores q_i . k_j / sqrt(dh) as in softmax attention but no softmax:

  out_i = (q_i / sqrt(dh))^T C,   C = sum_j k_j v_j^T / n      ([dh, dh] per head)

C is a fixed-size summary of the whole sequence (`summary`), built once in O(n dh^2); each lookup
costs O(dh^2) whatever n is, and C streams as C_t = C_{t-1} + k_t v_t^T. Padded keys are zeroed.

Choices (the paper leaves them open for a Transformer layer):
* Scale: queries are scaled by dh**-0.5, so the "attention weight" of key j for query i is the
  softmax-attention logit itself.
* `normalization="length"`: divide by n, the number of real keys (causal: the number of real keys
  up to and including position i; 1 if there is none). Keeps the output an average, whose size
  does not grow with the sequence length. `"none"`: the raw sum, as in the paper.
* `gated=True`: each key-side state is modulated by a learned sigmoid gate before the outer
  product, k_i -> sigmoid(W_g x_i + b_g) * k_i with W_g [D, D] (xavier init, no dependence on
  other tokens) and b_g [D] (zero init). The paper's family gates each state before it enters
  the summary (h_i -> sigmoid(W_g h_i + b_g) * h_i); its exact form is not available. Here the
  state that enters C is the key, and the gate is computed from the token x_i, so the model can
  choose per token and channel how much of the token is written into the fixed-size summary
  (queries and values are not gated).
* `dropout_rate` is unused: no attention matrix is ever formed.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import common
from luna_jax.attention import linear_common

Array = jax.Array
State = dict[str, Array]
NORMALIZATIONS = ("length", "none")


class CheapLinearAttention(linear_common.LinearAttention):
  """out = Q (K^T V) per head, optionally divided by the number of real keys and key-gated."""
  num_heads: int
  dropout_rate: float = 0.0   # unused (no attention matrix)
  dtype: Any = jnp.float32
  use_bias: bool = False
  causal: bool = False
  chunk_size: int = 64        # causal: <= 0 parallel [N, N] form, else chunked scan
  normalization: str = "length"
  gated: bool = False

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; valid: {NORMALIZATIONS}")
    d = x_BxNxD.shape[-1]

    def proj(name, **kw):
      kw = {"use_bias": self.use_bias, "gain": 1.0, "fan_in": d, "dtype": self.dtype, **kw}
      return common.projection(d, name, **kw)

    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = (
        common.split_heads(proj(name)(x_BxNxD), self.num_heads)
        for name in ("query", "key", "value"))
    if self.gated:
      gate_BxNxD = jax.nn.sigmoid(proj("gate", use_bias=True, zero_bias=True)(x_BxNxD))
      k_BxNxHxK = k_BxNxHxK * common.split_heads(gate_BxNxD, self.num_heads)
    q_BxNxHxK = q_BxNxHxK * q_BxNxHxK.shape[-1]**-0.5
    o_BxNxHxK, new_state = linear_common.attend(
        q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask_BxN, state, is_causal=self.causal,
        chunk_size=self.chunk_size, eps=0.0, mode="none")

    real_BxN = (jnp.ones(x_BxNxD.shape[:2], jnp.float32) if mask_BxN is None
                else mask_BxN.astype(jnp.float32))
    if state is not None:
      count_BxN = state["count"][:, None] + real_BxN
      new_state["count"] = count_BxN[:, 0]
    elif self.causal:
      count_BxN = jnp.cumsum(real_BxN, axis=1)
    else:
      count_BxN = jnp.broadcast_to(real_BxN.sum(axis=1, keepdims=True), real_BxN.shape)
    if self.normalization == "length":
      o_BxNxHxK = o_BxNxHxK / jnp.maximum(count_BxN, 1.0)[:, :, None, None]

    if state is None:
      scale_BxN = (1.0 / jnp.maximum(count_BxN, 1.0) if self.normalization == "length" else None)
      linear_common.sow_attention_map(self, q_BxNxHxK, k_BxNxHxK, mask_BxN,
                                      is_causal=self.causal, eps=0.0, mode="none",
                                      row_scale_BxN=scale_BxN)
    y_BxNxD = proj("out")(common.merge_heads(o_BxNxHxK.astype(self.dtype)))
    return y_BxNxD, new_state, (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK)

  def summary(self, x_BxNxD: Array, mask_BxN: Array | None = None) -> Array:
    """The fixed-size summary C = K^T V (/ n with "length"), [B, H, dh, dh]."""
    _, k_BxNxHxK, v_BxNxHxK = self.features(x_BxNxD, mask_BxN)
    k_BxNxHxK = common.zero_masked(k_BxNxHxK.astype(jnp.float32), mask_BxN)
    c_BxHxKxK = jnp.einsum("bnhk,bnhj->bhkj", k_BxNxHxK, v_BxNxHxK.astype(jnp.float32))
    if self.normalization == "length":
      n_B = (x_BxNxD.shape[1] * jnp.ones(x_BxNxD.shape[:1]) if mask_BxN is None
             else mask_BxN.sum(axis=1))
      c_BxHxKxK = c_BxHxKxK / jnp.maximum(n_B, 1.0)[:, None, None, None]
    return c_BxHxKxK

  def init_state(self, batch_size: int) -> State:
    """Empty recurrent state; call via `apply(variables, B, method=...)` (reads D from params)."""
    d = self.variables["params"]["query"]["kernel"].shape[0]
    dh = d // self.num_heads
    state = linear_common.zero_state(batch_size, self.num_heads, dh, dh)
    state["count"] = jnp.zeros((batch_size,), jnp.float32)
    return state
