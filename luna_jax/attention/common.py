"""Small pieces shared by the attention modules and the models: projections, head reshapes,
masks, dropout."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Dtype = Any


def xavier_uniform(gain: float = 1.0) -> nn.initializers.Initializer:
  """torch.nn.init.xavier_uniform_ with `gain`: U(+-gain * sqrt(6 / (fan_in + fan_out)))."""
  return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def torch_linear_bias(fan_in: int) -> nn.initializers.Initializer:
  """torch.nn.Linear's default bias init: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def projection(features: int, name: str, *, dtype: Dtype = jnp.float32, use_bias: bool = True,
               gain: float = 1.0, fan_in: int | None = None, zero_bias: bool = False) -> nn.Dense:
  """A Dense with the official init: xavier_uniform(gain) kernel, torch-default or zero bias."""
  bias_init = (nn.initializers.zeros if zero_bias or fan_in is None else torch_linear_bias(fan_in))
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=xavier_uniform(gain), bias_init=bias_init, name=name)


class DenseParams(nn.Module):
  """The kernel [in, out] (and bias [out]) of one projection, under the projection's own name,
  for callers that fuse several projections of one input into one matmul (`fused_dense`). The
  parameter tree is that of an `nn.Dense` of the same name."""
  features: int
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array | None]:
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    return kernel, bias


def projection_params(features: int, name: str, *, use_bias: bool = True, gain: float = 1.0,
                      fan_in: int | None = None, zero_bias: bool = False) -> DenseParams:
  """`projection`'s parameters (same init and names) without the matmul."""
  bias_init = (nn.initializers.zeros if zero_bias or fan_in is None else torch_linear_bias(fan_in))
  return DenseParams(features, use_bias=use_bias, kernel_init=xavier_uniform(gain),
                     bias_init=bias_init, name=name)


def fused_dense(x_BxNxD: Array, params: list[tuple[Array, Array | None]], dtype: Dtype
                ) -> list[Array]:
  """Several projections of one input as one matmul against the concatenated kernels (one
  pass over x forward and backward); returns each projection's output."""
  kernel = jnp.concatenate([k for k, _ in params], axis=1).astype(dtype)
  y = jnp.einsum("...d,de->...e", x_BxNxD.astype(dtype), kernel)
  if all(b is not None for _, b in params):
    y = y + jnp.concatenate([b for _, b in params]).astype(dtype)
  splits = []
  for k, _ in params[:-1]:
    splits.append((splits[-1] if splits else 0) + k.shape[1])
  return jnp.split(y, splits, axis=-1)


def split_heads(x_BxNxD: Array, num_heads: int) -> Array:
  """[B, N, D] -> [B, N, H, D/H]; head k owns channels [k*dh, (k+1)*dh)."""
  b, n, d = x_BxNxD.shape
  if d % num_heads:
    raise ValueError(f"width {d} is not divisible by num_heads={num_heads}")
  return x_BxNxD.reshape(b, n, num_heads, d // num_heads)


def merge_heads(x_BxNxHxK: Array) -> Array:
  """[B, N, H, K] -> [B, N, H*K]."""
  b, n, h, k = x_BxNxHxK.shape
  return x_BxNxHxK.reshape(b, n, h * k)


@jax.custom_vjp
def softmax_last(x: Array) -> Array:
  """`jax.nn.softmax` over the last axis whose backward pass keeps only the probabilities y
  (dx = y * (dy - sum(y * dy))); autodiff of `jax.nn.softmax` also keeps the exponentials and a
  broadcast of 1/sum: three [.., T, S] tensors instead of one."""
  return jax.nn.softmax(x, axis=-1)


def _softmax_last_fwd(x: Array) -> tuple[Array, Array]:
  y = jax.nn.softmax(x, axis=-1)
  return y, y


def _softmax_last_bwd(y: Array, dy: Array) -> tuple[Array]:
  return (y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True)),)


