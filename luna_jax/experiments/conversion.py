r"""Conversion study: what a linear mechanism keeps of a trained softmax model.

  python -m luna_jax.experiments.conversion --source runs/listops_quick_softmax \
      --targets learned_kernel,linear_elu,performer,cheap_linear,cosformer,luna \
      --steps 0,100,400 --root runs/conversion

Rerun with the same --root, finished runs are read back and unfinished ones resumed; a --root
whose runs were made from another source (its path, or its best checkpoint's step and sha256,
recorded in each converted run's init_from.json) or another config is refused.

For every target mechanism and every N in --steps, two ordinary runs (own workdirs, resumable,
same metrics as any run): `converted` starts from the source's best checkpoint
(`config.init_from`, luna_jax/transfer.py) and fine-tunes N steps; `scratch` trains the same
target from its usual initialisation for the same N steps. N = 0 evaluates the converted model as
it is (no scratch run). Both use the source run's config (task, data, sizes,
optimizer and schedule) with `model.attention` set to the target, `num_train_steps = N`, a warmup
of min(source warmup, N / 4) steps at the source's peak learning rate (under `rsqrt_lra`, whose
peak is lr / sqrt(warmup), lr is scaled by sqrt(new warmup / source warmup)) and one validation
at the end.

Writes ROOT/conversion.md (table), ROOT/conversion.csv and ROOT/conversion.png: test accuracy
recovered, converted / source (and scratch / source), against N.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Any, Sequence

import ml_collections

import lra_tasks
from luna_jax import cli, config_checks, resume_rules, trainer, transfer
from luna_jax import workdir as wd

PROG = "python -m luna_jax.experiments.conversion"
# Errors that mean bad input, not a bug: one line (luna_jax/cli.py).
USER_ERRORS = (wd.ConfigError, wd.CheckpointError, wd.WorkdirError, wd.DamagedFileError,
               lra_tasks.DataError, transfer.IncompatibleSourceError,
               trainer.NonFiniteLossError, FileNotFoundError)


class StudyStopped(Exception):
  """A run of the study was stopped by SIGINT/SIGTERM (its step is saved)."""


class SourceError(ValueError):
  """--source is not a finished run."""


TARGETS = ("learned_kernel", "linear_elu", "performer", "cheap_linear", "cosformer", "luna")


def target_config(source: ml_collections.ConfigDict, target: str, steps: int,
                  init_from: str | None) -> ml_collections.ConfigDict:
  """The source run's config for `target`, fine-tuned (or trained) for `steps` steps."""
  c = ml_collections.ConfigDict(source.to_dict())
  c.model.attention = target
  if target == "luna":          # Luna's own layer (post-LN, P updated per layer)
    c.model.block = "post_ln"
  c.num_train_steps = steps
  c.warmup_steps = min(int(source.warmup_steps), max(steps // 4, 1))
  if c.schedule == "rsqrt_lra":   # its peak is lr / sqrt(warmup): keep the source's peak
    c.learning_rate = float(source.learning_rate) * (c.warmup_steps / source.warmup_steps)**0.5
  c.eval_every = max(steps, 1)
  c.checkpoint_every = max(steps, 1)
  c.init_from = init_from or ""
  c.protocol = "custom"
  return c


def run_point(source_dir: str, source: ml_collections.ConfigDict, target: str, steps: int,
              kind: str, root: str, train: bool = True) -> dict[str, Any] | None:
  """One converted or scratch run; returns its results.json (rerun-safe: a finished workdir is
  read, not retrained). With train=False, None for a run that has not finished. A workdir of
  another config, or converted from another source checkpoint, is refused (`check_reusable`)."""
  workdir = os.path.join(root, target, f"{kind}_n{steps}")
  config = target_config(source, target, steps,
                         os.path.abspath(source_dir) if kind == "converted" else None)
  check_reusable(workdir, config, source_dir if kind == "converted" else None)
  done = wd.read_json(wd.path(workdir, wd.RESULTS_FILE))
  if done is not None and done.get("finished"):
    return done
  if not train:
    return None
  return trainer.train_and_evaluate(config, workdir)


def check_reusable(workdir: str, config: ml_collections.ConfigDict, source_dir: str | None
                   ) -> None:
  """ConfigMismatchError if WORKDIR holds a run of another config, or (`source_dir` given) one
  converted from another source checkpoint: the source's path and its best checkpoint's step
  and sha256 are part of a converted run's identity (init_from.json)."""
  changes = resume_rules.changed_config(workdir, config)
  why = (f"{workdir} holds a run of another config ({'; '.join(map(str, changes))})"
         if changes else source_dir and resume_rules.converted_from_other(workdir, source_dir))
  if why:
    raise wd.ConfigMismatchError(f"{why}: use another --root for this study")


def run_study(source_dir: str, targets: Sequence[str], steps: Sequence[int], root: str,
              train: bool = True) -> list[dict[str, Any]]:
  """Every (target, N, converted|scratch) run; returns the table rows. train=False only reads
  the runs that finished (the others are left out of the averages and shown as not run)."""
  source = resume_rules.load_config(source_dir)
  source_results = wd.read_json(wd.path(source_dir, wd.RESULTS_FILE))
  if source_results is None or "test_accuracy" not in source_results:
    raise SourceError(f"--source {source_dir}: no finished run (results.json with "
                      "test_accuracy)")
  base = float(source_results["test_accuracy"])
  rows = []
  nan = float("nan")
  for target in targets:
    try:            # a target this source cannot become is a table row, not a crash
      config_checks.validate_config(target_config(source, target, max(steps, default=1), source_dir))
    except wd.ConfigError as e:
      print(f"{target}: not convertible from this source: {e}", flush=True)
      rows += [{"target": target, "steps": n, "source_test_accuracy": base,
                **{f"{k}_{f}": nan for k in ("converted", "scratch")
                   for f in ("test_accuracy", "recovered", "majority")},
                "note": f"not convertible: {e}"} for n in steps]
      continue
    for n in steps:
      row = {"target": target, "steps": n, "source_test_accuracy": base, "note": ""}
      for kind in ("converted", "scratch"):
        if kind == "scratch" and n == 0:    # an untrained model: nothing to compare
          row.update(scratch_test_accuracy=float("nan"), scratch_recovered=float("nan"),
                     scratch_majority=float("nan"))
          continue
        res = run_point(source_dir, source, target, n, kind, root, train)
        if res is not None and not res.get("finished"):
          raise StudyStopped(f"{target} {kind} N={n} was stopped at step {res.get('step')} "
                             "(its checkpoint is saved); rerun the same command to go on")
        if res is None:
          row.update({f"{kind}_test_accuracy": float("nan"), f"{kind}_recovered": float("nan"),
                      f"{kind}_majority": float("nan")})
          continue
        acc = float(res["test_accuracy"])
        row[f"{kind}_test_accuracy"] = acc
        row[f"{kind}_recovered"] = acc / base if base > 0 else float("nan")
        row[f"{kind}_majority"] = float(res.get("test_majority_accuracy", float("nan")))
      rows.append(row)
      print(f"{target} N={n}: converted {_acc(row['converted_test_accuracy'])} "
            f"({_pct(row['converted_recovered'])} of source {base:.4f}), scratch "
            f"{_acc(row['scratch_test_accuracy'])}", flush=True)
  return rows


def _acc(x: float) -> str:
  return "—" if x != x else f"{x:.4f}"


def _pct(x: float) -> str:
  return "—" if x != x else f"{100 * x:.1f}%"


def write_outputs(rows: list[dict[str, Any]], root: str, source_dir: str) -> dict[str, str]:
  """conversion.md, conversion.csv and conversion.png under `root`."""
  os.makedirs(root, exist_ok=True)
  files = {k: os.path.join(root, f"conversion.{k}") for k in ("md", "csv", "png")}
  fields = list(rows[0]) if rows else []
  with open(files["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  base = rows[0]["source_test_accuracy"] if rows else float("nan")
  majority = rows[0].get("converted_majority", float("nan")) if rows else float("nan")
  lines = [f"# Conversion study: {source_dir}", "",
           f"Source (softmax) test accuracy {base:.4f}; test majority class {majority:.4f}. "
           "`recovered` = test accuracy / source test accuracy; — = not run (no scratch run "
           "at N = 0).", "",
           "| target | fine-tune steps N | converted test acc. | converted recovered | "
           "scratch test acc. | scratch recovered |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['target']} | {r['steps']} | {_acc(r['converted_test_accuracy'])} | "
                 f"{_pct(r['converted_recovered'])} | {_acc(r['scratch_test_accuracy'])} | "
                 f"{_pct(r['scratch_recovered'])} |")
  notes = dict.fromkeys(f"- {r['target']}: {r['note']}" for r in rows if r.get("note"))
  if notes:
    lines += [""] + list(notes)
  with open(files["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for i, target in enumerate(dict.fromkeys(r["target"] for r in rows)):
    pts = [r for r in rows if r["target"] == target]
    ns = [r["steps"] for r in pts]
    ax.plot(ns, [100 * r["converted_recovered"] for r in pts], "o-", color=f"C{i}",
            label=f"{target} converted")
    scratch = [r for r in pts if r["scratch_recovered"] == r["scratch_recovered"]]
    ax.plot([r["steps"] for r in scratch], [100 * r["scratch_recovered"] for r in scratch],
            "x--", color=f"C{i}", alpha=0.6, label=f"{target} scratch")
  ax.axhline(100, color="gray", lw=0.8)
  if base == base and base > 0 and majority == majority:
    ax.axhline(100 * majority / base, color="gray", lw=0.8, ls=":", label="majority class")
  ax.set_xlabel("fine-tuning steps N")
  ax.set_ylabel("test accuracy / source's (%)")
  ax.set_title(f"Accuracy recovered after converting the softmax model\n{source_dir}",
               fontsize=8)
  ax.legend(fontsize=6, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(files["png"], dpi=100)
  return files


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog=PROG,
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", required=True, help="workdir of a finished (softmax) run")
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--steps", default="0,100,400", help="fine-tuning steps, comma-separated")
  parser.add_argument("--root", required=True, help="folder for the runs and the table")
  parser.add_argument("--table_only", action="store_true",
                      help="write the table from the runs that finished; train nothing")
  args = parser.parse_args(argv)
  targets = [t for t in args.targets.split(",") if t]
  steps = [int(s) for s in args.steps.split(",") if s]
  try:
    rows = run_study(args.source, targets, steps, args.root, train=not args.table_only)
  except StudyStopped as e:
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    return 0
  except USER_ERRORS + (SourceError,) as e:
    cli.fail(PROG, e)
  files = write_outputs(rows, args.root, args.source)
  print(open(files["md"]).read())
  print(json.dumps(files), file=sys.stderr)
  return 0


if __name__ == "__main__":
  from luna_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.preload_tcmalloc()
  runtime.set_cpu_dispatch()
  sys.exit(main())
