r"""The matrix products of a Luna training step, one at a time: XLA:CPU (jax) against torch.

Every dot of the forward and backward pass of one Luna encoder layer (the --preset's sizes) is
timed alone as a jitted `lax.dot_general` and as `torch.matmul` on views with the same operand
orientation (NN = A[M,K] B[K,N]; NT = A B^T, the input gradients; TN = A^T B, the weight
gradients), float32, in alternating fresh subprocesses (one per framework and round; each shape
gets --warmup untimed and --repeats timed calls, median kept). Where the per-shape ratios are
below 1, the library's dots, not the code around them, set the pace: that is the question this
answers for benchmarks/compare_torch.py's table.

  python -m benchmarks.gemm_shapes --preset layer_4k --out_json benchmarks/results/cpu_gemm_layer_4k.json \
      --out_md benchmarks/results/cpu_gemm_layer_4k.md
  python -m benchmarks.gemm_shapes --preset small_protocol   # configs/listops.py:luna,small,l=16

Needs torch for its half (`pip install -r benchmarks/requirements-torch.txt`); without it, or
with --frameworks jax, the jax column alone is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import Any

from benchmarks import compare_torch

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


def layer_gemms(tokens: int, d: int, ffn: int, batch: int, heads: int, l: int,
                block_diagonal: bool) -> list[dict[str, Any]]:
  """(name, batch dims, M, K, N, orientation) of the dots of one Luna layer's forward and
  backward pass: fused X projections (pk, pv, q), out_proj, FFN, and the pack/unpack products
  (per head, or with all heads as one block-diagonal operand of H*l rows)."""
  n = tokens // batch
  out = []

  def add(name, m, k, nn, orient, b=1):
    out.append({"name": name, "batch": b, "m": m, "k": k, "n": nn, "orient": orient})

  for name, fan_out in (("x projections (pk,pv,q)", 3 * d), ("out_proj", d), ("fc1", ffn)):
    fan_in = d
    add(f"{name} fwd", tokens, fan_in, fan_out, "NN")
    add(f"{name} dX", tokens, fan_out, fan_in, "NT")
    add(f"{name} dW", fan_in, tokens, fan_out, "TN")
  add("fc2 fwd", tokens, ffn, d, "NN")
  add("fc2 dX", tokens, d, ffn, "NT")
  add("fc2 dW", ffn, tokens, d, "TN")
  if block_diagonal:    # [B, H*l, D] x [B, N, D]: all heads at once
    rows, width, bb = heads * l, d, batch
  else:                 # per head: [B*H, l, dh] x [B*H, N, dh]
    rows, width, bb = l, d // heads, batch * heads
  add("pack scores", rows, width, n, "NT", bb)
  add("pack context", rows, n, width, "NN", bb)
  add("unpack scores", n, width, rows, "NT", bb)
  add("unpack output", n, rows, width, "NN", bb)
  add("pack scores dK", n, rows, width, "TN", bb)
  add("unpack output dA", n, width, rows, "NT", bb)
  return out


PRESETS = {
    # compare_torch's encoder layer at N=4096, l=256: B=2, D=256, 4 heads, FFN 1024.
    "layer_4k": dict(tokens=2 * 4096, d=256, ffn=1024, batch=2, heads=4, l=256,
                     block_diagonal=False),
    # configs/listops.py:luna,small,l=16: B=32, N=2000, width 64, FFN 128, 4 heads.
    "small_protocol": dict(tokens=32 * 2000, d=64, ffn=128, batch=32, heads=4, l=16,
                           block_diagonal=True),
}


def _operands(g: dict[str, Any], np_rng) -> tuple[Any, Any]:
  """float32 numpy operands stored in the orientation's layout: A is [K, M] for TN, B is [N, K]
  for NT (so the product reads a transposed view, as autodiff's dots do)."""
  b, m, k, n = g["batch"], g["m"], g["k"], g["n"]
  a_shape = (b, k, m) if g["orient"] == "TN" else (b, m, k)
  b_shape = (b, n, k) if g["orient"] == "NT" else (b, k, n)
  import numpy as np
  return (np_rng.standard_normal(a_shape, dtype=np.float32),
          np_rng.standard_normal(b_shape, dtype=np.float32))


def worker(framework: str, gemms: list[dict[str, Any]], warmup: int, repeats: int
           ) -> dict[str, Any]:
  import numpy as np
  rng = np.random.default_rng(0)
  ms = []
  if framework == "jax":
    import jax
    from jax import lax
    ver = {"jax": jax.__version__}
    for g in gemms:
      a, b = (jax.device_put(x) for x in _operands(g, rng))
      lhs_c = 1 if g["orient"] == "TN" else 2     # contracting dim of A as stored
      rhs_c = 2 if g["orient"] == "NT" else 1
      f = jax.jit(lambda a, b, lc=lhs_c, rc=rhs_c: lax.dot_general(
          a, b, (((lc,), (rc,)), ((0,), (0,)))))
      ms.append(compare_torch.time_steps(lambda: f(a, b).block_until_ready(), warmup,
                                            repeats)["median_ms"])
  else:
    import torch
    ver = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
      for g in gemms:
        a, b = (torch.from_numpy(x) for x in _operands(g, rng))
        a = a.transpose(1, 2) if g["orient"] == "TN" else a
        b = b.transpose(1, 2) if g["orient"] == "NT" else b
        ms.append(compare_torch.time_steps(lambda: torch.matmul(a, b), warmup,
                                            repeats)["median_ms"])
  return {"ms": ms, "versions": ver}


def _run(framework: str, args: argparse.Namespace) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "benchmarks.gemm_shapes", "--worker", framework,
         "--preset", args.preset, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                  os.environ.get("PYTHONPATH")])))
  if framework == "jax":
    env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"{framework} worker failed:\n{(proc.stderr or proc.stdout)[-2000:]}")


