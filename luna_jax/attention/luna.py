"""Luna: pack/unpack nested attention (Ma et al. 2021), bidirectional form.

Reproduces the official `LunarMultiheadAttention` (fairseq-apollo, `luna_attention.py`):

  pack:    Y_P = concat_h softmax_N( (Lin_pq(P) * dhp**-0.5) Lin_pk(X)^T ) Lin_pv(X)     [l, D]
  unpack:  Y_X = Lin_out( concat_h softmax_l( (Lin_q(X) * dh**-0.5) Lin_k(Y_P)^T ) Lin_v(Y_P) )

The X padding mask masks the pack keys; the P-slot mask masks the unpack keys. The packed context
has no output projection. Tied K/V (`tie_kv`) shares one projection for K and V within each step
(pc on the P side, c on the X side). Both softmaxes run in float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from luna_jax.attention import common

Array = jax.Array


def block_diagonal(x_BxLxHxK: Array) -> Array:
  """[B, l, H, K] -> [B, H*l, H*K]: row (h, j) holds x[:, j, h] in head h's channels."""
  b, l, h, k = x_BxLxHxK.shape
  eye_HxH = jnp.eye(h, dtype=x_BxLxHxK.dtype)
  bd_BxHxLxGxK = jnp.einsum("bjhk,hg->bhjgk", x_BxLxHxK, eye_HxH)
  return bd_BxHxLxGxK.reshape(b, h * l, h * k)


