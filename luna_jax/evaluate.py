r"""Evaluates a trained model on one split of any data folder in the official format.

  python -m luna_jax.evaluate RUN --data_dir DIR [--split test] [--out FILE]

RUN is a run folder (its best checkpoint; `best_params.msgpack` once training finished) or a
committed results folder (`config.json` + `best_params.msgpack`, e.g. results/listops_small/*).
The data is read exactly as the run read its own (`config.json`: token set, lengths, CLS,
truncation), from DIR instead of the run's `data_dir`; for ListOps DIR needs only the split's
file (e.g. the release's `basic_test.tsv` for a model trained on generated ListOps); other tasks
load their folder as training does. The split is read as the run's protocol reads it (the test
split without its last partial batch under `small` and `skyformer`). Prints the accuracy, the
split's majority-class rate and the number of examples; `--out FILE` writes them as JSON with
the provenance of the data (files and their sha256, token set) and of the model (folder, step,
the parameters file's sha256).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

SPLITS = ("train", "validation", "test")


def evaluate_run(run: str, data_dir: str, split: str = "test") -> dict[str, Any]:
  """The evaluation of RUN's best parameters on `split` of `data_dir` (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  import lra_tasks  # pylint: disable=g-import-not-at-top
  from lra_tasks import listops  # pylint: disable=g-import-not-at-top
  from lra_tasks.common import file_digest  # pylint: disable=g-import-not-at-top
  from luna_jax import checkpoints, steps, workdir as wd  # pylint: disable=g-import-not-at-top

  if split not in SPLITS:
    raise ValueError(f"--split={split!r}; expected one of {SPLITS}")
  run = os.path.abspath(run)
  config, params, step = checkpoints.load_params(run, "best")
  with config.unlocked():
    config.data_dir = os.path.abspath(data_dir) if data_dir else ""
  task = (listops.load(config, splits=(split,)) if config.task == "listops"
          else lra_tasks.load_task(config))
  cfg = steps.model_config(config, task)
  mesh = steps.data_mesh()
  programs = steps.programs_of(config, cfg, mesh)
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  data_sh = NamedSharding(mesh, PartitionSpec("data"))
  out = steps.evaluate_split(config, task, programs.eval, data_sh, split, params, step,
                               steps.run_keys(config)[1])
  name = steps.split_name(split)
  params_file = wd.path(run, wd.PARAMS_FILE)
  return {"accuracy": out[f"{name}_accuracy"],
          "majority_accuracy": out[f"{name}_majority_accuracy"],
          "num_examples": out[f"{name}_examples"], "loss": out[f"{name}_loss"],
          "split": split, "data": dict(task.provenance),
          "model": {"run": run, "task": config.task, "attention": cfg.attention,
                    "protocol": config.get("protocol", "custom"), "step": int(step),
                    "params_sha256": file_digest(params_file) if os.path.isfile(params_file)
                    else None}}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m luna_jax.evaluate",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("run", help="a run folder or a committed results folder")
  parser.add_argument("--data_dir", required=True,
                      help="the folder holding the split's file(s), as the release names them")
  parser.add_argument("--split", default="test", choices=SPLITS)
  parser.add_argument("--out", default="", help="also write the numbers as JSON to this file")
  args = parser.parse_args(argv)
  from lra_tasks import DataError  # pylint: disable=g-import-not-at-top
  from luna_jax import workdir as wd  # pylint: disable=g-import-not-at-top
  try:
    result = evaluate_run(args.run, args.data_dir, args.split)
  except (DataError, wd.ConfigError, FileNotFoundError, ValueError) as e:
    sys.exit(f"luna_jax.evaluate: error: {e}")
  print(f"{args.split}: accuracy {result['accuracy']:.4f} (majority class "
        f"{result['majority_accuracy']:.4f}) on {result['num_examples']} examples; "
        f"{result['model']['attention']} model of {result['model']['run']} at step "
        f"{result['model']['step']}")
  if args.out:
    wd.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
