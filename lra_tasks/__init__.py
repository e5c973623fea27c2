"""LRA tasks, one module each: `load_task(config)` returns a `common.TaskData`."""
from __future__ import annotations

import importlib

from lra_tasks.common import DataError, TaskData

# config.task -> module. Path-X is Pathfinder at 128x128.
TASK_MODULES = {
    "listops": "lra_tasks.listops",
    "text": "lra_tasks.text",
    "retrieval": "lra_tasks.retrieval",
    "image": "lra_tasks.image",
    "pathfinder": "lra_tasks.pathfinder",
    "pathx": "lra_tasks.pathfinder",
}


def load_task(config) -> TaskData:
  """Loads the task named by `config.task`."""
  if config.task not in TASK_MODULES:
    raise ValueError(f"config.task={config.task!r} is not a known task; valid: "
                     f"{', '.join(TASK_MODULES)}")
  return importlib.import_module(TASK_MODULES[config.task]).load(config)


__all__ = ["DataError", "TaskData", "load_task", "TASK_MODULES"]
