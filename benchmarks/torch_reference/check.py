"""Checks the PyTorch Luna rendering against the official modules' reference vectors.

  python -m benchmarks.torch_reference.check tests/fixtures/luna_vectors.npz [--tol 1e-5]

Loads the fixture weights by official state-dict name into `LunaAttentionTorch` (untied, the
P-masked case2, tied K/V) and `LunaEncoderLayerTorch`, runs them in eval mode in float32, prints
the max absolute error of every output and exits 1 if any exceeds --tol (2 if the file is
unreadable or lacks an entry).
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping

import numpy as np
import torch

from benchmarks.torch_reference.luna_torch import (LunaAttentionTorch, LunaEncoderLayerTorch,
                                                   load_flat_state_dict)


def _cfg(v: Mapping[str, np.ndarray], name: str, default: int | None = None) -> int:
  key = f"cfg_{name}"
  if key in v:
    return int(v[key])
  if default is None:
    raise KeyError(key)
  return default


def check_bidirectional(v: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Max abs error of every official output present in `v` (time-major layout)."""
  heads = _cfg(v, "num_heads")
  pheads = _cfg(v, "num_pheads", heads)
  d = int(v["x"].shape[-1])
  x = torch.as_tensor(v["x"], dtype=torch.float32)
  p = torch.as_tensor(v["p"], dtype=torch.float32)
  x_pad = torch.as_tensor(v["key_padding_mask"]) if "key_padding_mask" in v else None
  err = lambda got, ref: float(np.max(np.abs(got.detach().numpy().astype(np.float64)
                                             - np.asarray(ref, np.float64))))
  errors: dict[str, float] = {}

  def attention(tied: bool, prefix: str) -> LunaAttentionTorch:
    m = LunaAttentionTorch(d, heads, pheads, tie_kv=tied)
    load_flat_state_dict(m, v, prefix)
    return m.eval()

  with torch.no_grad():
    if "pq_proj_weight" in v:
      m = attention(False, "")
      y, yp, probs = m(x, p, x_pad, None, need_weights=True)
      errors["out"] = err(y, v["out"])
      errors["pcontext"] = err(yp, v["pcontext"])
      if "out_f64" in v:
        errors["out_vs_f64"] = err(y, v["out_f64"])
        errors["pcontext_vs_f64"] = err(yp, v["pcontext_f64"])
      if "unpack_attn_probs" in v:
        errors["unpack_attn_probs"] = err(probs, v["unpack_attn_probs"])
      if "pkey_padding_mask_case2" in v:
        y, yp = m(x, p, x_pad, torch.as_tensor(v["pkey_padding_mask_case2"]))
        errors["out_case2"] = err(y, v["out_case2"])
        errors["pcontext_case2"] = err(yp, v["pcontext_case2"])
    if "tied_pq_proj_weight" in v:
      y, yp = attention(True, "tied_")(x, p, x_pad)
      errors["tied_out"] = err(y, v["tied_out"])
      errors["tied_pcontext"] = err(yp, v["tied_pcontext"])
    if "layer_x_out" in v:
      tied = "layer_self_attn_pc_proj_weight" in v
      layer = LunaEncoderLayerTorch(d, int(v["layer_fc1_weight"].shape[0]), heads, pheads,
                                    tie_kv=tied)
      load_flat_state_dict(layer, v, "layer_")
      xo, po = layer.eval()(x, p, x_pad)
      errors["layer_x_out"] = err(xo, v["layer_x_out"])
      errors["layer_p_out"] = err(po, v["layer_p_out"])
  if not errors:
    raise KeyError("none of: pq_proj_weight, tied_pq_proj_weight, layer_x_out")
  return errors


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_reference.check",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("vectors", help="npz in the layout of tests/fixtures/luna_vectors.npz")
  parser.add_argument("--tol", type=float, default=1e-5)
  args = parser.parse_args(argv)
  try:
    with np.load(args.vectors) as f:
      v = {k: f[k] for k in f.files}
  except (OSError, ValueError) as e:
    print(f"error: cannot read vectors file {args.vectors}: {e}", file=sys.stderr)
    return 2
  try:
    errors = check_bidirectional(v)
  except KeyError as e:
    print(f"error: {args.vectors}: missing entry {e}", file=sys.stderr)
    return 2
  print(f"{args.vectors} (torch {torch.__version__}, float32, eval mode)")
  worst = 0.0
  for name, e in errors.items():
    print(f"  {name:<28s} max|err| = {e:.3e}  {'ok' if e <= args.tol else 'FAIL'}")
    worst = max(worst, e)
  ok = worst <= args.tol
  print(f"{'PASS' if ok else 'FAIL'}: worst {worst:.3e} (tolerance {args.tol:.0e})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
