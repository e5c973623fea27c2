"""Official PyTorch Luna parameters -> this project's Flax parameters, and a parity checker.

Name mapping (torch layout W [out, in] becomes a Flax kernel W^T [in, out]):

  torch (LunarMultiheadAttention)          flax (LunaAttention)
  {pq,pk,pv,q,k,v,out}_proj.{weight,bias}  {pq,pk,pv,q,k,v,out}_proj/{kernel,bias}
  {pq,pc,q,c,out}_proj.*  (tied K/V)       {pq,pc,q,c,out}_proj/*
  torch (LunaSentenceEncoderLayer)         flax (EncoderLayer, attention="luna")
  self_attn.*                              self_attn/*
  self_attn_layer_norm.{weight,bias}       self_attn_layer_norm/{scale,bias}
  self_atten_proj_layer_norm.*             atten_proj_layer_norm/*
  fc1.*, fc2.*                             ffn/fc1/*, ffn/fc2/*
  final_layer_norm.*                       final_layer_norm/*

Usage:
  python -m luna_jax.convert check VECTORS.npz          # bidirectional attention + layer
  python -m luna_jax.convert check-causal VECTORS.npz   # causal attention (parallel + incremental)
Each prints the max absolute error of every output and exits 1 if any exceeds --tol (1e-5).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from luna_jax import models
from luna_jax.attention.luna import LunaAttention

Params = dict
LAYER_NAMES = {  # torch sub-module -> flax sub-module of EncoderLayer (luna)
    "self_attn_layer_norm": ("self_attn_layer_norm",),
    "self_atten_proj_layer_norm": ("atten_proj_layer_norm",),
    "fc1": ("ffn", "fc1"),
    "fc2": ("ffn", "fc2"),
    "final_layer_norm": ("final_layer_norm",),
}


def _linear(sd: Mapping[str, np.ndarray], prefix: str) -> Params:
  """torch Linear `{prefix}_weight/_bias` (or '.'-separated) -> Flax Dense params."""
  get = lambda n: sd[f"{prefix}_{n}"] if f"{prefix}_{n}" in sd else sd[f"{prefix}.{n}"]
  out = {"kernel": jnp.asarray(np.asarray(get("weight")).T)}
  try:
    out["bias"] = jnp.asarray(get("bias"))
  except KeyError:
    pass
  return out


def _layer_norm(sd: Mapping[str, np.ndarray], prefix: str) -> Params:
  get = lambda n: sd[f"{prefix}_{n}"] if f"{prefix}_{n}" in sd else sd[f"{prefix}.{n}"]
  return {"scale": jnp.asarray(get("weight")), "bias": jnp.asarray(get("bias"))}


def attention_params(sd: Mapping[str, np.ndarray], prefix: str = "", tied: bool = False
                     ) -> Params:
  """LunarMultiheadAttention weights (names `{prefix}{proj}_proj_weight`) -> LunaAttention params."""
  names = ("pq", "pc", "q", "c", "out") if tied else ("pq", "pk", "pv", "q", "k", "v", "out")
  return {f"{n}_proj": _linear(sd, f"{prefix}{n}_proj") for n in names}


def causal_attention_params(sd: Mapping[str, np.ndarray], prefix: str = "", tied: bool = True
                            ) -> Params:
  """LunarCausalAttention weights -> LunaCausalAttention params."""
  names = ("pq", "pc", "q", "c", "out") if tied else ("pq", "pc", "q", "k", "v", "out")
  return {f"{n}_proj": _linear(sd, f"{prefix}{n}_proj") for n in names}


def layer_params(sd: Mapping[str, np.ndarray], prefix: str = "layer_", tied: bool = False
                 ) -> Params:
  """LunaSentenceEncoderLayer weights -> EncoderLayer (luna) params."""
  params: Params = {"self_attn": attention_params(sd, f"{prefix}self_attn_", tied)}
  for torch_name, path in LAYER_NAMES.items():
    convert = _layer_norm if torch_name.endswith("norm") else _linear
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = convert(sd, f"{prefix}{torch_name}")
  return params


def _cfg(v: Mapping[str, np.ndarray], name: str, default: int | None = None) -> int:
  key = f"cfg_{name}"
  if key in v:
    return int(v[key])
  if default is None:
    raise KeyError(f"vectors file has no {key!r}")
  return default


def _btd(a: np.ndarray) -> jnp.ndarray:
  """Time-major [T, B, D] -> batch-major [B, T, D]."""
  return jnp.asarray(np.swapaxes(a, 0, 1))


def check_bidirectional(v: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Runs LunaAttention (untied, P-masked, tied) and the Luna EncoderLayer on official vectors;
  returns the max absolute error of every output present in `v`."""
  heads = _cfg(v, "num_heads")
  pheads = _cfg(v, "num_pheads", heads)
  x, p = _btd(v["x"]), _btd(v["p"])
  x_mask = ~jnp.asarray(v["key_padding_mask"]) if "key_padding_mask" in v else None
  errors: dict[str, float] = {}
  err = lambda got, ref: float(np.max(np.abs(np.asarray(got) - _btd(ref))))

  def run(tied: bool, prefix: str, p_mask=None):
    attn = LunaAttention(num_heads=heads, num_pack_heads=pheads, tie_kv=tied)
    params = attention_params(v, prefix, tied)
    (y, yp), state = attn.apply({"params": params}, x, x_mask, p, p_mask,
                                mutable=["intermediates"])
    return y, yp, state["intermediates"]

  if "pq_proj_weight" in v:
    y, yp, inter = run(False, "")
    errors["out"] = err(y, v["out"])
    errors["pcontext"] = err(yp, v["pcontext"])
    if "out_f64" in v:
      errors["out_vs_f64"] = err(y, v["out_f64"])
      errors["pcontext_vs_f64"] = err(yp, v["pcontext_f64"])
    if "unpack_attn_probs" in v:  # official [H, B, N, l]; ours [B, H, N, l]
      a = np.asarray(inter["unpack_attn"][0]).transpose(1, 0, 2, 3)
      errors["unpack_attn_probs"] = float(np.max(np.abs(a - v["unpack_attn_probs"])))
    if "pkey_padding_mask_case2" in v:
      y, yp, _ = run(False, "", ~jnp.asarray(v["pkey_padding_mask_case2"]))
      errors["out_case2"] = err(y, v["out_case2"])
      errors["pcontext_case2"] = err(yp, v["pcontext_case2"])
  if "tied_pq_proj_weight" in v:
    y, yp, _ = run(True, "tied_")
    errors["tied_out"] = err(y, v["tied_out"])
    errors["tied_pcontext"] = err(yp, v["tied_pcontext"])
  if "layer_x_out" in v:
    tied = "layer_self_attn_pc_proj_weight" in v
    d = x.shape[-1]
    cfg = models.ModelConfig(vocab_size=1, num_classes=1, max_len=1, emb_dim=d,
                             num_heads=heads, num_pack_heads=pheads, tie_kv=tied,
                             mlp_dim=_cfg(v, "ffn_dim", int(v["layer_fc1_weight"].shape[0])))
    layer = models.EncoderLayer(cfg)
    xo, po = layer.apply({"params": layer_params(v, "layer_", tied)}, x, x_mask, p, None, True)
    errors["layer_x_out"] = err(xo, v["layer_x_out"])
    errors["layer_p_out"] = err(po, v["layer_p_out"])
  if not errors:
    raise KeyError("vectors file holds none of: pq_proj_weight, tied_pq_proj_weight, layer_x_out")
  return errors


