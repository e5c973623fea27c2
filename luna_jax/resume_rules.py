"""The config check on resume: which changes of the config, the data and the device count a
workdir's checkpoints accept, and the records of what was accepted (config.json, identity.json
and config_history.jsonl of `luna_jax.workdir`'s run folder); also what tools that reuse
finished runs check (`changed_config`, `best_identity`, `converted_from_other`).

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
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections

from luna_jax import workdir as wd

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


def resume_changes(workdir: str, config: ml_collections.ConfigDict) -> list[Change]:
  """The changes of `config` against WORKDIR/config.json that a resume may accept ([] for a
  workdir without checkpoints). Writes nothing; raises ConfigMismatchError (one message naming
  every refused field with old and new values) for a change of the model or data, or of the
  schedule without `config.allow_resume_changes`."""
  if not wd.has_checkpoints(workdir):
    return []
  allow = bool(config.get("allow_resume_changes", False))
  stored = wd.read_json(wd.path(workdir, wd.CONFIG_FILE))
  if stored is None:
    if allow:
      log.warning("%s is missing: cannot check the config against the checkpoints "
                  "(allow_resume_changes=true; parameter shapes are still checked)",
                  wd.path(workdir, wd.CONFIG_FILE))
      return []
    raise wd.ConfigMismatchError(
        f"{workdir} holds checkpoints but no {wd.CONFIG_FILE}, so the config cannot be checked "
        f"against them: restore {wd.CONFIG_FILE}, pass --config.allow_resume_changes=true to "
        f"resume anyway, or use a new --workdir")
  changes = config_changes(stored, config)
  refused = [c for c in changes if c.kind == MODEL_DATA]
  if refused:
    raise wd.ConfigMismatchError(
        f"{workdir} holds checkpoints of another model or data: "
        f"{'; '.join(map(str, refused))}. Use a new --workdir for this config (or rerun with "
        f"the old values; deleting {wd.CHECKPOINTS_DIR}/ and {wd.BEST_DIR}/ starts over)")
  schedule = [c for c in changes if c.kind == SCHEDULE]
  if schedule and not allow:
    raise wd.ConfigMismatchError(
        f"{workdir} holds checkpoints made with another optimizer schedule: "
        f"{'; '.join(map(str, schedule))}. Pass --config.allow_resume_changes=true to resume "
        f"with the new values (recorded in {wd.CONFIG_HISTORY_FILE}), or rerun with the old ones")
  return changes


def run_identity(provenance: Mapping[str, Any], num_devices: int) -> dict[str, Any]:
  """What identity.json holds (`luna_jax.workdir`'s docstring)."""
  return {"data": wd.json_safe(dict(provenance)), "num_devices": num_devices}


def _data_difference(name: str, old: Any, new: Any) -> str:
  if name.startswith("files."):
    return f"the file {name[len('files.'):]} changed (sha256 {_show(old)} -> {_show(new)})"
  return f"data {name}: {_show(old)} -> {_show(new)}"


def identity_changes(workdir: str, identity: Mapping[str, Any]) -> list[Change]:
  """The device-count change against identity.json that a resume records ([] for a workdir
  without checkpoints or without identity.json); ConfigMismatchError naming each file (with
  both hashes) or generator setting of data that differs from the checkpoints'."""
  stored = wd.read_json(wd.path(workdir, wd.IDENTITY_FILE)) if wd.has_checkpoints(workdir) else None
  if not isinstance(stored, Mapping):
    return []
  old, new = flatten(stored.get("data") or {}), flatten(identity["data"])
  differ = [_data_difference(k, old.get(k, ABSENT), new.get(k, ABSENT))
            for k in sorted(set(old) | set(new)) if old.get(k, ABSENT) != new.get(k, ABSENT)]
  if differ:
    raise wd.ConfigMismatchError(
        f"{workdir} holds checkpoints trained on other data: {'; '.join(differ)} (recorded in "
        f"{wd.IDENTITY_FILE}). Use a new --workdir for this data, or restore the old files")
  return [Change(k, stored[k], identity[k], MACHINE) for k in ("num_devices",)
          if k in stored and stored[k] != identity[k]]


def changed_config(workdir: str, config: ml_collections.ConfigDict | Mapping[str, Any]
                   ) -> list[Change]:
  """The changes of `config` against the config of WORKDIR's checkpoints or results that a
  rerun would not accept: model/data, and schedule unless `allow_resume_changes` ([] for a
  folder without checkpoints or results). For tools that reuse finished runs (sweep,
  conversion study), which must not take a finished run of another config for this one."""
  stored = wd.read_json(wd.path(workdir, wd.CONFIG_FILE))
  if stored is None or not (wd.has_checkpoints(workdir)
                            or os.path.exists(wd.path(workdir, wd.RESULTS_FILE))):
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
  steps = wd.finished_steps(wd.path(workdir, wd.BEST_DIR))
  if not steps:
    raise FileNotFoundError(f"no best checkpoint under {wd.path(workdir, wd.BEST_DIR)}")
  return {"workdir": workdir, "step": steps[-1],
          "sha256": folder_digest(os.path.join(wd.path(workdir, wd.BEST_DIR), str(steps[-1])))}


def converted_from_other(workdir: str, source: str) -> str | None:
  """Why WORKDIR's init_from.json names another source than `source`'s best checkpoint (path,
  step or sha256), or None if it names that one (or there is no init_from.json)."""
  stored = wd.read_json(wd.path(workdir, wd.INIT_FROM_FILE))
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
    raise wd.ConfigMismatchError(
        f"config.num_train_steps={num_train_steps} is below step {step} of the checkpoint in "
        f"{wd.path(workdir, wd.CHECKPOINTS_DIR)}: a run is not shortened after the fact; rerun "
        f"with num_train_steps >= {step}, or use a new --workdir")


def record_config(workdir: str, config: ml_collections.ConfigDict, changes: Sequence[Change],
                  step: int, identity: Mapping[str, Any] | None = None) -> None:
  """Writes config.json (and identity.json, if given) and appends the accepted `changes` (made
  at `step`) to config_history.jsonl. Call only after the resume check and the restore
  succeeded."""
  if not wd.is_primary():
    return
  if identity is not None:
    wd.write_json(wd.path(workdir, wd.IDENTITY_FILE), identity)
  if changes:
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "changes": {c.field: [None if c.old is ABSENT else c.old,
                                   None if c.new is ABSENT else c.new] for c in changes}}
    with open(wd.path(workdir, wd.CONFIG_HISTORY_FILE), "a") as f:
      f.write(wd.dumps(entry) + "\n")
  tmp = wd.path(workdir, f"{wd.CONFIG_FILE}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, wd.path(workdir, wd.CONFIG_FILE))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The training config saved in WORKDIR/config.json."""
  config = wd.read_json(wd.path(workdir, wd.CONFIG_FILE))
  if config is None:
    raise FileNotFoundError(f"no {wd.CONFIG_FILE} in {workdir!r}: not a train_and_evaluate workdir")
  return ml_collections.ConfigDict(config)
