"""What every LRA task module returns, and helpers shared by the readers.

A task module `lra_tasks/<name>.py` exposes `load(config) -> TaskData`. Splits are random-access
sequences (anything with `__len__` and `__getitem__`, typically a `grain.MapDataset`) whose
records are dicts of numpy arrays:

  {"inputs": int32[seq_len], "targets": int32[]}             # one-sequence tasks
  {"inputs": int32[2, seq_len], "targets": int32[]}          # Retrieval (two documents)

`seq_len` is the full length the model sees (special tokens such as CLS included), already
truncated and padded with `pad_id`. Tasks without padding (Image, Pathfinder) set pad_id=None:
every position is a real token, so no pixel value is ever treated as padding.

Nothing is dropped or changed silently. Every split must hold at least one example
(`check_splits`, which the trainer calls; `TaskData.sources` says where each split came from);
readers log counted warnings (logger `lra_tasks.<task>`, one line per file)
for what they keep but alter: ListOps rows longer than `seq_len` are truncated, or refused with
`config.allow_truncation=False` (a truncated expression may have another value). Text and
Retrieval documents are cut to `seq_len` bytes by the LRA protocol itself (Retrieval counts
them in its notice); empty Retrieval documents are counted warnings. Notices (data generation,
decoding progress) are INFO lines of the same loggers; train.py shows them on the console.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
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
  # Where the data came from, for results.json: {"source": "official", "files": {name:
  # sha256}} or {"source": "generated", "generator": module, "settings": {...}}.
  provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Where each split comes from (a file, a folder, the config fields of generated data), for
  # messages such as an empty split's.
  sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


class DataError(ValueError):
  """Bad or missing input data; the message names the file (and line) and what was expected."""


def check_splits(task: TaskData, default_source: str = "") -> None:
  """DataError naming the source (file, folder or config field) of the first empty split."""
  for split in SPLITS:
    if len(task.splits[split]) == 0:
      source = task.sources.get(split, default_source)
      raise DataError(f"{task.name}: the {split} split is empty ({source}); every split needs "
                      "at least one example")


def uses_cls(config: Any) -> bool:
  """The one CLS rule: a task prepends a CLS token exactly when the model reads it out
  (`config.model.readout == "cls"`); every other readout sees the bare sequence."""
  model = config.get("model") or {}
  return model.get("readout", "cls") == "cls"


def default_cache_dir() -> str:
  """Where generated data is cached: $LUNA_JAX_CACHE or ~/.cache/luna_jax."""
  return os.path.expanduser(os.environ.get("LUNA_JAX_CACHE", "~/.cache/luna_jax"))


def file_digest(path: str) -> str:
  """sha256 of a file's bytes, cached per (path, size, mtime) under default_cache_dir() so a
  large release file is hashed once."""
  st = os.stat(path)
  key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
  cache_path = os.path.join(default_cache_dir(), "digests.json")
  try:
    with open(cache_path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  if key not in cache:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
    cache[key] = h.hexdigest()
    try:
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      tmp = f"{cache_path}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(cache, f)
      os.replace(tmp, cache_path)
    except OSError:
      pass                     # a read-only cache only costs re-hashing next time
  return cache[key]


def official_provenance(paths: Sequence[Any], **extra: Any) -> dict[str, Any]:
  """Provenance of data read from release files: each file's name and sha256 (remote files,
  such as gs:// paths, are named without a hash)."""
  files = {}
  for p in map(str, paths):
    files[os.path.basename(p)] = file_digest(p) if os.path.isfile(p) else f"not hashed: {p}"
  return {"source": "official", "files": files, **extra}
