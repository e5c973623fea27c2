"""Softmax attention over blocks of keys (and queries) with an online softmax.

`blocked_attention` computes what `common.softmax_attend` computes for softmax attention
(float32 masked softmax of scale * Q K^T, attention dropout with the same hash masks, product
with V) without building the [B, H, T, S] scores: a scan over key blocks keeps, per query row,
the running max, the running sum of exponentials and the running weighted sum of values
(flash-attention style). The loops run over groups of examples, query blocks and key blocks, so
one step holds O(G H T_block S_block) scores, and the whole call O(B H T K) besides its inputs,
instead of O(B H T S). A group holds G = gcd(B, device count) examples, one from each
contiguous batch shard, so a batch sharded over the devices (data parallel) stays sharded: each
device loops over its own examples. On one device G = 1.

Its custom VJP keeps only the output and, per query row, the max and the sum of exponentials;
the backward pass recomputes each block's scores and probabilities from them.

Same function as the XLA form, including its edge cases:
* masked scores are float32's lowest value, as in `common.masked_softmax`, so a query row with no
  visible key gets uniform weights over all S keys (masked ones included), as there;
* the dropout keep bit of element (b, h, t, s) is the hash of its flat index in the [B, H, T, S]
  mask (`common.keep_at`), so each block computes exactly its slice of the XLA form's mask;
* blocks past the end of T or S (padding up to a whole block) weigh exactly nothing.
A block whose scores are all masked for every example of its group is skipped (causal blocks
above the diagonal; key blocks past the examples' lengths, so with G = 1 a padded batch costs in
proportion to its real keys) unless some query row of the block sees no key at all (it needs
every key, as above).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from luna_jax.attention import common

Array = jax.Array
_LOWEST = float(jnp.finfo(jnp.float32).min)   # a masked score, as in common.masked_softmax
_NO_KEY = jnp.iinfo(jnp.int32).max             # first visible key of an example that has none


class _Blocks(NamedTuple):
  """Static description of one call: scale, causal, dropout rate, sizes and block sizes."""
  scale: float
  causal: bool
  rate: float
  b: int       # examples
  h: int       # heads
  t: int       # queries
  s: int       # keys
  g: int       # examples per group (per loop step)
  bq: int      # queries per block
  bk: int      # keys per block

  @property
  def nq(self) -> int:
    return -(-self.t // self.bq)

  @property
  def nk(self) -> int:
    return -(-self.s // self.bk)


def blocked_attention(q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                      key_mask_BxS: Array | None = None, *, scale: float, causal: bool = False,
                      dropout_rate: float = 0.0, dropout_seeds: Array | None = None,
                      block_size: int = 128, query_block_size: int = 0,
                      batch_group: int = 0) -> Array:
  """softmax(scale * Q K^T, masked) V per head, over blocks: o_BxTxHxK in v's dtype.

  `key_mask_BxS`: True = attend. `causal`: query t sees keys s <= t. `dropout_seeds` (from
  `common.Dropout(rate).seeds()`) turns on attention dropout with the masks of the XLA form.
  `block_size` keys and `query_block_size` queries (0: all T) per step; `batch_group` examples
  per step (0: gcd(B, device count), one per data-parallel shard; it must divide B)."""
  b, t, h, _ = q_BxTxHxK.shape
  s = k_BxSxHxK.shape[1]
  g = batch_group or math.gcd(b, jax.device_count())
  if block_size < 1 or query_block_size < 0 or b % g:
    raise ValueError(f"block_size={block_size} must be >= 1, query_block_size="
                     f"{query_block_size} >= 0, batch_group={batch_group} divide B={b}")
  rate = float(dropout_rate) if dropout_seeds is not None else 0.0
  if rate >= 1.0:
    raise ValueError(f"dropout_rate={dropout_rate} must be < 1")
  cfg = _Blocks(float(scale), bool(causal), rate, b, h, t, s, g, min(query_block_size or t, t),
                min(block_size, s))
  mask = None if key_mask_BxS is None else key_mask_BxS.astype(bool)
  return _attention(cfg, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask,
                    dropout_seeds if rate > 0.0 else None)


# ------------------------------------------------------------------------------- layouts
# Example b = g * (B / G) + r is member g of group r: a contiguous shard of the batch holds the
# same members of every group.


def _to_blocks(cfg: _Blocks, x_BxNxHxK: Array, block: int, num: int) -> Array:
  """[B, N, H, K] -> [B/G, num, G, H, block, K], zero-padded to num * block rows."""
  b, n, h, k = x_BxNxHxK.shape
  x = jnp.pad(x_BxNxHxK, ((0, 0), (0, num * block - n), (0, 0), (0, 0)))
  return x.reshape(cfg.g, b // cfg.g, num, block, h, k).transpose(1, 2, 0, 4, 3, 5)


def _from_blocks(cfg: _Blocks, x_RxMxGxHxCxK: Array, n: int) -> Array:
  """[B/G, num, G, H, block, K] -> [B, n, H, K] (padding rows dropped)."""
  r, m, g, h, c, k = x_RxMxGxHxCxK.shape
  return x_RxMxGxHxCxK.transpose(2, 0, 1, 4, 3, 5).reshape(g * r, m * c, h, k)[:, :n]


def _rows_to_blocks(cfg: _Blocks, x_BxTxH: Array) -> Array:
  """Per-row values [B, T, H] -> [B/G, nq, G, H, bq]."""
  return _to_blocks(cfg, x_BxTxH[..., None], cfg.bq, cfg.nq)[..., 0]


def _groups(cfg: _Blocks, x_Bx_: Array) -> Array:
  """[B, ...] -> [B/G, G, ...]."""
  return jnp.swapaxes(x_Bx_.reshape(cfg.g, cfg.b // cfg.g, *x_Bx_.shape[1:]), 0, 1)


class _KeyBlocks(NamedTuple):
  """One group's keys by block (the xs of the scans over key blocks), leading axis nk."""
  k: Array            # [nk, G, H, bk, K]
  v: Array            # [nk, G, H, bk, K]
  mask: Array | None  # [nk, G, bk] (False past S)
  j: Array            # [nk] block index


