r"""Runs a sweep: expands a sweep file into points and runs `train.py` once per point.

  python -m luna_jax.experiments.sweep run configs/sweeps/quick.py --root runs/quick [--parallel 2]
  python -m luna_jax.experiments.sweep run configs/sweeps/lra_luna.py:data=/data --root gs://B/lra \
      --launcher tpu --tpu NAME --zone ZONE [--project P] --dry-run

A sweep file has `get_sweep(arg) -> list[dict]` (see configs/sweeps/hyper.py): each dict names
the config file (`config`), its argument (`arg`), config overrides and an optional `name` tag.
A point's workdir is ROOT/<task>/<attention>[_l<proj_len>]_lr<lr>_s<seed>[_<name>], from the
resolved config. Extra `--config.KEY=VALUE` flags after the options go to every point (they do
not change workdir names).

Local launcher: points whose workdir holds results.json are skipped, diverged ones too (unless
--retry-diverged; the rerun would diverge again), and so are points another process is running
(their workdir's LOCK; two sweeps on one root share the work); the others run, resuming from their latest
checkpoint. A point whose workdir holds checkpoints or results of another config (the point's
config with the extra flags, against WORKDIR/config.json; bookkeeping fields such as eval_every
aside, schedule fields too with --config.allow_resume_changes=true) is refused, not skipped nor
run: rerun with the old flags, or use another --root. Output goes to WORKDIR/sweep.log; a failed run leaves WORKDIR/FAILED with the log
tail. TPU launcher: one `gcloud ... tpu-vm ssh --worker=all` command per point, one after
another (no skipping: the root is remote; a finished run only re-evaluates its test set).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import types
from typing import Any, Callable, Sequence

from luna_jax.experiments import runs as runs_lib
from luna_jax import cli, resume_rules
from luna_jax import workdir as wd, workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[2]
RESERVED = ("config", "arg", "name")
LOG_FILE = wd.SWEEP_LOG_FILE


class SweepError(ValueError):
  """A sweep file that cannot be expanded; the message names the file and what was expected."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run of a sweep."""
  config_file: str                        # relative to the repository, e.g. configs/listops.py
  config_arg: str                         # e.g. "luna,l=16"
  overrides: tuple[tuple[str, Any], ...]  # (config key without "config.", value), in order
  name: str                               # "<task>/<run name>", the workdir below the root

  def workdir(self, root: str) -> str:
    return f"{root.rstrip('/')}/{self.name}"

  def train_args(self, root: str, extra: Sequence[str] = ()) -> list[str]:
    """`train.py` and its flags (run from the repository root)."""
    config = f"{self.config_file}:{self.config_arg}" if self.config_arg else self.config_file
    return (["train.py", f"--config={config}", f"--workdir={self.workdir(root)}"]
            + [f"--config.{k}={format_value(v)}" for k, v in self.overrides] + list(extra))


# ----------------------------------------------------------------------------- expansion

def format_value(v: Any) -> str:
  """A value as an ml_collections flag value."""
  if isinstance(v, bool):
    return "true" if v else "false"
  return repr(v) if isinstance(v, float) else str(v)


def short_float(x: float) -> str:
  """1e-4 -> "1e-4", 0.05 -> "5e-2", 2.5e-4 -> "2.5e-4" (for workdir names)."""
  mantissa, exponent = f"{x:e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


_MODULES: dict[str, types.ModuleType] = {}


def load_module(path: str) -> types.ModuleType:
  """Imports a config or sweep file given by path (relative to the cwd or the repository)."""
  full = pathlib.Path(path)
  if not full.exists() and not full.is_absolute():
    full = REPO / path
  if not full.exists():
    raise FileNotFoundError(f"{path} not found (also looked in {REPO})")
  key = str(full.resolve())
  if key not in _MODULES:         # config files import `configs.common` (pip install -e .)
    spec = importlib.util.spec_from_file_location(f"_sweep_{full.stem}", full)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except SyntaxError as e:
      raise SweepError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # pylint: disable=broad-except
      raise SweepError(f"{path}: importing it failed: {cli.one_line(e)}") from e
    _MODULES[key] = module
  return _MODULES[key]


