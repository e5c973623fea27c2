"""Luna attention and the post-LN Luna encoder layer in PyTorch: the "official speed" stand-in.

This is a clean-room rendering of the semantics of the official PyTorch modules
(`LunarMultiheadAttention` and `LunaSentenceEncoderLayer` of XuezheMax/fairseq-apollo, paper-era
commit 1ea2f78), written from the description in shared/reference/luna.md sections 1-2 and not
copied from that (or any other) code base. It is validated against the outputs of the official
modules in tests/fixtures/luna_vectors.npz (`python -m benchmarks.torch_reference.check`).

It keeps the op structure of the official fairseq module so that timing it stands in for timing
the official code: time-major inputs, one `nn.Linear` per projection, heads folded into the batch
dimension, `torch.bmm` for scores and contexts, additive -inf masking through `masked_fill`, and
`F.softmax` computed in float32. Parameter names are the official state-dict names, so official
weights load by name (`load_flat_state_dict` reads the fixture's '.' -> '_' flattened names).

Conventions (fairseq): x is [N, B, D], the packed sequence p is [l, B, D]; `key_padding_mask`
[B, N] and `pkey_padding_mask` [B, l] are True where a position is padding / a slot is masked.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-5


class LunaAttentionTorch(nn.Module):
  """Bidirectional Luna attention (pack, then unpack).

  pack:    Y_P = concat_h softmax_N((Lin_pq(P) * dhp**-0.5) Lin_pk(X)^T) Lin_pv(X)        [l,B,D]
  unpack:  Y_X = Lin_out(concat_h softmax_l((Lin_q(X) * dh**-0.5) Lin_k(Y_P)^T) Lin_v(Y_P)) [N,B,D]

  Untied: projections pq, pk, pv, q, k, v, out. Tied K/V (`tie_kv`): pq, pc, q, c, out, where
  pc replaces pk = pv and c replaces k = v. The X padding mask masks the pack keys only; the
  P-slot mask masks the unpack keys only. Attention dropout applies to both probability maps.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_pheads: Optional[int] = None,
               dropout: float = 0.0, tie_kv: bool = False, bias: bool = True):
    super().__init__()
    self.embed_dim = embed_dim
    self.num_heads = num_heads
    self.num_pheads = num_pheads or num_heads
    self.dropout = dropout
    self.tie_kv = tie_kv
    if embed_dim % self.num_heads or embed_dim % self.num_pheads:
      raise ValueError(f"embed_dim {embed_dim} is not divisible by the number of heads "
                       f"({self.num_heads}, pack {self.num_pheads})")
    self.head_dim = embed_dim // self.num_heads
    self.phead_dim = embed_dim // self.num_pheads
    self.scaling = self.head_dim**-0.5
    self.pscaling = self.phead_dim**-0.5

    self.pq_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
    if tie_kv:
      self.pc_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
      self.c_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
    else:
      self.pk_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
      self.pv_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
      self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
      self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
    self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
    self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
    self.reset_parameters()

  def reset_parameters(self) -> None:
    """Official init: xavier_uniform(gain 1/sqrt 2) on the q/k/v-type projections (biases keep
    torch's default), xavier_uniform(gain 1) with a zero bias on out_proj."""
    names = ("pq", "pc", "q", "c") if self.tie_kv else ("pq", "pk", "pv", "q", "k", "v")
    for n in names:
      nn.init.xavier_uniform_(getattr(self, f"{n}_proj").weight, gain=1 / math.sqrt(2))
    nn.init.xavier_uniform_(self.out_proj.weight)
    if self.out_proj.bias is not None:
      nn.init.zeros_(self.out_proj.bias)

  @staticmethod
  def _attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], batch: int,
              heads: int, dropout: float, training: bool) -> tuple[Tensor, Tensor]:
    """q [B*H, T, dh] (already scaled), k, v [B*H, S, dh], key_mask [B, S] True = masked.
    Returns (context [B*H, T, dh], probabilities [B*H, T, S])."""
    scores = torch.bmm(q, k.transpose(1, 2))
    if key_mask is not None:
      t, s = scores.shape[1:]
      scores = scores.view(batch, heads, t, s).masked_fill(
          key_mask[:, None, None, :].to(torch.bool), float("-inf")).view(batch * heads, t, s)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
    dropped = F.dropout(probs, p=dropout, training=training)
    return torch.bmm(dropped, v), probs

  def forward(self, query: Tensor, pquery: Tensor, key_padding_mask: Optional[Tensor] = None,
              pkey_padding_mask: Optional[Tensor] = None, need_weights: bool = False
              ) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """query x [N, B, D], pquery p [l, B, D] -> (out [N, B, D], pcontext [l, B, D]), plus the
    unpack attention probabilities [H, B, N, l] when `need_weights`."""
    n, b, d = query.shape
    l = pquery.shape[0]
    h, hp = self.num_heads, self.num_pheads

    # Pack: P queries attend over X.
    pq = self.pq_proj(pquery) * self.pscaling
    if self.tie_kv:
      pk = pv = self.pc_proj(query)
    else:
      pk = self.pk_proj(query)
      pv = self.pv_proj(query)
    pq = pq.view(l, b * hp, self.phead_dim).transpose(0, 1)
    pk = pk.view(n, b * hp, self.phead_dim).transpose(0, 1)
    pv = pk if self.tie_kv else pv.view(n, b * hp, self.phead_dim).transpose(0, 1)
    pctx, _ = self._attend(pq, pk, pv, key_padding_mask, b, hp, self.dropout, self.training)
    pcontext = pctx.transpose(0, 1).reshape(l, b, d)

    # Unpack: X queries attend over the packed context (no output projection on it).
    q = self.q_proj(query) * self.scaling
    if self.tie_kv:
      k = v = self.c_proj(pcontext)
    else:
      k = self.k_proj(pcontext)
      v = self.v_proj(pcontext)
    q = q.view(n, b * h, self.head_dim).transpose(0, 1)
    k = k.view(l, b * h, self.head_dim).transpose(0, 1)
    v = k if self.tie_kv else v.view(l, b * h, self.head_dim).transpose(0, 1)
    ctx, probs = self._attend(q, k, v, pkey_padding_mask, b, h, self.dropout, self.training)
    out = self.out_proj(ctx.transpose(0, 1).reshape(n, b, d))
    if need_weights:
      return out, pcontext, probs.view(b, h, n, l).transpose(0, 1)
    return out, pcontext


