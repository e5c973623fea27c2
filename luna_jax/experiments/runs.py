"""The runs under a folder, read back and aggregated: one `Run` per workdir (status, numbers,
protocol, data), `Row`s of finished seeds per protocol x data x task x mechanism x variant, and the
selected table of each (protocol, data) group. `luna_jax.experiments.results` writes the report
from these; `luna_jax.experiments.plots` draws them."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Iterable

from luna_jax import cli, resume_rules
from luna_jax import workdir as wd

TASKS5 = ("listops", "text", "retrieval", "image", "pathfinder")
TASKS6 = TASKS5 + ("pathx",)
TASK_TITLES = {"listops": "ListOps", "text": "Text", "retrieval": "Retrieval",
               "image": "Image", "pathfinder": "Pathfinder", "pathx": "Path-X"}
MECHANISM_ORDER = ("luna-16", "luna-128", "luna-256", "softmax", "linear_elu", "performer",
                   "cheap_linear", "learned_kernel", "cosformer")
# Config fields that do not make a different experiment (seeds of one point share the rest).
IGNORED_KEYS = ("seed", "data_dir", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints", "grain_workers")
# File names of a run folder (luna_jax.workdir owns them).
CONFIG_FILE, FAILED_FILE, RUN_FILES = wd.CONFIG_FILE, wd.FAILED_FILE, wd.RUN_FILES
METRICS_FILE, RESULTS_FILE = wd.METRICS_FILE, wd.RESULTS_FILE


@dataclasses.dataclass
class Run:
  """One workdir."""
  workdir: str
  task: str
  mechanism: str
  seed: int | None
  status: str                      # finished | unfinished | diverged | failed | unreadable | copy
  step: int                        # last logged step
  num_train_steps: int | None
  test_accuracy: float | None      # fraction, at the best validation step
  best_val_accuracy: float | None
  num_params: int | None
  steps_per_s: float | None
  peak_memory_bytes: int | None
  config: dict[str, Any]           # flattened config.json
  message: str = ""
  protocol: str = "unknown"        # luna_paper | lra_reference | small | skyformer | quick | custom
  data: dict[str, Any] = dataclasses.field(default_factory=dict)   # results.json "data"

  @property
  def data_label(self) -> str:
    return data_label(self.data)


@dataclasses.dataclass
class Row:
  """Finished seeds of one protocol x data x task x mechanism x variant."""
  task: str
  mechanism: str
  variant: str
  runs: list[Run]
  selected: bool = False

  @property
  def protocol(self) -> str:
    return self.runs[0].protocol

  @property
  def data_label(self) -> str:
    return self.runs[0].data_label

  def _values(self, field: str) -> list[float]:
    return [getattr(r, field) for r in self.runs if getattr(r, field) is not None]

  @property
  def test(self) -> list[float]:
    return [100 * a for a in self._values("test_accuracy")]

  @property
  def mean(self) -> float:
    return statistics.fmean(self.test) if self.test else math.nan

  @property
  def std(self) -> float | None:
    return statistics.stdev(self.test) if len(self.test) > 1 else None

  @property
  def val_mean(self) -> float:
    vals = self._values("best_val_accuracy")
    return 100 * statistics.fmean(vals) if vals else -math.inf

  def median(self, field: str) -> float | None:
    vals = self._values(field)
    return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------- reading

# Generators that older runs recorded under another module name (the same data): one label.
_GENERATOR_RENAMES = {"lra_tasks.listops": "lra_tasks.listops_generator"}


def data_label(data: dict[str, Any]) -> str:
  """"official", "generated: <generator> <settings>" or "unknown" (older runs), followed by
  "; tokens <set>" where the run recorded its token set (ListOps): runs that read other
  symbols of the same files never share a table."""
  source = data.get("source")
  label = source or "unknown"
  if source == "generated":
    settings = ", ".join(f"{k}={v}" for k, v in sorted(data.get("settings", {}).items()))
    generator = data.get("generator", "?")
    label = f"generated: {_GENERATOR_RENAMES.get(generator, generator)} ({settings})"
  return f"{label}; tokens {data['tokens']}" if data.get("tokens") else label


def mechanism_name(attention: str, proj_len: int | None) -> str:
  return f"luna-{proj_len}" if attention == "luna" else attention


def diverged_message(text: str) -> bool:
  return any(s in text for s in ("NaN", "NonFiniteLossError", "non-finite"))


_read_json = wd.read_json       # None if absent; errors name the file
_read_jsonl = wd.read_jsonl     # [] if absent; errors name the file and line


_flatten = resume_rules.flatten  # {"a": {"b": 1}} -> {"a.b": 1}


def workdir_status(workdir: str) -> tuple[str, str]:
  """(status, message) of a workdir: finished, diverged, failed or unfinished."""
  if os.path.exists(os.path.join(workdir, RESULTS_FILE)):
    return "finished", ""
  failed = os.path.join(workdir, FAILED_FILE)
  message = ""
  if os.path.exists(failed):
    with open(failed) as f:
      message = f.read().strip()
  # metrics.jsonl writes a non-finite loss as null.
  losses = [r["train_loss"] for r in _read_jsonl(os.path.join(workdir, METRICS_FILE))
            if "train_loss" in r]
  if (any(x is None or not math.isfinite(x) for x in losses)
      or (message and diverged_message(message))):
    return "diverged", message
  return ("failed", message) if message else ("unfinished", "")


def find_workdirs(root: str) -> list[str]:
  """Folders under `root` (itself included) that hold a run, sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    if any(f in filenames for f in RUN_FILES):
      found.append(dirpath)
      dirnames[:] = []        # checkpoints/, best/, tb/ belong to this run
    dirnames.sort()
  return sorted(found)


