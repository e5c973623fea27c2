r"""Wall time of one training epoch with and without length bucketing (the trainer's own step).

For each --buckets value (1 = no bucketing: every batch padded to config.seq_len), the epoch-0
batch plan of `luna_jax.input_pipeline.BucketedBatches` over the task's train split gives how
many batches of each static length one epoch has. Each shape's training step (`steps.train_step`,
jitted, the config's model and optimizer) is compiled once, run --warmup times, then timed
--repeats times on real batches of that shape; the epoch time is sum over shapes of
(batches x median step time), reported with the per-shape figures. With --full_steps K the
first K batches of the plan are also run back to back and timed end to end, input pipeline
included, as a check on the projection.

  python benchmarks/epoch_time.py --config configs/listops.py:luna,small,l=16 --buckets 1,4 \
      --out_json benchmarks/results/cpu_listops_epoch.json \
      --out_md benchmarks/results/cpu_listops_epoch.md
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

from luna_jax import runtime

runtime.preload_tcmalloc()
runtime.set_cpu_dispatch()     # as train.py has them

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lra_tasks  # noqa: E402
from luna_jax import config_checks, input_pipeline, steps, trainer  # noqa: E402
from luna_jax.experiments import sweep  # noqa: E402


def load_config(spec: str) -> Any:
  """`configs/x.py:arg` -> that file's get_config(arg)."""
  path, _, arg = spec.partition(":")
  return sweep.resolve_config(path, arg, [])


def time_steps(step_fn, state, batches: list[dict[str, np.ndarray]], key: jax.Array,
               warmup: int, repeats: int) -> tuple[float, list[float]]:
  """(compile + first step s, timed step seconds) over `batches` cycled."""
  t0 = time.perf_counter()
  state, _ = step_fn(state, batches[0], key)
  jax.block_until_ready(state.params)
  first = time.perf_counter() - t0
  times = []
  for i in range(warmup + repeats):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[(i + 1) % len(batches)], key)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return first, times


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", default="configs/listops.py:luna,small,l=16")
  parser.add_argument("--buckets", default="1,4", help="bucket counts to compare (1 = none)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--full_steps", type=int, default=0,
                      help="also time this many consecutive batches of the plan end to end")
  parser.add_argument("--out_json", default="")
  parser.add_argument("--out_md", default="")
  args = parser.parse_args(argv)

  config = load_config(args.config)
  config_checks.validate_config(config)
  task = lra_tasks.load_task(config)
  if task.pad_id is None:
    raise SystemExit(f"{config.task} has no padding: length bucketing does not apply")
  train = task.splits["train"]
  lengths = input_pipeline.example_lengths(train, task.pad_id)
  cfg = steps.model_config(config, task)
  key = jax.random.key(config.seed)
  state = steps.init_state(config, cfg, key)
  step_fn = jax.jit(functools.partial(steps.train_step,
                                      redraw_every=config.get("redraw_every", 0)))
  print(f"{config.task}: {len(train)} train examples, lengths {lengths.min()}-{lengths.max()} "
        f"(mean {lengths.mean():.0f}), batch {config.batch_size}, seq_len {config.seq_len}",
        flush=True)

  load_before = os.getloadavg()[0]
  rows = []
  for num_buckets in [int(b) for b in args.buckets.split(",")]:
    shapes = input_pipeline.bucket_lengths(config.seq_len, num_buckets)
    it = input_pipeline.BucketedBatches(train, lengths, config.batch_size, config.seed, shapes)
    plan = it.plan(0)
    count = collections.Counter(length for length, _ in plan)
    per_shape = []
    for length in sorted(count):
      rows_of_shape = [r for n, r in plan if n == length][:args.warmup + args.repeats + 1]
      batches = []
      for idx in rows_of_shape:
        records = [train[int(i)] for i in idx]
        batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
        batch["inputs"] = batch["inputs"][..., :length]
        batches.append(batch)
      first, times = time_steps(step_fn, state, batches, key, args.warmup, args.repeats)
      median = statistics.median(times)
      per_shape.append({"length": length, "batches": count[length], "compile_and_first_s": first,
                        "step_s_median": median, "step_s_all": times})
      print(f"buckets={num_buckets} length {length}: {count[length]} batches, "
            f"{median * 1e3:.0f} ms/step (first {first:.1f} s)", flush=True)
    epoch_s = sum(p["batches"] * p["step_s_median"] for p in per_shape)
    row = {"buckets": num_buckets, "shapes": list(shapes), "batches": len(plan),
           "examples_per_epoch": len(plan) * config.batch_size,
           "projected_epoch_s": epoch_s, "per_shape": per_shape}
    if args.full_steps:
      t0 = time.perf_counter()
      s = state
      for _ in range(args.full_steps):
        s, metrics = step_fn(s, next(it), key)
      jax.block_until_ready(metrics["loss"])
      row["full_steps"] = args.full_steps
      row["full_steps_s"] = time.perf_counter() - t0
    rows.append(row)
    print(f"buckets={num_buckets}: projected epoch {epoch_s / 60:.1f} min "
          f"({len(plan)} batches)", flush=True)

  out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
         "config": args.config, "machine": trainer.machine_description(),
         "load_before": load_before, "load_after": os.getloadavg()[0],
         "data": task.provenance, "train_examples": len(train),
         "mean_length": float(lengths.mean()), "rows": rows}
  base = rows[0]["projected_epoch_s"]
  lines = [f"# One {config.task} training epoch with and without length bucketing",
           "", f"{out['date']}; `{args.config}`; {out['machine']}; load {load_before:.2f} -> "
           f"{out['load_after']:.2f}; train split {len(train)} examples, mean length "
           f"{lengths.mean():.0f} of {config.seq_len}.", "",
           "| buckets | shapes | batches | projected epoch min | speedup | ms/step by shape |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    shapes = ", ".join(f"{p['length']}: {p['batches']} x {p['step_s_median'] * 1e3:.0f}"
                       for p in r["per_shape"])
    lines.append(f"| {r['buckets']} | {r['shapes']} | {r['batches']} | "
                 f"{r['projected_epoch_s'] / 60:.1f} | {base / r['projected_epoch_s']:.2f}x | "
                 f"{shapes} |")
  for r in rows:
    if "full_steps" in r:
      lines.append(f"\nbuckets={r['buckets']}: the first {r['full_steps']} batches of the plan run "
                   f"back to back in {r['full_steps_s']:.1f} s (input pipeline included).")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out_json:
    pathlib.Path(args.out_json).write_text(json.dumps(out, indent=1) + "\n")
  if args.out_md:
    pathlib.Path(args.out_md).write_text(text)


if __name__ == "__main__":
  main()