def markdown(report: dict[str, Any]) -> str:
  m = report["meta"]
  fws = m["frameworks"]
  lines = [f"# Matrix products of one Luna layer ({m['preset']}): "
           + " vs ".join(fws) + " (CPU, float32)", "",
           f"{m['date']}; {m['cpu_model']}; {m['versions']}; sizes {m['sizes']}; median of "
           f"{m['repeats']} after {m['warmup']} warmup calls, median over {m['rounds']} "
           f"alternating round(s); {m['load_before']} -> {m['load_after']} load.", "",
           "| dot | batch x M x K x N | form | GFLOP | " + " | ".join(
               f"{f} ms | {f} GFLOP/s" for f in fws) + (" | torch ms / jax ms |"
                                                        if len(fws) == 2 else ""),
           "|" + "---|" * (4 + 2 * len(fws) + (len(fws) == 2))]
  for r in report["rows"]:
    cells = [r["name"], f"{r['batch']} x {r['m']} x {r['k']} x {r['n']}", r["orient"],
             f"{r['gflop']:.2f}"]
    for f in fws:
      cells += [f"{r[f + '_ms']:.2f}", f"{r['gflop'] / r[f + '_ms'] * 1e3:.0f}"]
    if len(fws) == 2:
      cells.append(f"{r['torch_ms'] / r['jax_ms']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  tot = {f: sum(r[f + "_ms"] for r in report["rows"]) for f in fws}
  gf = sum(r["gflop"] for r in report["rows"])
  cells = ["all of the above", "", "", f"{gf:.2f}"]
  for f in fws:
    cells += [f"{tot[f]:.1f}", f"{gf / tot[f] * 1e3:.0f}"]
  if len(fws) == 2:
    cells.append(f"{tot['torch'] / tot['jax']:.2f}")
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="layer_4k", choices=sorted(PRESETS))
  ap.add_argument("--frameworks", default="jax,torch", help="jax, torch or both")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out_json", default="")
  ap.add_argument("--out_md", default="")
  ap.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  gemms = layer_gemms(**PRESETS[args.preset])
  if args.worker:
    print(RESULT_PREFIX + json.dumps(worker(args.worker, gemms, args.warmup, args.repeats)),
          flush=True)
    return None
  fws = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  if "torch" in fws:
    try:
      import torch  # noqa: F401
    except ImportError:
      print("torch is not installed: timing jax only", file=sys.stderr)
      fws.remove("torch")
  from luna_jax import runtime
  load_before = os.getloadavg()
  runs: dict[str, list] = {f: [] for f in fws}
  versions: dict[str, Any] = {}
  for _ in range(args.rounds):
    for f in fws:
      res = _run(f, args)
      runs[f].append(res["ms"])
      versions.update(res["versions"])
  rows = []
  for i, g in enumerate(gemms):
    row = dict(g, gflop=2 * g["batch"] * g["m"] * g["k"] * g["n"] / 1e9)
    for f in fws:
      row[f + "_ms"] = statistics.median(r[i] for r in runs[f])
    rows.append(row)
  report = {"meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "cpu_model": runtime.cpu_model(), "versions": versions,
                     "preset": args.preset, "sizes": PRESETS[args.preset], "frameworks": fws,
                     "rounds": args.rounds, "warmup": args.warmup, "repeats": args.repeats,
                     "load_before": [round(x, 2) for x in load_before],
                     "load_after": [round(x, 2) for x in os.getloadavg()],
                     "command": [sys.executable, *sys.argv], "dtype": "float32"},
            "rows": rows, "runs": runs}
  md = markdown(report)
  print(md)
  compare_torch.write_outputs(args.out_json, report, args.out_md, md)
  return report


if __name__ == "__main__":
  main()
