r"""A lent GPU's minutes, prepared (issue 26): the published ListOps rows, then the missing speed
points, each phase one command of at most ~9 minutes that writes everything under --out.

  python -m benchmarks.reproduce_gpu reproduce --out $OUT     # or: bash benchmarks/run_gpu.sh reproduce
  python -m benchmarks.reproduce_gpu speed --out $OUT         #     bash benchmarks/run_gpu.sh speed
  python -m benchmarks.reproduce_gpu reproduce --out /tmp/dry --dry-run   # CPU, tiny, ~1 minute

reproduce: (1) setup check (devices, versions) into setup.json; the full generated ListOps set
(96,000 / 2,000 / 2,000, seed 0) into data/listops with one worker process per core; (2) the
small-protocol ListOps rows, seed 0, bfloat16 (a knob of that protocol, configs/common.py
PROTOCOL_EXTRA_KNOBS): softmax, performer, luna l=16, learned_kernel, run side by side on the
one GPU (`--parallel`, each process with its share of memory: a width-64 model leaves the GPU
mostly idle); (3) with the time left, the Luna paper's ListOps runs (configs/listops.py:luna,l=16
then l=256, float32, as that recipe states no other precision). Every run has a time budget; at
its end the run gets SIGTERM, saves a checkpoint and stops (rerunning the command resumes it; a
finished run is skipped). After every run, SUMMARY.md (the timings and the results table of
luna_jax.experiments.results, each row beside its published twin) and summary/ are rewritten.

speed: the attention_scaling points still missing on the H200: the cuDNN / flash Text model at
4K, the XLA Text model at 2K and 3K, the linear mechanisms at 2K-4K; one process per group and
length, each with a per-point budget that lets the model compile (60 s; compilation takes 12-23
s); a group whose JSON already holds all its points is skipped; speed/SUMMARY.md merges them.

--dry-run: tiny generated data and models, a few steps, on whatever backend is present (the test
suite runs it: tests/benchmarks/test_reproduce_gpu.py). Its tiny overrides make every run
`custom` (configs/common.py mark_overrides), so its table sets no published row beside them;
they are not results.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
FULL_LISTOPS = dict(num_train=96_000, num_val=2_000, num_test=2_000, min_length=500,
                    max_length=2_000, max_depth=10, max_args=10, seed=0)
TINY_LISTOPS = dict(num_train=64, num_val=32, num_test=32, min_length=5, max_length=60,
                    max_depth=3, max_args=4, seed=0)
# Dry run: sizes small enough for a CPU (every run is a `custom` recipe, relabelled).
TINY_TRAIN = {"num_train_steps": 2, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2,
              "log_every": 1, "seq_len": 48, "truncate_len": 0, "model.max_len": 48,
              "batch_size": 8, "eval_max_examples": 16, "model.num_layers": 1,
              "model.emb_dim": 16, "model.mlp_dim": 32, "model.num_heads": 2,
              "model.classifier_dim": 16, "model.performer.num_features": 8}


@dataclasses.dataclass(frozen=True)
class TrainRun:
  """One train.py run of the reproduce phase."""
  name: str                         # workdir below OUT/runs/listops
  config: str                       # configs/listops.py:ARG
  flags: tuple[str, ...] = ()       # --config.K=V
  budget_s: float = 150.0           # wall-clock cap, compilation and data loading included
  wave: str = "small"               # runs of one wave run side by side


def reproduce_runs(dry_run: bool) -> list[TrainRun]:
  """The ListOps runs, in order of priority."""
  bf16 = ("--config.model.dtype=bfloat16",)
  runs = [TrainRun("small_softmax_s0", "configs/listops.py:softmax,small,seed=0", bf16),
          TrainRun("small_performer_s0", "configs/listops.py:performer,small,seed=0", bf16),
          TrainRun("small_luna16_s0", "configs/listops.py:luna,small,l=16,seed=0", bf16),
          TrainRun("small_learned_kernel_s0", "configs/listops.py:learned_kernel,small,seed=0",
                   bf16),
          TrainRun("paper_luna16_s0", "configs/listops.py:luna,l=16,seed=0", budget_s=330,
                   wave="luna_paper"),
          TrainRun("paper_luna256_s0", "configs/listops.py:luna,l=256,seed=0", budget_s=330,
                   wave="luna_paper")]
  if not dry_run:
    return runs
  out = []
  for r in runs:
    out.append(dataclasses.replace(
        r, budget_s=120, flags=r.flags + tuple(f"--config.{k}={v}" for k, v in TINY_TRAIN.items())))
  return out


# ----------------------------------------------------------------------------- setup

def setup_check(out: pathlib.Path, dry_run: bool) -> dict[str, Any]:
  """Devices and versions into OUT/setup.json (and nvidia-smi's view into nvidia-smi.txt); on a
  full run a missing GPU is an error."""
  code = ("import json, jax, importlib.metadata as md\n"
          "v = {}\n"
          "for p in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', "
          "'ml-collections', 'array-record', 'tensorboardX', 'matplotlib', 'numpy'):\n"
          "  try: v[p] = md.version(p)\n"
          "  except md.PackageNotFoundError: v[p] = None\n"
          "d = jax.devices()\n"
          "print(json.dumps({'backend': jax.default_backend(), 'devices': [str(x) for x in d],"
          " 'device_kind': d[0].device_kind, 'versions': v}))\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300, check=False)
  info: dict[str, Any] = {"python": sys.version.split()[0], "host": platform.node(),
                          "cpus": os.cpu_count(), "date": _now(), "dry_run": dry_run}
  if r.returncode != 0:
    info["error"] = r.stderr.strip()[-2000:]
  else:
    info.update(json.loads(r.stdout.strip().splitlines()[-1]))
  if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False)
    (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
  _write_json(out / "setup.json", info)
  print(f"setup: {json.dumps(info)}", flush=True)
  if "error" in info:
    raise SystemExit(f"setup check failed (jax import): {info['error']}")
  if not dry_run and info["backend"] != "gpu":
    raise SystemExit(f"no GPU backend (got {info['backend']!r}); --dry-run runs on a CPU")
  return info


def generate_listops(work: pathlib.Path, dry_run: bool) -> tuple[pathlib.Path, float]:
  """The generated ListOps set in WORK/data/listops (reused when complete); (folder, seconds)."""
  folder = work / "data" / "listops"
  if (folder / "GENERATED.json").exists():
    return folder, 0.0
  settings = TINY_LISTOPS if dry_run else FULL_LISTOPS
  t0 = time.time()
  cmd = ([sys.executable, "-m", "lra_tasks.listops_generator", "--out", str(folder),
          "--workers", "1" if dry_run else "0"]
         + [f"--{k}={v}" for k, v in settings.items()])
  subprocess.run(cmd, cwd=REPO, check=True, timeout=600)
  return folder, time.time() - t0


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Proc:
  run: TrainRun
  popen: subprocess.Popen
  started: float
  stop_at: float
  log: Any
  termed_at: float | None = None


def train_command(run: TrainRun, workdir: pathlib.Path, data_dir: pathlib.Path) -> list[str]:
  return ([sys.executable, "train.py", f"--config={run.config}", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}"] + list(run.flags))


def run_wave(runs: Sequence[TrainRun], work: pathlib.Path, data_dir: pathlib.Path,
             deadline: float, parallel: int, grace_s: float, record: dict[str, Any],
             on_change, on_start) -> None:
  """Runs `runs` (at most `parallel` at once), each until it finishes, its budget ends or the
  deadline comes (then SIGTERM: the trainer saves and stops; SIGKILL after grace_s)."""
  queue = [r for r in runs if not (work / "runs" / "listops" / r.name / "results.json").exists()]
  for r in runs:
    if r not in queue:
      record["runs"].setdefault(r.name, {"outcome": "finished earlier"})
  env = dict(os.environ)
  if parallel > 1:       # each process gets its share of the GPU instead of 75% of it
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.2f}")
  running: list[Proc] = []
  while queue or running:
    while queue and len(running) < parallel and deadline - time.time() > grace_s + 20:
      r = queue.pop(0)
      workdir = work / "runs" / "listops" / r.name
      workdir.mkdir(parents=True, exist_ok=True)
      cmd = train_command(r, workdir, data_dir)
      log = open(workdir / "reproduce.log", "a")  # pylint: disable=consider-using-with
      log.write(f"=== {_now()} {' '.join(cmd)}\n")
      log.flush()
      now = time.time()
      running.append(Proc(r, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True),
                          now, min(now + r.budget_s, deadline - grace_s), log))
      record["runs"][r.name] = {"outcome": "running", "command": " ".join(cmd),
                                "started": _now(), "parallel": parallel}
      on_start()
    if not running:
      for r in queue:
        record["runs"].setdefault(r.name, {"outcome": "not started (no time left)"})
      break
    time.sleep(0.5)
    for p in list(running):
      rc = p.popen.poll()
      now = time.time()
      if rc is None:
        if p.termed_at is None and now >= p.stop_at:
          os.killpg(p.popen.pid, signal.SIGTERM)   # the trainer saves a checkpoint and exits
          p.termed_at = now
        elif p.termed_at is not None and now - p.termed_at > grace_s:
          os.killpg(p.popen.pid, signal.SIGKILL)
        continue
      running.remove(p)
      p.log.close()
      done = (work / "runs" / "listops" / p.run.name / "results.json").exists()
      outcome = ("stopped at its budget (rerun to resume)" if p.termed_at is not None else
                 "finished" if done and rc == 0 else f"failed (exit {rc}; see reproduce.log)")
      record["runs"][p.run.name].update(outcome=outcome, returncode=rc,
                                        seconds=round(now - p.started, 1))
      on_change()


LIGHT_FILES = ("config.json", "metrics.jsonl", "results.json", "FAILED", "reproduce.log")


def write_summary(out: pathlib.Path, work: pathlib.Path, record: dict[str, Any]) -> None:
  """OUT/reproduce.json, OUT/summary/ (results.md, CSVs, plots where matplotlib is present)
  and OUT/SUMMARY.md (the run timings, then the results table); with a separate work folder,
  each run's small files (not its checkpoints) are copied to OUT/runs."""
  sys.path.insert(0, str(REPO))
  from luna_jax.experiments import results  # pylint: disable=import-outside-toplevel
  _write_json(out / "reproduce.json", record)
  root = work / "runs"
  root.mkdir(parents=True, exist_ok=True)
  if work != out:
    for run_dir in root.glob("*/*"):
      dest = out / run_dir.relative_to(work)
      dest.mkdir(parents=True, exist_ok=True)
      for name in LIGHT_FILES:
        if (run_dir / name).exists():
          shutil.copy2(run_dir / name, dest / name)
  summary = out / "summary"
  try:
    report = results.write_report([str(root)], str(summary), with_published=True)
    table = pathlib.Path(report["files"]["results.md"]).read_text()
  except ImportError as e:     # no matplotlib: the table alone
    runs = results.load_runs([str(root)])
    table = results.markdown(runs, results.aggregate(runs), str(root), True)
    summary.mkdir(parents=True, exist_ok=True)
    (summary / "results.md").write_text(table)
    record["summary_note"] = f"plots skipped: {e}"
  lines = ["# ListOps reproduction on a lent GPU" + (" (DRY RUN: tiny sizes, not results)"
                                                     if record.get("dry_run") else ""), "",
           f"Started {record['started']}, updated {_now()}; setup: "
           f"{record.get('setup', {}).get('device_kind', '?')}, jax "
           f"{record.get('setup', {}).get('versions', {}).get('jax', '?')}; data generated in "
           f"{record.get('generate_s', 0):.0f} s. Runs of one wave shared the GPU (their "
           "steps/s are not speeds).", "",
           "| run | outcome | seconds | command |", "|---|---|---|---|"]
  for name, r in record["runs"].items():
    lines.append(f"| {name} | {r.get('outcome', '')} | {r.get('seconds', '')} | "
                 f"`{r.get('command', '')}` |")
  text = "\n".join(lines) + "\n\n" + table.replace("# LRA results (measured)", "## Results", 1)
  (out / "SUMMARY.md").write_text(text)


def reproduce(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.out).resolve()
  work = pathlib.Path(args.work).resolve() if args.work else out
  out.mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True, exist_ok=True)
  start = time.time()
  deadline = start + args.budget_s
  record: dict[str, Any] = {"started": _now(), "dry_run": args.dry_run, "runs": {},
                            "budget_s": args.budget_s, "work": str(work)}
  record["setup"] = setup_check(out, args.dry_run)
  data_dir, record["generate_s"] = generate_listops(work, args.dry_run)
  runs = reproduce_runs(args.dry_run)
  if args.only:
    runs = [r for r in runs if r.name in args.only.split(",")]
  def on_change():
    write_summary(out, work, record)

  def on_start():
    _write_json(out / "reproduce.json", record)
  on_change()
  for wave, parallel in (("small", args.parallel), ("luna_paper", min(args.parallel, 2))):
    wave_runs = [r for r in runs if r.wave == wave]
    if wave_runs:
      run_wave(wave_runs, work, data_dir, deadline, parallel, args.grace_s, record, on_change,
               on_start)
  # Time left: another go for the runs stopped at their budget (they resume).
  again = [r for r in runs if record["runs"].get(r.name, {}).get("outcome", "").startswith(
      "stopped") and deadline - time.time() > 60]
  if again:
    run_wave([dataclasses.replace(r, budget_s=args.budget_s) for r in again], work, data_dir,
             deadline, args.parallel, args.grace_s, record, on_change, on_start)
  record["seconds"] = round(time.time() - start, 1)
  on_change()
  print((out / "SUMMARY.md").read_text())
  return 0


