"""One (mechanism, length) point: compile, FLOPs and memory analysis, timed steps, as a result
row; in this process or a fresh one (`--isolate`); and the sweep over all points."""
from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax

from benchmarks.attention_scaling.machine import device_peak_bytes, memory_limit_bytes
from benchmarks.attention_scaling.specs import MechanismSpec, parse_ints, parse_mechanisms
from benchmarks.attention_scaling.steps import (attention_impl, build_layer_step,
                                                build_model_step, compiler_options,
                                                uses_fused_kernel)

REPO = pathlib.Path(__file__).resolve().parents[2]
OOM_MARKERS = ("resource_exhausted", "out of memory", "failed to allocate",
               "oom when allocating")   # compared in lower case
WHILE_OP = re.compile(r"\bwhile\(")
RESULT_FIELDS = ("mechanism", "proj_len", "length", "batch", "dim", "heads", "layers", "mode",
                 "dtype", "status", "compile_time_s", "step_time_s", "examples_per_s",
                 "tokens_per_s", "peak_memory_bytes", "flops", "achieved_flops_per_s",
                 "fraction_of_peak")


# ----------------------------------------------------------------------------- compiled analysis

def is_oom_error(exc: BaseException) -> bool:
  """True for XLA allocation failures (RESOURCE_EXHAUSTED, out of memory, ...)."""
  text = f"{type(exc).__name__}: {exc}".lower()
  return isinstance(exc, MemoryError) or any(m in text for m in OOM_MARKERS)


def cost_flops(compiled: Any) -> float | None:
  """FLOPs from `compiled.cost_analysis()`, which is a dict, a list of dicts or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def lowered_flops(lowered: Any) -> float | None:
  """FLOPs of a lowered (not compiled) computation, from its unoptimised HLO."""
  return cost_flops(lowered)


def memory_breakdown(compiled: Any) -> dict[str, int] | None:
  """Byte sizes from `compiled.memory_analysis()` (None where unsupported)."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if mem is None:
    return None
  out = {}
  for key in ("temp", "argument", "output", "alias", "generated_code"):
    out[key] = int(getattr(mem, f"{key}_size_in_bytes", 0) or 0)
  return out


def estimated_peak_bytes(breakdown: dict[str, int] | None) -> int | None:
  """temp + argument + output, minus outputs that alias (donated) arguments."""
  if breakdown is None:
    return None
  return breakdown["temp"] + breakdown["argument"] + breakdown["output"] - breakdown["alias"]


# ----------------------------------------------------------------------------- one point

def point_label(spec: MechanismSpec, args: argparse.Namespace) -> str:
  """The spec as typed, plus "[cudnn]" / "[flash]" when a fused kernel runs."""
  if not uses_fused_kernel(spec, args):
    return spec.label
  return f"{spec.label}[{'cudnn' if spec.name == 'softmax' else 'flash'}]"


def base_row(spec: MechanismSpec, length: int, args: argparse.Namespace) -> dict[str, Any]:
  """The point's row before it runs: what it is, status "error", no measurements."""
  dropout_active = args.mode == "model" and not uses_fused_kernel(spec, args)
  row = {f: None for f in RESULT_FIELDS}
  row.update(
      mechanism=spec.name, label=point_label(spec, args), proj_len=spec.proj_len, length=length,
      batch=args.batch, dim=args.dim, heads=args.heads, layers=args.layers, mode=args.mode,
      dtype=args.dtype, status="error", mlp_dim=args.mlp_dim if args.mode == "model" else None,
      remat=args.remat,
      attention_impl=attention_impl(spec, args, dropout_active and args.attention_dropout > 0),
      attention_dropout=(args.attention_dropout if dropout_active else 0.0),
      repeats_done=0, step_times_s=[], device_peak_bytes_in_use=None, memory_analysis=None,
      flops_compiled=None, flops_source=None, flops_note=None, message=None,
      point_seconds=None)
  return row