def _mask_blocks(cfg: _Blocks, mask_BxS: Array | None) -> Array | None:
  """[B, S] -> [B/G, nk, G, bk], False past S."""
  if mask_BxS is None:
    return None
  padded = jnp.pad(mask_BxS, ((0, 0), (0, cfg.nk * cfg.bk - cfg.s)))
  return jnp.swapaxes(_groups(cfg, padded).reshape(-1, cfg.g, cfg.nk, cfg.bk), 1, 2)


def _first_visible(cfg: _Blocks, mask_BxS: Array | None) -> Array:
  """[B/G, G] int32: each example's first key to attend to (_NO_KEY: none)."""
  if mask_BxS is None:
    return jnp.zeros((cfg.b // cfg.g, cfg.g), jnp.int32)
  first = jnp.where(mask_BxS.any(-1), jnp.argmax(mask_BxS, -1).astype(jnp.int32), _NO_KEY)
  return _groups(cfg, first)


def _members(cfg: _Blocks) -> Array:
  """[B/G, G] int32: the example index of each member of each group."""
  return _groups(cfg, jnp.arange(cfg.b, dtype=jnp.int32))


def _blind(cfg: _Blocks, first_G: Array, i: Array) -> Array:
  """Whether query block i of the group holds a row that sees no key (some example's)."""
  if cfg.causal:   # row t sees no key iff t < first
    return (i * cfg.bq < first_G).any()
  return (first_G == _NO_KEY).any()


# ------------------------------------------------------------------------------- one tile


def _unless_skipped(cfg: _Blocks, tile, skip, carry, kb: _KeyBlocks, i: Array, blind: Array):
  """tile(carry, kb), or skip(carry, kb) when tile (query block i, key block j) of the group
  has no visible score and no row of the query block is blind."""
  if not cfg.causal and kb.mask is None:
    return tile(carry, kb)
  cols = kb.j * cfg.bk + jnp.arange(cfg.bk)
  visible = cols < cfg.s if kb.mask is None else kb.mask
  if cfg.causal:
    visible = visible & (cols <= jnp.minimum((i + 1) * cfg.bq, cfg.t) - 1)
  return lax.cond(visible.any() | blind, tile, skip, carry, kb)


def _keep(cfg: _Blocks, kb: _KeyBlocks, i: Array) -> Array | None:
  """[G|1, 1, bq|1, bk] bool: visible scores of the tile (None: all)."""
  keep = None if kb.mask is None else kb.mask[:, None, None, :]
  if cfg.causal:
    rows = i * cfg.bq + jnp.arange(cfg.bq)
    cols = kb.j * cfg.bk + jnp.arange(cfg.bk)
    causal = (cols[None, :] <= rows[:, None])[None, None]
    keep = causal if keep is None else keep & causal
  return keep


def _scores(cfg: _Blocks, q_GxHxQxK: Array, kb: _KeyBlocks, keep: Array | None) -> Array:
  """Float32 masked scores [G, H, bq, bk] of the tile; keys past S are -inf (they weigh nothing
  even in a row that sees no key, where masked keys weigh as much as any)."""
  s = jnp.einsum("ghqk,ghck->ghqc", q_GxHxQxK, kb.k,
                 preferred_element_type=jnp.float32) * cfg.scale
  if keep is not None:
    s = jnp.where(keep, s, _LOWEST)
  if cfg.nk * cfg.bk > cfg.s:
    cols = kb.j * cfg.bk + jnp.arange(cfg.bk)
    s = jnp.where(cols < cfg.s, s, -jnp.inf)
  return s


def _dropout_scale(cfg: _Blocks, seeds: Array, members_G: Array, i: Array, j: Array) -> Array:
  """[G, H, bq, bk] float32: 1/(1-rate) where the XLA form's [B, H, T, S] mask keeps, else 0."""
  shape = (cfg.g, cfg.h, cfg.bq, cfg.bk)
  _, h_, t_, s_ = (lax.broadcasted_iota(jnp.uint32, shape, d) for d in range(4))
  rows = t_ + (i * cfg.bq).astype(jnp.uint32)
  cols = s_ + (j * cfg.bk).astype(jnp.uint32)
  bh = members_G.astype(jnp.uint32)[:, None, None, None] * jnp.uint32(cfg.h) + h_
  idx = (bh * jnp.uint32(cfg.t) + rows) * jnp.uint32(cfg.s) + cols
  keep = common.keep_at(seeds, idx, cfg.rate)
  return jnp.where(keep, jnp.float32(1.0 / (1.0 - cfg.rate)), jnp.float32(0.0))


# ------------------------------------------------------------------------------- forward


def _forward_query_block(cfg: _Blocks, keys: _KeyBlocks, seeds: Array | None,
                         q_GxHxQxK: Array, members_G: Array, i: Array, blind: Array
                         ) -> tuple[Array, Array, Array]:
  """(output [G, H, bq, K] float32, row max [G, H, bq], row sum of exp [G, H, bq]) of one
  group's query block."""

  def tile(carry, kb: _KeyBlocks):
    m, l, acc = carry
    s = _scores(cfg, q_GxHxQxK, kb, _keep(cfg, kb, i))
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    if seeds is not None:
      p = p * _dropout_scale(cfg, seeds, members_G, i, kb.j)
    pv = jnp.einsum("ghqc,ghck->ghqk", p.astype(kb.v.dtype), kb.v,
                    preferred_element_type=jnp.float32)
    return m_new, l, alpha[..., None] * acc + pv

  def step(carry, kb: _KeyBlocks):
    return _unless_skipped(cfg, tile, lambda c, _: c, carry, kb, i, blind), None

  rows = q_GxHxQxK.shape[:3]
  init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros((*rows, keys.v.shape[-1]), jnp.float32))
  (m, l, acc), _ = lax.scan(step, init, keys)
  return acc / l[..., None], m, l


def _forward(cfg: _Blocks, q, k, v, mask, seeds):

  def group(xs):
    q_r, k_r, v_r, mask_r, first_G, members_G = xs
    keys = _KeyBlocks(k_r, v_r, mask_r, jnp.arange(cfg.nk))
    return lax.map(lambda x: _forward_query_block(cfg, keys, seeds, x[0], members_G, x[1],
                                                  _blind(cfg, first_G, x[1])),
                   (q_r, jnp.arange(cfg.nq)))

  o, m, l = lax.map(group, (_to_blocks(cfg, q, cfg.bq, cfg.nq),
                            _to_blocks(cfg, k, cfg.bk, cfg.nk), _to_blocks(cfg, v, cfg.bk, cfg.nk),
                            _mask_blocks(cfg, mask), _first_visible(cfg, mask), _members(cfg)))
  return _from_blocks(cfg, o, cfg.t).astype(v.dtype), (m, l)   # m, l: [B/G, nq, G, H, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Blocks, q: Array, k: Array, v: Array, mask: Array | None,
               seeds: Array | None) -> Array:
  return _forward(cfg, q, k, v, mask, seeds)[0]


