"""Post-hoc conversion: start a model from another run's trained parameters.

`--config.init_from=WORKDIR` makes the trainer build the model of `config` (any mechanism) and
take from WORKDIR's best checkpoint every parameter whose path and shape match: embeddings,
q/k/v/out projections, FFN, LayerNorms, classifier. Only what the target adds is initialised
fresh (the learned kernel's feature maps and psi MLP, cheap_linear's gate, ...); what only the
source has is dropped. `transfer` returns the new parameters and a `TransferReport` saying what
was copied, initialised and dropped.

Luna as a target: its projections map from a softmax layer as
  query -> q_proj,  key -> pk_proj,  value -> pv_proj,  out -> out_proj
(the pack step's keys and values read X as the softmax keys and values did); pq_proj, k_proj,
v_proj (the unpack side reads the packed context, which the source never had), P and its
LayerNorms are fresh. Luna's layer is post-LN where the LRA and small-protocol baselines are
pre-LN, so the copied weights sit in a different computation: expect a larger drop before
fine-tuning than for the kernel mechanisms, which keep the block structure.

A source that cannot be converted (another task, width, depth, head count, vocabulary or number
of classes) fails before any compute, naming the field (`check_compatible`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax import traverse_util
import jax
import numpy as np

# Fields that must agree between source and target (the copied tensors' meaning depends on them).
MUST_MATCH = ("task", "seq_len", "model.emb_dim", "model.num_layers", "model.num_heads",
              "model.mlp_dim", "model.qkv_dim", "model.classifier_dim",
              "model.classifier_layers", "model.embedding", "model.positions",
              "model.readout", "model.tie_layer_weights")

# softmax-family parameter name -> Luna parameter name, inside each layer's self_attn.
LUNA_FROM_SOFTMAX = {"query": "q_proj", "key": "pk_proj", "value": "pv_proj", "out": "out_proj"}


class IncompatibleSourceError(ValueError):
  """The source run's model cannot be converted into the target's."""


@dataclasses.dataclass
class TransferReport:
  """What `transfer` did, by parameter path ("encoder/layers_0/self_attn/query/kernel")."""
  copied: list[str]
  initialised: list[str]
  dropped: list[str]
  renamed: dict[str, str]          # target path -> source path, for mapped names

  def summary(self) -> str:
    """One line for the console."""
    def names(paths: list[str]) -> str:
      leaf_modules = sorted({p.rsplit("/", 2)[-2] if p.count("/") >= 1 else p for p in paths})
      return ", ".join(leaf_modules[:8]) + (" ..." if len(leaf_modules) > 8 else "")
    return (f"init_from: copied {len(self.copied)} tensors, initialised {len(self.initialised)}"
            f" ({names(self.initialised) or 'none'}), dropped {len(self.dropped)}"
            f" ({names(self.dropped) or 'none'})"
            + (f", {len(self.renamed)} mapped by name" if self.renamed else ""))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node.get(part) if hasattr(node, "get") else None
    if node is None:
      return None
  return node


def check_compatible(source: Any, target: Any, source_workdir: str = "") -> None:
  """Raises IncompatibleSourceError naming every field in MUST_MATCH that differs."""
  diffs = [f"{f}: source {_get(source, f)!r}, target {_get(target, f)!r}" for f in MUST_MATCH
           if _get(source, f) != _get(target, f)]
  if diffs:
    where = f" ({source_workdir})" if source_workdir else ""
    raise IncompatibleSourceError(
        f"config.init_from{where} cannot be converted into this model; these fields differ: "
        + "; ".join(diffs))


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}


def _source_path(path: str, source: dict[str, Any], to_luna: bool) -> str | None:
  """The source path that fills target `path`, or None."""
  if path in source:
    return path
  parts = path.split("/")
  if to_luna and "self_attn" in parts[:-2]:
    i = parts.index("self_attn")
    inverse = {v: k for k, v in LUNA_FROM_SOFTMAX.items()}
    if parts[i + 1] in inverse:
      mapped = "/".join(parts[:i + 1] + [inverse[parts[i + 1]]] + parts[i + 2:])
      if mapped in source:
        return mapped
  return None


def transfer(source_params: Any, target_params: Any, *, target_is_luna: bool = False
             ) -> tuple[Any, TransferReport]:
  """Target parameters with every path- and shape-matching tensor taken from the source
  (bitwise), the rest left as initialised. Returns (params, report)."""
  src, tgt = _flat(source_params), _flat(target_params)
  out, copied, initialised, renamed, used = {}, [], [], {}, set()
  for path, leaf in tgt.items():
    s_path = _source_path(path, src, target_is_luna)
    if s_path is not None and np.shape(src[s_path]) == np.shape(leaf):
      out[path] = jax.numpy.asarray(src[s_path], dtype=leaf.dtype)
      copied.append(path)
      used.add(s_path)
      if s_path != path:
        renamed[path] = s_path
    else:
      out[path] = leaf
      initialised.append(path)
  dropped = sorted(p for p in src if p not in used)
  params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
  return params, TransferReport(sorted(copied), sorted(initialised), dropped, renamed)