def load_run(workdir: str) -> Run:
  """Reads one workdir (config.json, metrics.jsonl, results.json, FAILED); a run whose files
  cannot be read has status `unreadable` and the reason as its message."""
  try:
    return _read_run(workdir)
  except (OSError, ValueError) as e:
    return Run(workdir=workdir, task="unknown", mechanism="unknown", seed=None,
               status="unreadable", step=0, num_train_steps=None, test_accuracy=None,
               best_val_accuracy=None, num_params=None, steps_per_s=None,
               peak_memory_bytes=None, config={}, message=cli.one_line(e))


def _read_run(workdir: str) -> Run:
  config = _read_json(os.path.join(workdir, CONFIG_FILE)) or {}
  results = _read_json(os.path.join(workdir, RESULTS_FILE)) or {}
  records = _read_jsonl(os.path.join(workdir, METRICS_FILE))
  model = config.get("model", {})
  status, message = workdir_status(workdir)
  attention = results.get("attention") or model.get("attention") or "unknown"
  proj_len = results.get("proj_len", model.get("proj_len"))
  speeds = [r["steps_per_s"] for r in records if "steps_per_s" in r]
  peaks = [r["peak_memory_bytes"] for r in records if "peak_memory_bytes" in r]
  params = results.get("num_params") or next(
      (r["num_params"] for r in records if "num_params" in r), None)
  return Run(
      workdir=workdir, task=results.get("task") or config.get("task") or "unknown",
      mechanism=mechanism_name(attention, proj_len),
      seed=results.get("seed", config.get("seed")), status=status,
      step=max([r.get("step", 0) for r in records] + [results.get("step", 0)]),
      num_train_steps=results.get("num_train_steps", config.get("num_train_steps")),
      test_accuracy=results.get("test_accuracy") if status == "finished" else None,
      best_val_accuracy=results.get("best_val_accuracy"), num_params=params,
      steps_per_s=results.get("steps_per_s") or (statistics.median(speeds) if speeds else None),
      peak_memory_bytes=max(peaks) if peaks else None, config=_flatten(config),
      message=message, protocol=results.get("protocol") or config.get("protocol") or "unknown",
      data=results.get("data") or {})


def load_runs(roots: Iterable[str]) -> list[Run]:
  """The runs under `roots`, a finished run already found under another folder (same protocol,
  data and config apart from bookkeeping fields) marked `copy`."""
  runs = [load_run(w) for root in roots for w in find_workdirs(root)]
  first: dict[str, Run] = {}
  for r in runs:
    if r.status != "finished":
      continue
    key = json.dumps([r.protocol, r.data_label, {k: v for k, v in sorted(r.config.items())
                                     if resume_rules.field_kind(k) != resume_rules.BOOKKEEPING}])
    if key in first:
      r.status, r.message = "copy", f"the same run as {first[key].workdir} (counted once)"
      r.test_accuracy = None
    else:
      first[key] = r
  return runs


# ----------------------------------------------------------------------------- aggregation

PROTOCOL_ORDER = ("luna_paper", "lra_reference", "small", "skyformer", "custom", "quick",
                  "unknown")
