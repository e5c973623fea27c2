r"""Attention scaling benchmark: train-step time, memory and FLOPs against sequence length.

Two modes:
* `layer`: one attention layer, forward + backward of mean(y**2) with respect to its params and
  its input (and Luna's P), deterministic (no dropout).
* `model`: the byte-level Text classifier of LRA Table 2 (4 layers, D=256, 4 heads, MLP 1024,
  batch 32, 259-token vocabulary), one AdamW train step (forward + backward + update, dropout on).

Every point reports compile time, the median step time after warm-up, examples/s and tokens/s,
the compiled memory estimate (temp + argument + output - aliased bytes, any backend), the
device's `peak_bytes_in_use` where the backend reports it, the compiled FLOP count and the
fraction of the device's matmul peak measured in the same run. Points that do not fit are rows
with status "oom", failures rows with status "error"; neither stops the sweep.

Usage, from the repository root:
  python benchmarks/attention_scaling.py --mode layer --lengths 1024,2048,4096 \
      --mechanisms softmax,luna:16,luna:256 --dtype bfloat16 \
      --json out/layer.json --markdown out/layer.md --plot out/layer.png
  python benchmarks/attention_scaling.py --mode model --lengths 1024,2048,3072,4096 \
      --mechanisms softmax,luna:256,performer --softmax-impl cudnn --luna-flash --json out/model.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax  # noqa: E402

from luna_jax import runtime  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_MECHANISMS = "softmax,luna:16,luna:256,cheap_linear,linear_elu,performer,learned_kernel"
DEFAULT_LENGTHS = "1024,2048,4096"
DEFAULT_LUNA_PROJ_LEN = 16
VOCAB_SIZE = 259          # 256 bytes + specials, as the Text task
NUM_CLASSES = 2
# Mode defaults for the sizes (model: LRA Table 2 Text; layer: one layer of the same width).
MODE_DEFAULTS = {
    "model": {"batch": 32, "dim": 256, "heads": 4, "layers": 4},
    "layer": {"batch": 8, "dim": 256, "heads": 4, "layers": 1},
}
OOM_MARKERS = ("resource_exhausted", "out of memory", "failed to allocate",
               "oom when allocating")   # compared in lower case
WHILE_OP = re.compile(r"\bwhile\(")
RESULT_FIELDS = ("mechanism", "proj_len", "length", "batch", "dim", "heads", "layers", "mode",
                 "dtype", "status", "compile_time_s", "step_time_s", "examples_per_s",
                 "tokens_per_s", "peak_memory_bytes", "flops", "achieved_flops_per_s",
                 "fraction_of_peak")


# ----------------------------------------------------------------------------- small helpers

@dataclasses.dataclass(frozen=True)
class MechanismSpec:
  """One entry of `--mechanisms`: `label` as typed, registry `name`, Luna's `proj_len`."""
  label: str
  name: str
  proj_len: int | None = None
  error: str | None = None      # a spec that cannot run (reported as an error row)


def parse_mechanisms(text: str) -> list[MechanismSpec]:
  """Parses "softmax,luna:16,luna:256" into specs; never raises (bad specs carry `error`)."""
  specs = []
  for label in (s.strip() for s in text.split(",")):
    if not label:
      continue
    name, _, arg = label.partition(":")
    if name != "luna":
      err = f"{name!r} takes no ':' argument" if arg else None
      specs.append(MechanismSpec(label, name, None, err))
    elif not arg:
      specs.append(MechanismSpec(label, name, DEFAULT_LUNA_PROJ_LEN))
    elif arg.isdigit() and int(arg) > 0:
      specs.append(MechanismSpec(label, name, int(arg)))
    else:
      specs.append(MechanismSpec(label, name, None, f"luna:{arg}: proj_len must be a positive int"))
  return specs


def parse_ints(text: str) -> list[int]:
  return [int(s) for s in text.split(",") if s.strip()]


