r"""A learning-rate x seed sweep for one task and mechanism.

  python -m luna_jax.experiments.sweep run configs/sweeps/lr_seed.py:listops,luna,l=256 --root runs/lr \
      --dry-run
  python -m luna_jax.experiments.sweep run configs/sweeps/lr_seed.py:text,softmax,lrs=0.025+0.05+0.1,seeds=2 \
      --root runs/lr

Argument: a task word (default listops), an attention word (default luna), and optionally
  l=N          Luna projection length (model.proj_len),
  lrs=A+B+..   peak learning rates (default: the recipe's learning_rate times 0.5, 1 and 2),
  seeds=N      seeds 0..N-1 (default 3),
  quick=1      use the task's quick config variant,
  data=DIR, tfds=DIR   data locations as in lra_luna.py.
Order: learning rate outermost, then seed.
"""
from __future__ import annotations

import importlib

from configs import common
from configs.sweeps import hyper as h
from configs.sweeps import lra_luna

LR_FACTORS = (0.5, 1.0, 2.0)


def get_sweep(arg: str | None = None) -> h.Sweep:
  words, kv = h.parse_arg(arg, {"l", "lrs", "seeds", "quick", "data", "tfds"})
  tasks = words & set(lra_luna.ALL_TASKS)
  attentions = words & set(common.ATTENTIONS)
  if words - tasks - attentions or len(tasks) > 1 or len(attentions) > 1:
    raise ValueError(f"lr_seed argument {arg!r}: expected at most one task of "
                     f"{lra_luna.ALL_TASKS} and one attention of {common.ATTENTIONS}")
  task = tasks.pop() if tasks else "listops"
  config_arg = (attentions.pop() if attentions else "luna") + (
      ",quick" if kv.get("quick", "0") not in ("", "0") else "")
  if "l" in kv:
    config_arg += f",l={int(kv['l'])}"
  if "lrs" in kv:
    lrs = [float(v) for v in kv["lrs"].split("+")]
  else:
    recipe = importlib.import_module(f"configs.{task}").get_config(config_arg).learning_rate
    lrs = [recipe * f for f in LR_FACTORS]
  return h.product(lra_luna.task_points(task, kv.get("data", ""), kv.get("tfds", "")),
                   h.fixed("arg", config_arg), h.sweep("learning_rate", lrs),
                   h.sweep("seed", range(int(kv.get("seeds", 3)))))