def resolve_config(config_file: str, config_arg: str, overrides: Sequence[tuple[str, Any]]):
  """The config of a point: `get_config(arg)` with the overrides set (checks keys and types)."""
  config = load_module(config_file).get_config(config_arg or None)
  for key, value in overrides:
    node, (*parents, leaf) = config, key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise SweepError(f"sweep sets unknown config field {key!r} ({config_file}:{config_arg})")
    node[leaf] = value
  return config


def run_name(config, tag: str = "") -> str:
  """<task>/<attention>[_l<proj_len>]_lr<lr>_s<seed>[_<tag>]."""
  parts = [config.model.attention]
  if config.model.attention == "luna":
    parts.append(f"l{config.model.proj_len}")
  parts += [f"lr{short_float(config.learning_rate)}", f"s{config.seed}"]
  if tag:
    if not re.fullmatch(r"[\w.+=-]+", str(tag)):
      raise ValueError(f"sweep name tag {tag!r} must be a plain path component")
    parts.append(str(tag))
  return f"{config.task}/{'_'.join(parts)}"


def to_point(d: dict[str, Any]) -> Point:
  """A sweep dict -> Point (the config is resolved to name the workdir); SweepError naming the
  point if it cannot be."""
  if not isinstance(d, dict) or "config" not in d:
    raise SweepError(f"sweep point {d!r} is not a dict with a 'config' (the config file)")
  overrides = tuple((k.removeprefix("config."), v) for k, v in d.items() if k not in RESERVED)
  try:
    config = resolve_config(d["config"], d.get("arg", ""), overrides)
    return Point(d["config"], d.get("arg", ""), overrides, run_name(config, d.get("name", "")))
  except SweepError:
    raise
  except (AttributeError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
    raise SweepError(f"sweep point {d}: {cli.one_line(e)}") from e


def sweep_dicts(spec: str) -> list[dict[str, Any]]:
  """What `get_sweep(arg)` of `SWEEP_FILE[:arg]` returns; SweepError unless a list."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"{path} has no get_sweep(arg) function (a sweep file defines one that "
                     "returns a list of dicts; see configs/sweeps/hyper.py)")
  try:
    points = module.get_sweep(arg or None)
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f"{path}: get_sweep({arg or None!r}) failed: {cli.one_line(e)}") from e
  if not isinstance(points, (list, tuple)):
    raise SweepError(f"{path}: get_sweep returned a {type(points).__name__}, expected a list of "
                     "dicts")
  return list(points)


def expand(spec: str) -> list[Point]:
  """Points of `SWEEP_FILE[:arg]`, in the sweep's order; SweepError naming what is wrong (a
  file that does not import, no get_sweep, not a list of dicts, an unknown field, two points
  with one workdir)."""
  points = [to_point(d) for d in sweep_dicts(spec)]
  seen: dict[str, Point] = {}
  for p in points:
    if p.name in seen:
      raise SweepError(f"two sweep points share the workdir {p.name!r}: {seen[p.name]} and {p}; "
                       "add a 'name' tag to tell them apart")
    seen[p.name] = p
  return points


# ----------------------------------------------------------------------------- commands

def local_command(point: Point, root: str, extra: Sequence[str] = ()) -> list[str]:
  return [sys.executable] + point.train_args(root, extra)


def _quote_path(path: str) -> str:
  """shlex.quote that keeps a leading ~/ expandable by the remote shell."""
  return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def tpu_command(point: Point, root: str, extra: Sequence[str] = (), *, tpu: str, zone: str,
                project: str = "", repo_dir: str = "~/luna-jax", python: str = "python",
                env: Sequence[str] = ()) -> list[str]:
  """`gcloud compute tpus tpu-vm ssh` running the point on every worker of a TPU slice."""
  assignments = []
  for e in env:
    key, _, value = e.partition("=")
    if not key.isidentifier():
      raise ValueError(f"--env {e!r} must be KEY=VALUE")
    assignments.append(f"{key}={shlex.quote(value)}")   # quote only the value: still an env
  remote = " ".join([f"cd {_quote_path(repo_dir)} &&", "LUNA_JAX_DISTRIBUTED=1"]
                    + assignments + [shlex.quote(python)]
                    + [shlex.quote(a) for a in point.train_args(root, extra)])
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, "--zone", zone]
  if project:
    cmd += ["--project", project]
  return cmd + ["--worker=all", "--command", remote]


# ----------------------------------------------------------------------------- running

def run_logged(cmd: list[str], workdir: str) -> int:
  """Runs `cmd` in the repository, appending its output to WORKDIR/sweep.log; on failure
  writes WORKDIR/FAILED with the log tail (results.py reads NaN there as divergence)."""
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, LOG_FILE)
  with open(log_path, "a") as log:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
  if rc not in (0, wd.BUSY_EXIT_STATUS) and not os.path.exists(wd.path(workdir,
                                                                          wd.RESULTS_FILE)):
    with open(log_path) as f:
      tail = f.read()[-4000:]
    with open(wd.path(workdir, wd.FAILED_FILE), "w") as f:
      f.write(f"exit status {rc}\n{tail}")
  return rc


def run_streamed(cmd: list[str], workdir: str) -> int:
  """Runs `cmd` with its output on the console (remote launchers)."""
  del workdir
  return subprocess.run(cmd).returncode


def point_config(point: Point, extra: Sequence[str] = ()):
  """The config train.py runs for `point` with the extra `--config.KEY=VALUE` flags."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = resolve_config(point.config_file, point.config_arg, point.overrides)
  try:
    common.apply_overrides(config, dict(a[len("--config."):].partition("=")[::2] for a in extra))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise SweepError(f"{' '.join(extra)}: {cli.one_line(e)}") from e
  return config


