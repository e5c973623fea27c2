"""Performer attention (Choromanski et al. 2021): FAVOR+ positive orthogonal random features.

`kernel="softmax"` (FAVOR+), with x_hat = x / dh**0.25 for queries and keys of each head:

  phi(x_hat) = m**-0.5 * exp(w_i . x_hat - |x_hat|^2 / 2),  i = 1..m
  out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j) + eps)

an unbiased estimate of softmax(q k^T / sqrt(dh)) attention. The m x dh matrix W is drawn in
blocks of dh Gaussian rows orthogonalised by QR, each row rescaled by the norm of a fresh
Gaussian vector in R^dh (one W per layer, shared by all heads). Stabilisers (exact: each is a
constant that cancels in the ratio, only the relative size of eps changes; no gradient flows
through them):
* queries: exp(. - max over the features of that query);
* keys, bidirectional: exp(. - max over the features and the real keys); padded keys are
  excluded from the max and zeroed in the sums;
* keys, causal and `step`: a sequence-global max would let future keys leak in and cannot be
  streamed, so the stabiliser of query i is the running max over the real keys j <= i; the
  carried state is rescaled when the running max grows (`linear_common`, log-domain keys).

`form="nystromformer_lra"` (softmax kernel, bidirectional): FAVOR+ as the Nystromformer LRA code
ran it (its `attention_performer.py` around performer-pytorch 0.15.0's `FastAttention`; the
Skyformer code bundles the same kernel), every difference from the form above kept:
* q and k are divided by dh**0.25 before the kernel divides them by dh**0.25 again, so the
  features estimate exp(q . k / dh), not exp(q . k / sqrt(dh));
* phi(x) = m**-0.5 * (exp(w_i . x_hat - |x_hat|^2 / 2 - c) + 1e-4): the 1e-4 is inside each
  feature, so the stabilisers c no longer cancel: queries take the max over their own features,
  keys ONE max over the whole batch, heads, positions and features (torch.max with its
  gradient, as there);
* padded keys are zeroed, not removed: k = 0 gives phi = m**-0.5 (exp(-c) + 1e-4) > 0, so they
  add to the normaliser, while v is zeroed too so they add nothing to the numerator;
* out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / (phi(q_i)^T sum_j phi(k_j)), no eps;
* W drawn once and never redrawn (that code has no redraw): use it with `redraw=False`.
Under data parallelism the key max is over the global batch (torch: over each GPU's share).

`kernel="relu"`: the deterministic phi(x) = relu(x) + 0.001 on the raw per-head projections (no
random features; `num_features` and `redraw` unused), which is what the LRA reference configs
ran under the Performer name.

Random features contract (features are not parameters and get no gradient):
* they are drawn from the rng stream "features": `self.make_rng("features")`, which already
  folds in the module path, so every layer gets its own W. The trainer passes
  `rngs={"features": jax.random.fold_in(base_key, step // redraw_every)}` so W is redrawn every
  `redraw_every` steps from an explicit key; evaluation passes a fixed key (or none).
* without a "features" stream, or with `redraw=False`, W comes from the fixed key
  jax.random.key(0) folded with a hash of the module path: fixed for the whole run, distinct
  per layer.
`__call__`, `features` and `step` draw W the same way, so decoding uses the training features
when given the same rngs. `dropout_rate` is unused: no attention matrix is ever formed.
"""
from __future__ import annotations

import math
import zlib
import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import linear_common

Array = jax.Array
State = dict[str, Array]
KERNELS = ("softmax", "relu")
FORMS = ("favor", "nystromformer_lra")
RELU_STABILIZER = 1e-3
TORCH_FEATURE_EPS = 1e-4     # performer-pytorch softmax_kernel's eps, inside every feature


