"""LUNA learned-kernel attention (Shahbazi et al. 2025, arXiv 2512.08061).

The feature map is learned and the same for queries and keys (per head, x of width dh):

  u_i(x)   = w_i . x + b_i                          i = 1..m   (W [m, dh], b [m], all heads)
  phi(x)   = h(x) / sqrt(m) * [psi_l(u_i(x))]_{i,l}   l = 1..L   (a vector of size m*L)
  out      = phi(Q) (phi(K)^T V) / (phi(Q) (phi(K)^T 1) + eps)

psi is a scalar MLP 1 -> hidden -> L with ReLU after each layer, so features are non-negative
and the kernel phi(x)^T phi(y) is positive definite. Choices:
* Q/K scaling: q and k are scaled by dh**-0.25 before phi (the split of softmax's 1/sqrt(dh)
  between queries and keys, as Performer's x_hat), so u starts with variance ~|x|^2 / dh**1.5.
* W ~ N(0, 1/dh), b = 0. psi's weights and biases use torch nn.Linear's default init
  U(+-1/sqrt(fan_in)) (fan_in 1 then `hidden`), so its ReLU breakpoints are spread out.
* `shared_mlp=True`: one MLP with L outputs for all channels i; False: one MLP per channel
  (parameters with a leading m axis, evaluated with one einsum).
* `envelope="none"`: h = 1. `"learned"`: h(x) = softplus(a . x + c), a [dh] zero init and c
  init softplus^-1(1), so h = 1 at init (shared by heads, same for queries and keys). Note that
  a query's envelope cancels in the ratio (up to eps); only the key envelope changes outputs, as a
  learned per-key weight.
* `rms_rescale=True`: u_i is multiplied by min(1, 0.1 / rms_i), rms_i the root mean square of
  u_i over the real (unpadded) query and key tokens of the current batch and all heads, so the
  same phi serves queries and keys. Gradients flow through the statistic. Whole-batch statistics
  see future tokens, so this is rejected with `causal=True` and in `step`.
* eps = 1e-6 (not published). `dropout_rate` is unused: no attention matrix is ever formed.
* psi is evaluated exactly as the piecewise-linear function it is (scalar_mlp.py): a segment
  lookup among its `hidden` breakpoints, so its [tokens, H, m, hidden] activation never exists
  (the direct MLP form made the quick ListOps step 10-20x slower than linear_elu's).
* Memory: the feature map still runs over chunks of `feature_chunk` tokens, each recomputed in
  the backward pass, so its residuals are chunk-sized.
"""
from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import common
from luna_jax.attention import linear_common
from luna_jax.attention import scalar_mlp

Array = jax.Array
State = dict[str, Array]
ENVELOPES = ("none", "learned")
RMS_TARGET = 0.1


def _torch_uniform(fan_in: int) -> nn.initializers.Initializer:
  """U(+-1/sqrt(fan_in)), torch nn.Linear's default for weights and biases."""
  return common.torch_linear_bias(fan_in)


def rms_factor(u_BxNxHxM: Array, mask_BxN: Array | None) -> Array:
  """Per-channel min(1, RMS_TARGET / rms) over real tokens and heads: [M]."""
  sq_BxNxHxM = jnp.square(u_BxNxHxM)
  if mask_BxN is None:
    mean_M = sq_BxNxHxM.mean(axis=(0, 1, 2))
  else:
    w_BxNx1x1 = mask_BxN[:, :, None, None].astype(sq_BxNxHxM.dtype)
    count = jnp.maximum(w_BxNx1x1.sum() * u_BxNxHxM.shape[2], 1.0)
    mean_M = jnp.where(w_BxNx1x1 > 0, sq_BxNxHxM, 0.0).sum(axis=(0, 1, 2)) / count
  return jnp.minimum(1.0, RMS_TARGET * jax.lax.rsqrt(mean_M + 1e-12))


def chunked_map(fn, x: Array, u: Array, chunk: int, axis: int = 1) -> Array:
  """fn(x, u) over chunks of `chunk` tokens (token axis `axis` of x, u and the output), each
  rematerialised in the backward pass, so psi's residuals are chunk-sized, never N-sized."""
  n = x.shape[axis]
  if chunk <= 0 or chunk >= n:
    return fn(x, u)
  pad = -n % chunk
  if pad:
    x, u = (jnp.pad(a, [(0, 0)] * axis + [(0, pad)] + [(0, 0)] * (a.ndim - axis - 1))
            for a in (x, u))
  g = (n + pad) // chunk

  def to_chunks(a):   # [.., N, ..] -> [G, .., c, ..]
    return jnp.moveaxis(a.reshape(*a.shape[:axis], g, chunk, *a.shape[axis + 1:]), axis, 0)

  out = jax.lax.map(lambda xs: jax.checkpoint(fn)(*xs), (to_chunks(x), to_chunks(u)))
  out = jnp.moveaxis(out, 0, axis)
  out = out.reshape(*out.shape[:axis], n + pad, *out.shape[axis + 2:])
  return jax.lax.slice_in_dim(out, 0, n, axis=axis)


