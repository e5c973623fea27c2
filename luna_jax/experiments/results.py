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
import math
import os
import sys
from typing import Any, Iterable

from luna_jax.experiments import published as pub
from luna_jax.experiments.plots import plot_accuracy, plot_curves, plot_speed_accuracy
from luna_jax.experiments.runs import (GENERATED_MARK, Group, Row, Run, TASK_TITLES, TASKS5,
                                       TASKS6, _task_key, aggregate, average, group_title,
                                       groups_of, load_runs, relative_speeds, selected_table)
from luna_jax import cli
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
    out += ["", f"## {group_title(group)}", ""] + _group_table(rows, group, with_published)
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