class LunaEncoderLayerTorch(nn.Module):
  """Post-LN Luna encoder layer (the LRA setting):

    Y_X, Y_P = LunaAttention(X, P, x_pad, p_pad)
    X1 = LN_attn(X + dropout(Y_X));  P' = LN_proj(P + dropout(Y_P))     (P: no FFN)
    X' = LN_final(X1 + dropout(fc2(act_dropout(gelu(fc1(X1))))))       (exact erf GELU)
  """

  def __init__(self, embed_dim: int = 256, ffn_embed_dim: int = 1024, num_heads: int = 4,
               num_pheads: Optional[int] = None, dropout: float = 0.0,
               attention_dropout: float = 0.0, activation_dropout: float = 0.0,
               tie_kv: bool = False):
    super().__init__()
    self.dropout = dropout
    self.activation_dropout = activation_dropout
    self.self_attn = LunaAttentionTorch(embed_dim, num_heads, num_pheads,
                                        dropout=attention_dropout, tie_kv=tie_kv)
    self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
    self.self_atten_proj_layer_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
    self.fc1 = nn.Linear(embed_dim, ffn_embed_dim)
    self.fc2 = nn.Linear(ffn_embed_dim, embed_dim)
    self.final_layer_norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

  def forward(self, x: Tensor, px: Tensor, x_padding_mask: Optional[Tensor] = None,
              px_padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """x [N, B, D], px [l, B, D] -> (x' [N, B, D], px' [l, B, D])."""
    y, yp = self.self_attn(x, px, x_padding_mask, px_padding_mask)
    x = self.self_attn_layer_norm(x + F.dropout(y, p=self.dropout, training=self.training))
    px = self.self_atten_proj_layer_norm(
        px + F.dropout(yp, p=self.dropout, training=self.training))
    hid = F.gelu(self.fc1(x))
    hid = F.dropout(hid, p=self.activation_dropout, training=self.training)
    hid = F.dropout(self.fc2(hid), p=self.dropout, training=self.training)
    return self.final_layer_norm(x + hid), px


def load_flat_state_dict(module: nn.Module, flat: Mapping[str, np.ndarray], prefix: str = ""
                         ) -> None:
  """Loads official weights stored under flattened names (`prefix` + state-dict name with
  '.' -> '_', as in tests/fixtures/luna_vectors.npz). Every parameter must be present."""
  state = {}
  for name, ref in module.state_dict().items():
    key = prefix + name.replace(".", "_")
    if key not in flat:
      raise KeyError(f"no weight {key!r} for parameter {name!r}")
    value = torch.as_tensor(np.asarray(flat[key]), dtype=ref.dtype)
    if value.shape != ref.shape:
      raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}")
    state[name] = value
  module.load_state_dict(state, strict=True)
