r"""Softmax attention "xla" against "blocked" (attention/blocked.py) on this machine.

1. The small-protocol ListOps training step (`configs/listops.py:softmax,small`: 2 layers, width
   64, 2 heads, N = 2,000, batch 32) with each `model.softmax.implementation`, each in a fresh
   process (`benchmarks/xla_flags.py`'s worker: the trainer's own `train_step`, state donated,
   synthetic batch, compile + --warmup steps, then --repeats timed steps; median wall time and
   the process's peak RSS). Rounds alternate the implementations.
2. With --lengths: the attention module alone (the config's batch, width, heads and attention
   dropout; real lengths uniform in [N/4, N], or N with --unpadded), forward + backward w.r.t. its parameters and
   input, both implementations timed round-robin in one process at each N (median of
   --repeats), with XLA's temporary bytes of each compiled program: where "auto" should switch
   to "blocked" (`common.BLOCKED_MIN_KEYS`).

  python -m benchmarks.softmax_step --warmup 1 --repeats 3 --lengths 256,512,1024,2048 \
      --out_json benchmarks/results/cpu_softmax_blocked.json \
      --out_md benchmarks/results/cpu_softmax_blocked.md
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
from typing import Any

from benchmarks import step_breakdown, xla_flags
from luna_jax import runtime

IMPLEMENTATIONS = ("xla", "blocked")


def training_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per implementation: median step ms, compile + first step s, peak RSS MB."""
  if args.rounds == 0:
    return []
  runs: dict[str, list[dict]] = {impl: [] for impl in IMPLEMENTATIONS}
  errors = {}
  for _ in range(args.rounds):
    for impl in IMPLEMENTATIONS:
      step_args = argparse.Namespace(**{
          **vars(args), "config": f"{args.config},model.softmax.implementation={impl}"})
      r, error = xla_flags.run_worker(xla_flags.step_argv(step_args))
      if r is None:
        errors[impl] = error
        print(f"{impl}: failed: {error}", flush=True)
        continue
      runs[impl].append(r)
      print(f"{impl}: {statistics.median(r['wall_s']) * 1e3:.0f} ms/step, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, first {r['first_s']:.1f} s", flush=True)
  rows = []
  for impl in IMPLEMENTATIONS:
    if not runs[impl]:
      rows.append({"implementation": impl, "error": errors.get(impl, "")})
      continue
    rows.append({"implementation": impl,
                 "step_ms": statistics.median(statistics.median(r["wall_s"])
                                              for r in runs[impl]) * 1e3,
                 "cpu_ms": statistics.median(statistics.median(r["cpu_s"])
                                             for r in runs[impl]) * 1e3,
                 "first_s": statistics.median(r["first_s"] for r in runs[impl]),
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[impl]),
                 "runs": runs[impl]})
  return rows