def fit_loglog_slope(xs: Sequence[float], ys: Sequence[float], tail: int = 0) -> float:
  """Least-squares slope of log(y) against log(x), i.e. k in y ~ c * x**k.

  Uses only the `tail` largest x when `tail` >= 2 (the asymptotic regime); ignores non-positive
  or non-finite pairs; returns nan when fewer than two distinct x remain.
  """
  pairs = sorted((float(x), float(y)) for x, y in zip(xs, ys)
                 if x is not None and y is not None and x > 0 and y > 0
                 and math.isfinite(x) and math.isfinite(y))
  if tail >= 2:
    pairs = pairs[-tail:]
  if len({x for x, _ in pairs}) < 2:
    return float("nan")
  lx = np.log([x for x, _ in pairs])
  ly = np.log([y for _, y in pairs])
  slope, _ = np.polyfit(lx, ly, 1)
  return float(slope)


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


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def host_available_bytes() -> int | None:
  """MemAvailable of the host (Linux), else total physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def memory_limit_bytes(override_gb: float | None) -> int | None:
  """The budget a point's estimated memory must fit: the override, the device's `bytes_limit`,
  or 90% of the host's available memory on CPU."""
  if override_gb is not None:
    return int(override_gb * 2**30)
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  avail = host_available_bytes()
  return int(0.9 * avail) if avail else None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_description() -> str:
  d = jax.devices()[0]
  kind = d.device_kind
  if d.platform == "cpu":
    kind = f"{cpu_model()} ({os.cpu_count()} cores)"
  return f"{kind} [{d.platform}, {jax.device_count()} device(s), using 1]"


def measure_matmul_peak(size: int, dtype: str, repeats: int = 5) -> dict[str, Any]:
  """Best-of-`repeats` FLOP/s of a size^3 matmul in `dtype` on the default device."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a_NxN = jax.random.normal(k1, (size, size), jnp.float32).astype(dtype)
  b_NxN = jax.random.normal(k2, (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.matmul).lower(a_NxN, b_NxN).compile()
  jax.block_until_ready(matmul(a_NxN, b_NxN))
  best = float("inf")
  for _ in range(max(1, repeats)):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a_NxN, b_NxN))
    best = min(best, time.perf_counter() - t0)
  return {"size": size, "dtype": dtype, "best_seconds": best, "flops_per_s": 2.0 * size**3 / best}


TORCH_PEAK_SNIPPET = """
import json, sys, time, torch
n = int(sys.argv[1])
a, b = torch.randn(n, n), torch.randn(n, n)
a @ b
times = []
for _ in range(5):
  t0 = time.perf_counter()
  a @ b
  times.append(time.perf_counter() - t0)
print(json.dumps({"flops_per_s": 2.0 * n**3 / min(times), "threads": torch.get_num_threads(),
                  "version": torch.__version__}))
