r"""Attention scaling benchmark: train-step time, memory and FLOPs against sequence length.

Two modes:
* `layer`: one attention layer, forward + backward of mean(y**2) with respect to its params and
  its input (and Luna's P), deterministic (no dropout).
* `model`: the byte-level Text classifier of LRA Table 2 (4 layers, D=256, 4 heads, MLP 1024,
  batch 32, 259-token vocabulary), one step of the trainer (`luna_jax.steps.train_step`:
  forward + backward + AdamW update, dropout on).

Every point reports compile time, the median step time after warm-up, examples/s and tokens/s,
the compiled memory estimate (temp + argument + output - aliased bytes, any backend), the
device's `peak_bytes_in_use` where the backend reports it, the compiled FLOP count and the
fraction of the device's matmul peak measured in the same run. Points that do not fit are rows
with status "oom", failures rows with status "error"; neither stops the sweep.

Modules: `specs` (what to run), `steps` (the jitted steps), `machine` (device, memory budget,
matmul peak), `measure` (one point, isolated points, the sweep), `report` (tables, plot, JSON),
`cli` (arguments and `main`).

Usage, from the repository root:
  python -m benchmarks.attention_scaling --mode layer --lengths 1024,2048,4096 \
      --mechanisms softmax,luna:16,luna:256 --dtype bfloat16 \
      --json out/layer.json --markdown out/layer.md --plot out/layer.png
  python -m benchmarks.attention_scaling --mode model --lengths 1024,2048,3072,4096 \
      --mechanisms softmax,luna:256,performer --softmax-impl cudnn --luna-flash --json out/model.json
"""
from benchmarks.attention_scaling.cli import build_parser, main, resolve_defaults
from benchmarks.attention_scaling.measure import (RESULT_FIELDS, child_argv, cost_flops,
                                                  is_oom_error, run_point, run_sweep)
from benchmarks.attention_scaling.report import (fit_counts, fit_heading, fit_loglog_slope,
                                                 merge_reports, relative_to, slopes,
                                                 to_markdown, torch_peak_words)
from benchmarks.attention_scaling.specs import MechanismSpec, parse_ints, parse_mechanisms
from benchmarks.attention_scaling.steps import Step, build_layer_step, build_model_step

__all__ = ["RESULT_FIELDS", "MechanismSpec", "Step", "build_layer_step", "build_model_step",
           "build_parser", "child_argv", "cost_flops", "fit_counts", "fit_heading",
           "fit_loglog_slope", "is_oom_error", "main", "merge_reports", "parse_ints",
           "parse_mechanisms", "relative_to", "resolve_defaults", "run_point", "run_sweep",
           "slopes", "to_markdown", "torch_peak_words"]
