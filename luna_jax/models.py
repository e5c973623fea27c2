"""LRA classifiers: the Luna encoder (post-LN, P updated per layer) and a generic encoder that
runs any attention of the family, plus the classification head and the Retrieval dual encoder.

Luna follows the official `LunaSentenceEncoder` for LRA (see ../shared/reference/luna.md §2-3):
learned positions (pads get none), a learned P [l, D], dynamic projection (slot j of example b is
masked when j >= number of real tokens of b), separate embedding LayerNorms for x and P, post-LN
layers, CLS or mean readout, Dense -> ReLU -> Dense(no bias) head.

Readouts (`readout`): "cls" reads position 0, where the task put a CLS token; "first" reads
position 0 of a sequence without CLS (the LRA Retrieval code); "mean" averages over the real
tokens; "mean_padded" sums the real tokens' outputs and divides by the padded length N (the
Nystromformer LRA code: outputs zeroed at pads, then a mean over all positions).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from luna_jax.attention import common, get_attention

Array = jax.Array
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static, hashable model description (built from `config.model` and the task)."""
  vocab_size: int
  num_classes: int
  max_len: int                         # length of the position table
  pad_id: int | None = 0               # None: no padding (Image, Pathfinder)
  num_docs: int = 1                    # 2: Retrieval dual encoder
  attention: str = "luna"
  attention_kwargs: tuple[tuple[str, Any], ...] = ()   # mechanism-specific options
  proj_len: int = 16
  num_layers: int = 1
  emb_dim: int = 128
  num_heads: int = 4
  num_pack_heads: int = 0              # 0 -> num_heads
  mlp_dim: int = 256
  tie_kv: bool = False
  tie_layer_weights: bool = False
  dynamic_projection: bool = True
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation_dropout: float = 0.0
  block: str = "post_ln"               # "post_ln" (Luna: always) or "pre_ln" (LRA reference)
  positions: str = "learned"           # "learned" or "sinusoidal"
  embedding: str = "tokens"            # "tokens", "linear" (pixel value / 255 through a Dense)
                                       # or "patches" (square image, patch_size^2 values / 255
                                       # through a Dense: (S / patch_size)^2 tokens)
  patch_size: int = 0                  # "patches" only
  readout: str = "cls"                 # cls | first | mean | mean_padded (module docstring)
  readout_length: int = 0              # mean_padded divides by this (0: the input's N); set to
                                       # config.seq_len so length-bucketed batches are exact
  classifier_dim: int = 256
  classifier_layers: int = 1           # hidden layers of the head: widths C, C/2, ...
  classifier_bias: bool = False        # bias on the head's last Dense (Luna: none)
  retrieval_combine: str = "luna"      # luna: [doc2, doc1]; concat: [u, v];
                                       # interact: [u, v, u*v, u-v]
  qkv_dim: int = 0                     # attention width (all heads); 0 -> emb_dim
  qkv_bias: bool = False               # biases on the non-Luna q/k/v/out projections
  dtype: str = "float32"               # compute dtype; params and softmax stay float32
  remat: bool = False

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model: Any, **task_facts: Any) -> "ModelConfig":
    """`config.model` plus the task's facts (vocab_size, num_classes, max_len, pad_id,
    num_docs). Fields of `config.model` that are not model fields (init, redraw_every, the
    mechanism option groups) are left out; the chosen mechanism's group becomes
    `attention_kwargs`."""
    m = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    names = {f.name for f in dataclasses.fields(cls)} - {"attention_kwargs"}
    kwargs = {k: v for k, v in m.items() if k in names and k not in task_facts}
    options = m.get(m.get("attention", "luna")) or {}
    return cls(**kwargs, **task_facts, attention_kwargs=tuple(sorted(options.items())))