def run_point(spec: MechanismSpec, length: int, args: argparse.Namespace,
              limit_bytes: int | None, cache: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles, runs and measures one (mechanism, length); never raises (bar KeyboardInterrupt).

  `cache` carries the mechanism's initial parameters from one length to the next.
  """
  row = base_row(spec, length, args)
  t_start = time.perf_counter()
  peak_before = device_peak_bytes()
  step = None
  try:
    if spec.error:
      raise ValueError(spec.error)
    build = build_layer_step if args.mode == "layer" else build_model_step
    step = build(spec, length, args, {} if cache is None else cache)
    t0 = time.perf_counter()
    compiled = step.fn.lower(*step.args).compile(compiler_options=compiler_options(args))
    row["compile_time_s"] = time.perf_counter() - t0
    row["memory_analysis"] = memory_breakdown(compiled)
    row["peak_memory_bytes"] = estimated_peak_bytes(row["memory_analysis"])
    row["flops_compiled"] = cost_flops(compiled)
    row["flops"], row["flops_source"] = row["flops_compiled"], "compiled"
    if step.twin is not None:
      # Cost analysis does not see inside fused-kernel custom calls: count the XLA twin.
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), step.args)
      row["flops"], row["flops_source"] = lowered_flops(step.twin.lower(*shapes)), "xla_twin"
    if WHILE_OP.search(compiled.as_text() or ""):
      row["flops_note"] = "while loop in the HLO: cost analysis counts a loop body once"
    if limit_bytes and row["peak_memory_bytes"] and row["peak_memory_bytes"] > limit_bytes:
      row["status"] = "oom"
      row["message"] = (f"estimated {row['peak_memory_bytes'] / 2**30:.2f} GiB exceeds the "
                        f"limit {limit_bytes / 2**30:.2f} GiB; not run")
      return row

    call_args = step.args
    budget = args.max_seconds_per_point
    for _ in range(args.warmup):
      out = jax.block_until_ready(compiled(*call_args))
      call_args = step.next_args(call_args, out)
    times = []
    for _ in range(max(1, args.repeats)):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(*call_args))
      times.append(time.perf_counter() - t0)
      call_args = step.next_args(call_args, out)
      if budget and time.perf_counter() - t_start > budget:
        break
    del out, call_args
    step_time = statistics.median(times)
    row.update(status="ok", step_times_s=times, repeats_done=len(times), step_time_s=step_time,
               examples_per_s=args.batch / step_time, tokens_per_s=args.batch * length / step_time)
    if row["flops"]:
      row["achieved_flops_per_s"] = row["flops"] / step_time
    peak_after = device_peak_bytes()
    # The device counter is a process-wide maximum: it belongs to this point only if it rose.
    if peak_after is not None and (peak_before is None or peak_after > peak_before):
      row["device_peak_bytes_in_use"] = int(peak_after)
  except KeyboardInterrupt:
    raise
  except Exception as exc:  # noqa: BLE001 - every failure becomes a row
    row["status"] = "oom" if is_oom_error(exc) else "error"
    row["message"] = f"{type(exc).__name__}: {exc}"[:2000]
  finally:
    row["point_seconds"] = time.perf_counter() - t_start
    del step
    gc.collect()
  return row


def child_argv(spec: MechanismSpec, length: int, args: argparse.Namespace,
               result_path: str) -> list[str]:
  """Command line that runs one point in a fresh process (`--isolate`), from `REPO`."""
  argv = [sys.executable, "-m", "benchmarks.attention_scaling",
          "--mode", args.mode, "--mechanisms", spec.label, "--lengths", str(length),
          "--batch", str(args.batch), "--dim", str(args.dim), "--heads", str(args.heads),
          "--layers", str(args.layers), "--mlp-dim", str(args.mlp_dim), "--dtype", args.dtype,
          "--softmax-impl", args.softmax_impl, "--repeats", str(args.repeats),
          "--warmup", str(args.warmup), "--dropout", str(args.dropout),
          "--attention-dropout", str(args.attention_dropout),
          "--max-seconds-per-point", str(args.max_seconds_per_point or 0),
          "--child-result", result_path]
  if args.luna_flash:
    argv.append("--luna-flash")
  if args.xla_fast_compile:
    argv.append("--xla-fast-compile")
  if args.remat:
    argv.append("--remat")
  if args.memory_limit_gb is not None:
    argv += ["--memory-limit-gb", str(args.memory_limit_gb)]
  return argv


def run_point_isolated(spec: MechanismSpec, length: int, args: argparse.Namespace
                       ) -> dict[str, Any]:
  """Runs one point in a subprocess: a clean device peak counter, and crashes stay contained."""
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    result_path = os.path.join(tmp, "row.json")
    timeout = 5 * args.max_seconds_per_point + 300 if args.max_seconds_per_point else None
    try:
      # From the repository root, so `-m benchmarks.attention_scaling` finds this package.
      proc = subprocess.run(child_argv(spec, length, args, result_path), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
      row = base_row(spec, length, args)
      row.update(message=f"timed out after {timeout} s", point_seconds=time.perf_counter() - t0)
      return row
    if os.path.exists(result_path):
      with open(result_path) as f:
        return json.load(f)
  row = base_row(spec, length, args)
  killed = proc.returncode in (-9, 137)
  row.update(status="oom" if killed else "error", point_seconds=time.perf_counter() - t0,
             message=(f"child exited with {proc.returncode}"
                      + (" (killed: likely out of host memory)" if killed else "")
                      + f"; stderr tail: {proc.stderr[-1500:]}"))
  return row


# ----------------------------------------------------------------------------- the sweep

def finish_row(row: dict[str, Any], peak_flops: float | None,
               xla_flops: float | None = None) -> dict[str, Any]:
  """fraction_of_peak: of the machine's peak (the better of XLA's and torch's matmul);
  fraction_of_xla_matmul: of XLA's own matmul (flatters where XLA's matmul is the slower)."""
  if row.get("achieved_flops_per_s") and peak_flops:
    row["fraction_of_peak"] = row["achieved_flops_per_s"] / peak_flops
  if row.get("achieved_flops_per_s") and xla_flops:
    row["fraction_of_xla_matmul"] = row["achieved_flops_per_s"] / xla_flops
  return row


def skipped_row(spec: MechanismSpec, length: int, args: argparse.Namespace,
                reason: str) -> dict[str, Any]:
  """The row of a point not run, with the reason."""
  row = base_row(spec, length, args)
  row.update(status="skipped", message=reason)
  return row


def run_sweep(args: argparse.Namespace, report: dict[str, Any],
              on_row: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
  """All (mechanism, length) points; after an oom, error or too-slow point the mechanism's
  longer lengths are skipped."""
  limit_bytes = memory_limit_bytes(args.memory_limit_gb)
  report["memory_limit_bytes"] = limit_bytes
  peak = report.get("matmul_peak_flops")
  results = []
  for spec in parse_mechanisms(args.mechanisms):
    stop_reason = None
    cache: dict[str, Any] = {}
    for length in sorted(parse_ints(args.lengths)):
      if stop_reason:
        row = skipped_row(spec, length, args, stop_reason)
      elif args.isolate:
        row = run_point_isolated(spec, length, args)
      else:
        row = run_point(spec, length, args, limit_bytes, cache)
      finish_row(row, peak, report.get("xla_matmul_flops"))
      results.append(row)
      on_row(row)
      if row["status"] in ("oom", "error") and not stop_reason:
        stop_reason = f"skipped: {row['label']} at length {length} was {row['status']}"
      elif (row["status"] == "ok" and args.max_seconds_per_point
            and row["point_seconds"] > args.max_seconds_per_point):
        stop_reason = (f"skipped: {row['label']} at length {length} took "
                       f"{row['point_seconds']:.1f} s > {args.max_seconds_per_point} s")
  return results
