"""Small pieces shared by the attention modules and the models: projections, head reshapes,
masks, dropout."""
from __future__ import annotations

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


def masked_softmax(scores: Array, key_mask: Array | None) -> Array:
  """Float32 softmax over the last axis; `key_mask` (True = keep) broadcasts against scores."""
  scores = scores.astype(jnp.float32)
  if key_mask is not None:
    scores = jnp.where(key_mask, scores, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores, axis=-1)


def zero_masked(x_BxNx_: Array, mask_BxN: Array | None) -> Array:
  """Zeroes rows where mask is False (padding) so they contribute nothing to sums."""
  if mask_BxN is None:
    return x_BxNx_
  shape = mask_BxN.shape + (1,) * (x_BxNx_.ndim - mask_BxN.ndim)
  return x_BxNx_ * mask_BxN.reshape(shape).astype(x_BxNx_.dtype)


IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def resolve_implementation(implementation: str, dtype: Dtype, dropout_active: bool) -> str:
  """The attention path a softmax step takes (`implementation` of softmax and Luna):
  "xla": einsum scores, float32 masked softmax, attention dropout, einsum with V.
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention; GPU
    only, 16-bit dtypes, no attention dropout, no attention maps, padding as key lengths (so it
    assumes right padding, as every LRA task pads).
  "auto": "cudnn" on a GPU with a 16-bit dtype and no active attention dropout, else "xla"."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; valid: {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  cudnn_ok = (jax.default_backend() == "gpu" and not dropout_active
              and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
  return "cudnn" if cudnn_ok else "xla"


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


def dropout_keep(key: Array, shape: tuple[int, ...], rate: float) -> Array:
  """Bool keep-mask with P(keep) = 1 - rate (rate quantised to 2**-32).

  Bits are a counter-based hash of each element's flat index, fmix32(fmix32(i ^ s0) + s1),
  seeded by two uint32 drawn from `key`: a pure function of (key, index), so the mask is the
  same on any number of devices and after a resume, and about 30x cheaper on CPU than
  threefry bits per element (tests/luna_jax/attention/test_dropout.py checks its statistics)."""
  s = jax.random.bits(key, (2,), jnp.uint32)
  size = 1
  for dim in shape:
    size *= dim
  idx = lax.iota(jnp.uint32, size).reshape(shape)
  bits = _fmix32(_fmix32(idx ^ s[0]) + s[1])
  return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (rng stream "dropout") with hash-based masks (`dropout_keep`)."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    keep = dropout_keep(self.make_rng("dropout"), x.shape, self.rate)
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))
