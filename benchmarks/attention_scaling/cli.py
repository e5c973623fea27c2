"""The command line: arguments, mode defaults, and `main` (a sweep, one `--isolate` child point,
or `--merge`)."""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from typing import Any, Sequence

import jax

from benchmarks.attention_scaling import machine
from benchmarks.attention_scaling.measure import run_point, run_sweep
from benchmarks.attention_scaling.report import (merge_reports, row_line, torch_peak_words,
                                                 write_json, write_outputs)
from benchmarks.attention_scaling.specs import (DEFAULT_LENGTHS, DEFAULT_MECHANISMS,
                                                MODE_DEFAULTS, parse_ints, parse_mechanisms)
from luna_jax import runtime

COMMAND = "python -m benchmarks.attention_scaling"


def build_parser() -> argparse.ArgumentParser:
  """The arguments; sizes left None take the mode's defaults (`resolve_defaults`)."""
  p = argparse.ArgumentParser(
      prog=COMMAND,
      description="Train-step time, memory and FLOPs of attention mechanisms against length.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--mechanisms", default=DEFAULT_MECHANISMS,
                 help="comma list; luna:16 is Luna with proj_len 16")
  p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma list of sequence lengths")
  p.add_argument("--mode", choices=("layer", "model"), default="layer",
                 help="layer: one attention layer fwd+bwd; model: Text classifier AdamW step")
  p.add_argument("--batch", type=int, default=None, help="None: 32 (model), 8 (layer)")
  p.add_argument("--dim", type=int, default=None, help="model width D; None: 256")
  p.add_argument("--heads", type=int, default=None, help="None: 4")
  p.add_argument("--layers", type=int, default=None, help="model mode (layer mode times one layer); None: 4")
  p.add_argument("--mlp-dim", type=int, default=None, help="model mode; None: 4 * dim")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--softmax-impl", choices=("xla", "cudnn", "auto"), default="xla")
  p.add_argument("--luna-flash", action="store_true",
                 help="Luna pack/unpack through jax.nn.dot_product_attention (cuDNN on GPU)")
  p.add_argument("--remat", action="store_true", help="rematerialise layers in the backward")
  p.add_argument("--dropout", type=float, default=0.1, help="model mode")
  p.add_argument("--attention-dropout", type=float, default=0.1,
                 help="model mode; forced to 0 for fused kernels (cudnn softmax, luna flash)")
  p.add_argument("--repeats", type=int, default=10, help="timed steps per point (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--max-seconds-per-point", type=float, default=0.0,
                 help="0: no limit; else stop timing a point past this and skip the "
                      "mechanism's longer lengths")
  p.add_argument("--memory-limit-gb", type=float, default=None,
                 help="points whose compiled estimate exceeds this are 'oom'; None: the "
                      "device's bytes_limit, or 90%% of available host memory on CPU")
  p.add_argument("--matmul-size", type=int, default=None,
                 help="matmul peak probe size; None: 2048 on CPU, 8192 on accelerators; "
                      "0 skips it")
  p.add_argument("--xla-fast-compile", action="store_true",
                 help="compile with XLA backend optimisations off (smoke tests; timings are "
                      "not representative)")
  p.add_argument("--isolate", action="store_true",
                 help="run each point in a fresh subprocess (clean device peak memory)")
  p.add_argument("--compare-speedup", default="softmax", metavar="LABEL",
                 help="baseline label of the relative table; 'none' to omit")
  p.add_argument("--fit-tail", type=int, default=3,
                 help="fit exponents on the last K ok lengths (0: all)")
  p.add_argument("--json", default=None, metavar="PATH")
  p.add_argument("--markdown", default=None, metavar="PATH")
  p.add_argument("--plot", default=None, metavar="PATH")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="combine earlier --json reports into one markdown/plot/JSON; runs nothing")
  p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
  return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
  """Fills the sizes left unset with the mode's defaults (layer mode: one layer)."""
  for key, value in MODE_DEFAULTS[args.mode].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.mode == "layer":
    args.layers = 1
  if args.mlp_dim is None:
    args.mlp_dim = 4 * args.dim
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; returns the report that `--json` writes."""
  args = resolve_defaults(build_parser().parse_args(argv))
  if args.merge:
    report = merge_reports(args.merge)
    write_outputs(report, args)
    return report
  if args.child_result:   # one point inside an --isolate subprocess
    spec = parse_mechanisms(args.mechanisms)[0]
    row = run_point(spec, parse_ints(args.lengths)[0], args,
                    machine.memory_limit_bytes(args.memory_limit_gb))
    write_json(row, args.child_result)
    return row

  command = f"{COMMAND} {shlex.join(sys.argv[1:] if argv is None else argv)}"
  report: dict[str, Any] = {
      "device": machine.device_description(), "backend": jax.default_backend(),
      "versions": machine.versions(), "command": command,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "mode": args.mode, "dtype": args.dtype,
      "host": {"cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
               "malloc": runtime.allocator()},
      "args": vars(args), "matmul_peak": None, "matmul_peak_flops": None, "results": []}
  size = args.matmul_size
  if size is None:
    size = 2048 if jax.default_backend() == "cpu" else 8192
  if size:
    report["matmul_peak"] = machine.measure_matmul_peak(size, args.dtype)
    report["xla_matmul_flops"] = report["matmul_peak"]["flops_per_s"]
    report["torch_matmul"] = (machine.measure_torch_matmul_peak(size) if args.dtype == "float32"
                              else None)
    torch_flops = (report["torch_matmul"] or {}).get("flops_per_s", 0.0)
    # The machine's peak: the better of XLA's and torch's matmul at the same size.
    report["matmul_peak_flops"] = max(report["xla_matmul_flops"], torch_flops)
    print(f"matmul ({size}^3 {args.dtype}): XLA {report['xla_matmul_flops'] / 1e9:.1f} GFLOP/s, "
          f"torch {torch_peak_words(report, 1e-9, 'GFLOP/s')}; peak = "
          f"{'the better' if torch_flops else 'XLA'}", flush=True)

  def on_row(row: dict[str, Any]) -> None:
    report["results"].append(row)
    write_json(report, args.json)   # partial results survive an interrupted sweep
    print(row_line(row), flush=True)

  run_sweep(args, report, on_row)
  report["host"]["load_average_end"] = list(os.getloadavg())
  write_outputs(report, args)
  return report
