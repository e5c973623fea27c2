"""The report's figures: test accuracy per task, speed against accuracy, learning curves; one set
per (protocol, data) group, published markers only beside runs of the same protocol."""
from __future__ import annotations

import math
import os
import statistics
from typing import Any

from luna_jax.experiments import published as pub
from luna_jax.experiments.runs import (METRICS_FILE, RESULTS_FILE, Group, Row, Run, TASK_TITLES,
                                       TASKS5, _read_json, _read_jsonl, _sort_key, _task_key,
                                       group_title, relative_speeds)


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
  _set_title(ax, f"Test accuracy (measured; mean ± std over seeds)\n{group_title(group)}", 8)
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
  title = f"Speed vs accuracy (marker area: {size_name})\n{group_title(group)}"
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
  _set_title(ax, f"Accuracy vs step\n{group_title(group)}", 8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

