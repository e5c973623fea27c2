"""The run folder: its file names, the config check on resume, checkpoints with recovery, the
bookkeeping of metrics.jsonl, and reading a run back (trainer, results, sweep and inspection).

  WORKDIR/config.json             the config of the checkpoints; written only after the resume
                                  check passed and the checkpoint was restored
  WORKDIR/identity.json           what the checkpoints were made from besides the config: the
                                  data's provenance (each file's sha256; generated data also by
                                  its settings) and the device count; written with config.json
  WORKDIR/config_history.jsonl    one line per resume that changed the config or device count:
                                  {"step": N, "time": ..., "changes": {field: [old, new]}}
  WORKDIR/metrics.jsonl           {"step": s, ...} per line; non-finite numbers are null; a
                                  training record averages the log_every steps up to s, or
                                  the `averaged_steps` it names (the first after a resume)
  WORKDIR/results.json            written at the end, from the best checkpoint that exists
  WORKDIR/FAILED                  why the last attempt failed (a rerun removes it)
  WORKDIR/LOCK                    {"host", "pid"} of the one process writing the folder
  WORKDIR/checkpoints/<step>/     train state (`state`) + grain iterator (`data_iter`), orbax
  WORKDIR/checkpoints/corrupt-<step>/   an unreadable checkpoint, moved aside
  WORKDIR/best/<step>/            parameters of the best validation score (one step)
  WORKDIR/best_params.msgpack     the parameters results.json was measured with and their
                                  step (flax msgpack; small: committed beside results.json,
                                  read by `load_params` and `python -m luna_jax.evaluate`)
  WORKDIR/tb/                     TensorBoard events
  WORKDIR/sweep.log               output of `luna_jax.experiments.sweep` runs

Resume rules (`resume_changes`). A workdir that holds checkpoints is resumed only with a config
that makes the same model on the same data. Fields are classified here and nowhere else:
* model/data (`MODEL_DATA`): everything not listed below: `model.*`, `task`, `seq_len`,
  `data_dir`, `batch_size`, `seed`, `append_eos`, the task's data group (`listops.*`,
  `pathfinder.*`), `grain_workers` (the checkpointed data iterator's state has its form) and any
  field this module does not know. A change fails before any compute,
  naming each field with its old and new value.
* schedule (`SCHEDULE_FIELDS`): the optimizer and its schedule. Changed only with
  `--config.allow_resume_changes=true`.
* bookkeeping (`BOOKKEEPING_FIELDS`): how often to log, evaluate and save, labels,
  and how the same model is computed (remat, attention implementation). Always accepted.
Every accepted change is appended to config_history.jsonl. `num_train_steps` below the step of
the restored checkpoint is refused whatever the flags (`check_steps`): a run is not shortened
after the fact.
The data itself (`identity_changes`): a split file whose sha256 differs from identity.json's (an
edited file under an unchanged data_dir), or generated data of other settings, is refused like a
model/data field, naming the file and both hashes. A changed device count is accepted (the
batch is global) but changes the numbers: it is recorded in config_history.jsonl and said. A
field present on one side only (a field added to or removed from the code since the run
started) is a change only when it is a model/data field whose value differs from the current
default of `luna_jax.config_defaults.base_config()` (a field without such a default always
differs).

One writer per run folder (`WorkdirLock`): a run holds WORKDIR/LOCK while it writes; a second
writer fails naming the holder. A lock left by a dead process on this host is taken over with a
warning; one of another host is never taken over (delete the file once that process is gone).

A start from step 0 (`check_start_over`) never replaces the work of an earlier run on its own:
with no readable training checkpoint, a folder that holds checkpoints proven unreadable
(checkpoints/corrupt-*) or an intact best/ with its results.json is started over only with
`start_over` (train.py --start_over); deleting checkpoints/ and best/ says the same.

Metrics and results derive from checkpoints: a start from step N (0 for a new run) drops the
metrics.jsonl records after N (all of them when N = 0) and every test record, removes best/
steps after N and a stale results.json, and takes the best validation score only from records
at or below N.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

CONFIG_FILE = "config.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
IDENTITY_FILE = "identity.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
FAILED_FILE = "FAILED"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
TB_DIR = "tb"
SWEEP_LOG_FILE = "sweep.log"
INIT_FROM_FILE = "init_from.json"                  # what a converted run took from its source
PARAMS_FILE = "best_params.msgpack"                # the tested parameters, one portable file
LOCK_FILE = "LOCK"                                   # the process writing the folder
BUSY_EXIT_STATUS = 75      # train.py's exit status when another process holds the workdir
CORRUPT_PREFIX = "corrupt-"
STATE_ITEM, DATA_ITER_ITEM = "state", "data_iter"   # the items of a training checkpoint
TMP_MARKER = ".orbax-checkpoint-tmp"                 # orbax's unfinished-save folders
# Any of these makes a folder a run (luna_jax.experiments.results).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE)

MODEL_DATA, SCHEDULE, BOOKKEEPING = "model/data", "schedule", "bookkeeping"
MACHINE = "machine"                   # identity.json's num_devices: accepted, recorded, said
SCHEDULE_FIELDS = ("learning_rate", "warmup_steps", "warmup_init_lr", "num_train_steps",
                   "schedule", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "grad_clip",
                   "grad_clip_value",
                   "one_cycle.*")
BOOKKEEPING_FIELDS = ("eval_every", "eval_max_examples", "eval_stream", "test_drop_last",
                      "save_best_after", "log_every", "checkpoint_every",
                      "keep_checkpoints", "protocol", "allow_resume_changes",
                      "allow_truncation",
                      # how the same model is computed (same parameters, same data)
                      "model.remat", "model.*.implementation", "model.luna.use_flash",
                      "model.softmax.block_size", "model.softmax.query_block_size")

log = logging.getLogger(__name__)
# jax and orbax are imported where checkpoints are touched, so that reading a run folder
# (luna_jax.experiments.results, .sweep) stays fast.


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and what was expected."""


