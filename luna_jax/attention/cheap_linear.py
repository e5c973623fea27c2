"""Cheap linear attention (de Brebisson & Vincent 2016): content attention without the softmax.

Removing the softmax from content attention turns a lookup into a product with a fixed-size
summary: r = H^T (H q) = C q with C = sum_i h_i h_i^T. C is built once in O(n k^2), streams as
C_t = C_{t-1} + h_t h_t^T, and each lookup costs O(k^2) whatever n is. Two forms, per head:

* `form="transformer"` (default; the natural generalisation inside a Transformer layer):
    out_i = (q_i / sqrt(dh))^T C,   C = sum_j k_j v_j^T / n      ([dh, dh])
  with separate key and value projections; the "attention weight" of key j for query i is the
  softmax-attention logit itself. `normalization="length"` (its default) divides by n, the number
  of real keys (causal: the real keys up to and including i; 1 if none), keeping the output an
  average whose size does not grow with the length.
* `form="paper"` (the paper's mechanism): one projection h_j = W_h x_j serves as key and value,
  C = sum_j h_j h_j^T is symmetric, and out_i = q_i^T C = C q_i, with no scaling and no
  normaliser (its default normalization is "none").

`normalization="auto"` picks the form's default; "length" or "none" force one.
`gated=True`: each key-side state is modulated by a learned sigmoid gate before it enters C,
s_j -> sigmoid(W_g x_j + b_g) * s_j (W_g xavier, b_g zero init), computed from the token x_j, so
the model chooses per token and channel how much of it is written into the summary. The paper
describes gated variants of this kind but its exact gate is not available; this is our form. In
the transformer form the gate acts on the keys; in the paper form on h (both sides of the outer
product, so C stays symmetric). Padded keys are zeroed. No attention matrix is ever formed.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import common
from luna_jax.attention import linear_common

Array = jax.Array
State = dict[str, Array]
FORMS = ("transformer", "paper")
NORMALIZATIONS = ("auto", "length", "none")


class CheapLinearAttention(linear_common.LinearAttention):
  """out = Q (K^T V) per head (transformer form) or C q with C = sum h h^T (paper form)."""
  form: str = "transformer"
  normalization: str = "auto"
  gated: bool = False

  def _normalization(self) -> str:
    if self.form not in FORMS:
      raise ValueError(f"form={self.form!r}; valid: {FORMS}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; valid: {NORMALIZATIONS}")
    if self.normalization == "auto":
      return "length" if self.form == "transformer" else "none"
    return self.normalization

  def _gate(self, x_BxNxD: Array, width: int) -> Array:
    """sigmoid(W_g x + b_g) split into heads: [B, N, H, width / H]."""
    g = self._project(width, "gate", use_bias=True, zero_bias=True, fan_in=x_BxNxD.shape[-1])
    return common.split_heads(jax.nn.sigmoid(g(x_BxNxD)), self.num_heads)

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    normalization = self._normalization()
    d = x_BxNxD.shape[-1]
    e = self.qkv_dim or d
    if self.form == "paper":
      q_BxNxHxK = common.split_heads(self._project(e, "query", fan_in=d)(x_BxNxD),
                                     self.num_heads)
      h_BxNxHxK = common.split_heads(self._project(e, "state", fan_in=d)(x_BxNxD),
                                     self.num_heads)
      if self.gated:
        h_BxNxHxK = h_BxNxHxK * self._gate(x_BxNxD, e)
      k_BxNxHxK = v_BxNxHxK = h_BxNxHxK
    else:
      q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = self._qkv(x_BxNxD)
      if self.gated:
        k_BxNxHxK = k_BxNxHxK * self._gate(x_BxNxD, e)
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
    if normalization == "length":
      o_BxNxHxK = o_BxNxHxK / jnp.maximum(count_BxN, 1.0)[:, :, None, None]

    if state is None:
      scale_BxN = 1.0 / jnp.maximum(count_BxN, 1.0) if normalization == "length" else None
      linear_common.sow_attention_map(self, q_BxNxHxK, k_BxNxHxK, mask_BxN,
                                      is_causal=self.causal, eps=0.0, mode="none",
                                      row_scale_BxN=scale_BxN)
    y_BxNxD = self._out(o_BxNxHxK, d)
    return y_BxNxD, new_state, (q_BxNxHxK, k_BxNxHxK, v_BxNxHxK)

  def summary(self, x_BxNxD: Array, mask_BxN: Array | None = None) -> Array:
    """The fixed-size summary C = K^T V (/ n with "length"), [B, H, dh, dh]; symmetric in the
    paper form (K = V = H)."""
    _, k_BxNxHxK, v_BxNxHxK = self.features(x_BxNxD, mask_BxN)
    k_BxNxHxK = common.zero_masked(k_BxNxHxK.astype(jnp.float32), mask_BxN)
    c_BxHxKxK = jnp.einsum("bnhk,bnhj->bhkj", k_BxNxHxK, v_BxNxHxK.astype(jnp.float32))
    if self._normalization() == "length":
      n_B = (x_BxNxD.shape[1] * jnp.ones(x_BxNxD.shape[:1]) if mask_BxN is None
             else mask_BxN.sum(axis=1))
      c_BxHxKxK = c_BxHxKxK / jnp.maximum(n_B, 1.0)[:, None, None, None]
    return c_BxHxKxK

  def lookup(self, c_BxHxKxK: Array, x_BxMxD: Array) -> Array:
    """Outputs of M query tokens from a summary C (`summary`): O(M dh^2) per head, whatever
    the length of the sequence C summarises. [B, M, D]."""
    q_BxMxHxK = self.features(x_BxMxD)[0].astype(jnp.float32)
    o_BxMxE = common.merge_heads(jnp.einsum("bmhk,bhkj->bmhj", q_BxMxHxK, c_BxHxKxK))
    out = self.variables["params"]["out"]
    return o_BxMxE @ out["kernel"] + (out["bias"] if "bias" in out else 0.0)

  def init_state(self, batch_size: int) -> State:
    """Empty recurrent state plus the count of real tokens seen."""
    state = super().init_state(batch_size)
    state["count"] = jnp.zeros((batch_size,), jnp.float32)
    return state
