"""Attention maps of a trained (or freshly initialised) classifier, for inspection only.

`attention_maps(model_cfg, params, inputs)` runs `models.Classifier` once with
`mutable=["intermediates"]` and returns one `LayerMaps` per encoder layer (numpy arrays):

* Luna: the pack map `pack_BxHxLxN` (P slot -> tokens, rows sum to 1 over the real tokens),
  the unpack map `unpack_BxHxNxL` (token -> P slots, rows sum to 1 over the live slots), and an
  effective token -> token map `effective_BxNxN = mean_h(unpack) @ mean_h(pack)`. The effective
  map is an approximation: between the two steps the packed context goes through the unpack
  key/value projections, which mix the heads' channels, so no single per-head product is the
  exact token-to-token influence. It is what one would get if every head routed through the
  same mixture of slots. It is a row-stochastic [N, N] map whose columns at padded tokens are 0.
* Softmax attention: its [N, N] map `attn_BxHxNxN` (rows sum to 1 over real keys).
* Linear mechanisms (cheap_linear, linear_elu, performer, learned_kernel, cosformer): the N x N
  kernel map they imply, `attn_BxHxNxN`, when the module sows it (see `ATTN_KEY`).

Where the maps come from: every attention module sows float32 maps into the `intermediates`
collection, and only when that collection is mutable (`self.sow` is a no-op otherwise, and a
mechanism that must build an extra N x N matrix for it checks
`self.is_mutable_collection("intermediates")` first). Training and evaluation apply the model
without `mutable`, so they compute and keep none of it. Keys, per attention module (`self_attn`):

  "pack_attn"     [B, Hp, l, N]  Luna pack softmax over N (padded tokens 0)
  "unpack_attn"   [B, H, N, l]   Luna unpack softmax over l (masked P slots 0)
  "attn_weights"  [B, H, N, N]   every other mechanism: softmax map, or the normalised kernel map
                                 phi(q_i).phi(k_j) / normaliser_i (padded keys 0)

Maps that are N x N are refused above `max_dense_len` tokens (ValueError). For the Retrieval
dual encoder the batch axis is `2 * B` in the order (example 0 doc 0, example 0 doc 1, ...).

Checkpoints: `load_config(workdir)` reads the run's config and `load_params(workdir)` restores
the parameters of the best-validation checkpoint or of the latest training checkpoint onto one
local device, whatever topology they were saved from (they live in `luna_jax.resume_rules` and
`luna_jax.checkpoints`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import lra_tasks
from luna_jax import checkpoints, models, resume_rules

PACK_KEY = "pack_attn"
UNPACK_KEY = "unpack_attn"
ATTN_KEY = "attn_weights"
ATTENTION_MODULE = "self_attn"
MAX_DENSE_LEN = 4096
LINEAR_MECHANISMS = ("cheap_linear", "linear_elu", "performer", "learned_kernel", "cosformer")


class MapNotSownError(LookupError):
  """The attention module did not sow the map that inspection needs."""


@dataclasses.dataclass(frozen=True)
class LayerMaps:
  """Attention maps of one encoder layer; float32 numpy arrays, batch first.

  Attributes:
    layer: layer index (0 = closest to the embeddings).
    name: where the maps were found in `intermediates`, e.g. "encoder/layers_0/self_attn".
    attention: the mechanism name (`ModelConfig.attention`).
    mask_BxN: bool, True = real token (False = padding).
    p_mask_BxL: Luna only: bool, True = live P slot (dynamic projection); None = all live.
    pack_BxHxLxN: Luna only: pack map, rows over tokens.
    unpack_BxHxNxL: Luna only: unpack map, rows over P slots.
    effective_BxNxN: Luna only: head-averaged unpack @ head-averaged pack (approximation, see the
      module docstring); None when N > max_dense_len.
    attn_BxHxNxN: other mechanisms: the (implied) N x N attention map.
  """
  layer: int
  name: str
  attention: str
  mask_BxN: np.ndarray
  p_mask_BxL: np.ndarray | None = None
  pack_BxHxLxN: np.ndarray | None = None
  unpack_BxHxNxL: np.ndarray | None = None
  effective_BxNxN: np.ndarray | None = None
  attn_BxHxNxN: np.ndarray | None = None

  @property
  def token_map_BxNxN(self) -> np.ndarray | None:
    """One token -> token map per example: Luna's effective map, else the head mean."""
    if self.effective_BxNxN is not None:
      return self.effective_BxNxN
    return None if self.attn_BxHxNxN is None else self.attn_BxHxNxN.mean(axis=1)


