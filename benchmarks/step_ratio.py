r"""One config's training step against a baseline config's, interleaved in one process.

Both configs' `train_step` (the trainer's, jitted with the state donated, on the synthetic batch
of `benchmarks/xla_flags.py`) are compiled first; then each round times one step of each,
alternating which goes first. On a shared host the load moves step times by 2x within minutes;
a per-round ratio sees the same load on both sides, so its median is the figure to quote
(besides the medians of wall and process-CPU time). With several host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, what train.py sets up on an N-core CPU)
the batch is split over them as the trainer does.

  python -m benchmarks.step_ratio --config configs/listops.py:learned_kernel,quick \
      --baseline configs/listops.py:linear_elu,quick --min_len 20 --max_len 120 --rounds 40
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import xla_flags


def _compiled_step(args: argparse.Namespace, config: str):
  import functools
  import jax
  from luna_jax import steps
  sub = argparse.Namespace(**{**vars(args), "config": config})
  state, batch = xla_flags.data_parallel(*xla_flags.synthetic_setup(sub)[2:])
  step = jax.jit(functools.partial(steps.train_step, redraw_every=0), donate_argnums=0)
  return step, state, batch


def measure(args: argparse.Namespace) -> dict:
  """{"config", "baseline", per-side wall/cpu lists (s), "ratio_wall", "ratio_cpu" medians}."""
  import jax
  key = jax.random.key(1)
  sides = {name: list(_compiled_step(args, cfg)) for name, cfg in
           (("config", args.config), ("baseline", args.baseline))}
  times = {name: {"wall": [], "cpu": []} for name in sides}

  def run(name: str, record: bool) -> None:
    step, state, batch = sides[name]
    t0, c0 = time.perf_counter(), time.process_time()
    state, m = step(state, batch, key)
    jax.block_until_ready(m)
    sides[name][1] = state
    if record:
      times[name]["wall"].append(time.perf_counter() - t0)
      times[name]["cpu"].append(time.process_time() - c0)

  for r in range(args.warmup + args.rounds):
    order = ("config", "baseline") if r % 2 == 0 else ("baseline", "config")
    for name in order:
      run(name, r >= args.warmup)
  ratio = {k: statistics.median(a / b for a, b in zip(times["config"][k], times["baseline"][k]))
           for k in ("wall", "cpu")}
  return {"config": args.config, "baseline": args.baseline, "rounds": args.rounds,
          "psi_floor": bool(getattr(args, "psi_floor", False)),
          "devices": len(jax.devices()), "times_s": times,
          "median_ms": {n: {k: 1e3 * statistics.median(v) for k, v in t.items()}
                        for n, t in times.items()},
          "ratio_wall": ratio["wall"], "ratio_cpu": ratio["cpu"]}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  xla_flags.add_step_arguments(parser)
  parser.add_argument("--baseline", required=True, help="config of the denominator step")
  parser.add_argument("--rounds", type=int, default=40)
  parser.add_argument("--psi_floor", action="store_true",
                      help="learned kernel with psi replaced by relu(u c_l + 0.1), c_l fixed (same "
                           "shapes, no lookup, no psi parameters): what its F-wide features cost "
                           "without psi")
  parser.add_argument("--out_json", default="")
  args = parser.parse_args(argv)
  if args.psi_floor:
    import jax
    from luna_jax.attention import scalar_mlp
    import jax.numpy as jnp
    slopes_L = jnp.linspace(-1.0, 1.0, 4)
    scalar_mlp.psi = (lambda u, w1, b1, w2, b2, scale=1.0:
                      jax.nn.relu(u[..., None] * slopes_L[:w2.shape[-1]] + 0.1) * scale)
  from luna_jax import runtime
  runtime.set_cpu_dispatch()          # as train.py has it
  rep = measure(args)
  med = rep["median_ms"]
  print(f"{args.config}: {med['config']['wall']:.0f} ms wall, {med['config']['cpu']:.0f} ms CPU")
  print(f"{args.baseline}: {med['baseline']['wall']:.0f} ms wall, "
        f"{med['baseline']['cpu']:.0f} ms CPU")
  print(f"median per-round ratio over {args.rounds} rounds: {rep['ratio_wall']:.2f}x wall, "
        f"{rep['ratio_cpu']:.2f}x CPU")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(rep, f, indent=1)
  return rep


if __name__ == "__main__":
  main()