def torch_linear(features: int, fan_in: int, name: str, use_bias: bool = True,
                 dtype: Any = jnp.float32) -> nn.Dense:
  """A Dense with torch.nn.Linear's default init: weight and bias U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  uniform = lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound)
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=uniform, bias_init=uniform, name=name)


def layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, name=name)


class FeedForward(nn.Module):
  """fc2(dropout_act(gelu(fc1(x)))), exact (erf) GELU."""
  mlp_dim: int
  activation_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: Array, deterministic: bool) -> Array:
    d = x_BxNxD.shape[-1]
    h = torch_linear(self.mlp_dim, d, "fc1", dtype=self.dtype)(x_BxNxD)
    h = nn.gelu(h, approximate=False)
    h = common.Dropout(self.activation_dropout)(h, deterministic=deterministic)
    return torch_linear(d, self.mlp_dim, "fc2", dtype=self.dtype)(h)


def attention_module(cfg: ModelConfig, name: str = "self_attn") -> nn.Module:
  """The configured mechanism with the model's sizes; the one place that builds it."""
  cls = get_attention(cfg.attention)
  kwargs = dict(num_heads=cfg.num_heads, dropout_rate=cfg.attention_dropout,
                dtype=cfg.compute_dtype, qkv_dim=cfg.qkv_dim)
  if carries_p(cfg):   # Luna: its own projections (always biased), pack heads, tied K/V
    kwargs.update(num_pack_heads=cfg.num_pack_heads, tie_kv=cfg.tie_kv)
  else:
    kwargs.update(use_bias=cfg.qkv_bias)
  return cls(**kwargs, **dict(cfg.attention_kwargs), name=name)


def carries_p(cfg: ModelConfig) -> bool:
  """Whether the mechanism reads and updates a packed sequence P (Luna)."""
  return bool(getattr(get_attention(cfg.attention), "carries_p", False))


