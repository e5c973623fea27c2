"""The run folder: its file names, the JSON files, the bookkeeping of metrics.jsonl and
results.json when a run starts, and reading a run back (trainer, results, sweep and inspection).
Its other rules have their own modules: the lock (`luna_jax.workdir_lock`), the config check on
resume and the records of what it accepted (`luna_jax.resume_rules`), checkpoints with recovery
and the parameters file (`luna_jax.checkpoints`).

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
                                  read by `checkpoints.load_params` and
                                  `python -m luna_jax.evaluate`)
  WORKDIR/tb/                     TensorBoard events
  WORKDIR/sweep.log               output of `luna_jax.experiments.sweep` runs

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

import glob
import json
import logging
import math
import os
import shutil
from typing import Any, Iterable, Mapping, Sequence

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
TMP_MARKER = ".orbax-checkpoint-tmp"                 # orbax's unfinished-save folders
# Any of these makes a folder a run (luna_jax.experiments.results).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE)

log = logging.getLogger(__name__)
# jax is imported only where the processes are counted (is_primary, sync), and orbax only by
# luna_jax.checkpoints, so that reading a run folder (luna_jax.experiments.results, .sweep)
# stays fast.


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


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the run folder's files."""
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


def has_checkpoints(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints or WORKDIR/best holds a finished step."""
  return any(finished_steps(path(workdir, d)) for d in (CHECKPOINTS_DIR, BEST_DIR))


def finished_steps(folder: str) -> list[int]:
  """The steps of the finished saves in `folder` (its numbered subfolders), ascending."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


# ----------------------------------------------------------------------------- metrics

def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of WORKDIR/metrics.jsonl (empty if there is none)."""
  return read_jsonl(path(workdir, METRICS_FILE))


def start_at(workdir: str, step: int, num_train_steps: int) -> None:
  """Makes the files agree with a run that starts from checkpoint `step` (0: a new run): drops
  metrics records after it (all when 0) and all test records, FAILED, and a results.json that
  a further training would make stale."""
  if not is_primary():
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
  if start_over or not is_primary():
    return
  ckpt_dir = path(workdir, CHECKPOINTS_DIR)
  corrupt = (sorted(n for n in os.listdir(ckpt_dir) if n.startswith(CORRUPT_PREFIX))
             if os.path.isdir(ckpt_dir) else [])
  best = finished_steps(path(workdir, BEST_DIR))
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
  if is_primary():
    for d in (CHECKPOINTS_DIR, BEST_DIR):
      for p in sorted(glob.glob(os.path.join(path(workdir, d), f"*{TMP_MARKER}*"))):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.info("removed the unfinished save %s", p)
  sync("luna_jax_clean_tmp")
  return removed