class ConfigMismatchError(ConfigError):
  """The config differs from the one the workdir's checkpoints were made with."""


class DamagedFileError(ValueError):
  """A run file (config.json, metrics.jsonl, ...) that is not what this module writes."""


class CheckpointError(RuntimeError):
  """No readable checkpoint, or a checkpoint that cannot be written."""


class WorkdirError(RuntimeError):
  """A workdir that cannot be used: no name, not a folder, not writable, or in use."""


class WorkdirBusyError(WorkdirError):
  """Another live process holds the workdir's lock."""


def path(workdir: str, name: str) -> str:
  """WORKDIR/name."""
  return os.path.join(workdir, name)


def _is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def sync(name: str) -> None:
  """All processes wait here (file operations are done by process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- JSON files

def json_safe(obj: Any) -> Any:
  """`obj` with NaN and +-Inf replaced by None (JSON has no such numbers)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs: Any) -> str:
  """Strict JSON of `obj` (non-finite numbers as null)."""
  return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json(file: str, obj: Any) -> None:
  """Writes `obj` to `file` atomically (a kill leaves the old file or the new one)."""
  tmp = f"{file}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(dumps(obj, indent=2) + "\n")
  os.replace(tmp, file)


def read_json(file: str) -> Any:
  """The JSON object in `file`, or None if there is no such file; DamagedFileError naming it if
  it is not JSON."""
  if not os.path.exists(file):
    return None
  with open(file) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise DamagedFileError(f"{file}: not valid JSON ({e}); repair or delete it") from None