# ----------------------------------------------------------------------------- speed

@dataclasses.dataclass(frozen=True)
class SpeedGroup:
  """One benchmarks.attention_scaling process (one length)."""
  name: str
  mechanisms: str
  length: int
  flags: tuple[str, ...] = ()

  @property
  def points(self) -> int:
    return len(self.mechanisms.split(","))


LUNA = "luna:16,luna:128,luna:256"


def speed_groups() -> list[SpeedGroup]:
  """The missing points, most wanted first: cuDNN/flash at 4K, XLA at 2K/3K, linear beyond 1K
  (linear_elu has 2K-4K and cosformer 2K-3K from the last machine)."""
  fast = ("--softmax-impl", "cudnn", "--luna-flash")
  groups = [SpeedGroup("model_fast_4096", f"softmax,{LUNA}", 4096, fast)]
  for n in (2048, 3072):
    groups.append(SpeedGroup(f"model_quadratic_{n}", f"softmax,{LUNA}", n,
                             ("--softmax-impl", "xla")))
  for n in (2048, 3072, 4096):
    groups.append(SpeedGroup(f"model_linear_{n}", "cheap_linear,performer,learned_kernel", n))
  groups.append(SpeedGroup("model_cosformer_4096", "cosformer", 4096))
  return groups


DRY_LENGTH = {2048: 64, 3072: 96, 4096: 128}
DRY_SPEED = ("--dim", "16", "--heads", "2", "--batch", "1", "--layers", "1", "--mlp-dim", "32",
             "--matmul-size", "128", "--xla-fast-compile")


