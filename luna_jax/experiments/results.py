r"""Aggregates training workdirs into the LRA table (markdown, CSV) and plots.

  python -m luna_jax.experiments.results --root runs/lra --out runs/lra/report [--published]

Every folder under --root holding config.json, metrics.jsonl or results.json is one run. A run
is `finished` (results.json), `diverged` (a non-finite train_loss in metrics.jsonl, or a FAILED
file whose text mentions NaN/Inf), `failed` (another FAILED file), `unfinished`, `unreadable`
(a damaged run file: listed with the reason, the report goes on) or `copy` (a finished run
with the protocol, data, seed and config of another one found first, such as a copied folder:
counted once). A --root that does not exist is an error. Finished
runs are grouped by task and mechanism (Luna split by proj_len); runs of one group whose configs
differ in more than seed/data/bookkeeping fields form separate variants, and the table shows
the variant with the best mean validation accuracy (model selection on validation).

Writes to --out: results.md, results.csv (one row per task x mechanism x variant, plus the
averages and, with --published, the published rows), runs.csv (one row per run),
accuracy.png and speed_accuracy.png.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
from typing import Any, Iterable

from luna_jax.experiments import published as pub
from luna_jax import cli
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


_flatten = wd.flatten            # {"a": {"b": 1}} -> {"a.b": 1}


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
                                     if wd.field_kind(k) != wd.BOOKKEEPING}])
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


# ----------------------------------------------------------------------------- writing

def _fmt(x: float | None, digits: int = 2) -> str:
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def seeds_cell(row: Row) -> str:
  """The seeds column: their count and which, e.g. "1 (seed 0)", "3 (seeds 0, 1, 2)"."""
  seeds = [str(r.seed) for r in row.runs]
  return f"{len(seeds)} (seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)})"


def _cell(row: Row | None) -> str:
  if row is None or not row.test:
    return "—"
  std = f" ± {row.std:.2f}" if row.std is not None else ""
  mark = GENERATED_MARK if row.data_label.startswith("generated") else ""
  return f"{row.mean:.2f}{std}{mark} (n={len(row.test)})"


def _md_table(header: list[str], lines: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return out + ["| " + " | ".join(line) + " |" for line in lines]


def _published_cell(v: float | str | None) -> str:
  return "—" if v is None else (v if isinstance(v, str) else f"{v:.2f}")


def group_listops_tokens(rows: list[Row], group: Group) -> str | None:
  """The ListOps token set the group's runs read (results.json data.tokens), None if none
  recorded it."""
  return next((r.runs[0].data.get("tokens") for r in rows
               if (r.protocol, r.data_label) == group and r.runs[0].data.get("tokens")), None)


def _source_marks(src: pub.Source) -> str:
  """" (protocol not stated)" and " (unverified)" where they apply."""
  marks = " (protocol not stated)" if src.protocol == pub.NOT_STATED else ""
  return marks + ("" if src.verified else " (unverified)")


def _group_title(group: Group) -> str:
  protocol, data = group
  title = PROTOCOL_TITLES.get(protocol, protocol)
  if data.startswith("generated"):
    return f"{title} · data {data} {GENERATED_MARK}"
  return f"{title} · data: {data}"


def _group_table(rows: list[Row], group: Group, with_published: bool) -> list[str]:
  """One (protocol, data) table; with_published adds the published rows of the same
  protocol, labelled with their source."""
  table = selected_table(rows, group)
  tasks = sorted({r.task for r in rows if (r.protocol, r.data_label) == group} | set(TASKS5),
                 key=_task_key)
  extra = [t for t in tasks if t not in TASKS6]
  has_pathx = any(r.task == "pathx" for r in rows if (r.protocol, r.data_label) == group)
  header = (["mechanism"] + [TASK_TITLES[t] for t in TASKS5] + ["Avg (5 tasks)"]
            + (["Path-X", "Avg (6 tasks)"] if has_pathx else []) + extra)
  lines = []
  for mech, by_task in table.items():
    means = {t: row.mean for t, row in by_task.items()}
    line = [mech] + [_cell(by_task.get(t)) for t in TASKS5] + [_fmt(average(means, TASKS5))]
    if has_pathx:
      line += [_cell(by_task.get("pathx")), _fmt(average(means, TASKS6))]
    lines.append(line + [_cell(by_task.get(t)) for t in extra])
  notes = []
  if with_published and any(s.shown_under(group[0]) for s in pub.PUBLISHED):
    ours = {}
    for (protocol, mech), refs in pub.COMPARABLE.items():
      for ref in refs:
        if protocol == group[0]:
          ours[ref] = mech
    tokens = group_listops_tokens(rows, group)
    for src, model, vals in pub.comparable_rows(group[0]):
      line = [f"published: {model} [{src.name}]" + _source_marks(src)]
      line += [_published_cell(vals.get(t)) if pub.comparable_cell(src, t, tokens) else "—"
               for t in TASKS5] + [_published_cell(vals.get("avg5"))]
      if not pub.comparable_cell(src, "listops", tokens) and "listops" in vals:
        notes.append(f"[{src.name}] ListOps read token set "
                     f"`{src.listops_tokens or 'not known'}`, these runs "
                     f"`{tokens or 'not recorded'}`: its ListOps number is not shown.")
      if has_pathx:
        line += [_published_cell(vals.get("pathx")), _published_cell(vals.get("avg6"))]
      lines.append(line + ["—" for _ in extra])
      if (src, model) in ours:
        notes.append(f"`{ours[(src, model)]}` follows the model of published {model} "
                     f"[{src.name}].")
    notes += sorted({f"[{src.name}]: protocol `{src.protocol}`; {src.note}; numbers checked "
                     f"against {src.verified or 'nothing (unverified)'}."
                     for src, _, _ in pub.comparable_rows(group[0])})
  out = _md_table(header, lines)
  if group[1].startswith("generated"):
    out += ["", f"{GENERATED_MARK} generated data ({group[1]}), not the LRA release."
            + (" The published rows of this protocol were measured on the release."
               if notes else "")]
  return out + ([""] + [f"- {n}" for n in notes] if notes else [])


def markdown(runs: list[Run], rows: list[Row], root: str, with_published: bool) -> str:
  """The results report: one table per (protocol, data) group."""
  out = ["# LRA results (measured)", "",
         "Test accuracy (%) of the best-validation checkpoint, mean ± sample std over seeds "
         "(n = seeds). Runs are tabled by protocol and data source, never mixed; published "
         "rows appear only beside runs of the same protocol. An average is shown only when "
         "all its tasks are present; the 5-task average (without Path-X) and the 6-task "
         "average are not comparable."]
  for group in groups_of(rows):
    out += ["", f"## {_group_title(group)}", ""] + _group_table(rows, group, with_published)
  if not rows:
    out += ["", "No finished runs."]

  detail = []
  for group in groups_of(rows):
    speeds = relative_speeds(selected_table(rows, group))
    for row in rows:
      if (row.protocol, row.data_label) != group:
        continue
      mem = row.median("peak_memory_bytes")
      detail.append([
          row.protocol, TASK_TITLES.get(row.task, row.task),
          row.mechanism + (" *" if row.selected else ""), row.variant or "—",
          seeds_cell(row), _cell(row),
          _fmt(row.val_mean if row.val_mean > -math.inf else None),
          f"{int(row.median('num_params')):,}" if row.median("num_params") else "—",
          _fmt(row.median("steps_per_s")), _fmt(speeds.get(row.mechanism, {}).get(row.task)),
          _fmt(mem / 2**30, 3) if mem else "—"])
  if detail:
    out += ["", "## Per task and variant", "",
            "`*` marks the variant in the tables above (best mean validation accuracy). "
            "steps/s is the median over seeds of each run's median.", ""]
    out += _md_table(["protocol", "task", "mechanism", "variant", "seeds", "test acc. (%)",
                      "val acc. (%)", "params", "steps/s", "speed vs softmax",
                      "peak memory (GiB)"], detail)

  def rel(r: Run) -> str:
    return os.path.relpath(r.workdir, root)

  for status, title in (("unfinished", "Unfinished runs"), ("diverged", "Diverged runs"),
                        ("failed", "Failed runs"), ("unreadable", "Unreadable runs"),
                        ("copy", "Copies of a run (counted once)")):
    group = [r for r in runs if r.status == status]
    if not group:
      continue
    out += ["", f"## {title}", ""]
    out += _md_table(
        ["workdir", "task", "mechanism", "seed", "last step", "of", "message"],
        [[rel(r), r.task, r.mechanism, str(r.seed), str(r.step), str(r.num_train_steps),
          _one_line(r.message)] for r in group])
  if with_published:
    shown = {g[0] for g in groups_of(rows)}
    hidden = sorted({f"{s.name} (`{s.protocol}`)" for s in pub.PUBLISHED
                     if not any(s.shown_under(p) for p in shown)})
    if hidden:
      out += ["", "Published tables not shown (no measured run of their protocol): "
              + "; ".join(hidden) + "."]
  return "\n".join(out) + "\n"


def _one_line(text: str, limit: int = 200) -> str:
  lines = [s.strip() for s in text.splitlines() if s.strip()]
  hit = next((s for s in reversed(lines) if "Error" in s or "NaN" in s), lines[-1] if lines else "")
  return hit.replace("|", "/")[:limit]


CSV_FIELDS = ("source", "protocol", "data", "task", "mechanism", "variant", "selected",
              "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "val_acc_mean",
              "num_params", "steps_per_s_median", "speed_vs_softmax", "peak_memory_bytes")


def csv_rows(rows: list[Row], with_published: bool) -> list[dict[str, Any]]:
  """results.csv: measured rows, measured averages, then (optionally) the published rows of
  the protocols measured."""
  out = []
  for group in groups_of(rows):
    table = selected_table(rows, group)
    speeds = relative_speeds(table)
    for row in rows:
      if (row.protocol, row.data_label) != group:
        continue
      out.append({
          "source": "measured", "protocol": row.protocol, "data": row.data_label,
          "task": row.task, "mechanism": row.mechanism, "variant": row.variant,
          "selected": row.selected, "n_seeds": len(row.test),
          "seeds": " ".join(str(r.seed) for r in row.runs), "test_acc_mean": row.mean,
          "test_acc_std": row.std,
          "val_acc_mean": row.val_mean if row.val_mean > -math.inf else None,
          "num_params": row.median("num_params"), "steps_per_s_median": row.median("steps_per_s"),
          "speed_vs_softmax": speeds.get(row.mechanism, {}).get(row.task),
          "peak_memory_bytes": row.median("peak_memory_bytes")})
    for mech, by_task in table.items():
      means = {t: r.mean for t, r in by_task.items()}
      for name, tasks in (("avg5", TASKS5), ("avg6", TASKS6)):
        avg = average(means, tasks)
        if avg is not None:
          out.append({"source": "measured", "protocol": group[0], "data": group[1],
                      "task": name, "mechanism": mech, "selected": True, "test_acc_mean": avg})
  if with_published:
    for protocol in sorted({g[0] for g in groups_of(rows)}):
      for src, model, vals in pub.comparable_rows(protocol):
        for task, v in vals.items():
          out.append({"source": f"published: {src.name}{_source_marks(src)}",
                      "protocol": src.protocol,
                      "data": f"tokens {src.listops_tokens}" if task == "listops" else "",
                      "task": task, "mechanism": model, "test_acc_mean": v})
  return out


RUN_FIELDS = ("workdir", "task", "mechanism", "seed", "status", "step", "num_train_steps",
              "test_accuracy", "best_val_accuracy", "num_params", "steps_per_s",
              "peak_memory_bytes", "message")


def _write_csv(path: str, fields: Iterable[str], rows: list[dict[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(fields))
    w.writeheader()
    for row in rows:
      w.writerow({k: "" if v is None else v for k, v in row.items()})


# ----------------------------------------------------------------------------- plots

def _set_title(ax: Any, title: str, fontsize: float) -> None:
  """`title`, each line wrapped to the figure's width (a long group name is not clipped)."""
  import textwrap  # pylint: disable=g-import-not-at-top
  width_pt = ax.figure.get_figwidth() * 72 * 0.92
  chars = max(int(width_pt / (0.6 * fontsize)), 20)
  lines = [w for line in title.split("\n") for w in (textwrap.wrap(line, chars) or [""])]
  ax.set_title("\n".join(lines), fontsize=fontsize)