class LearnedKernelAttention(linear_common.LinearAttention):
  """Normalised linear attention with LUNA's learned positive feature map."""
  num_features: int = 32      # m
  num_outputs: int = 4        # L
  hidden: int = 64
  shared_mlp: bool = True
  envelope: str = "none"
  rms_rescale: bool = False
  eps: float = 1e-6
  feature_chunk: int = 256    # tokens per chunk of the feature map (0: all at once)

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    if self.envelope not in ENVELOPES:
      raise ValueError(f"envelope={self.envelope!r}; valid: {ENVELOPES}")
    if self.rms_rescale and (self.causal or state is not None):
      raise ValueError("rms_rescale uses whole-batch statistics: not causal, no step")
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = self._qkv(x_BxNxD)
    dh, m, hid, l = q_BxNxHxK.shape[-1], self.num_features, self.hidden, self.num_outputs
    w_MxK = self.param("feature_proj", nn.initializers.normal(dh**-0.5), (m, dh), jnp.float32)
    b_M = self.param("feature_bias", nn.initializers.zeros, (m,), jnp.float32)
    lead = () if self.shared_mlp else (m,)
    w1 = self.param("psi_w1", _torch_uniform(1), lead + (hid,), jnp.float32)
    b1 = self.param("psi_b1", _torch_uniform(1), lead + (hid,), jnp.float32)
    w2 = self.param("psi_w2", _torch_uniform(hid), lead + (hid, l), jnp.float32)
    b2 = self.param("psi_b2", _torch_uniform(hid), lead + (l,), jnp.float32)
    if self.envelope == "learned":
      env_a_K = self.param("envelope_w", nn.initializers.zeros, (dh,), jnp.float32)
      env_c = self.param("envelope_b", nn.initializers.constant(math.log(math.e - 1.0)), (),
                         jnp.float32)

    # Heads before tokens from here on: the attention products take [B, H, N, F] operands,
    # and transposing q and k (dh wide) is cheaper than transposing u (m) or features (m L).
    xs = [a.astype(jnp.float32).swapaxes(1, 2) * dh**-0.25 for a in (q_BxNxHxK, k_BxNxHxK)]
    us = [jnp.einsum("bhnk,mk->bhnm", x, w_MxK) + b_M for x in xs]
    if self.rms_rescale:
      factor_M = rms_factor(jnp.concatenate([u.swapaxes(1, 2) for u in us], axis=1),
                            None if mask_BxN is None else jnp.concatenate([mask_BxN] * 2, 1))
      us = [u * factor_M for u in us]

    def phi(x_BxHxNxK, u_BxHxNxM):
      # m**-0.5 is folded into psi's table.
      psi_BxHxNxMxL = scalar_mlp.psi(u_BxHxNxM, w1, b1, w2, b2, scale=m**-0.5)
      phi_BxHxNxF = psi_BxHxNxMxL.reshape(*u_BxHxNxM.shape[:3], m * l)
      if self.envelope == "learned":
        env_BxHxN = jax.nn.softplus(x_BxHxNxK @ env_a_K + env_c)
        phi_BxHxNxF = phi_BxHxNxF * env_BxHxN[..., None]
      return phi_BxHxNxF

    phi_q_BxHxNxF, phi_k_BxHxNxF = (
        chunked_map(phi, x, u, self.feature_chunk, axis=2)
        for x, u in zip(xs, us))
    # [B, N, H, F] for the causal and recurrent forms, inspection and `features` (unused, so
    # compiled away, in the bidirectional training step).
    phi_q_BxNxHxF, phi_k_BxNxHxF = phi_q_BxHxNxF.swapaxes(1, 2), phi_k_BxHxNxF.swapaxes(1, 2)
    if state is None:
      linear_common.sow_attention_map(self, phi_q_BxNxHxF, phi_k_BxNxHxF, mask_BxN,
                                      is_causal=self.causal, eps=self.eps, mode="eps")
    if state is None and not self.causal:
      o_BxNxHxK = linear_common.bidirectional_heads_first(
          phi_q_BxHxNxF, phi_k_BxHxNxF, v_BxNxHxK, mask_BxN, eps=self.eps, mode="eps")
    else:
      o_BxNxHxK, state = linear_common.attend(
          phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK, mask_BxN, state, is_causal=self.causal,
          chunk_size=self.chunk_size, eps=self.eps, mode="eps")
    y_BxNxD = self._out(o_BxNxHxK, x_BxNxD.shape[-1])
    return y_BxNxD, state, (phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)

  def _state_features(self, head_dim: int) -> int:
    return self.num_features * self.num_outputs