def speed_complete(path: pathlib.Path, group: SpeedGroup) -> bool:
  """Whether a group's JSON holds all its points."""
  if not path.exists():
    return False
  try:
    return len(json.loads(path.read_text()).get("results", [])) >= group.points
  except (OSError, json.JSONDecodeError):
    return False


def speed(args: argparse.Namespace) -> int:
  final = pathlib.Path(args.out).resolve() / "speed"
  out = pathlib.Path(args.work).resolve() / "speed" if args.work else final
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  deadline = start + args.budget_s
  record: dict[str, Any] = {"started": _now(), "dry_run": args.dry_run, "groups": {}}
  record["setup"] = setup_check(out, args.dry_run)
  groups = speed_groups()
  if args.only:
    groups = [g for g in groups if g.name in args.only.split(",")]
  for g in groups:
    json_path = out / f"{g.name}.json"
    if speed_complete(json_path, g):
      record["groups"][g.name] = {"outcome": "complete earlier"}
      continue
    left = deadline - time.time()
    if left < 45:
      record["groups"][g.name] = {"outcome": "not started (no time left)"}
      continue
    length = DRY_LENGTH[g.length] if args.dry_run else g.length
    cmd = [sys.executable, "-m", "benchmarks.attention_scaling", "--mode", "model",
           "--dtype", "float32" if args.dry_run else "bfloat16",
           "--repeats", "1" if args.dry_run else str(args.repeats), "--warmup",
           "1" if args.dry_run else "2", "--max-seconds-per-point", str(args.point_s),
           "--lengths", str(length), "--mechanisms", g.mechanisms, *g.flags,
           *(DRY_SPEED if args.dry_run else ()), "--json", str(json_path),
           "--markdown", str(out / f"{g.name}.md")]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    t0 = time.time()
    with open(out / f"{g.name}.log", "a") as log:
      log.write(f"=== {_now()} {' '.join(cmd)}\n")
      log.flush()
      p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
      try:   # budget: every point may take point_s (compilation included), plus the startup
        rc = p.wait(timeout=min(g.points * args.point_s + 30, left - 10))
        outcome = "ok" if rc == 0 else f"exit {rc}"
      except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)     # the JSON is rewritten after every point
        rc, outcome = p.wait(), "cut at its budget (the JSON keeps the points measured)"
    record["groups"][g.name] = {"outcome": outcome, "seconds": round(time.time() - t0, 1),
                                "command": " ".join(cmd)}
    _write_speed_summary(out, record, final)
  record["seconds"] = round(time.time() - start, 1)
  _write_speed_summary(out, record, final)
  print((out / "SUMMARY.md").read_text())
  return 0