class EncoderLayer(nn.Module):
  """One Transformer layer around any mechanism of the family.

  post_ln (Luna's LunaSentenceEncoderLayer, and `block="post_ln"`):
    X' = LN(X + drop(Y_X)); X'' = LN(X' + drop(FFN(X')));  P' = LN_proj(P + drop(Y_P)) when
    the mechanism carries P (no FFN on P).
  pre_ln (the LRA reference and the small-model protocol):
    X' = X + drop(attn(LN(X))); X'' = X' + drop(FFN(LN(X'))).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxNxD: Array, mask_BxN: Array | None, p_BxLxD: Array | None,
               p_mask_BxL: Array | None, deterministic: bool
               ) -> tuple[Array, Array | None]:
    cfg = self.cfg
    attn = attention_module(cfg)
    ff = FeedForward(cfg.mlp_dim, cfg.activation_dropout, cfg.compute_dtype, name="ffn")
    drop = common.Dropout(cfg.dropout)
    if cfg.block == "pre_ln":
      y_BxNxD, _ = attn(layer_norm("self_attn_layer_norm")(x_BxNxD), mask_BxN,
                        deterministic=deterministic)
      x_BxNxD = x_BxNxD + drop(y_BxNxD, deterministic)
      h_BxNxD = ff(layer_norm("final_layer_norm")(x_BxNxD), deterministic)
      return x_BxNxD + drop(h_BxNxD, deterministic), None
    y_BxNxD, yp_BxLxD = attn(x_BxNxD, mask_BxN, p_BxLxD, p_mask_BxL,
                             deterministic=deterministic)
    x_BxNxD = layer_norm("self_attn_layer_norm")(x_BxNxD + drop(y_BxNxD, deterministic))
    if yp_BxLxD is not None:
      p_BxLxD = layer_norm("atten_proj_layer_norm")(p_BxLxD + drop(yp_BxLxD, deterministic))
    h_BxNxD = ff(x_BxNxD, deterministic)
    return layer_norm("final_layer_norm")(x_BxNxD + drop(h_BxNxD, deterministic)), p_BxLxD


def sinusoidal_table(num: int, dim: int) -> np.ndarray:
  """[num, dim] sine/cosine position table (Vaswani et al.); row 0 is position 0."""
  pos = np.arange(num)[:, None]
  inv = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((num, dim), np.float32)
  table[:, 0::2] = np.sin(pos * inv)
  table[:, 1::2] = np.cos(pos * inv)[:, : dim // 2]
  return table


class PatchEmbed(nn.Module):
  """Pixel values [B, S*S] (row-major square image, no padding) -> [B, (S/p)^2, D]: each p x p
  patch's values / 255 through one Dense, patches in row-major order (ViT's patch embedding)."""
  patch_size: int
  features: int

  @nn.compact
  def __call__(self, pixels_BxN: Array) -> Array:
    b, n = pixels_BxN.shape
    side, p = math.isqrt(n), self.patch_size
    if side * side != n or p < 1 or side % p:
      raise ValueError(f"embedding='patches' needs a square image whose side is a multiple of "
                       f"config.model.patch_size={p}; got a sequence of {n} values")
    g = side // p
    patches_BxTxPP = (pixels_BxN.reshape(b, g, p, g, p).transpose(0, 1, 3, 2, 4)
                      .reshape(b, g * g, p * p).astype(jnp.float32) / 255.0)
    return nn.Dense(self.features)(patches_BxTxPP)


class Encoder(nn.Module):
  """Token ids [B, N] -> pooled features [B, D]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxN: Array, deterministic: bool = True) -> Array:
    cfg = self.cfg
    b, n = tokens_BxN.shape
    d = cfg.emb_dim
    if n > cfg.max_len:
      raise ValueError(f"sequence length {n} exceeds the position table (max_len={cfg.max_len})")
    mask_BxN = (jnp.ones((b, n), bool) if cfg.pad_id is None else tokens_BxN != cfg.pad_id)
    # Luna's encoder is fairseq's: embeddings N(0, D**-0.5), an embedding LayerNorm, and P.
    is_luna = carries_p(cfg)
    emb_std = d**-0.5 if is_luna else 1.0

    # Embeddings. Position j (from 1) is the token's index; pads get none. Where padding only
    # trails (every token task) this is fairseq's count of real tokens; with pads inside the
    # sequence (black pixels as padding, `lra_tasks.common.pixel_pad_id`) each pixel keeps its
    # place in the image, as the small protocol's code had it.
    if cfg.embedding == "patches":
      if cfg.pad_id is not None:
        raise ValueError("embedding='patches' is for unpadded images (Pathfinder); this task "
                         f"pads with token {cfg.pad_id}")
      x_BxNxD = PatchEmbed(cfg.patch_size, d, name="embed_patches")(tokens_BxN)
      b, n = x_BxNxD.shape[:2]
      mask_BxN = jnp.ones((b, n), bool)
    elif cfg.embedding == "linear":
      values = tokens_BxN.astype(jnp.float32)[..., None] / 255.0
      x_BxNxD = nn.Dense(d, name="embed_values")(values)
    else:
      x_BxNxD = nn.Embed(cfg.vocab_size, d, embedding_init=nn.initializers.normal(emb_std),
                         name="embed_tokens")(tokens_BxN)
    positions_BxN = jnp.arange(1, n + 1, dtype=jnp.int32)[None, :] * mask_BxN
    if cfg.positions == "learned":
      # Luna: N(0, D**-0.5) (fairseq); the LRA reference's AddPositionEmbs: N(0, 0.02).
      pos_std = d**-0.5 if is_luna else 0.02
      pos_BxNxD = nn.Embed(cfg.max_len + 1, d, embedding_init=nn.initializers.normal(pos_std),
                           name="embed_positions")(positions_BxN)
    else:
      pos_BxNxD = jnp.asarray(sinusoidal_table(cfg.max_len + 1, d))[positions_BxN]
    x_BxNxD = x_BxNxD + pos_BxNxD * mask_BxN[..., None]
    drop = common.Dropout(cfg.dropout)

    p_BxLxD = p_mask_BxL = None
    if is_luna or cfg.block == "post_ln":
      x_BxNxD = layer_norm("emb_layer_norm")(x_BxNxD)
    x_BxNxD = drop(x_BxNxD, deterministic) * mask_BxN[..., None]
    if is_luna:
      p_LxD = self.param("projected_embeddings", nn.initializers.normal(d**-0.5),
                         (cfg.proj_len, d))
      p_LxD = layer_norm("proj_emb_layer_norm")(p_LxD)
      p_BxLxD = jnp.broadcast_to(p_LxD, (b, cfg.proj_len, d))
      if cfg.dynamic_projection and cfg.pad_id is not None:
        # Equivalent to slicing P to the longest real length: extra slots are masked keys.
        lengths_B = mask_BxN.sum(axis=1)
        p_mask_BxL = jnp.arange(cfg.proj_len)[None, :] < lengths_B[:, None]
      p_BxLxD = drop(p_BxLxD, deterministic)
      if p_mask_BxL is not None:
        p_BxLxD = p_BxLxD * p_mask_BxL[..., None]

    layer_cls = EncoderLayer
    if cfg.remat:
      layer_cls = nn.remat(layer_cls, static_argnums=(5,))
    shared = layer_cls(cfg, name="layer") if cfg.tie_layer_weights else None
    for i in range(cfg.num_layers):
      layer = shared or layer_cls(cfg, name=f"layers_{i}")
      x_BxNxD, p_BxLxD = layer(x_BxNxD, mask_BxN, p_BxLxD, p_mask_BxL, deterministic)
    if cfg.block == "pre_ln":
      x_BxNxD = layer_norm("final_layer_norm")(x_BxNxD)

    return readout(x_BxNxD, mask_BxN, cfg.readout, cfg.readout_length)