def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height))   # no pyplot: renders with Agg, no global state


def plot_accuracy(table: dict[str, dict[str, Row]], path: str, with_published: bool,
                  group: Group) -> None:
  """Grouped bars: test accuracy per task, one bar per mechanism (error bars: std); published
  markers only for rows of the same protocol."""
  tasks = sorted({t for by_task in table.values() for t in by_task}, key=_task_key)
  mechs = list(table)
  fig = _figure(max(6.0, 1.5 + len(tasks) * (0.4 + 0.2 * len(mechs))), 4.5)
  ax = fig.subplots()
  width = 0.8 / len(mechs)
  labelled = False
  for i, mech in enumerate(mechs):
    xs = [j + (i - (len(mechs) - 1) / 2) * width for j, t in enumerate(tasks)
          if t in table[mech]]
    rows = [table[mech][t] for t in tasks if t in table[mech]]
    ax.bar(xs, [r.mean for r in rows], width, yerr=[r.std or 0.0 for r in rows], capsize=2,
           label=mech)
    if with_published and (group[0], mech) in pub.COMPARABLE:
      source, model = pub.COMPARABLE[(group[0], mech)][0]
      vals = pub.PUBLISHED[source][model]
      pts = [(x, vals[r.task]) for x, r in zip(xs, rows)
             if isinstance(vals.get(r.task), float)
             and pub.comparable_cell(source, r.task, r.runs[0].data.get("tokens"))]
      if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="D", s=18, color="black",
                   zorder=3, label=None if labelled else "published (paper)")
        labelled = True
  ax.set_xticks(range(len(tasks)), [TASK_TITLES.get(t, t) for t in tasks])
  ax.set_ylabel("test accuracy (%)")
  _set_title(ax, f"Test accuracy (measured; mean ± std over seeds)\n{_group_title(group)}", 8)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_speed_accuracy(table: dict[str, dict[str, Row]], path: str,
                        with_published: bool, group: Group) -> None:
  """LRA-style chart: speed (x) vs mean accuracy (y); marker area: peak memory or params.
  Published points only for official-data runs of the Luna-paper or LRA-reference protocol."""
  mechs = list(table)
  common = sorted(set.intersection(*(set(table[m]) for m in mechs)), key=_task_key)
  tasks_of = {m: common or sorted(table[m], key=_task_key) for m in mechs}
  speeds = relative_speeds(table)
  relative = "softmax" in table and all(t in speeds.get(m, {}) for m in mechs
                                        for t in tasks_of[m])
  mems = {m: [table[m][t].median("peak_memory_bytes") for t in tasks_of[m]] for m in mechs}
  use_memory = all(v for m in mechs for v in mems[m])

  def geo(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else math.nan

  xs, ys, sizes = [], [], []
  for m in mechs:
    ts = tasks_of[m]
    ys.append(statistics.fmean(table[m][t].mean for t in ts))
    xs.append(geo([speeds[m][t] for t in ts]) if relative else
              geo([s for t in ts if (s := table[m][t].median("steps_per_s"))]))
    src = mems[m] if use_memory else [table[m][t].median("num_params") for t in ts]
    sizes.append(statistics.fmean(v for v in src if v) if any(src) else 0.0)
  biggest = max(sizes) or 1.0
  fig = _figure(7.5, 5.0)
  ax = fig.subplots()
  ax.scatter(xs, ys, s=[60 + 900 * s / biggest for s in sizes], alpha=0.6,
             c=[f"C{i % 10}" for i in range(len(mechs))], edgecolors="black")
  for x, y, m in zip(xs, ys, mechs):
    ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
  show_published = (with_published and relative and tuple(common) == TASKS5
                    and group[1].startswith("official")
                    and group[0] in ("luna_paper", "lra_reference"))
  if show_published:
    for i, ((source, model), (speed, _)) in enumerate(pub.SPEED_TEXT_4K.items()):
      if source.protocol != group[0]:
        continue
      avg = pub.PUBLISHED[source][model].get("avg5")
      ax.scatter([speed], [avg], s=40, marker="D", facecolors="none", edgecolors="gray",
                 label="published" if i == 0 else None)
      ax.annotate(model, (speed, avg), textcoords="offset points",   # staggered labels
                  xytext=(6, (5, -4, -13)[i % 3]), fontsize=6, color="gray")
    ax.legend(fontsize=7, loc="lower right")
  task_names = ", ".join(TASK_TITLES.get(t, t) for t in common) or "each mechanism's own tasks"
  ax.set_xlabel("steps/s relative to softmax (geometric mean over tasks)" if relative
                else "steps/s (geometric mean over tasks)")
  ax.set_ylabel(f"mean test accuracy (%)\nover {task_names}", fontsize=8)
  size_name = "peak memory" if use_memory else "parameter count"
  title = f"Speed vs accuracy (marker area: {size_name})\n{_group_title(group)}"
  if show_published:
    title += "\npublished (gray): Text 4K speed, 5-task average"
  _set_title(ax, title, 9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_curves(runs: list[Run], path: str, group: Group) -> None:
  """Validation accuracy vs step of every run of one group (from metrics.jsonl), with each
  finished run's test accuracy at its best validation step."""
  fig = _figure(7.5, 4.5)
  ax = fig.subplots()
  for i, r in enumerate(sorted(runs, key=lambda r: (_task_key(r.task), _sort_key(r.mechanism),
                                                     r.seed or 0))):
    recs = [x for x in _read_jsonl(os.path.join(r.workdir, METRICS_FILE))
            if isinstance(x.get("val_accuracy"), (int, float))]
    if not recs:
      continue
    label = f"{TASK_TITLES.get(r.task, r.task)} {r.mechanism} s{r.seed}"
    ax.plot([x["step"] for x in recs], [100 * x["val_accuracy"] for x in recs],
            color=f"C{i % 10}", lw=1, label=label)
    if r.test_accuracy is not None:
      best = _read_json(os.path.join(r.workdir, RESULTS_FILE)) or {}
      ax.scatter([best.get("best_step", recs[-1]["step"])], [100 * r.test_accuracy],
                 color=f"C{i % 10}", marker="*", s=60, zorder=3)
  ax.set_xlabel("training step")
  ax.set_ylabel("validation accuracy (%)  (★ test, best checkpoint)", fontsize=8)
  _set_title(ax, f"Accuracy vs step\n{_group_title(group)}", 8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _slug(group: Group, index: int) -> str:
  return f"{group[0]}_{'official' if group[1] == 'official' else 'data'}{index}"


# ----------------------------------------------------------------------------- main

def write_report(roots: list[str], out_dir: str, with_published: bool = False) -> dict[str, Any]:
  """Scans `roots`, writes the report files into `out_dir`; returns {"runs", "rows", "files"}."""
  runs = load_runs(roots)
  rows = aggregate(runs)
  os.makedirs(out_dir, exist_ok=True)
  files = {name: os.path.join(out_dir, name) for name in ("results.md", "results.csv",
                                                          "runs.csv")}
  with open(files["results.md"], "w") as f:
    f.write(markdown(runs, rows, roots[0], with_published))
  _write_csv(files["results.csv"], CSV_FIELDS, csv_rows(rows, with_published))
  _write_csv(files["runs.csv"], RUN_FIELDS,
             [{k: getattr(r, k) for k in RUN_FIELDS} for r in runs])
  for i, group in enumerate(groups_of(rows)):
    table = selected_table(rows, group)
    slug = _slug(group, i)
    for kind, fn in (("accuracy", plot_accuracy), ("speed_accuracy", plot_speed_accuracy)):
      files[f"{kind}_{slug}.png"] = os.path.join(out_dir, f"{kind}_{slug}.png")
      fn(table, files[f"{kind}_{slug}.png"], with_published, group)
    files[f"curves_{slug}.png"] = os.path.join(out_dir, f"curves_{slug}.png")
    plot_curves([r for r in runs if (r.protocol, r.data_label) == group],
                files[f"curves_{slug}.png"], group)
  return {"runs": runs, "rows": rows, "files": files}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m luna_jax.experiments.results", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--root", action="append", required=True,
                      help="folder of workdirs (repeatable); searched recursively")
  parser.add_argument("--out", required=True, help="folder for results.md/csv and the plots")
  parser.add_argument("--published", action="store_true",
                      help="add the published numbers, labelled, in separate rows")
  args = parser.parse_args(argv)
  missing = [r for r in args.root if not os.path.isdir(r)]
  if missing:
    cli.fail(parser.prog, FileNotFoundError(f"--root {missing[0]}: no such folder"), 2)
  report = write_report(args.root, args.out, args.published)
  with open(report["files"]["results.md"]) as f:
    print(f.read())
  counts = {s: sum(r.status == s for r in report["runs"])
            for s in ("finished", "unfinished", "diverged", "failed", "unreadable", "copy")}
  print(f"{len(report['runs'])} runs ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
        f"wrote {', '.join(sorted(report['files']))} to {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