def _write_speed_summary(out: pathlib.Path, record: dict[str, Any], final: pathlib.Path
                         ) -> None:
  """speed/record.json, speed/speed_all.{json,md} (the groups merged) and speed/SUMMARY.md,
  copied from the work folder to OUT/speed (`final`) when they differ."""
  _write_json(out / "record.json", record)
  inputs = sorted(str(p) for p in out.glob("model_*.json"))
  merged = ""
  if inputs:
    r = subprocess.run([sys.executable, "-m", "benchmarks.attention_scaling", "--merge", *inputs,
                        "--compare-speedup", "softmax", "--json", str(out / "speed_all.json"),
                        "--markdown", str(out / "speed_all.md")], cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=False)
    merged = ((out / "speed_all.md").read_text() if r.returncode == 0 and
              (out / "speed_all.md").exists() else f"merge failed: {r.stderr[-1000:]}")
  lines = ["# Speed points on a lent GPU" + (" (DRY RUN: tiny sizes, not results)"
                                             if record.get("dry_run") else ""), "",
           f"Started {record['started']}, updated {_now()}.", "",
           "| group | outcome | seconds |", "|---|---|---|"]
  lines += [f"| {n} | {g['outcome']} | {g.get('seconds', '')} |"
            for n, g in record["groups"].items()]
  (out / "SUMMARY.md").write_text("\n".join(lines) + "\n\n" + merged)
  if final != out:
    shutil.copytree(out, final, dirs_exist_ok=True)


