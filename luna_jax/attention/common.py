"""Small pieces shared by the attention modules: projections, head reshapes, masks."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
