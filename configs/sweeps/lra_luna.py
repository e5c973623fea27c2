r"""The full LRA grid: Luna l in {16, 128, 256} and the baselines, each with its task recipe.

  python -m luna_jax.experiments.sweep run configs/sweeps/lra_luna.py:data=/data,seeds=3 \
      --root gs://BUCKET/lra --launcher tpu --tpu NAME --zone ZONE --dry-run

Argument (comma-separated, all optional):
  data=DIR    holds lra_release/ (ListOps, Retrieval, Pathfinder, Path-X) and, unless tfds= is
              given, tfds/ (the array_record builds of imdb_reviews and cifar10). Without it no
              data_dir is set: ListOps and Pathfinder then train on the built-in generated data
              (not the official sets), Text and Image read $TFDS_DATA_DIR, Retrieval fails.
  tfds=DIR    the TFDS data dir for Text and Image.
  seeds=N     seeds 0..N-1 (default 3).
  tasks=A+B   tasks (default listops+text+retrieval+image+pathfinder; `all` adds pathx).
Order: seed outermost, then task, then mechanism, so a partial sweep fills the whole table for
seed 0 first. Non-Luna mechanisms use the LRA reference recipe of their config file.
"""
from __future__ import annotations

from configs.sweeps import hyper as h

TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
ALL_TASKS = TASKS + ("pathx",)
PROJ_LENS = (16, 128, 256)
BASELINES = ("softmax", "linear_elu", "performer", "cheap_linear", "learned_kernel")
# Where each task's official data lives under data=DIR ("tfds" means the TFDS data dir).
DATA_LAYOUT = {"listops": "lra_release/listops-1000", "text": "tfds",
               "retrieval": "lra_release/tsv_data", "image": "tfds",
               "pathfinder": "lra_release/pathfinder32", "pathx": "lra_release/pathfinder128"}


def data_dir(task: str, data: str, tfds: str) -> str:
  """The data_dir override for `task` (empty: leave the config's default)."""
  if DATA_LAYOUT[task] == "tfds":
    return tfds or (f"{data.rstrip('/')}/tfds" if data else "")
  return f"{data.rstrip('/')}/{DATA_LAYOUT[task]}" if data else ""


def task_points(task: str, data: str = "", tfds: str = "") -> h.Sweep:
  """The config file of `task` and its data_dir (if any)."""
  d = data_dir(task, data, tfds)
  return h.product(h.fixed("config", f"configs/{task}.py"),
                   h.fixed("data_dir", d) if d else [{}])


def parse_tasks(value: str | None) -> tuple[str, ...]:
  if not value:
    return TASKS
  tasks = ALL_TASKS if value == "all" else tuple(value.split("+"))
  unknown = set(tasks) - set(ALL_TASKS)
  if unknown:
    raise ValueError(f"unknown task(s) {sorted(unknown)}; expected some of {ALL_TASKS}")
  return tasks


def get_sweep(arg: str | None = None) -> h.Sweep:
  words, kv = h.parse_arg(arg, {"data", "tfds", "seeds", "tasks"})
  if words:
    raise ValueError(f"lra_luna takes only key=value items, got {sorted(words)}")
  mechanisms = h.chain(
      h.product(h.fixed("arg", "luna"), h.sweep("model.proj_len", PROJ_LENS)),
      h.sweep("arg", BASELINES))
  points = []
  for seed in range(int(kv.get("seeds", 3))):
    for task in parse_tasks(kv.get("tasks")):
      points += h.product(task_points(task, kv.get("data", ""), kv.get("tfds", "")),
                          mechanisms, h.fixed("seed", seed))
  return points
