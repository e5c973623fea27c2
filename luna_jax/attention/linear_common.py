"""Kernelised linear attention given feature maps: bidirectional, causal and recurrent forms.

With row-wise feature maps phi_q = phi(Q), phi_k = phi(K) (shapes [B, N, H, F]) and values V
([B, N, H, K]), every linear mechanism of the family computes, per batch element and head,

  num_i = phi_q_i^T S,  S = sum_j phi_k_j v_j^T   ([F, K])
  den_i = phi_q_i^T z,  z = sum_j phi_k_j         ([F])
  out_i = normalise(num_i, den_i)

where the sums run over the real keys (bidirectional) or the real keys j <= i (causal). Padded
keys contribute nothing. `mode` selects the normalisation:

* "eps":   out = num / (den + eps)       (Linear Transformer, Performer, LUNA learned kernel)
* "floor": out = num / max(den, eps)     (cosFormer)
* "none":  out = num                     (cheap linear attention; it divides by counts itself)

Causal forms: `chunk_size <= 0` (or >= N) is the parallel form, an explicit lower-triangular
[N, N] product per head (O(N^2) memory; for short sequences and as a reference). `chunk_size > 0`
is the chunked form: within a chunk an explicit masked [c, c] product, across chunks the [F, K]
state carried by `lax.scan`; memory is O(N (F + K) + c^2 + F K) per head, and no per-step outer
products [N, F, K] are ever built (under autodiff the scan keeps per-chunk residuals: N/c
[c, c] blocks and N/c [F, K] states, still linear in N). `step` is the recurrent form (one token at a time, state of a
size independent of N).

Log-domain keys (`log_k=True`, used by Performer's positive random features): `phi_k` holds
log-features and the key features are exp(phi_k - c) for a stabiliser c shared by all keys that
a query sees, so c cancels in num / den (only the relative size of eps changes):
* bidirectional: c = max over features and real keys (per batch element and head);
* causal and step: c_i = running max over features and the real keys j <= i, i.e. exactly the
  bidirectional stabiliser applied to each prefix. The carried state is rescaled by
  exp(c_old - c_new) when the running max grows (as in online softmax), so the forms are causal,
  streamable and agree with each other. The stabiliser is treated as a constant (stop_gradient).
All sums are float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from luna_jax.attention import common

Array = jax.Array
State = dict[str, Array]

# A finite stand-in for -inf in running maxima: keeps exp() and where() gradients NaN-free.
NEG_BIG = -1e30
MODES = ("eps", "floor", "none")


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"unknown normalisation mode {mode!r}; valid: {MODES}")


def _key_log_max(log_k_BxNxHxF: Array, mask_BxN: Array | None) -> Array:
  """Per-key max over features, NEG_BIG at padded keys: [B, N, H]."""
  kmax_BxNxH = lax.stop_gradient(jnp.max(log_k_BxNxHxF, axis=-1))
  if mask_BxN is not None:
    kmax_BxNxH = jnp.where(mask_BxN[:, :, None], kmax_BxNxH, NEG_BIG)
  return kmax_BxNxH


def _key_features(phi_k_BxNxHxF: Array, mask_BxN: Array | None,
                  shift_BxNxH: Array | None) -> Array:
  """Key features with padded keys zeroed; exp(log_k - shift) in the log domain."""
  if shift_BxNxH is None:
    if mask_BxN is None:
      return phi_k_BxNxHxF
    return phi_k_BxNxHxF * mask_BxN[:, :, None, None].astype(phi_k_BxNxHxF.dtype)
  log_k = phi_k_BxNxHxF - shift_BxNxH[..., None]
  if mask_BxN is not None:
    log_k = jnp.where(mask_BxN[:, :, None, None], log_k, -jnp.inf)
  return jnp.exp(log_k)


def _normalise(num_BxNxHxK: Array, den_BxNxH: Array | None, eps, mode: str) -> Array:
  """Applies the normalisation `mode` (see module docstring)."""
  if mode == "none":
    return num_BxNxHxK
  if mode == "floor":
    return num_BxNxHxK / jnp.maximum(den_BxNxH, eps)[..., None]
  total_BxNxH = den_BxNxH + eps
  # total == 0 only where no real key has been seen (then num == 0 too): output 0.
  return num_BxNxHxK / jnp.where(total_BxNxH > 0, total_BxNxH, 1.0)[..., None]


def _f32(*xs: Array) -> tuple[Array, ...]:
  return tuple(x.astype(jnp.float32) for x in xs)


def bidirectional(phi_q_BxNxHxF: Array, phi_k_BxNxHxF: Array, v_BxNxHxK: Array,
                  mask_BxN: Array | None = None, *, eps: float = 1e-6, mode: str = "eps",
                  log_k: bool = False) -> Array:
  """Non-causal linear attention: every query sees every real key. Returns [B, N, H, K]."""
  _check_mode(mode)
  phi_q, phi_k, v = _f32(phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)
  shift_BxNxH = None
  if log_k:
    shift_BxH = jnp.max(_key_log_max(phi_k, mask_BxN), axis=1)
    shift_BxNxH = jnp.broadcast_to(shift_BxH[:, None], phi_k.shape[:3])
  kf_BxNxHxF = _key_features(phi_k, mask_BxN, shift_BxNxH)
  s_BxHxFxK = jnp.einsum("bnhf,bnhk->bhfk", kf_BxNxHxF, v)
  num_BxNxHxK = jnp.einsum("bnhf,bhfk->bnhk", phi_q, s_BxHxFxK)
  if mode == "none":
    return num_BxNxHxK
  den_BxNxH = jnp.einsum("bnhf,bhf->bnh", phi_q, kf_BxNxHxF.sum(axis=1))
  return _normalise(num_BxNxHxK, den_BxNxH, eps, mode)


def bidirectional_heads_first(phi_q_BxHxNxF: Array, phi_k_BxHxNxF: Array, v_BxNxHxK: Array,
                              mask_BxN: Array | None = None, *, eps: float = 1e-6,
                              mode: str = "eps") -> Array:
  """`bidirectional` (without log_k) on heads-first features [B, H, N, F], in two products: the
  key sums S and z as one [F, K + 1] product with [v, 1] (padded keys dropped through that
  operand, the F-wide features are not masked), then num and den as one product with it. No
  transpose of the features and no matrix-vector product. Returns [B, N, H, K]."""
  _check_mode(mode)
  phi_q, phi_k, v = _f32(phi_q_BxHxNxF, phi_k_BxHxNxF, v_BxNxHxK)
  real_BxN = (jnp.ones(v.shape[:2], jnp.float32) if mask_BxN is None
              else mask_BxN.astype(jnp.float32))
  k = v.shape[-1]
  v_BxHxNxK = v.swapaxes(1, 2)
  v1_BxHxNxK1 = jnp.concatenate([v_BxHxNxK, jnp.ones_like(v_BxHxNxK[..., :1])], axis=-1)
  v1_BxHxNxK1 = v1_BxHxNxK1 * real_BxN[:, None, :, None]
  # [K + 1, F] rather than [F, K + 1]: the faster order of both products on XLA:CPU (0.75x).
  sz_BxHxK1xF = jnp.einsum("bhnk,bhnf->bhkf", v1_BxHxNxK1, phi_k)
  numden_BxHxNxK1 = jnp.einsum("bhnf,bhkf->bhnk", phi_q, sz_BxHxK1xF).swapaxes(1, 2)
  num_BxNxHxK = numden_BxHxNxK1[..., :k]
  if mode == "none":
    return num_BxNxHxK
  return _normalise(num_BxNxHxK, numden_BxHxNxK1[..., k], eps, mode)


def attention_map(phi_q_BxNxHxF: Array, phi_k_BxNxHxF: Array, mask_BxN: Array | None, *,
                  is_causal: bool, eps: float, mode: str, log_k: bool = False) -> Array:
  """The N x N map a linear mechanism implies, [B, H, N, N] float32 (for inspection only)."""
  _check_mode(mode)
  phi_q, phi_k = _f32(phi_q_BxNxHxF, phi_k_BxNxHxF)
  shift_BxNxH = None
  if log_k:
    shift_BxH = jnp.max(_key_log_max(phi_k, mask_BxN), axis=1)
    shift_BxNxH = jnp.broadcast_to(shift_BxH[:, None], phi_k.shape[:3])
  kf_BxNxHxF = _key_features(phi_k, mask_BxN, shift_BxNxH)
  a_BxHxNxN = jnp.einsum("bihf,bjhf->bhij", phi_q, kf_BxNxHxF)
  if is_causal:
    n = a_BxHxNxN.shape[-1]
    a_BxHxNxN = jnp.where(jnp.tril(jnp.ones((n, n), bool)), a_BxHxNxN, 0.0)
  if mode == "none":
    return a_BxHxNxN
  den_BxHxN = a_BxHxNxN.sum(-1)
  if mode == "floor":
    return a_BxHxNxN / jnp.maximum(den_BxHxN, eps)[..., None]
  total_BxHxN = den_BxHxN + eps
  return a_BxHxNxN / jnp.where(total_BxHxN > 0, total_BxHxN, 1.0)[..., None]


def sow_attention_map(module: Any, phi_q_BxNxHxF: Array, phi_k_BxNxHxF: Array,
                      mask_BxN: Array | None, *, is_causal: bool, eps: float, mode: str,
                      log_k: bool = False, row_scale_BxN: Array | None = None) -> None:
  """Sows `attn_weights` [B, H, N, N] only when `intermediates` is mutable (inspection); the
  training path builds nothing. `row_scale_BxN` rescales query rows (cheap linear's 1/n)."""
  if not module.is_mutable_collection("intermediates"):
    return
  a_BxHxNxN = attention_map(phi_q_BxNxHxF, phi_k_BxNxHxF, mask_BxN, is_causal=is_causal,
                            eps=eps, mode=mode, log_k=log_k)
  if row_scale_BxN is not None:
    a_BxHxNxN = a_BxHxNxN * row_scale_BxN[:, None, :, None]
  module.sow("intermediates", "attn_weights", a_BxHxNxN)


def zero_state(batch_size: int, num_heads: int, num_features: int, head_dim: int) -> State:
  """Empty recurrent state: S [B, H, F, K], z [B, H, F], running log-max c [B, H]."""
  return {
      "s": jnp.zeros((batch_size, num_heads, num_features, head_dim), jnp.float32),
      "z": jnp.zeros((batch_size, num_heads, num_features), jnp.float32),
      "c": jnp.full((batch_size, num_heads), NEG_BIG, jnp.float32),
  }


def _causal_chunk(state: State, phi_q_BxCxHxF: Array, phi_k_BxCxHxF: Array,
                  v_BxCxHxK: Array, mask_BxC: Array | None, *, eps: float, mode: str,
                  log_k: bool) -> tuple[State, Array]:
  """One chunk of causal attention given the state of all earlier chunks."""
  s_BxHxFxK, z_BxHxF, c_BxH = state["s"], state["z"], state["c"]
  eps_BxCxH = eps
  if log_k:
    run_BxCxH = jnp.maximum(c_BxH[:, None], lax.cummax(_key_log_max(phi_k_BxCxHxF, mask_BxC),
                                                       axis=1))
    new_c_BxH = run_BxCxH[:, -1]
    decay_BxH = jnp.exp(c_BxH - new_c_BxH)   # c <= new_c: rescale the carried sums
    s_BxHxFxK = s_BxHxFxK * decay_BxH[..., None, None]
    z_BxHxF = z_BxHxF * decay_BxH[..., None]
    kf_BxCxHxF = _key_features(phi_k_BxCxHxF, mask_BxC,
                               jnp.broadcast_to(new_c_BxH[:, None], run_BxCxH.shape))
    # Everything here is scaled by exp(-new_c); query i wants exp(-run_i): rescale eps instead.
    eps_BxCxH = eps * jnp.exp(run_BxCxH - new_c_BxH[:, None])
    c_BxH = new_c_BxH
  else:
    kf_BxCxHxF = _key_features(phi_k_BxCxHxF, mask_BxC, None)
  c = phi_q_BxCxHxF.shape[1]
  causal_CxC = jnp.tril(jnp.ones((c, c), bool))
  a_BxHxCxC = jnp.where(causal_CxC,
                        jnp.einsum("bihf,bjhf->bhij", phi_q_BxCxHxF, kf_BxCxHxF), 0.0)
  num_BxCxHxK = (jnp.einsum("bhij,bjhk->bihk", a_BxHxCxC, v_BxCxHxK)
                 + jnp.einsum("bihf,bhfk->bihk", phi_q_BxCxHxF, s_BxHxFxK))
  if mode == "none":
    out_BxCxHxK = num_BxCxHxK
  else:
    den_BxCxH = (jnp.einsum("bhij->bih", a_BxHxCxC)
                 + jnp.einsum("bihf,bhf->bih", phi_q_BxCxHxF, z_BxHxF))
    out_BxCxHxK = _normalise(num_BxCxHxK, den_BxCxH, eps_BxCxH, mode)
  new_state = {
      "s": s_BxHxFxK + jnp.einsum("bjhf,bjhk->bhfk", kf_BxCxHxF, v_BxCxHxK),
      "z": z_BxHxF + kf_BxCxHxF.sum(axis=1),
      "c": c_BxH,
  }
  return new_state, out_BxCxHxK


def causal(phi_q_BxNxHxF: Array, phi_k_BxNxHxF: Array, v_BxNxHxK: Array,
           mask_BxN: Array | None = None, *, chunk_size: int = 64, eps: float = 1e-6,
           mode: str = "eps", log_k: bool = False) -> Array:
  """Causal linear attention (query i sees real keys j <= i). Returns [B, N, H, K].

  chunk_size <= 0 or >= N: parallel form ([N, N] per head); otherwise the chunked scan (N is
  padded internally to a multiple of chunk_size with masked keys).
  """
  _check_mode(mode)
  phi_q, phi_k, v = _f32(phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK)
  b, n, h, f = phi_q.shape
  state = zero_state(b, h, f, v.shape[-1])
  kw = dict(eps=eps, mode=mode, log_k=log_k)
  if chunk_size <= 0 or chunk_size >= n:
    return _causal_chunk(state, phi_q, phi_k, v, mask_BxN, **kw)[1]

  pad = -n % chunk_size
  mask_BxN = jnp.ones((b, n), bool) if mask_BxN is None else mask_BxN
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    phi_q, phi_k, v = (jnp.pad(x, widths) for x in (phi_q, phi_k, v))
    mask_BxN = jnp.pad(mask_BxN, ((0, 0), (0, pad)))
  num_chunks = (n + pad) // chunk_size

  def to_chunks(x):  # [B, N, ...] -> [N/c, B, c, ...]
    return x.reshape(b, num_chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

  def body(carry, xs):
    return _causal_chunk(carry, *xs, **kw)

  _, out_GxBxCxHxK = lax.scan(body, state, tuple(map(to_chunks, (phi_q, phi_k, v, mask_BxN))))
  return out_GxBxCxHxK.swapaxes(0, 1).reshape(b, n + pad, h, -1)[:, :n]


def attend(phi_q_BxNxHxF: Array, phi_k_BxNxHxF: Array, v_BxNxHxK: Array,
           mask_BxN: Array | None, state: State | None = None, *, is_causal: bool,
           chunk_size: int, eps: float, mode: str, log_k: bool = False
           ) -> tuple[Array, State | None]:
  """Whole-sequence attention (`state` None) or one recurrent `step` (N == 1, state given).

  Returns ([B, N, H, K] float32, new state or None).
  """
  kw = dict(eps=eps, mode=mode, log_k=log_k)
  if state is not None:
    if phi_q_BxNxHxF.shape[1] != 1:
      raise ValueError(f"a recurrent step takes one token, got N={phi_q_BxNxHxF.shape[1]}")
    mask_B = None if mask_BxN is None else mask_BxN[:, 0]
    out_BxHxK, state = step(phi_q_BxNxHxF[:, 0], phi_k_BxNxHxF[:, 0], v_BxNxHxK[:, 0], state,
                            mask_B, **kw)
    return out_BxHxK[:, None], state
  if is_causal:
    return causal(phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK, mask_BxN, chunk_size=chunk_size,
                  **kw), None
  return bidirectional(phi_q_BxNxHxF, phi_k_BxNxHxF, v_BxNxHxK, mask_BxN, **kw), None


def step(phi_q_BxHxF: Array, phi_k_BxHxF: Array, v_BxHxK: Array, state: State,
         mask_B: Array | None = None, *, eps: float = 1e-6, mode: str = "eps",
         log_k: bool = False) -> tuple[Array, State]:
  """Recurrent form: adds one token to the state, then reads it. Returns ([B, H, K], state).

  A token with mask_B False leaves the state unchanged (its output is still computed).
  """
  _check_mode(mode)
  phi_q, phi_k, v = _f32(phi_q_BxHxF, phi_k_BxHxF, v_BxHxK)
  s_BxHxFxK, z_BxHxF, c_BxH = state["s"], state["z"], state["c"]
  real_Bx1x1 = (jnp.ones(phi_q.shape[:1], bool) if mask_B is None else mask_B)[:, None, None]
  if log_k:
    kmax_BxH = jnp.where(real_Bx1x1[..., 0], lax.stop_gradient(phi_k.max(-1)), NEG_BIG)
    new_c_BxH = jnp.maximum(c_BxH, kmax_BxH)
    decay_BxH = jnp.exp(c_BxH - new_c_BxH)
    s_BxHxFxK = s_BxHxFxK * decay_BxH[..., None, None]
    z_BxHxF = z_BxHxF * decay_BxH[..., None]
    kf_BxHxF = jnp.exp(jnp.where(real_Bx1x1, phi_k - new_c_BxH[..., None], -jnp.inf))
    c_BxH = new_c_BxH
  else:
    kf_BxHxF = jnp.where(real_Bx1x1, phi_k, 0.0)
  s_BxHxFxK = s_BxHxFxK + jnp.einsum("bhf,bhk->bhfk", kf_BxHxF, v)
  z_BxHxF = z_BxHxF + kf_BxHxF
  num_BxHxK = jnp.einsum("bhf,bhfk->bhk", phi_q, s_BxHxFxK)
  den_BxH = None if mode == "none" else jnp.einsum("bhf,bhf->bh", phi_q, z_BxHxF)
  out_BxHxK = _normalise(num_BxHxK, den_BxH, eps, mode)
  return out_BxHxK, {"s": s_BxHxFxK, "z": z_BxHxF, "c": c_BxH}


class LinearAttention(nn.Module):
  """The interface and the parts every linear mechanism shares: the fields below, the q/k/v
  projections to `qkv_dim` (0: the model width D) split into heads, and the output projection
  back to D. Subclasses define `_forward(x, mask, state) -> (y, new_state, features)` (state
  None: the whole sequence) and `_state_features(head_dim)` (the feature size of the state)."""
  num_heads: int
  dropout_rate: float = 0.0   # unused: no attention matrix is ever formed
  dtype: Any = jnp.float32
  use_bias: bool = False      # biases on the q/k/v/out projections
  causal: bool = False
  chunk_size: int = 64        # causal: <= 0 parallel [N, N] form, else chunked scan
  qkv_dim: int = 0            # width of q/k/v (all heads); 0 -> D

  def _project(self, features: int, name: str, **kw) -> nn.Dense:
    """A Dense of the family's init (xavier kernel, torch-default bias)."""
    kw = {"use_bias": self.use_bias, "gain": 1.0, "dtype": self.dtype, **kw}
    return common.projection(features, name, **kw)

  def _qkv(self, x_BxNxD: Array) -> tuple[Array, Array, Array]:
    """q, k, v [B, N, H, qkv_dim / H] in the compute dtype."""
    d = x_BxNxD.shape[-1]
    e = self.qkv_dim or d
    return tuple(common.split_heads(self._project(e, name, fan_in=d)(x_BxNxD), self.num_heads)
                 for name in ("query", "key", "value"))

  def _out(self, o_BxNxHxK: Array, d: int) -> Array:
    """Merges heads and projects back to the model width d."""
    o_BxNxE = common.merge_heads(o_BxNxHxK.astype(self.dtype))
    return self._project(d, "out", fan_in=o_BxNxE.shape[-1])(o_BxNxE)

  def _head_dim(self) -> int:
    """Head width of the bound module (read from its parameters)."""
    return self.variables["params"]["query"]["kernel"].shape[1] // self.num_heads

  def init_state(self, batch_size: int) -> State:
    """Empty recurrent state; call via `apply(variables, B, method=...)` (reads sizes from
    params)."""
    dh = self._head_dim()
    return zero_state(batch_size, self.num_heads, self._state_features(dh), dh)

  def _state_features(self, head_dim: int) -> int:
    return head_dim

  def __call__(self, x_BxNxD: Array, mask_BxN: Array | None = None, p_BxLxD: Array | None = None,
               p_mask_BxL: Array | None = None, *, deterministic: bool = True
               ) -> tuple[Array, None]:
    """Returns (y_BxNxD, None); `p_*` and `deterministic` are ignored."""
    del p_BxLxD, p_mask_BxL, deterministic
    return self._forward(x_BxNxD, mask_BxN, None)[0], None

  def features(self, x_BxNxD: Array, mask_BxN: Array | None = None) -> tuple[Array, ...]:
    """(query features, key features, v) as the mechanism computes them (see its docstring)."""
    return self._forward(x_BxNxD, mask_BxN, None)[2]

  def step(self, x_BxD: Array, state: State, mask_B: Array | None = None
           ) -> tuple[Array, State]:
    """Causal decoding of one token: (y_BxD, new state). mask_B False: the sums are unchanged
    (cosFormer's position still advances). Performer: pass the same "features" rng as for the
    sequence."""
    mask_Bx1 = None if mask_B is None else mask_B[:, None]
    y_Bx1xD, state, _ = self._forward(x_BxD[:, None], mask_Bx1, state)
    return y_Bx1xD[:, 0], state