# ----------------------------------------------------------------------------- main

def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _write_json(path: pathlib.Path, obj: Any) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
  os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce_gpu", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("phase", choices=("reproduce", "speed"))
  parser.add_argument("--out", required=True, help="output folder (reruns resume in it)")
  parser.add_argument("--work", default="",
                      help="folder for the data, checkpoints and resumable state (default: "
                           "--out); OUT then gets only the small files: a device's $OUT is "
                           "new for every command, its /tmp stays while the machine is held")
  parser.add_argument("--dry-run", action="store_true", help="tiny sizes on any backend")
  parser.add_argument("--budget-s", type=float, default=510.0,
                      help="wall-clock budget of the phase (default 510: 8.5 minutes)")
  parser.add_argument("--only", default="", help="comma-separated run or group names")
  parser.add_argument("--parallel", type=int, default=4,
                      help="reproduce: train.py processes side by side (the luna_paper wave: "
                           "at most 2)")
  parser.add_argument("--grace-s", type=float, default=30.0,
                      help="reproduce: seconds between SIGTERM and SIGKILL at a run's budget")
  parser.add_argument("--point-s", type=int, default=60,
                      help="speed: per-point budget, compilation included")
  parser.add_argument("--repeats", type=int, default=5, help="speed: timed steps per point")
  args = parser.parse_args(argv)
  return reproduce(args) if args.phase == "reproduce" else speed(args)


if __name__ == "__main__":
  sys.exit(main())