"""


def measure_torch_matmul_peak(size: int) -> dict[str, Any] | None:
  """The same size^3 float32 matmul timed by torch (MKL) in a subprocess, or None without torch
  or off CPU: the machine's peak is the better of the two libraries, not XLA's alone."""
  if jax.default_backend() != "cpu":
    return None
  try:
    out = subprocess.run([sys.executable, "-c", TORCH_PEAK_SNIPPET, str(size)],
                         capture_output=True, text=True, timeout=300, check=True)
    return {"size": size, **json.loads(out.stdout.strip().splitlines()[-1])}
  except (subprocess.SubprocessError, ValueError, IndexError, OSError):
    return None


# ----------------------------------------------------------------------------- step builders

@dataclasses.dataclass
class Step:
  """A jitted step, its arguments, and how to thread its outputs into the next call."""
  fn: Callable
  args: tuple
  next_args: Callable[[tuple, Any], tuple]   # (args, outputs) -> args of the next call
  twin: Callable | None = None                # same math without fused kernels (FLOP count)


# About 4x faster CPU compiles of the small test models (measured on jaxlib 0.10.2).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_OPTIONS_CPU = {"xla_cpu_use_fusion_emitters": False}


def compiler_options(args: argparse.Namespace) -> dict[str, Any] | None:
  """XLA options of every compilation (`--xla-fast-compile`: smoke tests, not timings)."""
  if not args.xla_fast_compile:
    return None
  options = dict(FAST_COMPILE_OPTIONS)
  if jax.default_backend() == "cpu":
    options.update(FAST_COMPILE_OPTIONS_CPU)
  return options


def jit_run(fn: Callable, *call_args: Any, options: dict[str, Any] | None = None) -> Any:
  """Compiles `fn` for `call_args` with `options` and calls it once."""
  return jax.jit(fn).lower(*call_args).compile(compiler_options=options)(*call_args)


def fit_params(params: Any, shapes: Any) -> Any:
  """Slices every leaf to its wanted shape (a longer position table to the current length)."""
  def fit(p, s):
    return p if p.shape == s.shape else p[tuple(slice(0, n) for n in s.shape)]
  return jax.tree.map(fit, params, shapes)


def attention_kwargs(spec: MechanismSpec, args: argparse.Namespace) -> dict[str, Any]:
  """Mechanism options the CLI controls (fast paths)."""
  if spec.name == "softmax":
    return {"implementation": args.softmax_impl}
  if spec.name == "luna" and args.luna_flash:
    return {"implementation": "auto"}
  return {}


def uses_fused_kernel(spec: MechanismSpec, args: argparse.Namespace) -> bool:
  """Whether the point asks for a fused kernel (cuDNN softmax, Luna flash); those have no
  attention dropout, so the model runs them with attention dropout 0."""
  if spec.name == "softmax" and args.softmax_impl != "xla":
    if args.softmax_impl == "cudnn":
      return True
    try:   # "auto": fused exactly where it resolves to cuDNN without dropout
      from luna_jax.attention import common  # pylint: disable=import-outside-toplevel
      return common.resolve_implementation("auto", args.dtype, False) == "cudnn"
    except Exception:  # noqa: BLE001
      return False
  return spec.name == "luna" and args.luna_flash


def attention_impl(spec: MechanismSpec, args: argparse.Namespace, dropout_active: bool
                   ) -> str | None:
  """The attention implementation a point actually runs ("xla", "cudnn", "flash", ...)."""
  if spec.name == "softmax":
    try:
      from luna_jax.attention import common  # pylint: disable=import-outside-toplevel
      return common.resolve_implementation(args.softmax_impl, args.dtype, dropout_active)
    except Exception:  # noqa: BLE001
      return args.softmax_impl
  if spec.name == "luna":
    if not args.luna_flash:
      return "xla"
    from luna_jax.attention import common  # pylint: disable=import-outside-toplevel
    return common.resolve_implementation("auto", args.dtype, dropout_active)
  return None


def xla_twin_args(args: argparse.Namespace) -> argparse.Namespace:
  """The same benchmark with the fused kernels off: the FLOPs reference of a fused point."""
  return argparse.Namespace(**{**vars(args), "softmax_impl": "xla", "luna_flash": False})


def build_layer_step(spec: MechanismSpec, length: int, args: argparse.Namespace,
                     cache: dict[str, Any]) -> Step:
  """One attention layer: grads of mean(y**2) w.r.t. params, x (and P for Luna)."""
  from luna_jax.attention import get_attention  # pylint: disable=import-outside-toplevel
  cls = get_attention(spec.name)
  dtype = jnp.dtype(args.dtype)
  is_luna = spec.name == "luna"
  kx, kp, kinit, kfeat = jax.random.split(jax.random.key(0), 4)
  b, d = args.batch, args.dim
  x_BxNxD = jax.random.normal(kx, (b, length, d), jnp.float32).astype(dtype)
  mask_BxN = jnp.ones((b, length), bool)
  p_BxLxD = (jax.random.normal(kp, (b, spec.proj_len, d), jnp.float32).astype(dtype)
             if is_luna else None)

  def make_attn(a: argparse.Namespace) -> Any:
    return cls(num_heads=a.heads, dropout_rate=0.0, dtype=dtype, **attention_kwargs(spec, a))

  def make_grad_fn(a: argparse.Namespace) -> Callable:
    attn = make_attn(a)

    def forward(params, x_BxNxD, p_BxLxD):
      y_BxNxD, _ = attn.apply({"params": params}, x_BxNxD, mask_BxN, p_BxLxD, None,
                              deterministic=True, rngs={"features": kfeat})
      return jnp.mean(jnp.square(y_BxNxD.astype(jnp.float32)))

    if a.remat:
      forward = jax.checkpoint(forward)
    return jax.jit(jax.grad(forward, argnums=(0, 1, 2) if is_luna else (0, 1)))

  if "params" not in cache:   # parameter shapes do not depend on the length
    short = min(length, 16)
    attn = make_attn(args)
    init = lambda r: attn.init(r, x_BxNxD[:, :short], mask_BxN[:, :short], p_BxLxD, None,
                               deterministic=True)["params"]
    cache["params"] = jit_run(init, {"params": kinit, "features": kfeat, "dropout": kfeat},
                              options=compiler_options(args))
  twin = make_grad_fn(xla_twin_args(args)) if uses_fused_kernel(spec, args) else None
  return Step(make_grad_fn(args), (cache["params"], x_BxNxD, p_BxLxD), lambda a, _: a, twin)


def text_model_config(spec: MechanismSpec, length: int, args: argparse.Namespace) -> Any:
  """The LRA Text classifier (Luna recipe for luna, LRA reference blocks for the others)."""
  from luna_jax import models  # pylint: disable=import-outside-toplevel
  is_luna = spec.name == "luna"
  return models.ModelConfig(
      vocab_size=VOCAB_SIZE, num_classes=NUM_CLASSES, max_len=length, attention=spec.name,
      attention_kwargs=tuple(sorted(attention_kwargs(spec, args).items())),
      proj_len=spec.proj_len or DEFAULT_LUNA_PROJ_LEN, num_layers=args.layers,
      emb_dim=args.dim, num_heads=args.heads, mlp_dim=args.mlp_dim, classifier_dim=args.mlp_dim,
      dropout=args.dropout,
      attention_dropout=0.0 if uses_fused_kernel(spec, args) else args.attention_dropout,
      dtype=args.dtype, remat=args.remat, block="post_ln" if is_luna else "pre_ln",
      positions="learned" if is_luna else "sinusoidal")


def build_model_step(spec: MechanismSpec, length: int, args: argparse.Namespace,
                     cache: dict[str, Any]) -> Step:
  """The Text classifier: one AdamW step (forward + backward + update) on random bytes."""
  import optax  # pylint: disable=import-outside-toplevel
  from luna_jax import models  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  tokens_BxN = jnp.asarray(rng.integers(3, VOCAB_SIZE, (args.batch, length)), jnp.int32)
  targets_B = jnp.asarray(rng.integers(0, NUM_CLASSES, (args.batch,)), jnp.int32)
  kinit, kstep = jax.random.split(jax.random.key(0))
  short_BxS = tokens_BxN[:, :min(length, 16)]
  tx = optax.adamw(1e-4, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01)

  def make_train_step(a: argparse.Namespace) -> Callable:
    # A fused kernel runs without attention dropout; its XLA twin does the same.
    cfg = text_model_config(spec, length, a)
    if uses_fused_kernel(spec, args):
      cfg = dataclasses.replace(cfg, attention_dropout=0.0)
    model = models.Classifier(cfg)

    def train_step(params, opt_state, tokens_BxN, targets_B, key):
      kdrop, kfeat = jax.random.split(key)

      def loss_fn(params):
        logits_BxC = model.apply({"params": params}, tokens_BxN, deterministic=False,
                                 rngs={"dropout": kdrop, "features": kfeat})
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_BxC.astype(jnp.float32), targets_B).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(train_step, donate_argnums=(0, 1))

  if "params" not in cache:
    # Initialise once per mechanism at the longest length; shorter lengths slice the positions.
    longest = max([length] + parse_ints(args.lengths))
    init_model = models.Classifier(text_model_config(spec, longest, args))
    cache["params"] = jit_run(lambda k: init_model.init(k, short_BxS)["params"], kinit,
                              options=compiler_options(args))
  model = models.Classifier(text_model_config(spec, length, args))
  shapes = jax.eval_shape(lambda k: model.init(k, short_BxS)["params"], kinit)
  # Copies: the step donates its params, and the cached ones serve the next length too.
  params = jax.tree.map(lambda x: x.copy(), fit_params(cache["params"], shapes))
  opt_state = jit_run(tx.init, params, options=compiler_options(args))
  twin = make_train_step(xla_twin_args(args)) if uses_fused_kernel(spec, args) else None
  return Step(make_train_step(args), (params, opt_state, tokens_BxN, targets_B, kstep),
              lambda a, out: (out[0], out[1]) + a[2:], twin)


# ----------------------------------------------------------------------------- one point

def point_label(spec: MechanismSpec, args: argparse.Namespace) -> str:
  """The spec as typed, plus "[cudnn]" / "[flash]" when a fused kernel runs."""
  if not uses_fused_kernel(spec, args):
    return spec.label
  return f"{spec.label}[{'cudnn' if spec.name == 'softmax' else 'flash'}]"


def base_row(spec: MechanismSpec, length: int, args: argparse.Namespace) -> dict[str, Any]:
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
  """Command line that runs one point in a fresh process (`--isolate`)."""
  argv = [sys.executable, str(pathlib.Path(__file__).resolve()),
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
      proc = subprocess.run(child_argv(spec, length, args, result_path), capture_output=True,
                            text=True, timeout=timeout, check=False)
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


# ----------------------------------------------------------------------------- reporting

def _fmt(value: float | None, fmt: str, scale: float = 1.0) -> str:
  if value is None or not math.isfinite(value):
    return "-"
  return format(value * scale, fmt)


def _loads(host: dict[str, Any]) -> str:
  start = "/".join(f"{x:.1f}" for x in host["load_average"])
  end = host.get("load_average_end")
  return f"{start} (1/5/15 min) at start" + (
      f", {'/'.join(f'{x:.1f}' for x in end)} at end" if end else "")


def _labels(results: list[dict[str, Any]]) -> list[str]:
  return list(dict.fromkeys(r["label"] for r in results))


def slopes(results: list[dict[str, Any]], key: str, tail: int) -> dict[str, float]:
  """Per-label log-log slope of `key` against length over the "ok" points."""
  out = {}
  for label in _labels(results):
    pts = [(r["length"], r[key]) for r in results if r["label"] == label and r["status"] == "ok"]
    out[label] = fit_loglog_slope([p[0] for p in pts], [p[1] for p in pts], tail)
  return out


def relative_to(results: list[dict[str, Any]], baseline: str
                ) -> dict[str, dict[int, tuple[float | None, float | None] | str]]:
  """{label: {length: (speed x, memory x) or a note}} against the `baseline` label.

  speed = baseline step time / step time; memory = peak memory / baseline peak memory.
  """
  base = {r["length"]: r for r in results if r["label"] == baseline}
  out: dict[str, dict[int, Any]] = {}
  for r in results:
    if r["label"] == baseline:
      continue
    b = base.get(r["length"])
    cell: Any
    if r["status"] != "ok":
      cell = r["status"]
    elif b is None or b["status"] != "ok":
      cell = f"{baseline} {b['status'] if b else 'missing'}"
    else:
      speed = b["step_time_s"] / r["step_time_s"]
      mem = (r["peak_memory_bytes"] / b["peak_memory_bytes"]
             if r["peak_memory_bytes"] and b["peak_memory_bytes"] else None)
      cell = (speed, mem)
    out.setdefault(r["label"], {})[r["length"]] = cell
  return out


def resolve_baseline(results: list[dict[str, Any]], baseline: str | None) -> str | None:
  """The label matching `baseline` exactly, else the first "<baseline>[...]" label."""
  labels = _labels(results)
  if not baseline:
    return None
  if baseline in labels:
    return baseline
  return next((l for l in labels if l.startswith(f"{baseline}[")), None)


def to_markdown(report: dict[str, Any], baseline: str | None, tail: int) -> str:
  """The results table, the relative table (LRA Table 2 style) and the fitted exponents."""
  results = report["results"]
  peak = report.get("matmul_peak_flops")
  lines = [
      "# Attention scaling benchmark", "",
      f"- device: {report['device']} (backend {report['backend']})",
      "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
      f"- date: {report['date']}; host load average {_loads(report['host'])}",
      f"- command: `{report['command']}`",
      f"- machine matmul peak: {_fmt(peak, '.3g', 1e-12)} TFLOP/s, the better of XLA's "
      f"({_fmt(report.get('xla_matmul_flops'), '.3g', 1e-12)}) and torch's "
      f"({_fmt((report.get('torch_matmul') or {}).get('flops_per_s'), '.3g', 1e-12)}) "
      f"{report['matmul_peak']['size'] if report['matmul_peak'] else '-'}^3 {report['dtype']} "
      "matmul; '% of peak' divides by it, '% of XLA mm' by XLA's own",
      "- memory = compiled estimate (temp + arguments + outputs - aliased); device peak = "
      "`peak_bytes_in_use` where reported.", "",
      "| mechanism | length | status | compile s | step ms | examples/s | tokens/s | memory MiB "
      "| device peak MiB | GFLOP/step | TFLOP/s | % of peak | % of XLA mm |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['label']} | {r['length']} | {r['status']} | {_fmt(r['compile_time_s'], '.2f')} "
        f"| {_fmt(r['step_time_s'], '.2f', 1e3)} | {_fmt(r['examples_per_s'], '.3g')} "
        f"| {_fmt(r['tokens_per_s'], '.4g')} | {_fmt(r['peak_memory_bytes'], '.1f', 2**-20)} "
        f"| {_fmt(r['device_peak_bytes_in_use'], '.1f', 2**-20)} "
        f"| {_fmt(r['flops'], '.3g', 1e-9)} | {_fmt(r['achieved_flops_per_s'], '.3g', 1e-12)} "
        f"| {_fmt(r['fraction_of_peak'], '.1f', 100)} "
        f"| {_fmt(r.get('fraction_of_xla_matmul'), '.1f', 100)} |")
  notes = [f"- {r['label']} @ {r['length']}: {r['message']}" for r in results
           if r["status"] in ("oom", "error") and r.get("message")]
  if notes:
    lines += ["", "Failures:", ""] + [n.replace("\n", " ")[:300] for n in notes]

  baseline = resolve_baseline(results, baseline)
  if baseline:
    rel = relative_to(results, baseline)
    lengths = sorted({r["length"] for r in results})
    lines += ["", f"## Relative to {baseline} (speed x / memory x)", "",
              f"speed = {baseline} step time / step time; memory = peak memory / {baseline} "
              "peak memory (LRA Table 2 style: Luna-256 4.9x / 0.16x at 4K on TPU v3).", "",
              "| mechanism | " + " | ".join(str(n) for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for label, cells in rel.items():
      row = []
      for n in lengths:
        c = cells.get(n, "-")
        row.append(c if isinstance(c, str) else f"{c[0]:.2f}x / {_fmt(c[1], '.2f')}x")
      lines.append(f"| {label} | " + " | ".join(row) + " |")

  t_slopes = slopes(results, "step_time_s", tail)
  m_slopes = slopes(results, "peak_memory_bytes", tail)
  lines += ["", f"## Log-log exponents (fit over the last {tail or 'all'} ok lengths)", "",
            "| mechanism | step time ~ N^k | memory ~ N^k |", "|---|---|---|"]
  for label in _labels(results):
    lines.append(f"| {label} | {_fmt(t_slopes[label], '.2f')} | {_fmt(m_slopes[label], '.2f')} |")
  return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: str, title: str, tail: int) -> None:
  """Two log-log panels (step time, peak memory vs length) with fitted exponents in legends."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  panels = (("step_time_s", "step time (s)"), ("peak_memory_bytes", "peak memory (bytes)"))
  for ax, (key, ylabel) in zip(axes, panels):
    fitted = slopes(results, key, tail)
    for label in _labels(results):
      pts = sorted((r["length"], r[key]) for r in results
                   if r["label"] == label and r["status"] == "ok" and r[key])
      if not pts:
        continue
      k = fitted[label]
      name = f"{label} (N^{k:.2f})" if math.isfinite(k) else label
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="sequence length N", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _versions() -> dict[str, str]:
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__}


