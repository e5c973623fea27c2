"""What every LRA task module returns, and helpers shared by the readers.

A task module `lra_tasks/<name>.py` exposes `load(config) -> TaskData`. Splits are random-access
sequences (anything with `__len__` and `__getitem__`, typically a `grain.MapDataset`) whose
records are dicts of numpy arrays:

  {"inputs": int32[seq_len], "targets": int32[]}             # one-sequence tasks
  {"inputs": int32[2, seq_len], "targets": int32[]}          # Retrieval (two documents)

`seq_len` is the full length the model sees (special tokens such as CLS included), already
truncated and padded with `pad_id`. Tasks without padding (Image, Pathfinder) set pad_id=None:
every position is a real token, so no pixel value is ever treated as padding.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A loaded task: splits of fixed-length token records plus the facts the model needs."""
  name: str
  splits: Mapping[str, Sequence[dict[str, Any]]]
  vocab_size: int
  num_classes: int
  seq_len: int
  pad_id: int | None = 0
  num_docs: int = 1            # 2 for Retrieval (dual encoder)


class DataError(ValueError):
  """Bad or missing input data; the message names the file (and line) and what was expected."""


def default_cache_dir() -> str:
  """Where generated data is cached: $LUNA_JAX_CACHE or ~/.cache/luna_jax."""
  return os.path.expanduser(os.environ.get("LUNA_JAX_CACHE", "~/.cache/luna_jax"))
