"""What every LRA task module returns, and helpers shared by the readers.

A task module `lra_tasks/<name>.py` exposes `load(config) -> TaskData`. Splits are random-access
sequences (anything with `__len__` and `__getitem__`, typically a `grain.MapDataset`) whose
records are dicts of numpy arrays:

  {"inputs": int32[seq_len], "targets": int32[]}             # one-sequence tasks
  {"inputs": int32[2, seq_len], "targets": int32[]}          # Retrieval (two documents)

`seq_len` is the full length the model sees (special tokens such as CLS included), already
truncated and padded with `pad_id`. Pixel tasks (Image, Pathfinder) set pad_id=None: every
position is a real token; with `config.black_is_padding` they set pad_id=0 (`pixel_pad_id`), and
black pixels are masked as padding wherever they are, as the small protocol's code did.

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
  # Where the data came from, for results.json (`data_provenance`): {"source": "official",
  # "files": {name: sha256}} or {"source": "generated", "generator": module, "settings": {...},
  # "files": {name: sha256}}.
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


def truncate_len(config: Any) -> int:
  """`config.truncate_len`: at most this many symbols (bytes) of each sequence or document are
  kept before the zero padding to `seq_len` (0: as many as fit). A pipeline that cut its data at
  one length and padded it to a longer one (the small protocol's ListOps: 2,000 symbols + 48
  zeros) is reproduced exactly: the model sees the same padded length, the mean readout divides
  by it."""
  n = int(config.get("truncate_len", 0) or 0)
  if n < 0:
    raise DataError(f"config.truncate_len={n} must be >= 0 (0: keep what fits in seq_len)")
  return n


def pixel_pad_id(config: Any) -> int | None:
  """The pad id of a pixel task: None (every pixel is a token), or 0 with
  `config.black_is_padding` (the Nystromformer LRA code's `dataset.py` masks token value 0, so
  black pixels are masked as keys and left out of the mean readout; the small protocol)."""
  return 0 if config.get("black_is_padding", False) else None


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


def _file_hashes(paths: Sequence[Any]) -> dict[str, str]:
  """Each file's name and sha256 (remote files, such as gs:// paths, are named without one)."""
  files = {}
  for p in map(str, paths):
    files[os.path.basename(p)] = file_digest(p) if os.path.isfile(p) else f"not hashed: {p}"
  return files


def official_provenance(paths: Sequence[Any], **extra: Any) -> dict[str, Any]:
  """Provenance of data read from release files: each file's name and sha256 (remote files,
  such as gs:// paths, are named without a hash)."""
  return {"source": "official", "files": _file_hashes(paths), **extra}


# A built-in generator writes this file into the folder that holds its data files; its content
# is the provenance of that data without the file hashes: {"source": "generated", "generator":
# module, "settings": {...}, ...}.
GENERATED_MARKER = "GENERATED.json"


def write_generated_marker(folder: str, provenance: Mapping[str, Any]) -> None:
  """Writes `provenance` (`"source": "generated"`) as the marker of `folder`, atomically."""
  if provenance.get("source") != "generated" or not provenance.get("generator"):
    raise ValueError(f"a generated-data marker needs source 'generated' and a generator, got "
                     f"{dict(provenance)}")
  path = os.path.join(folder, GENERATED_MARKER)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(dict(provenance), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def read_generated_marker(folder: str) -> dict[str, Any] | None:
  """The marker of `folder` (see GENERATED_MARKER), or None if it has none; DataError naming
  the file if it is not a JSON object with "source": "generated" and a "generator"."""
  path = os.path.join(folder, GENERATED_MARKER)
  if not os.path.lexists(path):
    return None
  hint = (f"{GENERATED_MARKER} marks a folder of generated data (written by the built-in "
          "generators); generate the folder again, or delete the file if the folder holds "
          "the official release")
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the generated-data marker ({e}). {hint}") from None
  except ValueError as e:
    raise DataError(f"{path}: the generated-data marker is not valid JSON ({e}). "
                    f"{hint}") from None
  if (not isinstance(marker, dict) or marker.get("source") != "generated"
      or not isinstance(marker.get("generator"), str)):
    raise DataError(f"{path}: expected a JSON object with \"source\": \"generated\" and a "
                    f"\"generator\", got {json.dumps(marker)[:200]}. {hint}")
  return marker


def data_provenance(folder: str, files: Sequence[Any],
                    generated: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Provenance of the data `files` read from `folder`, each file with its sha256.

  Generated data: the marker in `folder` (GENERATED_MARKER) if there is one, else `generated`,
  what a loader that generated `folder` itself passes (folders it generated before markers
  existed have none). Anything else is official release data.
  """
  marker = read_generated_marker(folder)
  if marker is None and generated is not None:
    marker = dict(generated)
  if marker is None:
    return official_provenance(files)
  return {**marker, "files": _file_hashes(files)}