def _write_json(report: dict[str, Any], path: str | None) -> None:
  if not path:
    return
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=1, default=str)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
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
                    memory_limit_bytes(args.memory_limit_gb))
    _write_json(row, args.child_result)
    return row

  command = " ".join([pathlib.Path(sys.argv[0]).name] + list(sys.argv[1:] if argv is None
                                                            else argv))
  report: dict[str, Any] = {
      "device": device_description(), "backend": jax.default_backend(),
      "versions": _versions(), "command": command,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "mode": args.mode, "dtype": args.dtype,
      "host": {"cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
               "malloc": runtime.allocator()},
      "args": vars(args), "matmul_peak": None, "matmul_peak_flops": None, "results": []}
  size = args.matmul_size
  if size is None:
    size = 2048 if jax.default_backend() == "cpu" else 8192
  if size:
    report["matmul_peak"] = measure_matmul_peak(size, args.dtype)
    report["xla_matmul_flops"] = report["matmul_peak"]["flops_per_s"]
    report["torch_matmul"] = (measure_torch_matmul_peak(size) if args.dtype == "float32"
                              else None)
    torch_flops = (report["torch_matmul"] or {}).get("flops_per_s", 0.0)
    # The machine's peak: the better of XLA's and torch's matmul at the same size.
    report["matmul_peak_flops"] = max(report["xla_matmul_flops"], torch_flops)
    print(f"matmul ({size}^3 {args.dtype}): XLA {report['xla_matmul_flops'] / 1e9:.1f}, torch "
          f"{torch_flops / 1e9:.1f} GFLOP/s; peak = the better", flush=True)

  def on_row(row: dict[str, Any]) -> None:
    report["results"].append(row)
    _write_json(report, args.json)   # partial results survive an interrupted sweep
    print(f"{row['label']:>16} N={row['length']:<6} {row['status']:<7} "
          f"step {_fmt(row['step_time_s'], '.2f', 1e3)} ms  "
          f"mem {_fmt(row['peak_memory_bytes'], '.1f', 2**-20)} MiB  "
          f"compile {_fmt(row['compile_time_s'], '.1f')} s"
          + (f"  ({row['message'][:160]})" if row.get("message") else ""), flush=True)

  run_sweep(args, report, on_row)
  report["host"]["load_average_end"] = list(os.getloadavg())
  write_outputs(report, args)
  return report


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
  """One report from several JSON reports (e.g. an XLA run and a fused-kernel run)."""
  reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  merged = dict(reports[0])
  merged["merged_from"] = [{"path": str(p), "command": r["command"], "date": r["date"],
                            "matmul_peak_flops": r.get("matmul_peak_flops")}
                           for p, r in zip(paths, reports)]
  merged["command"] = " + ".join(r["command"] for r in reports)
  merged["results"] = [row for r in reports for row in r["results"]]
  return merged


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> str:
  """Writes the JSON, markdown and plot that were asked for; returns the markdown."""
  _write_json(report, args.json)
  baseline = None if args.compare_speedup.lower() == "none" else args.compare_speedup
  markdown = to_markdown(report, baseline, args.fit_tail)
  if args.markdown:
    pathlib.Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.markdown).write_text(markdown)
  if args.plot:
    pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    first = report["results"][0] if report["results"] else {}
    plot(report["results"], args.plot,
         f"{first.get('mode')} mode, {first.get('dtype')}, B={first.get('batch')}, "
         f"D={first.get('dim')}, H={first.get('heads')}, {report['device']}", args.fit_tail)
  print(markdown, flush=True)
  return markdown


if __name__ == "__main__":
  runtime.preload_tcmalloc()   # as train.py does (luna_jax/runtime.py)
  main()