def attention_lengths(args: argparse.Namespace, lengths: list[int]) -> list[dict[str, Any]]:
  """Per N: forward + backward ms and XLA temporary MB of the module, xla and blocked."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from luna_jax.attention.softmax import SoftmaxAttention
  from luna_jax.experiments import sweep

  path, _, arg = args.config.partition(":")
  config = sweep.resolve_config(path, arg, [])
  m = config.model
  b, d = config.batch_size, m.emb_dim
  rows = []
  for n in lengths:
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    low = n if args.unpadded else n // 4
    mask = jnp.asarray(np.arange(n)[None] < rng.integers(low, n + 1, size=(b, 1)))
    fns, temp_mb = {}, {}
    for impl in IMPLEMENTATIONS:
      module = SoftmaxAttention(num_heads=m.num_heads, dropout_rate=m.attention_dropout,
                                use_bias=m.qkv_bias, implementation=impl,
                                **{k: v for k, v in m.softmax.items() if k != "implementation"})
      params = module.init(jax.random.key(0), x, mask)["params"]

      def loss(params, x, mask, module=module):
        y, _ = module.apply({"params": params}, x, mask, deterministic=False,
                            rngs={"dropout": jax.random.key(1)})
        return jnp.sum(y)
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, mask).compile()
      temp_mb[impl] = compiled.memory_analysis().temp_size_in_bytes / 2**20
      fns[impl] = functools.partial(compiled, params, x, mask)
    ms = step_breakdown._interleaved_medians(fns, args.warmup, args.repeats)
    row = {"n": n, **{f"{impl}_ms": ms[impl] * 1e3 for impl in IMPLEMENTATIONS},
           **{f"{impl}_temp_mb": temp_mb[impl] for impl in IMPLEMENTATIONS}}
    print(f"N={n}: " + ", ".join(f"{impl} {row[impl + '_ms']:.0f} ms "
                                 f"({row[impl + '_temp_mb']:.0f} MB temp)"
                                 for impl in IMPLEMENTATIONS), flush=True)
    rows.append(row)
  return rows


def markdown(rep: dict[str, Any]) -> str:
  lines = [f"`{rep['command']}`", "",
           f"{rep['date']}; {rep['machine']}, {rep['cpu_count']} CPUs; jax {rep['jax']}; "
           f"allocator {rep['malloc']}; load {rep['load_before']:.2f} -> "
           f"{rep['load_after']:.2f}."]
  if rep["steps"]:
    lines += ["", f"Training step of `{rep['config']}` (synthetic batch, real lengths "
              f"{rep['batch_lengths'][0]}-{rep['batch_lengths'][1]}; median of "
              f"{rep['repeats']} steps after {rep['warmup']} warmup, median over "
              f"{rep['rounds']} round(s)):", "",
              "| implementation | step ms | vs xla | process CPU ms | compile + first s "
              "| peak RSS MB |", "|---|---|---|---|---|---|"]
  base = next((r["step_ms"] for r in rep["steps"]
               if r["implementation"] == "xla" and "step_ms" in r), None)
  for r in rep["steps"]:
    if "error" in r:
      lines.append(f"| {r['implementation']} | failed: {r['error']} | | | | |")
      continue
    rel = f"{base / r['step_ms']:.2f}x" if base else ""
    lines.append(f"| {r['implementation']} | {r['step_ms']:.0f} | {rel} | {r['cpu_ms']:.0f} | "
                 f"{r['first_s']:.1f} | {r['peak_rss_mb']:.0f} |")
  if rep["lengths"]:
    real = "N" if rep["unpadded"] else "uniform in [N/4, N]"
    lines += ["", f"Attention module alone, real lengths {real}, forward + backward (median of "
              f"{rep['repeats']} round-robin runs; XLA temporaries of the compiled program):",
              "", "| N | xla ms | blocked ms | blocked vs xla | xla temp MB | blocked temp MB |",
              "|---|---|---|---|---|---|"]
    for r in rep["lengths"]:
      lines.append(f"| {r['n']} | {r['xla_ms']:.1f} | {r['blocked_ms']:.1f} | "
                   f"{r['xla_ms'] / r['blocked_ms']:.2f}x | {r['xla_temp_mb']:.0f} | "
                   f"{r['blocked_temp_mb']:.0f} |")
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  xla_flags.add_step_arguments(parser)
  parser.set_defaults(config="configs/listops.py:softmax,small", warmup=1, repeats=3)
  parser.add_argument("--rounds", type=int, default=1, help="0: no training steps")
  parser.add_argument("--lengths", default="", help="comma-separated N for the module timing")
  parser.add_argument("--unpadded", action="store_true",
                      help="module timing without padding (real lengths N, not N/4-N)")
  parser.add_argument("--out_json", default="")
  parser.add_argument("--out_md", default="")
  return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else argv
  args = build_parser().parse_args(argv)
  load_before = os.getloadavg()[0]
  steps = training_steps(args)
  lengths = attention_lengths(args, [int(n) for n in args.lengths.split(",") if n])
  import jax
  rep = {"command": "python -m benchmarks.softmax_step " + " ".join(argv),
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "machine": runtime.cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
         "malloc": runtime.allocator(), "config": args.config,
         "batch_lengths": [args.min_len, args.max_len], "warmup": args.warmup,
         "repeats": args.repeats, "rounds": args.rounds, "unpadded": args.unpadded,
         "load_before": load_before,
         "load_after": os.getloadavg()[0], "steps": steps, "lengths": lengths}
  step_breakdown.write_report(rep, markdown(rep), args.out_json, args.out_md)
  return rep


if __name__ == "__main__":
  runtime.preload_tcmalloc()       # the workers inherit it, as train.py's step would have it
  runtime.set_cpu_dispatch()
  main()
