"""The attention family behind one interface.

Every mechanism is a Flax linen module in its own file with the same call signature:

  y_BxNxD, p_ctx_BxLxD = Attn(num_heads=..., ...)(x_BxNxD, mask_BxN, p_BxLxD=None,
                                                  p_mask_BxL=None, deterministic=True)

* `mask_BxN`: bool, True = real token (attend to it), False = padding. `None` = no padding.
  Padded keys contribute nothing; padded query rows are computed but ignored downstream.
* `p_BxLxD` / `p_mask_BxL`: Luna's packed sequence and its slot mask (True = live slot). Only
  Luna reads them; every other mechanism ignores them and returns `p_ctx = None`.
* `deterministic`: False enables attention dropout (rng stream "dropout").
* Softmaxes and kernel normalisers are computed in float32 whatever `dtype` is.

Linear mechanisms also take `causal: bool` (parallel causal form) and expose
`init_state(batch_size)` and `step(x_BxD, state) -> (y_BxD, state)` for token-by-token decoding
with a state whose size does not depend on the sequence length.

`get_attention(name)` returns the module class (any registered name, `luna_causal` included); an
unknown name raises a ValueError listing the valid names. A mechanism whose class sets
`carries_p = True` (Luna) gets a packed sequence P from the encoder and returns its update.
"""
from __future__ import annotations

import importlib

# name -> "module:Class" (imported lazily so one broken mechanism cannot break the others).
_REGISTRY = {
    "luna": "luna_jax.attention.luna:LunaAttention",
    "softmax": "luna_jax.attention.softmax:SoftmaxAttention",
    "cheap_linear": "luna_jax.attention.cheap_linear:CheapLinearAttention",
    "linear_elu": "luna_jax.attention.linear_elu:LinearEluAttention",
    "performer": "luna_jax.attention.performer:PerformerAttention",
    "learned_kernel": "luna_jax.attention.learned_kernel:LearnedKernelAttention",
    "cosformer": "luna_jax.attention.cosformer:CosformerAttention",
    # Causal Luna (the official MT decoder form; `step`/`decode` for token-by-token use).
    "luna_causal": "luna_jax.attention.luna_causal:LunaCausalAttention",
}
# The mechanisms an LRA classifier can use (config.model.attention): every bidirectional one.
# Causal-only modules (luna_causal) are looked up by name too but are not LRA encoders.
CAUSAL_ONLY = ("luna_causal",)
ATTENTION_NAMES = tuple(n for n in _REGISTRY if n not in CAUSAL_ONLY)


def get_attention(name: str):
  """Returns the attention module class registered under `name`."""
  if name not in _REGISTRY:
    raise ValueError(
        f"config.model.attention={name!r} is not a known attention; valid names: "
        f"{', '.join(_REGISTRY)}")
  module_name, cls_name = _REGISTRY[name].split(":")
  return getattr(importlib.import_module(module_name), cls_name)
