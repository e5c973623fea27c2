r"""Per-op profile of benchmarks/compare_torch.py's JAX step: where XLA:CPU spends the time.

Traces --steps executions of the compiled step (forward + backward of Luna attention or the Luna
encoder layer, the same sizes and inputs as compare_torch.py) with `jax.profiler`, reads the
per-op events of the Perfetto trace, and splits the op time into dots (XLA ops or fusions that
contain a `dot`) and everything else (softmax, LayerNorm, GELU, transposes and copies), with the
slowest ops named by their HLO op and the model code that emitted them. Ops can overlap (XLA:CPU
runs independent ops concurrently), so op times can add up to more than the step's wall time.

  python -m benchmarks.op_profile --what layer --n 4096 --l 256 \
      --out_json benchmarks/results/cpu_op_profile_layer_4k_256.json

With --config, the step profiled is instead the trainer's `train_step` for that config on the
synthetic batch of benchmarks/xla_flags.py (e.g. configs/listops.py:luna,small,l=16).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

from benchmarks import compare_torch


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Top-level and fused HLO instructions by name: shape, opcode, the computation a fusion calls,
  the op_name metadata, and whether it is or contains a dot."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (\S+) (\w+)\(", line)
    if not m:
      continue
    name, shape, opcode = m.groups()
    called = re.search(r"calls=%([\w.\-]+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    body = comps.get(called.group(1), []) if called else []
    ops[name] = {"shape": shape, "opcode": opcode,
                 "op_name": op_name.group(1) if op_name else "",
                 "dot": opcode == "dot" or any(" dot(" in b for b in body)}
  return ops


def _step(args: argparse.Namespace):
  """(jitted step, its arguments): compare_torch's module step, or the trainer's train_step."""
  if not args.config:
    return compare_torch.jax_step(args)
  import functools
  import jax
  from benchmarks import xla_flags
  from luna_jax import steps
  _, _, state, batch = xla_flags.synthetic_setup(args)
  step = jax.jit(functools.partial(steps.train_step, redraw_every=0))
  return step, (state, batch, jax.random.key(1))


def op_kind(name: str) -> str:
  """An op's kind for the summary: its HLO name without the numeric suffix
  (copy_bitcast_fusion.12 -> copy_bitcast_fusion)."""
  return re.sub(r"\.\d+$", "", name)


def profile(args: argparse.Namespace) -> dict[str, Any]:
  import jax
  step, operands = _step(args)
  compiled = step.lower(*operands).compile()
  ops = hlo_ops(compiled.as_text())
  for _ in range(args.warmup):
    jax.block_until_ready(compiled(*operands))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      jax.block_until_ready(compiled(*operands))
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))
    if not trace:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
    events = json.load(gzip.open(trace[-1]))["traceEvents"]
  per_op: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in ops:
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps
  split = {"dot": 0.0, "other": 0.0}
  counts = {"dot": 0, "other": 0}
  for name in per_op:
    kind = "dot" if ops[name]["dot"] else "other"
    split[kind] += per_op[name]
    counts[kind] += 1
  by_kind: collections.Counter = collections.Counter()
  kind_ops: collections.Counter = collections.Counter()
  for name, ms in per_op.items():
    kind = "dots (any op or fusion with a dot)" if ops[name]["dot"] else op_kind(name)
    by_kind[kind] += ms
    kind_ops[kind] += 1
  kinds = [{"kind": k, "ms": ms, "ops": kind_ops[k]} for k, ms in by_kind.most_common(args.top)]
  top = [{"op": name, "ms": ms, "kind": "dot" if ops[name]["dot"] else "other",
          "shape": ops[name]["shape"], "source": ops[name]["op_name"]}
         for name, ms in per_op.most_common(args.top)]
  step_name = (f"train_step of {args.config}" if args.config else
                f"{args.what} N={args.n} l={args.l} (B={args.batch}, D={args.dim}, "
                f"{args.heads} heads, FFN {args.ffn})")
  return {"step": step_name, "config": args.config, "what": args.what, "n": args.n,
          "l": args.l, "batch": args.batch, "dim": args.dim, "heads": args.heads,
          "ffn": args.ffn, "steps": args.steps, "wall_ms": wall_ms, "dot_ms": split["dot"],
          "other_ms": split["other"], "dot_ops": counts["dot"], "other_ops": counts["other"],
          "kinds": kinds, "top": top, "versions": {"jax": jax.__version__}}


def report_text(rep: dict[str, Any]) -> str:
  lines = [f"{rep['step']}: {rep['wall_ms']:.0f} ms wall per step; op time "
           f"dots {rep['dot_ms']:.0f} ms ({rep['dot_ops']} ops), other {rep['other_ms']:.0f} ms "
           f"({rep['other_ops']} ops)", "", "| ms | ops | kind |", "|---|---|---|"]
  lines += [f"| {k['ms']:.1f} | {k['ops']} | {k['kind']} |" for k in rep["kinds"]]
  lines += ["", "| ms | kind | op | shape | emitted by |", "|---|---|---|---|---|"]
  for t in rep["top"]:
    src = re.sub(r"^jit\([\w]+\)/", "", t["source"])
    lines.append(f"| {t['ms']:.1f} | {t['kind']} | {t['op']} | {t['shape']} | {src} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  from benchmarks import xla_flags
  step_flags = argparse.ArgumentParser(add_help=False)
  xla_flags.add_step_arguments(step_flags)
  # compare_torch's sizes for the module step; xla_flags' synthetic batch for --config.
  for parser, flags in ((compare_torch.build_parser(),
                         ("--batch", "--dim", "--heads", "--ffn", "--pad_frac", "--seed")),
                        (step_flags, ("--vocab", "--classes", "--min_len", "--max_len"))):
    for flag in flags:
      action = next(a for a in parser._actions if flag in a.option_strings)
      ap.add_argument(flag, type=action.type, default=action.default, help=action.help)
  ap.add_argument("--config", default="",
                  help="profile the trainer's train_step for this config instead (path[:arg])")
  ap.add_argument("--what", default="layer", choices=compare_torch.WHATS)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--l", type=int, default=256)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5, help="traced steps (op times are per step)")
  ap.add_argument("--top", type=int, default=20, help="slowest ops listed")
  ap.add_argument("--out_json", default="")
  ap.add_argument("--out_md", default="")
  args = ap.parse_args(argv)
  rep = profile(args)
  text = report_text(rep)
  print(text)
  compare_torch.write_outputs(args.out_json, rep, args.out_md, text)
  return rep


if __name__ == "__main__":
  main()