softmax_last.defvjp(_softmax_last_fwd, _softmax_last_bwd)


def masked_softmax(scores: Array, key_mask: Array | None) -> Array:
  """Float32 softmax over the last axis; `key_mask` (True = keep) broadcasts against scores."""
  scores = scores.astype(jnp.float32)
  if key_mask is not None:
    scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
  return softmax_last(scores)


def zero_masked(x_BxNx_: Array, mask_BxN: Array | None) -> Array:
  """Zeroes rows where mask is False (padding) so they contribute nothing to sums."""
  if mask_BxN is None:
    return x_BxNx_
  shape = mask_BxN.shape + (1,) * (x_BxNx_.ndim - mask_BxN.ndim)
  return x_BxNx_ * mask_BxN.reshape(shape).astype(x_BxNx_.dtype)


IMPLEMENTATIONS = ("xla", "cudnn", "blocked", "auto")
# "auto" takes the blocked form on CPU and TPU from this many keys on (softmax attention only).
# On the 2-core development CPU (benchmarks/RESULTS.md, "Blocked softmax attention") the blocked
# small-protocol attention layer was 0.58x the xla form's speed at N = 64 and 128 without
# padding, 1.39x at 256 (1.6x at 128-256 with LRA-like padding), with a third of its memory.
BLOCKED_MIN_KEYS = 256


def resolve_implementation(implementation: str, dtype: Dtype, dropout_active: bool,
                           num_keys: int | None = None) -> str:
  """The attention path a softmax step takes (`implementation` of softmax and Luna):
  "xla": einsum scores, float32 masked softmax, attention dropout, einsum with V.
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention; GPU
    only, 16-bit dtypes, no attention dropout, no attention maps, padding as key lengths (so it
    assumes right padding, as every LRA task pads).
  "blocked": `blocked.blocked_attention`, the same function as "xla" (attention dropout
    included) over key blocks with an online softmax and a backward pass that recomputes each
    block: no [T, S] array. Only for callers that pass `num_keys` (softmax attention).
  "auto": "cudnn" on a GPU with a 16-bit dtype and no active attention dropout; else "blocked" on
    CPU and TPU when the caller has a blocked form and `num_keys >= BLOCKED_MIN_KEYS`; else
    "xla"."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; valid: {IMPLEMENTATIONS}")
  if implementation == "blocked" and num_keys is None:
    raise ValueError("implementation='blocked' is softmax attention's; valid here: "
                     f"{tuple(i for i in IMPLEMENTATIONS if i != 'blocked')}")
  if implementation != "auto":
    return implementation
  cudnn_ok = (jax.default_backend() == "gpu" and not dropout_active
              and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
  if cudnn_ok:
    return "cudnn"
  if (num_keys is not None and num_keys >= BLOCKED_MIN_KEYS
      and jax.default_backend() in ("cpu", "tpu")):
    return "blocked"
  return "xla"


def fused_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                    key_mask_BxS: Array | None, *, scale: float, is_causal: bool = False,
                    implementation: str | None = "cudnn") -> Array:
  """`jax.nn.dot_product_attention` with a prefix key mask passed as key lengths (no [T, S]
  mask is built). `implementation=None` is XLA's path (used by the CPU tests of the lengths
  logic); "cudnn" the fused GPU kernel."""
  lengths_B = None if key_mask_BxS is None else key_mask_BxS.sum(-1).astype(jnp.int32)
  return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, scale=scale,
                                      is_causal=is_causal, key_value_seq_lengths=lengths_B,
                                      implementation=implementation)


def _fmix32(h: Array) -> Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def dropout_seeds(key: Array) -> Array:
  """The two uint32 seeds of a `dropout_keep` mask, drawn from `key`."""
  return jax.random.bits(key, (2,), jnp.uint32)


def keep_from_seeds(seeds: Array, shape: tuple[int, ...], rate: float) -> Array:
  """`dropout_keep`'s mask from its seeds (a pure function of seeds and element index)."""
  size = 1
  for dim in shape:
    size *= dim
  return keep_at(seeds, lax.iota(jnp.uint32, size).reshape(shape), rate)


