r"""Where the small-protocol training step spends its time: the whole step and its parts.

Each part is jitted on its own and timed on the same synthetic batch as benchmarks/xla_flags.py
(wall clock, one process, median of --repeats rounds after --warmup; each round times every part
once, so a drift in the host's load hits all parts alike; the parts run unsharded on the first
XLA device):

  train step        steps.train_step (state donated): everything below together
  forward+backward  value_and_grad of the loss (model and loss, no optimizer)
  optimizer         TrainState.apply_gradients on fixed gradients (AdamW, clipping)
  forward           the model alone, training mode (dropout on)
  encoder layer     one EncoderLayer, gradients w.r.t. its parameters and inputs
  attention         the layer's attention module alone, same inputs and gradients
  layer minus attention      (derived) FFN, LayerNorms, residual dropouts of one layer
  embedding, readout, loss   (derived) forward+backward - num_layers x encoder layer
  input pipeline    one batch from input_pipeline.train_iterator over in-memory rows

  python -m benchmarks.step_breakdown --out_json benchmarks/results/cpu_step_breakdown.json \
      --out_md benchmarks/results/cpu_step_breakdown.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import time
from typing import Any, Callable

from benchmarks import xla_flags
from benchmarks.attention_scaling import machine
from luna_jax import runtime

PARTS = ("train step", "forward+backward", "optimizer", "forward", "encoder layer", "attention",
         "layer minus attention", "embedding, readout, loss", "input pipeline")


def _interleaved_medians(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
                         ) -> dict[str, float]:
  """Median wall seconds of each function, timed round-robin (a drift in the host's load hits
  every part alike)."""
  import jax
  for fn in fns.values():
    for _ in range(max(warmup, 1)):        # at least once: compile outside the timing
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def measure(args: argparse.Namespace) -> dict[str, float]:
  """Median seconds of every part (derived parts by difference)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from luna_jax import input_pipeline, models, steps

  config, cfg, state, batch = xla_flags.synthetic_setup(args)
  key = jax.random.key(1)
  rngs = steps.step_rngs(key, state.step, 0)
  fns: dict[str, Callable[[], Any]] = {}

  step = jax.jit(functools.partial(steps.train_step, redraw_every=0), donate_argnums=0)
  holder = {"state": state}

  def one_step():
    holder["state"], m = step(holder["state"], batch, key)
    return m
  fns["train step"] = one_step
  state = steps.init_state(config, cfg, jax.random.key(0))

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["inputs"], deterministic=False, rngs=rngs)
    return steps.cross_entropy(logits, batch["targets"]).mean()
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  fns["forward+backward"] = lambda: grad_fn(state.params)
  grads = grad_fn(state.params)[1]
  update = jax.jit(lambda s, g: s.apply_gradients(grads=g))
  fns["optimizer"] = lambda: update(state, grads)
  fwd = jax.jit(lambda p: state.apply_fn({"params": p}, batch["inputs"], deterministic=False,
                                         rngs=rngs))
  fns["forward"] = lambda: fwd(state.params)

  # One layer and its attention on the shapes the model gives them.
  b, n, d = config.batch_size, config.seq_len, cfg.emb_dim
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  mask = jnp.asarray(batch["inputs"] != 0)
  p = (jnp.asarray(rng.normal(size=(b, cfg.proj_len, d)), jnp.float32)
       if models.carries_p(cfg) else None)
  layer_rngs = {"dropout": rngs["dropout"]}

  def grad_of(module, call):
    variables = module.init({"params": jax.random.key(2), **layer_rngs}, *call(x, p),
                            deterministic=False)

    def total(params, x, p):
      ys = module.apply({**variables, "params": params}, *call(x, p), deterministic=False,
                        rngs=layer_rngs)
      return sum(jnp.sum(y) for y in jax.tree.leaves(ys))
    g = jax.jit(jax.grad(total, argnums=(0, 1, 2)))
    return lambda: g(variables["params"], x, p)

  layer = models.EncoderLayer(cfg)
  fns["encoder layer"] = grad_of(layer, lambda x, p: (x, mask, p, None))
  attn = models.attention_module(cfg)
  attn_args = ((lambda x, p: (x, mask, p, None)) if p is not None
               else (lambda x, p: (x, mask)))
  fns["attention"] = grad_of(attn, attn_args)

  rows = [{"inputs": batch["inputs"][i % b], "targets": batch["targets"][i % b]}
          for i in range(8 * b)]
  it = input_pipeline.train_iterator(rows, b, 0)
  fns["input pipeline"] = lambda: next(it)["inputs"]

  out = _interleaved_medians(fns, args.warmup, args.repeats)
  out["layer minus attention"] = out["encoder layer"] - out["attention"]
  out["embedding, readout, loss"] = (out["forward+backward"]
                                     - cfg.num_layers * out["encoder layer"])
  return out


def report(args: argparse.Namespace, seconds: dict[str, float], load_before: float
           ) -> dict[str, Any]:
  import jax
  step = seconds["train step"]
  return {
      "command": "python -m benchmarks.step_breakdown " + " ".join(args.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": args.config, "batch_lengths": [args.min_len, args.max_len],
      "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_before": load_before, "load_after": os.getloadavg()[0],
      "machine": runtime.cpu_model(), "versions": machine.versions(),
      "parts": [{"part": k, "ms": seconds[k] * 1e3, "share_of_step": seconds[k] / step}
                for k in PARTS]}


def markdown(rep: dict[str, Any]) -> str:
  lines = [f"`{rep['command']}` ({rep['date']}, load {rep['load_before']:.2f} -> "
           f"{rep['load_after']:.2f}, "
           f"{rep['devices']} XLA device(s))", "", "| part | ms | share of the step |",
           "|---|---|---|"]
  lines += [f"| {p['part']} | {p['ms']:.1f} | {p['share_of_step']:.0%} |" for p in rep["parts"]]
  return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  xla_flags.add_step_arguments(parser)
  parser.add_argument("--out_json", default="")
  parser.add_argument("--out_md", default="")
  return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
  import sys
  argv = sys.argv[1:] if argv is None else argv
  args = build_parser().parse_args(argv)
  args.argv = argv
  load_before = os.getloadavg()[0]
  rep = report(args, measure(args), load_before)
  write_report(rep, markdown(rep), args.out_json, args.out_md)
  return rep


def write_report(rep: dict[str, Any], md: str, out_json: str, out_md: str) -> None:
  """Prints the markdown table; writes the report's JSON and the table where asked."""
  print(md, end="")
  if out_json:
    pathlib.Path(out_json).write_text(json.dumps(rep, indent=1) + "\n")
  if out_md:
    pathlib.Path(out_md).write_text(md)


if __name__ == "__main__":
  runtime.preload_tcmalloc()       # as train.py's step has them
  runtime.set_cpu_dispatch()
  main()