def _attention_fwd(cfg, q, k, v, mask, seeds):
  o, (m, l) = _forward(cfg, q, k, v, mask, seeds)
  return o, (q, k, v, mask, seeds, o, m, l)


# ------------------------------------------------------------------------------- backward


def _backward_group(cfg: _Blocks, seeds: Array | None, xs):
  """dq [nq, G, H, bq, K], dk and dv [nk, G, H, bk, K] (float32) of one group."""
  q_r, g_r, m_r, l_r, d_r, k_r, v_r, mask_r, first_G, members_G = xs
  keys = _KeyBlocks(k_r, v_r, mask_r, jnp.arange(cfg.nk))

  def query_block(dkv, xs):
    q_i, g_i, m_i, l_i, d_i, i = xs

    def tile(dq, kb: _KeyBlocks):
      keep = _keep(cfg, kb, i)
      s = _scores(cfg, q_i, kb, keep)
      y = jnp.exp(s - m_i[..., None]) / l_i[..., None]            # softmax weights
      da = jnp.einsum("ghqk,ghck->ghqc", g_i, kb.v, preferred_element_type=jnp.float32)
      a = y
      if seeds is not None:
        z = _dropout_scale(cfg, seeds, members_G, i, kb.j)
        a, da = y * z, da * z                                     # dropout is its own transpose
      dv = jnp.einsum("ghqc,ghqk->ghck", a.astype(g_i.dtype), g_i,
                      preferred_element_type=jnp.float32)
      ds = y * (da - d_i[..., None])
      if keep is not None:
        ds = jnp.where(keep, ds, 0.0)
      ds = (ds * cfg.scale).astype(q_i.dtype)
      dq = dq + jnp.einsum("ghqc,ghck->ghqk", ds, kb.k, preferred_element_type=jnp.float32)
      dk = jnp.einsum("ghqc,ghqk->ghck", ds, q_i, preferred_element_type=jnp.float32)
      return dq, (dk, dv)

    def skip(dq, kb: _KeyBlocks):
      zeros = jnp.zeros(kb.k.shape, jnp.float32)
      return dq, (zeros, zeros)

    def step(dq, kb: _KeyBlocks):
      return _unless_skipped(cfg, tile, skip, dq, kb, i, _blind(cfg, first_G, i))

    dq, (dk, dv) = lax.scan(step, jnp.zeros(q_i.shape, jnp.float32), keys)
    return (dkv[0] + dk, dkv[1] + dv), dq

  zeros = jnp.zeros(k_r.shape, jnp.float32)
  (dk, dv), dq = lax.scan(query_block, (zeros, zeros),
                          (q_r, g_r, m_r, l_r, d_r, jnp.arange(cfg.nq)))
  return dq, dk, dv


def _attention_bwd(cfg, res, g_BxTxHxK):
  q, k, v, mask, seeds, o, m, l = res
  # sum_s a_ts dA_ts = sum_k dO_tk O_tk (dropout included: O is the dropped output)
  d_BxTxH = jnp.einsum("bthk,bthk->bth", g_BxTxHxK.astype(jnp.float32), o.astype(jnp.float32))
  g = g_BxTxHxK.astype(v.dtype)
  dq, dk, dv = lax.map(
      functools.partial(_backward_group, cfg, seeds),
      (_to_blocks(cfg, q, cfg.bq, cfg.nq), _to_blocks(cfg, g, cfg.bq, cfg.nq), m, l,
       _rows_to_blocks(cfg, d_BxTxH), _to_blocks(cfg, k, cfg.bk, cfg.nk),
       _to_blocks(cfg, v, cfg.bk, cfg.nk), _mask_blocks(cfg, mask), _first_visible(cfg, mask),
       _members(cfg)))
  return (_from_blocks(cfg, dq, cfg.t).astype(q.dtype),
          _from_blocks(cfg, dk, cfg.s).astype(k.dtype),
          _from_blocks(cfg, dv, cfg.s).astype(v.dtype), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