def keep_at(seeds: Array, idx: Array, rate: float) -> Array:
  """The keep bits of the mask of `seeds` at the flat (row-major, uint32) element indices `idx`:
  a block of a mask computes exactly its slice of the whole mask."""
  bits = _fmix32(_fmix32(idx ^ seeds[0]) + seeds[1])
  return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout_keep(key: Array, shape: tuple[int, ...], rate: float) -> Array:
  """Bool keep-mask with P(keep) = 1 - rate (rate quantised to 2**-32).

  Bits are a counter-based hash of each element's flat index, fmix32(fmix32(i ^ s0) + s1),
  seeded by two uint32 drawn from `key`: a pure function of (key, index), so the mask is the
  same on any number of devices and after a resume, and about 30x cheaper on CPU than
  threefry bits per element (tests/luna_jax/attention/test_dropout.py checks its statistics)."""
  return keep_from_seeds(dropout_seeds(key), shape, rate)


def _drop(x: Array, seeds: Array | None, rate: float) -> Array:
  """Inverted dropout of x with the mask of `seeds` (identity when seeds is None)."""
  if seeds is None:
    return x
  keep = keep_from_seeds(seeds, x.shape, rate)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Dropout(nn.Module):
  """Inverted dropout (rng stream "dropout") with hash-based masks (`dropout_keep`)."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    return _drop(x, self.seeds(), self.rate)

  def seeds(self) -> Array:
    """This module's mask seeds (the same ones `__call__` would draw)."""
    return dropout_seeds(self.make_rng("dropout"))


def softmax_attend(spec: str, scores: Array, key_mask: Array | None, v: Array, *,
                   dropout_rate: float = 0.0, dropout_seeds: Array | None = None) -> Array:
  """einsum(spec, dropout(masked_softmax(scores, key_mask)), v): attention weights over the
  last axis of `scores` applied to `v`.

  The backward pass keeps only the float32 probabilities (and v): the dropout mask is a hash
  recomputed from its seeds, and the dropped weights are recomputed for dV, so one
  [.., T, S] tensor per attention map stays alive instead of the three to four autodiff keeps.
  Dropout, when `dropout_seeds` is given, equals `Dropout(rate)` with those seeds."""
  scores = scores.astype(jnp.float32)
  if key_mask is not None:
    scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
  if dropout_seeds is None or dropout_rate == 0.0:
    return _attend_weights(spec, 0.0, scores, v, None)
  return _attend_weights(spec, float(dropout_rate), scores, v, dropout_seeds)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend_weights(spec: str, rate: float, scores: Array, v: Array, seeds: Array | None
                    ) -> Array:
  a = _drop(jax.nn.softmax(scores, axis=-1), seeds, rate)
  return jnp.einsum(spec, a.astype(v.dtype), v)


def _attend_weights_fwd(spec, rate, scores, v, seeds):
  y = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(spec, _drop(y, seeds, rate).astype(v.dtype), v)
  return out, (y, v, seeds)


def _attend_weights_bwd(spec, rate, res, g_out):
  # The barrier keeps XLA from merging the recomputed mask and weights with the forward
  # pass's (CSE), which would keep those alive from the forward to the backward pass.
  y, v, seeds = lax.optimization_barrier(res)
  a = _drop(y, seeds, rate).astype(v.dtype)
  _, vjp = jax.vjp(lambda a_, v_: jnp.einsum(spec, a_, v_), a, v)
  da, dv = vjp(g_out)
  dy = _drop(da.astype(jnp.float32), seeds, rate)     # dropout is its own transpose
  ds = y * (dy - jnp.sum(y * dy, axis=-1, keepdims=True))
  return ds, dv, None


_attend_weights.defvjp(_attend_weights_fwd, _attend_weights_bwd)
