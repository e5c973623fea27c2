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
    pk_BxNxHxK = common.split_heads(pk_BxNxD, hp)
    pv_BxNxHxK = common.split_heads(pv_BxNxD, hp)
    pctx_BxLxHxK = self._attend(pq_BxLxHxK, pk_BxNxHxK, pv_BxNxHxK, mask_BxN, "pack_attn",
                                deterministic)
    pctx_BxLxD = common.merge_heads(pctx_BxLxHxK)

    # Unpack: X queries attend over the packed context.
    q_BxNxHxK = common.split_heads(q_BxNxD, h) * (d // h)**-0.5
    if self.tie_kv:
      k_BxLxD = v_BxLxD = self._proj("c_proj", d, g)(pctx_BxLxD)
    else:
      k_BxLxD, v_BxLxD = common.fused_dense(
          pctx_BxLxD, [common.projection_params(d, n, gain=g, fan_in=d)(d)
                       for n in ("k_proj", "v_proj")], self.dtype)
    k_BxLxHxK = common.split_heads(k_BxLxD, h)
    v_BxLxHxK = common.split_heads(v_BxLxD, h)
    y_BxNxHxK = self._attend(q_BxNxHxK, k_BxLxHxK, v_BxLxHxK, p_mask_BxL, "unpack_attn",
                             deterministic)
    y_BxNxD = self._proj("out_proj", d, 1.0)(common.merge_heads(y_BxNxHxK))
    return y_BxNxD, pctx_BxLxD

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
    a_BxHxTxS = common.masked_softmax(s_BxHxTxS, mask)
    self.sow("intermediates", name, a_BxHxTxS)
    if not deterministic and self.dropout_rate > 0.0:
      a_BxHxTxS = common.Dropout(self.dropout_rate)(a_BxHxTxS, deterministic=False)
    return jnp.einsum("bhts,bshk->bthk", a_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)