def read_jsonl(file: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file ([] if there is none). A last line without its newline
  that does not parse is a write cut short by a kill and is skipped; any other bad line is a
  DamagedFileError naming the file and line."""
  if not os.path.exists(file):
    return []
  with open(file) as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError as e:
      if i == len(lines):        # no newline after it: cut short
        log.warning("%s:%d: ignoring an incomplete last line (a write cut short)", file, i)
        continue
      raise DamagedFileError(f"{file}:{i}: not a JSON object ({e}); repair or delete that "
                             "line") from None
  return records


def _rewrite_jsonl(file: str, records: Iterable[Mapping[str, Any]]) -> None:
  tmp = f"{file}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(dumps(r) + "\n" for r in records)
  os.replace(tmp, file)


# ----------------------------------------------------------------------------- the folder

def checked_workdir(workdir: str | None) -> str:
  """The absolute path of `workdir`; WorkdirError for an empty name (an unset shell variable
  would otherwise make the current folder the run folder)."""
  if not workdir or not str(workdir).strip():
    raise WorkdirError(f"the workdir is empty ({workdir!r}: an unset shell variable?): name a "
                       "folder for the run, e.g. --workdir=runs/NAME")
  return os.path.abspath(workdir)


def _this_process() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid()}


def _holder(file: str) -> dict[str, Any] | None:
  """The {"host", "pid"} in a lock file; None if it is gone or unreadable."""
  try:
    with open(file) as f:
      holder = json.loads(f.read())
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _is_alive(holder: Mapping[str, Any] | None, file: str) -> bool:
  """Whether the lock's holder may still run: a process of another host always may; on this
  host, whether its pid exists. A lock without a readable holder (a writer killed between
  creating and filling it) counts as held for its first 10 seconds."""
  if holder is None:
    try:
      return time.time() - os.path.getmtime(file) < 10
    except OSError:
      return False
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  except (TypeError, ValueError):
    return False
  return True


def lock_holder(workdir: str) -> dict[str, Any] | None:
  """The live holder ({"host", "pid"}) of WORKDIR/LOCK, or None if the folder is free."""
  file = path(workdir, LOCK_FILE)
  if not os.path.exists(file):
    return None
  holder = _holder(file)
  return (holder or {"host": "?", "pid": "?"}) if _is_alive(holder, file) else None


def _busy_message(workdir: str, holder: Mapping[str, Any] | None) -> str:
  who = (f"process {holder.get('pid')} on host {holder.get('host')}" if holder
         else "a process that is starting")
  return (f"{workdir} is in use by {who} ({path(workdir, LOCK_FILE)}): one run writes a "
          "folder at a time; wait for it to end, or delete that file if the process is gone")


def _make_folder(workdir: str) -> str | None:
  """Creates `workdir` (WorkdirError naming the cause); returns the topmost folder it created
  (None if it existed)."""
  top, parent = None, workdir
  while not os.path.exists(parent):
    top, parent = parent, os.path.dirname(parent)
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError:
    raise WorkdirError(f"the workdir {workdir} is a file, not a folder") from None
  except NotADirectoryError:
    raise WorkdirError(f"the workdir {workdir} lies under {_file_above(workdir)}, which is a "
                       "file, not a folder") from None
  except OSError as e:
    raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror}") from None
  if not os.path.isdir(workdir):
    raise WorkdirError(f"the workdir {workdir} is a file, not a folder")
  return top


def _file_above(workdir: str) -> str:
  parent = workdir
  while parent != os.path.dirname(parent) and not os.path.isfile(parent):
    parent = os.path.dirname(parent)
  return parent


class WorkdirLock:
  """Holds WORKDIR/LOCK while a run writes the folder (module docstring); creates the folder,
  and on release removes the folders it created if they are still empty."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.file = path(workdir, LOCK_FILE)
    self._held = False
    self._created: str | None = None

  def __enter__(self) -> "WorkdirLock":
    if _is_primary():
      self._created = _make_folder(self.workdir)
      try:
        self._acquire()
      except BaseException:
        self._remove_created()
        raise
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._held and (_holder(self.file) or {}).get("pid") == os.getpid():
      os.remove(self.file)
    self._held = False
    self._remove_created()

  def _acquire(self) -> None:
    for _ in range(3):
      try:
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_stale()
        continue
      except OSError as e:
        raise WorkdirError(f"cannot write in the workdir {self.workdir}: {e.strerror} "
                           f"(creating {self.file})") from None
      with os.fdopen(fd, "w") as f:
        f.write(dumps(_this_process()) + "\n")
      self._held = True
      return
    raise WorkdirBusyError(_busy_message(self.workdir, _holder(self.file)))

  def _take_over_stale(self) -> None:
    """Removes the lock of a dead process (with a warning); WorkdirBusyError if it lives."""
    holder = _holder(self.file)
    if _is_alive(holder, self.file):
      raise WorkdirBusyError(_busy_message(self.workdir, holder))
    log.warning("%s: taking over the lock of process %s on this host, which has ended",
                self.file, (holder or {}).get("pid", "?"))
    try:
      os.remove(self.file)
    except FileNotFoundError:
      pass

  def _remove_created(self) -> None:
    folder = self.workdir
    while self._created is not None:
      try:
        os.rmdir(folder)
      except OSError:
        break
      if folder == self._created:
        break
      folder = os.path.dirname(folder)


# ----------------------------------------------------------------------------- configs

def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as config.json stores it (plain JSON values)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def field_names(config: ml_collections.ConfigDict | Mapping[str, Any]) -> list[str]:
  """Dotted names of every field, e.g. "model.proj_len"."""
  return sorted(flatten(config_dict(config)))


def closest_fields(name: str, names: Sequence[str], n: int = 3) -> list[str]:
  """The valid field names closest to a mistyped `name` (dotted, without "config.")."""
  leaf = name.rsplit(".", 1)[-1]
  by_leaf = [m for m in names if difflib.get_close_matches(leaf, [m.rsplit(".", 1)[-1]],
                                                           cutoff=0.75)]
  found = difflib.get_close_matches(name, names, n=n, cutoff=0.0)
  return list(dict.fromkeys(by_leaf + found))[:n]


def field_kind(name: str) -> str:
  """MODEL_DATA, SCHEDULE or BOOKKEEPING for a dotted field name (module docstring)."""
  def matches(patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
  if matches(BOOKKEEPING_FIELDS):
    return BOOKKEEPING
  if matches(SCHEDULE_FIELDS):
    return SCHEDULE
  return MODEL_DATA


@dataclasses.dataclass(frozen=True)
class Change:
  """One field that differs between the stored and the new config."""
  field: str
  old: Any
  new: Any
  kind: str

  def __str__(self) -> str:
    prefix = "" if self.kind == MACHINE else "config."
    return f"{prefix}{self.field}: {_show(self.old)} -> {_show(self.new)}"


class _Absent:
  def __repr__(self) -> str:
    return "(absent)"


ABSENT = _Absent()


def _show(v: Any) -> str:
  return repr(v) if v is not ABSENT else "(absent)"


def _defaults() -> dict[str, Any]:
  from luna_jax.config_defaults import base_config  # pylint: disable=g-import-not-at-top
  return flatten(config_dict(base_config()))


def config_changes(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
  """Fields that differ between two configs (JSON dicts), by the rules of the module docstring."""
  old_flat, new_flat = flatten(config_dict(stored)), flatten(config_dict(new))
  defaults = None
  changes = []
  for name in sorted(set(old_flat) | set(new_flat)):
    old, new_value = old_flat.get(name, ABSENT), new_flat.get(name, ABSENT)
    kind = field_kind(name)
    if old is ABSENT or new_value is ABSENT:
      if kind != MODEL_DATA:
        continue
      defaults = _defaults() if defaults is None else defaults
      present = new_value if old is ABSENT else old
      if name in defaults and defaults[name] == present:
        continue
    elif old == new_value:
      continue
    changes.append(Change(name, old, new_value, kind))
  return changes


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints or WORKDIR/best holds a finished step."""
  return any(_steps(path(workdir, d)) for d in (CHECKPOINTS_DIR, BEST_DIR))


def _steps(folder: str) -> list[int]:
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def resume_changes(workdir: str, config: ml_collections.ConfigDict) -> list[Change]:
  """The changes of `config` against WORKDIR/config.json that a resume may accept ([] for a
  workdir without checkpoints). Writes nothing; raises ConfigMismatchError (one message naming
  every refused field with old and new values) for a change of the model or data, or of the
  schedule without `config.allow_resume_changes`."""
  if not has_checkpoints(workdir):
    return []
  allow = bool(config.get("allow_resume_changes", False))
  stored = read_json(path(workdir, CONFIG_FILE))
  if stored is None:
    if allow:
      log.warning("%s is missing: cannot check the config against the checkpoints "
                  "(allow_resume_changes=true; parameter shapes are still checked)",
                  path(workdir, CONFIG_FILE))
      return []
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints but no {CONFIG_FILE}, so the config cannot be checked "
        f"against them: restore {CONFIG_FILE}, pass --config.allow_resume_changes=true to "
        f"resume anyway, or use a new --workdir")
  changes = config_changes(stored, config)
  refused = [c for c in changes if c.kind == MODEL_DATA]
  if refused:
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints of another model or data: "
        f"{'; '.join(map(str, refused))}. Use a new --workdir for this config (or rerun with "
        f"the old values; deleting {CHECKPOINTS_DIR}/ and {BEST_DIR}/ starts over)")
  schedule = [c for c in changes if c.kind == SCHEDULE]
  if schedule and not allow:
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints made with another optimizer schedule: "
        f"{'; '.join(map(str, schedule))}. Pass --config.allow_resume_changes=true to resume "
        f"with the new values (recorded in {CONFIG_HISTORY_FILE}), or rerun with the old ones")
  return changes


def run_identity(provenance: Mapping[str, Any], num_devices: int) -> dict[str, Any]:
  """What identity.json holds (module docstring)."""
  return {"data": json_safe(dict(provenance)), "num_devices": num_devices}


def _data_difference(name: str, old: Any, new: Any) -> str:
  if name.startswith("files."):
    return f"the file {name[len('files.'):]} changed (sha256 {_show(old)} -> {_show(new)})"
  return f"data {name}: {_show(old)} -> {_show(new)}"


def identity_changes(workdir: str, identity: Mapping[str, Any]) -> list[Change]:
  """The device-count change against identity.json that a resume records ([] for a workdir
  without checkpoints or without identity.json); ConfigMismatchError naming each file (with
  both hashes) or generator setting of data that differs from the checkpoints'."""
  stored = read_json(path(workdir, IDENTITY_FILE)) if has_checkpoints(workdir) else None
  if not isinstance(stored, Mapping):
    return []
  old, new = flatten(stored.get("data") or {}), flatten(identity["data"])
  differ = [_data_difference(k, old.get(k, ABSENT), new.get(k, ABSENT))
            for k in sorted(set(old) | set(new)) if old.get(k, ABSENT) != new.get(k, ABSENT)]
  if differ:
    raise ConfigMismatchError(
        f"{workdir} holds checkpoints trained on other data: {'; '.join(differ)} (recorded in "
        f"{IDENTITY_FILE}). Use a new --workdir for this data, or restore the old files")
  return [Change(k, stored[k], identity[k], MACHINE) for k in ("num_devices",)
          if k in stored and stored[k] != identity[k]]


def changed_config(workdir: str, config: ml_collections.ConfigDict | Mapping[str, Any]
                   ) -> list[Change]:
  """The changes of `config` against the config of WORKDIR's checkpoints or results that a
  rerun would not accept: model/data, and schedule unless `allow_resume_changes` ([] for a
  folder without checkpoints or results). For tools that reuse finished runs (sweep,
  conversion study), which must not take a finished run of another config for this one."""
  stored = read_json(path(workdir, CONFIG_FILE))
  if stored is None or not (has_checkpoints(workdir) or os.path.exists(path(workdir,
                                                                               RESULTS_FILE))):
    return []
  refused = (MODEL_DATA,) + (() if config.get("allow_resume_changes") else (SCHEDULE,))
  return [c for c in config_changes(stored, config) if c.kind in refused]


def folder_digest(folder: str) -> str:
  """sha256 of every file's relative path and bytes under `folder` (a checkpoint's identity)."""
  h = hashlib.sha256()
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in sorted(files):
      file = os.path.join(root, name)
      h.update(os.path.relpath(file, folder).encode() + b"\0")
      with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          h.update(chunk)
  return h.hexdigest()


def best_identity(workdir: str) -> dict[str, Any]:
  """{"workdir", "step", "sha256"} of WORKDIR's best checkpoint (what a converted run is made
  from; init_from.json records it). FileNotFoundError if there is none."""
  workdir = os.path.abspath(workdir)
  steps = _steps(path(workdir, BEST_DIR))
  if not steps:
    raise FileNotFoundError(f"no best checkpoint under {path(workdir, BEST_DIR)}")
  return {"workdir": workdir, "step": steps[-1],
          "sha256": folder_digest(os.path.join(path(workdir, BEST_DIR), str(steps[-1])))}


def converted_from_other(workdir: str, source: str) -> str | None:
  """Why WORKDIR's init_from.json names another source than `source`'s best checkpoint (path,
  step or sha256), or None if it names that one (or there is no init_from.json)."""
  stored = read_json(path(workdir, INIT_FROM_FILE))
  if not isinstance(stored, Mapping):
    return None
  now = best_identity(source)
  fields = [k for k in ("workdir", "step", "sha256") if k in stored]
  if all(stored[k] == now[k] for k in fields):
    return None
  show = lambda d: ", ".join(f"{k} {d.get(k)}" for k in fields)
  return (f"{workdir} was converted from another source checkpoint ({show(stored)}) than "
          f"{source}'s best ({show(now)})")


def check_steps(workdir: str, step: int, num_train_steps: int) -> None:
  """ConfigMismatchError if the restored checkpoint `step` is past `num_train_steps`."""
  if step > num_train_steps:
    raise ConfigMismatchError(
        f"config.num_train_steps={num_train_steps} is below step {step} of the checkpoint in "
        f"{path(workdir, CHECKPOINTS_DIR)}: a run is not shortened after the fact; rerun with "
        f"num_train_steps >= {step}, or use a new --workdir")


def record_config(workdir: str, config: ml_collections.ConfigDict, changes: Sequence[Change],
                  step: int, identity: Mapping[str, Any] | None = None) -> None:
  """Writes config.json (and identity.json, if given) and appends the accepted `changes` (made
  at `step`) to config_history.jsonl. Call only after the resume check and the restore
  succeeded."""
  if not _is_primary():
    return
  if identity is not None:
    write_json(path(workdir, IDENTITY_FILE), identity)
  if changes:
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "changes": {c.field: [None if c.old is ABSENT else c.old,
                                   None if c.new is ABSENT else c.new] for c in changes}}
    with open(path(workdir, CONFIG_HISTORY_FILE), "a") as f:
      f.write(dumps(entry) + "\n")
  tmp = path(workdir, f"{CONFIG_FILE}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config saved in WORKDIR/config.json."""
  config = read_json(path(workdir, CONFIG_FILE))
  if config is None:
    raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir!r}: not a train_and_evaluate workdir")
  return ml_collections.ConfigDict(config)


# ----------------------------------------------------------------------------- metrics

def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of WORKDIR/metrics.jsonl (empty if there is none)."""
  return read_jsonl(path(workdir, METRICS_FILE))


def start_at(workdir: str, step: int, num_train_steps: int) -> None:
  """Makes the files agree with a run that starts from checkpoint `step` (0: a new run): drops
  metrics records after it (all when 0) and all test records, FAILED, and a results.json that
  a further training would make stale."""
  if not _is_primary():
    return
  file = path(workdir, METRICS_FILE)
  if os.path.exists(file):
    records = read_jsonl(file)
    keep = [] if step == 0 else [r for r in records
                                 if r.get("step", 0) <= step and "test_accuracy" not in r]
    if len(keep) != len(records):
      _rewrite_jsonl(file, keep)
  for name in (FAILED_FILE,) + ((RESULTS_FILE,) if step < num_train_steps else ()):
    if os.path.exists(path(workdir, name)):
      os.remove(path(workdir, name))


def check_start_over(workdir: str, start_over: bool) -> None:
  """Before a start from step 0 (no readable training checkpoint): CheckpointError, unless
  `start_over`, if it would replace an earlier run's results (module docstring)."""
  if start_over or not _is_primary():
    return
  ckpt_dir = path(workdir, CHECKPOINTS_DIR)
  corrupt = (sorted(n for n in os.listdir(ckpt_dir) if n.startswith(CORRUPT_PREFIX))
             if os.path.isdir(ckpt_dir) else [])
  best = _steps(path(workdir, BEST_DIR))
  kept = ([f"{BEST_DIR}/{best[-1]}", RESULTS_FILE]
          if best and os.path.exists(path(workdir, RESULTS_FILE)) else [])
  if not corrupt and not kept:
    return
  why = [f"its checkpoints were unreadable (moved aside to {', '.join(corrupt)})"] if corrupt else []
  why += [f"it holds {' and '.join(kept)} of an earlier run"] if kept else []
  raise CheckpointError(
      f"{workdir} has no readable training checkpoint and {'; '.join(why)}: a start from step "
      f"0 would replace them. Rerun with --start_over to train again from step 0, or use a new "
      f"--workdir")


def best_validation(records: Sequence[Mapping[str, Any]], max_step: int
                    ) -> tuple[float, int]:
  """(best val_accuracy, its step) among records at or below `max_step`; (-1, -1) if none.
  Ties go to the earliest step (as in training, where only a strictly better score saves)."""
  best, best_step = -1.0, -1
  for r in records:
    v = r.get("val_accuracy")
    if isinstance(v, (int, float)) and r.get("step", 0) <= max_step and v > best:
      best, best_step = float(v), int(r["step"])
  return best, best_step


# ----------------------------------------------------------------------------- checkpoints

def clean_tmp(workdir: str) -> list[str]:
  """Removes unfinished orbax saves (`*.orbax-checkpoint-tmp*`) from checkpoints/ and best/;
  returns their paths."""
  removed = []
  if _is_primary():
    for d in (CHECKPOINTS_DIR, BEST_DIR):
      for p in sorted(glob.glob(os.path.join(path(workdir, d), f"*{TMP_MARKER}*"))):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.info("removed the unfinished save %s", p)
  sync("luna_jax_clean_tmp")
  return removed


def _unreadable_file(step_dir: str, error: BaseException) -> str:
  """The file of a checkpoint that `error` came from, as well as can be told."""
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      file = os.path.join(root, name)
      if name == "_CHECKPOINT_METADATA":          # orbax reads past a bad one of these
        continue
      try:
        with open(file, "rb") as f:
          if f.read(1) not in (b"{", b"["):       # not a JSON file (array data, markers)
            continue
          f.seek(0)
          json.loads(f.read())
      except (OSError, ValueError):
        return file
  files = re.findall(r'local file "([^"]+)"', str(error))
  return files[-1] if files else step_dir


# Errors of the machine, not of a checkpoint's bytes: a checkpoint that raises them is kept.
_NOT_DAMAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                      errno.EIO, errno.ETIMEDOUT)


def _not_damage(error: BaseException) -> BaseException | None:
  """The error in `error`'s chain that says reading failed for a reason other than the
  checkpoint's content (permissions, resources, I/O), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (MemoryError, PermissionError)) or (
        isinstance(error, OSError) and error.errno in _NOT_DAMAGE_ERRNOS):
      return error
    error = error.__cause__ or error.__context__
  return None


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().split("\n", 1)[0]
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
  return f"{type(error).__name__}: {text[:limit]}"


def _check_shapes(target: Any, stored: Any, where: str) -> None:
  """ConfigMismatchError if the checkpoint's parameter shapes are not the model's."""
  import jax  # pylint: disable=g-import-not-at-top
  want = {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
  have = {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_flatten_with_path(stored)[0]}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:4]
    detail = "; ".join(f"params{k}: checkpoint {have.get(k, 'absent')}, config "
                       f"{want.get(k, 'absent')}" for k in dict(diff))
    raise ConfigMismatchError(f"{where} holds parameters of another model ({detail}); use a "
                              "new --workdir for this config")


def _host_copy(tree: Any) -> Any:
  """The replicated state as host numpy arrays: one device-to-host copy per leaf. (Given the
  jax.Arrays themselves, orbax slices every leaf once per local replica to share the writing:
  on 8 host devices that is ~800 dispatches and 0.6 s per save of a tiny model. The state is
  replicated, so the primary host writes it whole; restores still return sharded jax.Arrays.)
  Copies, not views of the device buffers: the next (donating) train step may reuse those while
  the asynchronous save still writes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


class Checkpoints:
  """WORKDIR/checkpoints (train state + data iterator, saved asynchronously every `every`
  steps, newest `keep` kept) and WORKDIR/best (parameters of one step, saved synchronously).

  A save that fails stops the run at the first step after it fails (`check`), naming the
  error; its unfinished folder is removed and older checkpoints stay intact."""

  def __init__(self, workdir: str, *, keep: int, every: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.dir = path(workdir, CHECKPOINTS_DIR)
    self.best_dir = path(workdir, BEST_DIR)
    policies = ocp.checkpoint_managers
    self.mngr = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(every),
                policies.PreemptionCheckpointingPolicy()])),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITER_ITEM: ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        self.best_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler())
    self._pending: int | None = None
    self._failed_steps: list[int] = []
    self._threads_before_save: set[threading.Thread] = set()

  # -- restore

  def restore_latest(self, target: Any, set_iter_state: Callable[[Any], None]
                     ) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, its data iterator state given to
    `set_iter_state`; None if there is none. An unreadable one (its iterator state refused too)
    is logged (file and reason) and moved to checkpoints/corrupt-<step>/; CheckpointError if
    every checkpoint is unreadable."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    moved = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      step_dir = os.path.join(self.dir, str(step))
      try:
        meta = self.mngr.item_metadata(step)[STATE_ITEM]
        _check_shapes(target.params, meta["params"], step_dir)
        restored = self.mngr.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            DATA_ITER_ITEM: ocp.args.JsonRestore()}))
        set_iter_state(restored[DATA_ITER_ITEM])
        return step, restored[STATE_ITEM]
      except ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if (cause := _not_damage(e)) is not None:
          raise CheckpointError(
              f"cannot read checkpoint step {step} in {self.dir} ({_first_line(cause)}), which "
              "does not show that it is damaged: nothing was moved; fix the cause and rerun"
          ) from e
        moved.append(self._move_aside(step, step_dir, e))
    if moved:
      raise CheckpointError(f"no readable checkpoint in {self.dir}: moved "
                            f"{', '.join(moved)} aside (see the messages above); rerun with "
                            "--start_over to train again from step 0 (replacing best/ and "
                            "results.json)")
    return None

  def _move_aside(self, step: int, step_dir: str, error: BaseException) -> str:
    culprit = _unreadable_file(step_dir, error)
    dest = os.path.join(self.dir, f"{CORRUPT_PREFIX}{step}")
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(self.dir, f"{CORRUPT_PREFIX}{step}-{n}")
    if _is_primary():
      log.warning("checkpoint step %d is unreadable: %s (%s); moved it to %s and trying an "
                  "older one", step, culprit, _first_line(error), dest)
      os.rename(step_dir, dest)
    sync(f"luna_jax_move_aside_{step}")
    self.mngr.reload()
    return os.path.basename(dest)

  # -- training checkpoints

  def save(self, step: int, state: Any, data_iter_state: Any, force: bool = False) -> None:
    """Starts an asynchronous save if the policy (or `force`) says so."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    if not (force or self.mngr.should_save(step)):
      return
    threads = set(threading.enumerate())
    try:
      started = self.mngr.save(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(_host_copy(state)),
          DATA_ITER_ITEM: ocp.args.JsonSave(data_iter_state)}), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._pending if self._pending is not None else step, e)
    if started:
      self._pending = step
      self._threads_before_save = threads

  def check(self) -> None:
    """Raises CheckpointError if the last asynchronous save has failed (cheap; every step)."""
    if self._pending is not None and not self.mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the last save; CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def _failed(self, step: int | None, error: BaseException) -> None:
    self._pending = None
    self._failed_steps.append(step)    # its folder is removed by close(), once nothing writes
    self.mngr.reload()
    older = [s for s in self.mngr.all_steps() if step is None or s < step]
    kept = (f"checkpoint step {max(older)} is intact; fix the cause and rerun the same command "
            "to resume from it" if older else "there is no earlier checkpoint")
    raise CheckpointError(f"saving checkpoint step {step} to {self.dir} failed "
                          f"({_first_line(error)}); the run stopped there and {kept}") from error

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  # -- best

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def save_best(self, step: int, params: Any) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    try:
      self.best.save(step, args=ocp.args.StandardSave(_host_copy(params)), force=True)
      self.best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._remove_tmp(self.best_dir, step)
      raise CheckpointError(f"saving the best parameters (step {step}) to {self.best_dir} "
                            f"failed ({_first_line(e)}); the run stopped there") from e

  def prune_best_after(self, step: int) -> None:
    """Deletes best/ steps after `step` (they belong to a run that is being redone)."""
    for s in self.best.all_steps():
      if s > step:
        if _is_primary():
          log.info("removing %s/%d: it is newer than the restored step %d", self.best_dir, s,
                   step)
        self.best.delete(s)

  def restore_best(self, target: Any) -> Any:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    step = self.best.latest_step()
    try:
      _check_shapes(target, self.best.item_metadata(step), os.path.join(self.best_dir,
                                                                        str(step)))
      return self.best.restore(step, args=ocp.args.StandardRestore(target))
    except ConfigMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      step_dir = os.path.join(self.best_dir, str(step))
      raise CheckpointError(f"the best checkpoint {step_dir} is unreadable: "
                            f"{_unreadable_file(step_dir, e)} ({_first_line(e)}); delete it "
                            "and rerun to evaluate the latest parameters instead") from e

  @staticmethod
  def _remove_tmp(folder: str, step: int | None) -> None:
    if _is_primary():
      for p in glob.glob(os.path.join(folder, f"{step}{TMP_MARKER}*")):
        shutil.rmtree(p, ignore_errors=True)

  def close(self) -> None:
    """Waits for a pending save (errors are logged, not raised: call `wait` first to get
    them), closes both managers and removes what failed saves left."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      log.error("checkpoint save failed: %s", _first_line(e))
    self.mngr.close()
    self.best.close()
    if self._failed_steps:
      # The other items of a failed save go on writing in orbax's threads: let them finish
      # before removing their folder (bounded: a thread that never ends only costs the wait).
      deadline = time.time() + 30
      for t in set(threading.enumerate()) - self._threads_before_save:
        if t is not threading.current_thread() and not t.daemon:
          t.join(max(deadline - time.time(), 0.0))
      for step in self._failed_steps:
        self._remove_tmp(self.dir, step)