PROTOCOL_TITLES = {
    "luna_paper": "Luna paper recipes", "lra_reference": "LRA reference recipes",
    "small": "small-model protocol (the Nystromformer LRA code as it ran)",
    "skyformer": "Skyformer protocol (the Skyformer code's settings of the small model)",
    "custom": "custom (recipe fields overridden; comparable with no published table)",
    "quick": "quick runs (small generated data; comparable with no published number)",
    "unknown": "runs without a recorded protocol (older code)"}
GENERATED_MARK = "†"


def _sort_key(mechanism: str) -> tuple[int, str]:
  order = MECHANISM_ORDER.index(mechanism) if mechanism in MECHANISM_ORDER else 99
  return order, mechanism


def _task_key(task: str) -> tuple[int, str]:
  return (TASKS6.index(task) if task in TASKS6 else 99), task


def _group_key(protocol: str, data: str) -> tuple[int, int, str, str]:
  order = PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else 99
  return order, not data.startswith("official"), protocol, data


Group = tuple[str, str]    # (protocol, data label): runs of one group may share a table


def aggregate(runs: Iterable[Run]) -> list[Row]:
  """Rows of finished runs per protocol x data x task x mechanism x variant; the
  best-validation variant of each (protocol, data, task, mechanism) is marked `selected`.
  Runs of different protocols or data never share a row."""
  groups: dict[tuple[str, str, str, str], list[Run]] = {}
  for r in runs:
    if r.status == "finished":
      groups.setdefault((r.protocol, r.data_label, r.task, r.mechanism), []).append(r)

  def order(kv):
    (protocol, data, task, mech), _ = kv
    return _group_key(protocol, data), _task_key(task), _sort_key(mech)

  rows = []
  for (_, _, task, mech), group in sorted(groups.items(), key=order):
    keys = sorted({k for r in group for k in r.config} - set(IGNORED_KEYS))
    differing = [k for k in keys
                 if len({json.dumps(r.config.get(k), sort_keys=True) for r in group}) > 1]
    variants: dict[str, list[Run]] = {}
    for r in group:
      label = ", ".join(f"{k}={r.config.get(k)}" for k in differing)
      variants.setdefault(label, []).append(r)
    task_rows = [Row(task, mech, label, sorted(rs, key=lambda r: (r.seed is None, r.seed or 0)))
                 for label, rs in sorted(variants.items())]
    max(task_rows, key=lambda row: row.val_mean).selected = True
    rows += task_rows
  return rows


def groups_of(rows: Iterable[Row]) -> list[Group]:
  """The (protocol, data) groups present, in display order."""
  return sorted({(r.protocol, r.data_label) for r in rows}, key=lambda g: _group_key(*g))


def selected_table(rows: Iterable[Row], group: Group | None = None
                   ) -> dict[str, dict[str, Row]]:
  """mechanism -> task -> the selected row of one (protocol, data) group (default: the first
  group), mechanisms in display order."""
  rows = list(rows)
  if group is None:
    present = groups_of(rows)
    group = present[0] if present else ("", "")
  table: dict[str, dict[str, Row]] = {}
  for row in rows:
    if row.selected and (row.protocol, row.data_label) == group:
      table.setdefault(row.mechanism, {})[row.task] = row
  return {m: table[m] for m in sorted(table, key=_sort_key)}


def average(values: dict[str, float], tasks: tuple[str, ...]) -> float | None:
  """Mean over `tasks`, only when every one of them is present."""
  if all(t in values and not math.isnan(values[t]) for t in tasks):
    return statistics.fmean(values[t] for t in tasks)
  return None


def relative_speeds(table: dict[str, dict[str, Row]]) -> dict[str, dict[str, float]]:
  """mechanism -> task -> median steps/s divided by softmax's on the same task."""
  base = {t: row.median("steps_per_s") for t, row in table.get("softmax", {}).items()}
  out: dict[str, dict[str, float]] = {}
  for mech, tasks in table.items():
    for t, row in tasks.items():
      s = row.median("steps_per_s")
      if s and base.get(t):
        out.setdefault(mech, {})[t] = s / base[t]
  return out


def group_title(group: Group) -> str:
  protocol, data = group
  title = PROTOCOL_TITLES.get(protocol, protocol)
  if data.startswith("generated"):
    return f"{title} · data {data} {GENERATED_MARK}"
  return f"{title} · data: {data}"