def orthonormalize_columns(g_GxDxD: Array) -> Array:
  """Q of g = Q R with diag(R) > 0, per block: Gram-Schmidt, each column projected twice ("twice
  is enough": orthogonal to float precision). For Gaussian g this Q is Haar-distributed (a
  Householder QR's Q needs its columns flipped by sign(diag(R)) to be). Plain XLA rather than
  `jnp.linalg.qr`: on a CPU host split into several devices, jaxlib's LAPACK QR waits for work it
  schedules on XLA's intra-op pool, which every device's step occupies, and a data-parallel
  Performer step deadlocked (2 devices on 2 cores, 8 blocks of 32)."""
  dim = g_GxDxD.shape[-1]

  def column(j, q_GxDxD):
    earlier_D = (jnp.arange(dim) < j).astype(q_GxDxD.dtype)
    v_GxD = q_GxDxD[:, :, j]
    for _ in range(2):
      coef_GxD = jnp.einsum("gdk,gd->gk", q_GxDxD, v_GxD) * earlier_D
      v_GxD = v_GxD - jnp.einsum("gdk,gk->gd", q_GxDxD, coef_GxD)
    v_GxD = v_GxD / jnp.linalg.norm(v_GxD, axis=-1, keepdims=True)
    return q_GxDxD.at[:, :, j].set(v_GxD)

  return jax.lax.fori_loop(0, dim, column, g_GxDxD)


def orthogonal_random_features(key: Array, num_features: int, dim: int) -> Array:
  """[num_features, dim] rows: QR-orthogonalised Gaussian blocks (Haar-distributed directions),
  rows rescaled by the norms of fresh Gaussian vectors (so each row is marginally N(0, I))."""
  num_blocks = -(-num_features // dim)
  block_key, norm_key = jax.random.split(key)
  g_GxDxD = jax.random.normal(block_key, (num_blocks, dim, dim), jnp.float32)
  q_GxDxD = orthonormalize_columns(g_GxDxD)
  rows_MxD = jnp.swapaxes(q_GxDxD, 1, 2).reshape(num_blocks * dim, dim)[:num_features]
  norms_M = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32),
                            axis=-1)
  return rows_MxD * norms_M[:, None]


def nystromformer_lra_attention(q_BxNxHxK: Array, k_BxNxHxK: Array, v_BxNxHxK: Array,
                                mask_BxN: Array | None, w_FxK: Array
                                ) -> tuple[Array, Array, Array]:
  """FAVOR+ as the Nystromformer LRA code computed it (module docstring): (out [B, N, H, K],
  phi(q), phi(k)), float32."""
  dh, m = q_BxNxHxK.shape[-1], w_FxK.shape[0]
  keep_BxNx1x1 = (jnp.ones(q_BxNxHxK.shape[:2], jnp.float32) if mask_BxN is None
                  else mask_BxN.astype(jnp.float32))[:, :, None, None]
  q_BxNxHxK = q_BxNxHxK * dh**-0.25                  # the wrapper's scaling ...
  k_BxNxHxK = k_BxNxHxK * dh**-0.25 * keep_BxNx1x1
  v_BxNxHxK = v_BxNxHxK.astype(jnp.float32) * keep_BxNx1x1

  def dash(x_BxNxHxK):                               # ... and the kernel's
    x_hat = x_BxNxHxK * dh**-0.25
    return (jnp.einsum("bnhk,fk->bnhf", x_hat, w_FxK),
            0.5 * jnp.sum(x_hat**2, axis=-1, keepdims=True))

  q_dash, q_diag = dash(q_BxNxHxK)
  k_dash, k_diag = dash(k_BxNxHxK)
  phi_q_BxNxHxF = m**-0.5 * (jnp.exp(q_dash - q_diag - q_dash.max(-1, keepdims=True))
                             + TORCH_FEATURE_EPS)
  phi_k_BxNxHxF = m**-0.5 * (jnp.exp(k_dash - k_diag - k_dash.max()) + TORCH_FEATURE_EPS)
  d_inv_BxNxH = 1.0 / jnp.einsum("bnhf,bhf->bnh", phi_q_BxNxHxF, phi_k_BxNxHxF.sum(axis=1))
  context_BxHxFxK = jnp.einsum("bnhf,bnhk->bhfk", phi_k_BxNxHxF, v_BxNxHxK)
  o_BxNxHxK = jnp.einsum("bhfk,bnhf,bnh->bnhk", context_BxHxFxK, phi_q_BxNxHxF, d_inv_BxNxH)
  return o_BxNxHxK, phi_q_BxNxHxF, phi_k_BxNxHxF