# ----------------------------------------------------------------------------- inspection

def _local_target(tree: Any) -> Any:
  """Abstract arrays on the first local device, shaped like checkpoint metadata `tree`."""
  import jax  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def write_params_file(workdir: str, params: Any, step: int) -> str:
  """WORKDIR/PARAMS_FILE: `params` (host arrays) and their step, written atomically."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  data = flax.serialization.msgpack_serialize(
      {"step": int(step), "params": jax.device_get(params)})
  file = path(workdir, PARAMS_FILE)
  tmp = f"{file}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, file)
  return file


def read_params_file(folder: str) -> tuple[Any, int]:
  """(params as numpy arrays, step) of FOLDER/PARAMS_FILE; FileNotFoundError if absent,
  ValueError naming the file if it is not one."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  file = path(folder, PARAMS_FILE)
  with open(file, "rb") as f:
    raw = f.read()
  try:
    data = flax.serialization.msgpack_restore(raw)
    return data["params"], int(data["step"])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{file}: not a parameters file written by luna_jax "
                     f"({type(e).__name__}: {_first_line(e)})") from None


def _readable(step_dir: str, restore: Callable[[], Any]) -> Any:
  """restore(), or CheckpointError naming the unreadable file of `step_dir` and why."""
  try:
    return restore()
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"the checkpoint {step_dir} is unreadable: "
                          f"{_unreadable_file(step_dir, e)} ({_first_line(e)})") from e


