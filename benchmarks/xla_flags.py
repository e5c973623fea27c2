r"""The small-protocol training step under XLA:CPU option variants, each in a fresh process.

One training step of a config (default: `configs/listops.py:luna,small,l=16`, the trainer's own
`train_step`, jitted with the state donated) on a synthetic batch of the config's shape (token
ids random, real lengths uniform in [--min_len, --max_len], the rest padding); every variant of
XLA_FLAGS runs in its own subprocess: compile + --warmup steps, then --repeats timed steps,
median wall and process-CPU time. Variants XLA rejects are reported as such. Rounds alternate the
variants, so slow drifts in machine load hit all of them alike.

  python benchmarks/xla_flags.py --rounds 2 \
      --out_json benchmarks/results/cpu_xla_flags.json --out_md benchmarks/results/cpu_xla_flags.md
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

REPO = pathlib.Path(__file__).resolve().parents[1]

# (label, XLA_FLAGS additions[, environment]). The empty-valued fusion types switch those
# fusions off. Every worker runs CPU computations inline, as train.py does
# (luna_jax/runtime.py::set_cpu_dispatch), unless a variant's environment says otherwise.
VARIANTS = (
    ("default", ""),
    ("async CPU dispatch", "", {"LUNA_JAX_CPU_DISPATCH": "async"}),
    ("xnnpack off", "--xla_cpu_use_xnnpack=false"),
    ("ynn fusions off", "--xla_cpu_experimental_ynn_fusion_type="),
    ("xnn fusions off", "--xla_cpu_experimental_xnn_fusion_type="),
    ("onednn on", "--xla_cpu_use_onednn=true"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("no eigen threads", "--xla_cpu_multi_thread_eigen=false"),
    ("2 host devices (batch split)", "--xla_force_host_platform_device_count=2"),
    ("2 host devices + xnnpack off",
     "--xla_force_host_platform_device_count=2 --xla_cpu_use_xnnpack=false"),
)


def synthetic_setup(args: argparse.Namespace):
  """(config, model config, initial TrainState, batch) of `args.config` for a synthetic batch:
  token ids random in [1, vocab), real lengths uniform in [min_len, max_len], the rest padding."""
  import jax
  import numpy as np

  from luna_jax import models, steps
  from luna_jax.experiments import sweep

  path, _, arg = args.config.partition(":")
  config = sweep.resolve_config(path, arg, [])
  cfg = models.ModelConfig.from_config(
      config.model, vocab_size=args.vocab, num_classes=args.classes,
      max_len=config.model.get("max_len", 0) or config.seq_len, pad_id=0, num_docs=1,
      readout_length=config.seq_len)
  state = steps.init_state(config, cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.min_len, args.max_len + 1, size=config.batch_size)
  x = np.zeros((config.batch_size, config.seq_len), np.int32)
  for i, n in enumerate(lengths):
    x[i, :n] = rng.integers(1, args.vocab, size=n)
  batch = {"inputs": x, "targets": rng.integers(0, args.classes, config.batch_size)}
  return config, cfg, state, batch


def data_parallel(state, batch):
  """(state, batch) placed as the trainer places them: with several devices the batch is split
  over them and the state replicated; unchanged on one device."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = jax.devices()
  if len(devices) == 1:
    return state, batch
  mesh = Mesh(np.array(devices), ("data",))
  return (jax.device_put(state, NamedSharding(mesh, P())),
          jax.device_put(batch, NamedSharding(mesh, P("data"))))


def worker(args: argparse.Namespace) -> None:
  """Runs in the subprocess: prints one JSON line."""
  import functools
  import resource
  import time

  from luna_jax import runtime
  dispatch = runtime.set_cpu_dispatch()   # as train.py has it

  import jax

  from luna_jax import steps

  _, _, state, batch = synthetic_setup(args)
  state, batch = data_parallel(state, batch)
  devices = jax.devices()
  step = jax.jit(functools.partial(steps.train_step, redraw_every=0), donate_argnums=0)
  key = jax.random.key(1)
  t0 = time.perf_counter()
  state, m = step(state, batch, key)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  wall, cpu = [], []
  for i in range(args.warmup + args.repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    if i >= args.warmup:
      wall.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"first_s": first, "wall_s": wall, "cpu_s": cpu, "devices": len(devices),
                    "peak_rss_mb": peak_rss_mb, "cpu_dispatch": dispatch}), flush=True)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
  """The config, synthetic batch (`synthetic_setup`) and timing flags of a step benchmark."""
  parser.add_argument("--config", default="configs/listops.py:luna,small,l=16")
  parser.add_argument("--vocab", type=int, default=16)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--min_len", type=int, default=500)
  parser.add_argument("--max_len", type=int, default=2000)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)