def check_causal(v: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Runs LunaCausalAttention (parallel and token-by-token) on official causal vectors."""
  from luna_jax.attention.luna_causal import LunaCausalAttention, decode
  heads = _cfg(v, "num_heads")
  x, p = _btd(v["x"]), _btd(v["p"])
  errors: dict[str, float] = {}
  for prefix in ("tied_", "untied_"):
    if f"{prefix}pq_proj_weight" not in v:
      continue
    tied = prefix == "tied_"
    attn = LunaCausalAttention(num_heads=heads, tie_kv=tied)
    params = {"params": causal_attention_params(v, prefix, tied)}
    (y, _), state = attn.apply(params, x, None, p, mutable=["intermediates"])
    errors[f"{prefix}out"] = float(np.max(np.abs(np.asarray(y) - _btd(v[f"{prefix}out"]))))
    if f"{prefix}attn_probs" in v:
      a = np.asarray(state["intermediates"]["attn"][0]).transpose(1, 0, 2, 3)
      errors[f"{prefix}attn_probs"] = float(np.max(np.abs(a - v[f"{prefix}attn_probs"])))
    if f"{prefix}out_incremental" in v:
      y_inc = jax.jit(lambda prm: decode(attn, prm, x, p))(params)
      errors[f"{prefix}out_incremental"] = float(
          np.max(np.abs(np.asarray(y_inc) - _btd(v[f"{prefix}out_incremental"]))))
  if not errors:
    raise KeyError("vectors file holds neither tied_pq_proj_weight nor untied_pq_proj_weight")
  return errors


def _report(path: str, fn: Callable, tol: float) -> int:
  try:
    with np.load(path) as f:
      v = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    print(f"error: cannot read vectors file {path}: {e}", file=sys.stderr)
    return 2
  try:
    errors = fn(v)
  except KeyError as e:
    print(f"error: {path}: missing entry {e}", file=sys.stderr)
    return 2
  sizes = ", ".join(f"{k[4:]}={int(v[k])}" for k in sorted(v) if k.startswith("cfg_"))
  print(f"{path} ({sizes})")
  worst = 0.0
  for name, e in errors.items():
    flag = "ok" if e <= tol else "FAIL"
    print(f"  {name:<28s} max|err| = {e:.3e}  {flag}")
    worst = max(worst, e)
  print(f"{'PASS' if worst <= tol else 'FAIL'}: worst {worst:.3e} (tolerance {tol:.0e})")
  return 0 if worst <= tol else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m luna_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  for name in ("check", "check-causal"):
    s = sub.add_parser(name)
    s.add_argument("vectors", help="npz file in the layout of tests/fixtures/luna_*.npz")
    s.add_argument("--tol", type=float, default=1e-5)
  args = parser.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  fn = check_bidirectional if args.cmd == "check" else check_causal
  return _report(args.vectors, fn, args.tol)


if __name__ == "__main__":
  sys.exit(main())