class PerformerAttention(linear_common.LinearAttention):
  """Linear attention with FAVOR+ (or the LRA ReLU) features.

  `features()` returns (phi(q) with its per-query stabiliser, key features, v); for the softmax
  kernel the key features are in the log domain (stabilised inside linear_common)."""
  num_features: int = 256
  kernel: str = "softmax"
  redraw: bool = True
  eps: float = 1e-6
  form: str = "favor"          # favor | nystromformer_lra (module docstring)

  def _feature_key(self) -> Array:
    """Key for W: the "features" stream if given and redraw, else a fixed per-layer key."""
    if self.redraw and self.has_rng("features"):
      return self.make_rng("features")
    path_hash = zlib.crc32("/".join(map(str, self.path)).encode()) & 0x7FFFFFFF
    return jax.random.fold_in(jax.random.key(0), path_hash)

  def random_features(self, head_dim: int) -> Array:
    """The current W [num_features, head_dim] (float32, no gradient)."""
    return jax.lax.stop_gradient(
        orthogonal_random_features(self._feature_key(), self.num_features, head_dim))

  @nn.compact
  def _forward(self, x_BxNxD: Array, mask_BxN: Array | None,
               state: State | None) -> tuple[Array, State | None, tuple[Array, ...]]:
    """Projections, features and attention; one recurrent step when `state` is given."""
    if self.kernel not in KERNELS:
      raise ValueError(f"kernel={self.kernel!r}; valid: {KERNELS}")
    if self.form not in FORMS:
      raise ValueError(f"form={self.form!r}; valid: {FORMS}")
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = self._qkv(x_BxNxD)
    q_BxNxHxK = q_BxNxHxK.astype(jnp.float32)
    k_BxNxHxK = k_BxNxHxK.astype(jnp.float32)
    if self.form == "nystromformer_lra":
      if self.kernel != "softmax" or self.causal or state is not None:
        raise ValueError("form='nystromformer_lra' is the bidirectional softmax-kernel "
                         "Performer of that code; use form='favor' for kernel='relu', causal "
                         "attention or decoding")
      o_BxNxHxK, phi_q_BxNxHxF, phi_k_BxNxHxF = nystromformer_lra_attention(
          q_BxNxHxK, k_BxNxHxK, v_BxNxHxK, mask_BxN, self.random_features(q_BxNxHxK.shape[-1]))
      if self.is_mutable_collection("intermediates"):   # padded keys keep their share
        a_BxHxNxN = jnp.einsum("bihf,bjhf->bhij", phi_q_BxNxHxF, phi_k_BxNxHxF)
        self.sow("intermediates", "attn_weights", a_BxHxNxN / a_BxHxNxN.sum(-1, keepdims=True))
      y_BxNxD = self._out(o_BxNxHxK, x_BxNxD.shape[-1])
      return y_BxNxD, None, (phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)
    if self.kernel == "relu":
      phi_q_BxNxHxF = jax.nn.relu(q_BxNxHxK) + RELU_STABILIZER
      phi_k_BxNxHxF = jax.nn.relu(k_BxNxHxK) + RELU_STABILIZER
      log_k = False
    else:
      dh = q_BxNxHxK.shape[-1]
      w_FxK = self.random_features(dh)

      def log_features(x_BxNxHxK):  # log phi(x_hat)
        x_hat = x_BxNxHxK * dh**-0.25
        return (jnp.einsum("bnhk,fk->bnhf", x_hat, w_FxK)
                - 0.5 * jnp.sum(x_hat**2, axis=-1, keepdims=True)
                - 0.5 * math.log(self.num_features))

      log_q_BxNxHxF = log_features(q_BxNxHxK)
      phi_q_BxNxHxF = jnp.exp(
          log_q_BxNxHxF - jax.lax.stop_gradient(log_q_BxNxHxF.max(-1, keepdims=True)))
      phi_k_BxNxHxF = log_features(k_BxNxHxK)   # log domain: stabilised in linear_common
      log_k = True
    if state is None:
      linear_common.sow_attention_map(self, phi_q_BxNxHxF, phi_k_BxNxHxF, mask_BxN,
                                      is_causal=self.causal, eps=self.eps, mode="eps",
                                      log_k=log_k)
    o_BxNxHxK, state = linear_common.attend(
        phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK, mask_BxN, state, is_causal=self.causal,
        chunk_size=self.chunk_size, eps=self.eps, mode="eps", log_k=log_k)
    y_BxNxD = self._out(o_BxNxHxK, x_BxNxD.shape[-1])
    return y_BxNxD, state, (phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)

  def _state_features(self, head_dim: int) -> int:
    return head_dim if self.kernel == "relu" else self.num_features