class LunaAttention(nn.Module):
  """Luna attention: returns (unpacked output Y_X [B,N,D], packed context Y_P [B,l,D])."""
  carries_p = True                 # the encoder keeps a packed sequence P for it (models.py)
  num_heads: int
  num_pack_heads: int = 0          # 0 -> num_heads
  tie_kv: bool = False
  dropout_rate: float = 0.0        # attention dropout, on both probability maps
  dtype: jnp.dtype = jnp.float32
  implementation: str = "xla"      # xla | cudnn | auto (common.resolve_implementation)
  qkv_dim: int = 0                 # must be 0 or D: the packed context has no output projection

  def _proj(self, name: str, d: int, gain: float) -> nn.Dense:
    return common.projection(d, name, dtype=self.dtype, gain=gain, fan_in=d,
                             zero_bias=(name == "out_proj"))

  @nn.compact
  def __call__(self, x_BxNxD: Array, mask_BxN: Array | None = None, p_BxLxD: Array | None = None,
               p_mask_BxL: Array | None = None, *, deterministic: bool = True
               ) -> tuple[Array, Array]:
    if p_BxLxD is None:
      raise ValueError("LunaAttention needs the packed sequence p_BxLxD")
    d = x_BxNxD.shape[-1]
    if self.qkv_dim not in (0, d):
      raise ValueError(f"Luna needs qkv_dim == emb_dim ({d}), got {self.qkv_dim}: its packed "
                       "context P' = P + Y_P has no output projection")
    h, hp = self.num_heads, self.num_pack_heads or self.num_heads
    g = 2.0**-0.5  # official gain of the q/k/v projections

    # Pack: P queries attend over X. The X-side projections (pk, pv or pc, and q) are one
    # matmul (`fused_dense`); their parameters keep the official names and shapes.
    pq_BxLxHxK = common.split_heads(self._proj("pq_proj", d, g)(p_BxLxD), hp)
    pq_BxLxHxK = pq_BxLxHxK * (d // hp)**-0.5
    names = ("pc_proj", "q_proj") if self.tie_kv else ("pk_proj", "pv_proj", "q_proj")
    x_params = [common.projection_params(d, n, gain=g, fan_in=d)(d) for n in names]
    *pkv, q_BxNxD = common.fused_dense(x_BxNxD, x_params, self.dtype)
    pk_BxNxD, pv_BxNxD = (pkv[0], pkv[0]) if self.tie_kv else pkv
    l = p_BxLxD.shape[1]
    if self._block_diagonal(hp, l, deterministic):
      pctx_BxLxD = self._pack_block_diagonal(pq_BxLxHxK, pk_BxNxD, pv_BxNxD, mask_BxN,
                                             deterministic)
    else:
      pk_BxNxHxK = common.split_heads(pk_BxNxD, hp)
      pv_BxNxHxK = common.split_heads(pv_BxNxD, hp)
      pctx_BxLxHxK = self._attend(pq_BxLxHxK, pk_BxNxHxK, pv_BxNxHxK, mask_BxN, "pack_attn",
                                  deterministic)
      pctx_BxLxD = common.merge_heads(pctx_BxLxHxK)

    # Unpack: X queries attend over the packed context.
    q_BxNxD = q_BxNxD * (d // h)**-0.5
    if self.tie_kv:
      k_BxLxD = v_BxLxD = self._proj("c_proj", d, g)(pctx_BxLxD)
    else:
      k_BxLxD, v_BxLxD = common.fused_dense(
          pctx_BxLxD, [common.projection_params(d, n, gain=g, fan_in=d)(d)
                       for n in ("k_proj", "v_proj")], self.dtype)
    k_BxLxHxK = common.split_heads(k_BxLxD, h)
    v_BxLxHxK = common.split_heads(v_BxLxD, h)
    if self._block_diagonal(h, l, deterministic):
      o_BxNxD = self._unpack_block_diagonal(q_BxNxD, k_BxLxHxK, v_BxLxHxK, p_mask_BxL,
                                            deterministic)
    else:
      y_BxNxHxK = self._attend(common.split_heads(q_BxNxD, h), k_BxLxHxK, v_BxLxHxK,
                               p_mask_BxL, "unpack_attn", deterministic)
      o_BxNxD = common.merge_heads(y_BxNxHxK)
    y_BxNxD = self._proj("out_proj", d, 1.0)(o_BxNxD)
    return y_BxNxD, pctx_BxLxD

  # With few packed slots, all heads run as one matmul against a block-diagonal [H*l, D]
  # operand (head h's l rows hold its channels, zeros elsewhere): the N-long tensors stay
  # [B, N, D] and are never transposed into heads. The zeros cost H x the (small) attention
  # FLOPs, so this is used while H * l <= BLOCK_DIAGONAL_MAX_SLOTS; the results equal the per-head
  # form up to summation order.
  BLOCK_DIAGONAL_MAX_SLOTS = 64

  def _block_diagonal(self, heads: int, l: int, deterministic: bool) -> bool:
    dropout_active = not deterministic and self.dropout_rate > 0.0
    impl = common.resolve_implementation(self.implementation, self.dtype, dropout_active)
    return impl == "xla" and heads * l <= self.BLOCK_DIAGONAL_MAX_SLOTS

  def _pack_block_diagonal(self, pq_BxLxHxK: Array, pk_BxNxD: Array, pv_BxNxD: Array,
                           mask_BxN: Array | None, deterministic: bool) -> Array:
    """Pack for all heads at once: [B, H*l, D] queries x [B, N, D] keys -> context [B, l, D]."""
    b, l, h, k = pq_BxLxHxK.shape
    pq_BxMxD = block_diagonal(pq_BxLxHxK)                       # M = H * l, rows (h, j)
    s_BxMxN = jnp.einsum("bmd,bnd->bmn", pq_BxMxD, pk_BxNxD,
                         preferred_element_type=jnp.float32)
    mask = None if mask_BxN is None else mask_BxN[:, None, :]
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "pack_attn",
               common.masked_softmax(s_BxMxN, mask).reshape(b, h, l, -1))
    c_BxMxD = self._softmax_attend("bmn,bnd->bmd", s_BxMxN, mask, pv_BxNxD, deterministic)
    # Row (h, j) needs only head h's channels: take the diagonal blocks.
    c_BxHxLxGxK = c_BxMxD.reshape(b, h, l, h, k)
    ctx_BxLxHxK = jnp.einsum("bhlgk,hg->blhk", c_BxHxLxGxK, jnp.eye(h, dtype=c_BxMxD.dtype))
    return common.merge_heads(ctx_BxLxHxK)

  def _unpack_block_diagonal(self, q_BxNxD: Array, k_BxLxHxK: Array, v_BxLxHxK: Array,
                             p_mask_BxL: Array | None, deterministic: bool) -> Array:
    """Unpack for all heads at once: [B, N, D] queries x [B, H*l, D] keys -> [B, N, D]
    (heads already merged)."""
    b, l, h, _ = k_BxLxHxK.shape
    n = q_BxNxD.shape[1]
    k_BxMxD, v_BxMxD = block_diagonal(k_BxLxHxK), block_diagonal(v_BxLxHxK)
    s_BxNxHxL = jnp.einsum("bnd,bmd->bnm", q_BxNxD, k_BxMxD,
                           preferred_element_type=jnp.float32).reshape(b, n, h, l)
    mask = None if p_mask_BxL is None else p_mask_BxL[:, None, None, :]
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "unpack_attn",
               common.masked_softmax(s_BxNxHxL, mask).transpose(0, 2, 1, 3))
    v_BxHxLxD = v_BxMxD.reshape(b, h, l, -1)
    return self._softmax_attend("bnhl,bhld->bnd", s_BxNxHxL, mask, v_BxHxLxD, deterministic)

  def _softmax_attend(self, spec: str, scores: Array, key_mask: Array | None, v: Array,
                      deterministic: bool) -> Array:
    """einsum(spec, dropout(masked_softmax(scores)), v) with the lean backward pass of
    `common.softmax_attend`."""
    seeds = None
    if not deterministic and self.dropout_rate > 0.0:
      seeds = common.Dropout(self.dropout_rate).seeds()
    return common.softmax_attend(spec, scores, key_mask, v, dropout_rate=self.dropout_rate,
                                 dropout_seeds=seeds)

  def _attend(self, q_BxTxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
              key_mask_BxS: Array | None, name: str, deterministic: bool) -> Array:
    """Scaled-already softmax attention over S keys; sows the map when asked."""
    dropout_active = not deterministic and self.dropout_rate > 0.0
    impl = common.resolve_implementation(self.implementation, self.dtype, dropout_active)
    if impl == "cudnn" and not self.is_mutable_collection("intermediates"):
      if dropout_active:
        raise ValueError("implementation='cudnn' has no attention dropout; use 'xla' or 'auto'")
      # Key masks are prefixes here (right padding, dynamic projection): lengths suffice.
      return common.fused_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, key_mask_BxS, scale=1.0)
    s_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                           preferred_element_type=jnp.float32)
    mask = None if key_mask_BxS is None else key_mask_BxS[:, None, None, :]
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", name, common.masked_softmax(s_BxHxTxS, mask))
    return self._softmax_attend("bhts,bshk->bthk", s_BxHxTxS, mask, v_BxSxHxK, deterministic)