def load_params(workdir: str, which: str = "auto") -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) of a train_and_evaluate workdir, on one local device whatever
  topology saved them; or of a committed results folder (config.json and PARAMS_FILE only).

  Args:
    workdir: the training workdir, or a folder holding config.json and PARAMS_FILE.
    which: "best" (WORKDIR/best/<step>, params only; else PARAMS_FILE), "latest" (the newest
      training checkpoint WORKDIR/checkpoints/<step>/state) or "auto" (best if present, else
      latest).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if which not in ("auto", "best", "latest"):
    raise ValueError(f"which={which!r}; expected 'auto', 'best' or 'latest'")
  workdir = os.path.abspath(workdir)   # orbax needs absolute paths
  config = load_config(workdir)
  best_dir, ckpt_dir = path(workdir, BEST_DIR), path(workdir, CHECKPOINTS_DIR)
  if which in ("auto", "best") and os.path.isdir(best_dir):
    with ocp.CheckpointManager(best_dir, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
      if (step := mngr.latest_step()) is not None:
        def best():
          target = _local_target(mngr.item_metadata(step))
          return mngr.restore(step, args=ocp.args.StandardRestore(target))
        return config, _readable(os.path.join(best_dir, str(step)), best), step
  if which in ("auto", "latest") and os.path.isdir(ckpt_dir):
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITER_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers) as mngr:
      if (step := mngr.latest_step()) is not None:
        def latest():
          target = _local_target(mngr.item_metadata(step)[STATE_ITEM])
          return mngr.restore(step, args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]["params"]
        return config, _readable(os.path.join(ckpt_dir, str(step)), latest), step
  if which in ("auto", "best") and os.path.isfile(path(workdir, PARAMS_FILE)):
    params, step = read_params_file(workdir)
    return config, params, step
  raise FileNotFoundError(f"no {which} checkpoint under {workdir!r} (looked in {best_dir}, "
                          f"{ckpt_dir} and {PARAMS_FILE})")