def _skip_reason(workdir: str, retry_diverged: bool, config=None) -> str | None:
  """"running" (another process holds the workdir), "changed" (`changed_config`), "finished",
  "diverged" (unless retried), or None for a point to run."""
  if workdir_lock.lock_holder(workdir) is not None:
    return "running"
  if config is not None and resume_rules.changed_config(workdir, config):
    return "changed"
  status = runs_lib.workdir_status(workdir)[0]
  if status == "finished" or (status == "diverged" and not retry_diverged):
    return status
  return None


def run_sweep(points: Sequence[Point], root: str, command: Callable[[Point], list[str]], *,
              runner: Callable[[list[str], str], int] = run_logged, parallel: int = 1,
              dry_run: bool = False, check_workdirs: bool = True, retry_diverged: bool = False,
              cwd: str | None = str(REPO), out=None, extra: Sequence[str] = ()
              ) -> dict[str, str]:
  """Runs (or with dry_run prints) one command per point, `parallel` at a time.

  With check_workdirs, finished and diverged points are skipped and a stale FAILED marker is
  removed before a rerun; a point another process is running (its workdir's lock) is skipped,
  at planning and again just before it starts. Returns {point name: outcome}:
  skipped-finished, skipped-diverged, skipped-running, refused (another config than its
  workdir's, `changed_config`, with the `extra` flags), planned (dry run), ok, or failed (rc N).
  """
  out = out or sys.stdout
  outcome: dict[str, str] = {}
  todo = []
  configs = {p.name: point_config(p, extra) for p in points} if check_workdirs else {}
  for p in points:
    skip = (_skip_reason(p.workdir(root), retry_diverged, configs[p.name]) if check_workdirs
            else None)
    if skip == "changed":
      changes = resume_rules.changed_config(p.workdir(root), configs[p.name])
      outcome[p.name] = "refused"
      print(f"# refuse: {p.workdir(root)} holds a run of another config "
            f"({'; '.join(map(str, changes))}); rerun with its flags or use another --root",
            file=out)
    elif skip is not None:
      outcome[p.name] = f"skipped-{skip}"
      print(f"# skip ({skip}): {p.workdir(root)}", file=out)
    else:
      todo.append(p)
  if dry_run:
    for p in todo:
      prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
      print(prefix + shlex.join(command(p)), file=out)
      outcome[p.name] = "planned"
    return outcome

  lock = threading.Lock()

  def one(i: int, p: Point) -> None:
    run_dir = p.workdir(root)
    resumed = False
    if check_workdirs:
      # Looked at again now: another sweep on this root may have run or be running it.
      if (skip := _skip_reason(run_dir, retry_diverged, configs[p.name])) is not None:
        with lock:
          outcome[p.name] = f"skipped-{skip}"
          print(f"[{i}/{len(todo)}] skip ({skip}): {run_dir}", file=out, flush=True)
        return
      resumed = wd.has_checkpoints(run_dir)
      if os.path.exists(wd.path(run_dir, wd.FAILED_FILE)):
        os.remove(wd.path(run_dir, wd.FAILED_FILE))
    with lock:
      print(f"[{i}/{len(todo)}] {'resume' if resumed else 'start'} {p.name}", file=out,
            flush=True)
    rc = runner(command(p), run_dir)
    with lock:
      outcome[p.name] = ("ok" if rc == 0 else "skipped-running" if rc == wd.BUSY_EXIT_STATUS
                         else f"failed (rc {rc})")
      print(f"[{i}/{len(todo)}] {outcome[p.name]}: {p.name}", file=out, flush=True)

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    for f in [pool.submit(one, i, p) for i, p in enumerate(todo, 1)]:
      f.result()
  return outcome


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m luna_jax.experiments.sweep", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="cmd", required=True)
  run = sub.add_parser("run", help="run (or --dry-run print) the points of a sweep")
  run.add_argument("sweep", help="SWEEP_FILE[:arg], e.g. configs/sweeps/quick.py")
  run.add_argument("--root", required=True, help="workdirs go to ROOT/<task>/<name>")
  run.add_argument("--launcher", choices=("local", "tpu"), default="local")
  run.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
  run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  run.add_argument("--only", default="", help="regex: keep points whose name matches")
  run.add_argument("--retry-diverged", action="store_true")
  run.add_argument("--tpu", help="tpu: TPU VM name")
  run.add_argument("--zone", help="tpu: zone")
  run.add_argument("--project", default="", help="tpu: GCP project")
  run.add_argument("--repo-dir", default="~/luna-jax", help="tpu: repository on the workers")
  run.add_argument("--python", default="python", help="tpu: python on the workers")
  run.add_argument("--env", action="append", default=[],
                   help="tpu: KEY=VALUE set on the workers (repeatable)")
  args, extra = parser.parse_known_args(argv)
  bad = [a for a in extra if not a.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments {bad} (only --config.KEY=VALUE passes to train.py)")

  if not args.root.strip():
    parser.error("--root is empty (an unset shell variable?): name the folder of the runs")
  try:
    points = expand(args.sweep)
  except (SweepError, FileNotFoundError) as e:
    cli.fail(parser.prog, e, 2)
  if args.only:
    points = [p for p in points if re.search(args.only, p.name)]
  if args.launcher == "tpu":
    if not (args.tpu and args.zone):
      parser.error("--launcher tpu needs --tpu and --zone")
    if "://" not in args.root:
      print("warning: a TPU pod needs a root that every worker shares (gs://...)",
            file=sys.stderr)
    outcome = run_sweep(
        points, args.root,
        lambda p: tpu_command(p, args.root, extra, tpu=args.tpu, zone=args.zone,
                              project=args.project, repo_dir=args.repo_dir,
                              python=args.python, env=args.env),
        runner=run_streamed, dry_run=args.dry_run, check_workdirs=False, cwd=None)
  else:
    root = os.path.abspath(args.root)
    if args.parallel > 1:   # several runs on one GPU must not each grab 75% of its memory
      os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
      outcome = run_sweep(points, root, lambda p: local_command(p, root, extra),
                          runner=run_logged, parallel=args.parallel, dry_run=args.dry_run,
                          retry_diverged=args.retry_diverged, extra=extra)
    except (SweepError, wd.DamagedFileError) as e:
      cli.fail(parser.prog, e, 2)
  failed = [n for n, o in outcome.items() if o.startswith(("failed", "refused"))]
  if not args.dry_run:
    print(f"{len(points)} points: {sum(o == 'ok' for o in outcome.values())} ran, "
          f"{sum(o.startswith('skipped') for o in outcome.values())} skipped, "
          f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