def step_argv(args: argparse.Namespace) -> list[str]:
  """`add_step_arguments`' flags with the values of `args` (for a worker's command line)."""
  return [f"--{k}={getattr(args, k)}" for k in
          ("config", "vocab", "classes", "min_len", "max_len", "warmup", "repeats")]


def run_worker(passthrough: list[str], flags: str = "", env: dict[str, str] | None = None
               ) -> tuple[dict | None, str]:
  """Runs `worker` in a fresh process with `passthrough` arguments (`add_step_arguments`'
  flags), XLA_FLAGS extended by `flags` and `env` added: (its JSON result, "") or (None, the
  error's last line). The worker imports this checkout's packages (REPO first on PYTHONPATH),
  not whichever checkout the environment has installed."""
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
             **(env or {}))
  proc = subprocess.run([sys.executable, __file__, "--worker", *passthrough], cwd=REPO, env=env,
                        capture_output=True, text=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return None, (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
  return json.loads(lines[-1]), ""


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  add_step_arguments(parser)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--variants", default="", help="comma-separated labels (default: all)")
  parser.add_argument("--out_json", default="")
  parser.add_argument("--out_md", default="")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args)
    return

  from luna_jax import runtime
  runtime.preload_tcmalloc()       # the workers inherit it, as train.py's step would have it
  chosen = [v for v in VARIANTS
            if not args.variants or v[0] in args.variants.split(",")]
  passthrough = step_argv(args)
  results = {v[0]: [] for v in chosen}
  errors = {}
  load_before = os.getloadavg()[0]
  for _ in range(args.rounds):
    for label, flags, *extra_env in chosen:
      r, error = run_worker(passthrough, flags, extra_env[0] if extra_env else None)
      if r is None:
        errors[label] = error
        print(f"{label}: failed: {errors[label]}", flush=True)
        continue
      results[label].append(r)
      print(f"{label}: {statistics.median(r['wall_s']) * 1e3:.0f} ms/step "
            f"(cpu {statistics.median(r['cpu_s']) * 1e3:.0f} ms, first {r['first_s']:.1f} s)",
            flush=True)

  rows = []
  for label, flags, *extra_env in chosen:
    runs = results[label]
    flags = " ".join([*(f"{k}={v}" for k, v in (extra_env[0] if extra_env else {}).items()),
                      *([flags] if flags else [])])
    if not runs:
      rows.append({"variant": label, "flags": flags, "error": errors.get(label, "")})
      continue
    wall = statistics.median(statistics.median(r["wall_s"]) for r in runs)
    cpu = statistics.median(statistics.median(r["cpu_s"]) for r in runs)
    rows.append({"variant": label, "flags": flags, "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3,
                 "first_s": statistics.median(r["first_s"] for r in runs),
                 "peak_rss_mb": max(r.get("peak_rss_mb", float("nan")) for r in runs),
                 "runs": runs})
  base = next((r["wall_ms"] for r in rows if r["variant"] == "default" and "wall_ms" in r), None)
  import jax  # for the version only (the parent runs nothing on it)
  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": " ".join(["python", *sys.argv]), "config": args.config,
         "jax": jax.__version__, "cpu_count": os.cpu_count(), "malloc": runtime.allocator(),
         "load_before": load_before, "load_after": os.getloadavg()[0], "rows": rows}
  lines = [f"# Training step of `{args.config}` under XLA:CPU options", "",
           f"{out['date']}; jax {out['jax']}; {out['cpu_count']} CPUs; allocator "
           f"{out['malloc']}; synthetic batch, real lengths {args.min_len}-{args.max_len}; "
           f"median of {args.repeats} steps after {args.warmup} warmup, median over "
           f"{args.rounds} round(s); load {load_before:.2f} -> {out['load_after']:.2f}.", "",
           "| variant | environment / XLA_FLAGS | step ms | vs default | process CPU ms "
           "| compile + first s | peak RSS MB |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['variant']} | `{r['flags']}` | rejected: {r['error']} | | | | |")
    else:
      rel = f"{base / r['wall_ms']:.2f}x" if base else ""
      lines.append(f"| {r['variant']} | `{r['flags'] or '-'}` | {r['wall_ms']:.0f} | {rel} | "
                   f"{r['cpu_ms']:.0f} | {r['first_s']:.1f} | {r['peak_rss_mb']:.0f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out_json:
    pathlib.Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
  if args.out_md:
    pathlib.Path(args.out_md).write_text(text)


if __name__ == "__main__":
  main()