# ----------------------------------------------------------------------------- maps

def effective_map(unpack_BxHxNxL: np.ndarray, pack_BxHpxLxN: np.ndarray) -> np.ndarray:
  """mean_h(unpack) @ mean_h(pack): [B, N, N], rows sum to 1 when both factors' rows do."""
  u_BxNxL = np.asarray(unpack_BxHxNxL, np.float32).mean(axis=1)
  p_BxLxN = np.asarray(pack_BxHpxLxN, np.float32).mean(axis=1)
  return np.matmul(u_BxNxL, p_BxLxN)


def padding_masks(model_cfg: models.ModelConfig, inputs: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """(mask_BxN, p_mask_BxL) exactly as `models.Encoder` builds them; inputs [B, N] or [B, 2, N]."""
  tokens_BxN = np.asarray(inputs).reshape(-1, np.shape(inputs)[-1])
  if model_cfg.embedding == "patches":   # one token per patch, none padded (models.Encoder)
    side, p = math.isqrt(tokens_BxN.shape[-1]), model_cfg.patch_size
    return np.ones((tokens_BxN.shape[0], (side // p) ** 2), bool), None
  if model_cfg.pad_id is None:
    return np.ones(tokens_BxN.shape, bool), None
  mask_BxN = tokens_BxN != model_cfg.pad_id
  p_mask_BxL = None
  if model_cfg.attention == "luna" and model_cfg.dynamic_projection:
    lengths_B = mask_BxN.sum(axis=1)
    p_mask_BxL = np.arange(model_cfg.proj_len)[None, :] < lengths_B[:, None]
  return mask_BxN, p_mask_BxL


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _apply_with_intermediates(model_cfg: models.ModelConfig, params: Any, inputs: jax.Array,
                              rngs: Mapping[str, jax.Array] | None) -> Any:
  """Deterministic forward pass that returns only the sown intermediates."""
  _, state = models.Classifier(model_cfg).apply(
      {"params": params}, inputs, deterministic=True, rngs=rngs, mutable=["intermediates"])
  return state.get("intermediates", {})


def _layer_sort_key(name: str) -> tuple[int, str]:
  m = re.fullmatch(r"layers_(\d+)", name)
  return (int(m.group(1)), name) if m else (-1, name)


def _sown_by_layer(intermediates: Mapping[str, Any]
                   ) -> list[tuple[str, dict[str, Any]]]:
  """[(module path, {key: value}), ...] for each attention call, in layer order.

  A tied layer ("layer") is called num_layers times; each sow appended one tuple entry.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  modules: dict[tuple[str, ...], dict[str, tuple]] = {}
  for path, value in flat.items():
    if len(path) >= 2 and path[-2] == ATTENTION_MODULE:
      modules.setdefault(path[:-1], {})[path[-1]] = value
  out = []
  for path in sorted(modules, key=lambda p: [_layer_sort_key(s) for s in p]):
    sown = modules[path]
    calls = max(len(v) for v in sown.values())
    for i in range(calls):
      name = "/".join(path) + (f"[{i}]" if calls > 1 else "")
      out.append((name, {k: v[i] for k, v in sown.items() if i < len(v)}))
  return out


def attention_maps(model_cfg: models.ModelConfig | ml_collections.ConfigDict, params: Any,
                   inputs: Any, *, task: lra_tasks.TaskData | None = None,
                   max_dense_len: int = MAX_DENSE_LEN,
                   rngs: Mapping[str, jax.Array] | None = None) -> list[LayerMaps]:
  """Runs the classifier on `inputs` and returns the attention maps of every layer.

  Args:
    model_cfg: the static model description, or a training config together with `task`
      (the model description is then `steps.model_config(config, task)`).
    params: the classifier's params (e.g. from `load_params`).
    inputs: int tokens [B, N] (or [B, 2, N] for Retrieval); keep B small.
    task: the loaded task, needed only when `model_cfg` is a training config.
    max_dense_len: longest N for which an N x N map is built (ValueError above, for every
      mechanism but Luna; Luna then returns its pack/unpack maps without the effective map).
    rngs: optional rng streams, e.g. {"features": key} to use Performer's evaluation features.

  Returns:
    One `LayerMaps` per layer, in layer order.
  """
  if isinstance(model_cfg, ml_collections.ConfigDict):
    if task is None:
      raise ValueError("attention_maps(config, ...) with a training config needs task=")
    from luna_jax import steps  # pylint: disable=g-import-not-at-top
    model_cfg = steps.model_config(model_cfg, task)
  inputs = np.asarray(inputs)
  n = inputs.shape[-1]
  is_luna = model_cfg.attention == "luna"
  if not is_luna and n > max_dense_len:
    raise ValueError(
        f"{model_cfg.attention} attention maps are N x N: N={n} tokens is above "
        f"max_dense_len={max_dense_len}; inspect a shorter input (or raise max_dense_len)")
  mask_BxN, p_mask_BxL = padding_masks(model_cfg, inputs)
  inter = _apply_with_intermediates(model_cfg, params, jnp.asarray(inputs), rngs)
  sown = _sown_by_layer(jax.device_get(inter))
  key = PACK_KEY if is_luna else ATTN_KEY
  if not any(key in s for _, s in sown):
    hint = ("" if is_luna else
            f' It must call self.sow("intermediates", "{ATTN_KEY}", a_BxHxNxN) when '
            'self.is_mutable_collection("intermediates").')
    raise MapNotSownError(
        f"the {model_cfg.attention!r} attention module sowed no {key!r} into "
        f"intermediates (found {[sorted(s) for _, s in sown]}).{hint}")

  layers = []
  for i, (name, maps) in enumerate(sown):
    if is_luna:
      pack = np.asarray(maps[PACK_KEY], np.float32)
      unpack = np.asarray(maps[UNPACK_KEY], np.float32)
      eff = effective_map(unpack, pack) if n <= max_dense_len else None
      layers.append(LayerMaps(i, name, model_cfg.attention, mask_BxN, p_mask_BxL,
                              pack_BxHxLxN=pack, unpack_BxHxNxL=unpack, effective_BxNxN=eff))
    else:
      layers.append(LayerMaps(i, name, model_cfg.attention, mask_BxN,
                              attn_BxHxNxN=np.asarray(maps[ATTN_KEY], np.float32)))
  return layers


def kernel_attention_map(phi_q_BxNxHxF: np.ndarray, phi_k_BxNxHxF: np.ndarray,
                         mask_BxN: np.ndarray | None = None, *, mode: str = "eps",
                         eps: float = 1e-6, causal: bool = False,
                         count_normalise: bool = False) -> np.ndarray:
  """Reference N x N map of a kernelised linear attention: [B, H, N, N] (numpy, float64).

  a_ij = phi_q_i . phi_k_j * mask_j (* [j <= i] when causal), then per row:
  mode "eps": / (sum_j a_ij + eps); "floor": / max(sum_j a_ij, eps); "none": no division
  (cheap_linear), with `count_normalise` dividing by the number of real keys seen instead.
  `phi_k` must be the key features as they enter the sums (log-domain keys exponentiated).
  This is what a linear mechanism's sown "attn_weights" must equal (tests use it).
  """
  q = np.asarray(phi_q_BxNxHxF, np.float64)
  k = np.asarray(phi_k_BxNxHxF, np.float64)
  b, n = q.shape[:2]
  keep_BxN = np.ones((b, n), bool) if mask_BxN is None else np.asarray(mask_BxN, bool)
  a_BxHxNxN = np.einsum("bihf,bjhf->bhij", q, k) * keep_BxN[:, None, None, :]
  keep_BxNxN = np.broadcast_to(keep_BxN[:, None, :], (b, n, n))
  if causal:
    a_BxHxNxN = a_BxHxNxN * np.tril(np.ones((n, n)))
    keep_BxNxN = keep_BxNxN & np.tril(np.ones((n, n), bool))
  if mode == "none":
    if count_normalise:
      a_BxHxNxN = a_BxHxNxN / np.maximum(keep_BxNxN.sum(-1), 1)[:, None, :, None]
    return a_BxHxNxN
  den_BxHxN = a_BxHxNxN.sum(-1)
  if mode == "eps":
    den_BxHxN = den_BxHxN + eps
    den_BxHxN = np.where(den_BxHxN > 0, den_BxHxN, 1.0)
  elif mode == "floor":
    den_BxHxN = np.maximum(den_BxHxN, eps)
  else:
    raise ValueError(f"mode={mode!r}; expected 'eps', 'floor' or 'none'")
  return a_BxHxNxN / den_BxHxN[..., None]


# ----------------------------------------------------------------------------- checkpoints

def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config saved in the workdir (`luna_jax.resume_rules.load_config`)."""
  return resume_rules.load_config(workdir)


def load_params(workdir: str, which: str = "auto") -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) of a train_and_evaluate workdir (`luna_jax.checkpoints.load_params`):
  `which` is "best", "latest" or "auto" (best if present, else latest)."""
  return checkpoints.load_params(workdir, which)