READOUTS = ("cls", "first", "mean", "mean_padded")


def readout(x_BxNxD: Array, mask_BxN: Array, kind: str, length: int = 0) -> Array:
  """Pooled features [B, D] (see the module docstring for the kinds); `length` is the padded
  length "mean_padded" divides by (0: N)."""
  if kind in ("cls", "first"):
    return x_BxNxD[:, 0]
  m_BxNx1 = mask_BxN[..., None].astype(x_BxNxD.dtype)
  if kind == "mean":
    return (x_BxNxD * m_BxNx1).sum(axis=1) / jnp.maximum(m_BxNx1.sum(axis=1), 1.0)
  if kind == "mean_padded":
    return (x_BxNxD * m_BxNx1).sum(axis=1) / (length or x_BxNxD.shape[1])
  raise ValueError(f"config.model.readout={kind!r}; expected one of {READOUTS}")


class Classifier(nn.Module):
  """Encoder + Dense(C) -> ReLU -> Dense(classes, no bias); two towers for Retrieval."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool = True) -> Array:
    cfg = self.cfg
    encoder = Encoder(cfg, name="encoder")
    if cfg.num_docs == 2:
      # inputs [B, 2, N]: both documents through the same encoder, never attending to each other.
      b, _, n = inputs.shape
      feats = encoder(inputs.reshape(2 * b, n), deterministic).reshape(b, 2, -1)
      u_BxD, v_BxD = feats[:, 0], feats[:, 1]
      if cfg.retrieval_combine == "luna":
        h = jnp.concatenate([v_BxD, u_BxD], axis=-1)
      elif cfg.retrieval_combine == "concat":
        h = jnp.concatenate([u_BxD, v_BxD], axis=-1)
      elif cfg.retrieval_combine == "interact":
        h = jnp.concatenate([u_BxD, v_BxD, u_BxD * v_BxD, u_BxD - v_BxD], axis=-1)
      else:
        raise ValueError(f"config.model.retrieval_combine={cfg.retrieval_combine!r}; "
                         "expected 'luna', 'concat' or 'interact'")
    else:
      h = encoder(inputs, deterministic)
    h = h.astype(jnp.float32)
    for i in range(cfg.classifier_layers):
      name = "classifier_hidden" if i == 0 else f"classifier_hidden_{i}"
      h = nn.relu(torch_linear(cfg.classifier_dim // 2**i, h.shape[-1], name)(h))
    return torch_linear(cfg.num_classes, h.shape[-1], "classifier_out",
                        use_bias=cfg.classifier_bias)(h)


def bert_init(params: Any, key: Array) -> Any:
  """BERT init (fairseq `init_bert_params`): every Dense kernel and embedding table ~ N(0, 0.02),
  Dense biases 0. LayerNorms and Luna's P keep their init."""
  flat = traverse_util.flatten_dict(params)
  dense_paths = {path[:-1] for path in flat if path[-1] == "kernel"}
  keys = jax.random.split(key, len(flat))
  out = {}
  for (path, leaf), k in zip(flat.items(), keys):
    if path[-1] in ("kernel", "embedding"):
      leaf = 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype)
    elif path[-1] == "bias" and path[:-1] in dense_paths:
      leaf = jnp.zeros_like(leaf)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


def torch_init(params: Any, key: Array) -> Any:
  """PyTorch defaults as the Nystromformer LRA code has them: every Dense weight and bias
  U(+-1/sqrt(fan_in)) (nn.Linear), every embedding table N(0, 0.02). LayerNorms, Luna's P and
  mechanism-specific parameters keep their init."""
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(key, len(flat))
  fan_in = {path[:-1]: leaf.shape[0] for path, leaf in flat.items()
            if path[-1] == "kernel" and leaf.ndim == 2}
  out = {}
  for (path, leaf), k in zip(flat.items(), keys):
    if path[-1] == "embedding":
      leaf = 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype)
    elif path[-1] in ("kernel", "bias") and path[:-1] in fan_in:
      bound = fan_in[path[:-1]]**-0.5
      leaf = jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)
    out[path] = leaf
  return traverse_util.unflatten_dict(out)


INITS = {"default": None, "bert": bert_init, "torch": torch_init}


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
