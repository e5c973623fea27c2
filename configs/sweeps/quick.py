r"""A tiny local sweep over the quick configs (generated data; a few CPU minutes in all).

  python -m luna_jax.experiments.sweep run configs/sweeps/quick.py --root runs/quick_sweep
  python -m luna_jax.experiments.results --root runs/quick_sweep --out runs/quick_sweep/report

Argument (optional): steps=N (default 200), seeds=N (default 1),
tasks=A+B (default listops; pathfinder also runs on generated data),
attentions=A+B (default luna+softmax).
"""
from __future__ import annotations

from configs.sweeps import hyper as h


def get_sweep(arg: str | None = None) -> h.Sweep:
  words, kv = h.parse_arg(arg, {"steps", "seeds", "tasks", "attentions"})
  if words:
    raise ValueError(f"quick takes only key=value items, got {sorted(words)}")
  steps = int(kv.get("steps", 200))
  every = max(steps // 2, 1)
  points = []
  for task in kv.get("tasks", "listops").split("+"):
    points += h.product(
        h.fixed("config", f"configs/{task}.py"),
        h.sweep("arg", [f"{a},quick" for a in kv.get("attentions", "luna+softmax").split("+")]),
        h.fixed("num_train_steps", steps), h.fixed("warmup_steps", min(50, steps)),
        h.fixed("eval_every", every), h.fixed("checkpoint_every", every),
        h.sweep("seed", range(int(kv.get("seeds", 1)))))
  return points
