"""`train_and_evaluate(config, workdir)`: the LRA trainer (train.py, tests and notebooks call it).

Data parallel over every device of every host: one jitted step (`luna_jax.steps`) on a `Mesh`
with a `data` axis, the batch sharded over it and the state replicated. Checkpoints (orbax) hold
the train state and the grain iterator together, so a killed run resumes exactly; per-step
randomness is `fold_in(key, step)`. Validation every `eval_every` steps; the best-validation
parameters are kept and evaluated on the test split at the end. The config is checked in
`luna_jax.config_checks`, the optimizer is `luna_jax.optim`; what the workdir holds is
`luna_jax.workdir`, when a resume is accepted `luna_jax.resume_rules`, and how damaged checkpoints
are recovered `luna_jax.checkpoints`.

steps/s (console, metrics.jsonl and results.json alike): training steps per second of time
spent in training steps, i.e. without evaluation, logging, checkpoint saves and each process's
first step (compilation) (`_StepClock`); results.json's figure is over the whole run
(`metrics.run_steps_per_s`).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import lra_tasks
from luna_jax import input_pipeline, metrics as metrics_lib, models, runtime, steps, transfer
from luna_jax import checkpoints, resume_rules, workdir as wd, workdir_lock
from luna_jax.config_checks import check_task, validate_config
from luna_jax.optim import learning_rate_schedule
from luna_jax.steps import TrainState
from luna_jax.workdir import ConfigError


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


# ----------------------------------------------------------------------------- the recipe

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       start_over: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest readable checkpoint); returns the
  results dict also written to WORKDIR/results.json. The run folder's rules (one writer, resume
  checks, recovery, what metrics and results derive from) are in `luna_jax.workdir` and the
  modules it names.
  `start_over`: with no readable training checkpoint, train from step 0 even if that replaces
  an earlier run's best/ and results.json (`workdir.check_start_over`)."""
  validate_config(config)
  workdir = wd.checked_workdir(workdir)
  with workdir_lock.WorkdirLock(workdir):
    changes = resume_rules.resume_changes(workdir, config)     # before anything is written
    if config.get("init_from") and not wd.has_checkpoints(workdir):
      _check_source(config)   # once converted, the run has the parameters in its checkpoints
    task = lra_tasks.load_task(config)
    check_task(config, task)
    identity = resume_rules.run_identity(task.provenance, jax.device_count())
    changes += resume_rules.identity_changes(workdir, identity)
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
    wd.clean_tmp(workdir)
    run = _Run.of(config, workdir, task)
    train_iter = _train_iterator(run)
    try:
      first_step, state = _restore_or_initialize(run, train_iter, start_over)
      resume_rules.record_config(workdir, config, changes, first_step, identity)
      wd.start_at(workdir, first_step, config.num_train_steps)
      run.ckpts.prune_best_after(first_step)
      wd.sync("luna_jax_start")
      run.writer = metrics_lib.MetricWriter(workdir)
      run.progress = metrics_lib.Progress(config.num_train_steps, first_step)
      _announce(run, state, first_step, changes)
      stop = _StopFlag()
      stop.install()
      try:
        state, step, stopped_by = _train_steps(run, state, first_step, train_iter, stop)
      except BaseException:
        stop.restore()
        raise
      results = _results(run, state, step, finished=stopped_by is None)
      if stopped_by is not None:
        stop.restore()
        _say(f"received {stopped_by}: saved step {step}; rerun the same command to resume")
        return results
      try:
        stop.raise_from_now()
        results.update(_final_evaluation(run, state, step))
      except _Interrupted as e:
        results["finished"] = False
        _say(f"received {e}: during the final evaluation; step {step} is saved, rerun the "
             "same command to evaluate it")
        return results
      finally:
        stop.restore()
      _write_results(run, results)
      return results
    finally:
      if run.writer is not None:
        run.writer.close()
      run.ckpts.close()


# ----------------------------------------------------------------------------- its parts

@dataclasses.dataclass
class _Run:
  """What one call of train_and_evaluate works with: the config, its data and programs, the
  shardings, the checkpoints, and (once the state is known) the writer and progress line."""
  config: ml_collections.ConfigDict
  workdir: str
  task: lra_tasks.TaskData
  cfg: models.ModelConfig
  programs: steps.Programs
  data_sh: NamedSharding
  state_sh: Any
  init_key: jax.Array
  step_key: jax.Array
  buckets: tuple[int, ...]
  lengths: dict[str, np.ndarray]
  ckpts: checkpoints.Checkpoints
  writer: metrics_lib.MetricWriter | None = None
  progress: metrics_lib.Progress | None = None

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, workdir: str, task: lra_tasks.TaskData
         ) -> "_Run":
    cfg = steps.model_config(config, task)
    mesh = steps.data_mesh()
    programs = steps.programs_of(config, cfg, mesh)
    repl = NamedSharding(mesh, P())
    buckets, lengths = steps.length_buckets(config, task)
    if buckets:
      _say(f"length buckets {buckets}: " + ", ".join(
          f"{name} {np.bincount(np.searchsorted(buckets, ls), minlength=len(buckets)).tolist()}"
          for name, ls in lengths.items()))
    ckpts = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints,
                                    every=config.checkpoint_every)
    return cls(config, workdir, task, cfg, programs, NamedSharding(mesh, P("data")),
               jax.tree.map(lambda _: repl, programs.abstract), *steps.run_keys(config),
               buckets, lengths, ckpts)

  def target(self, abstract: Any, shardings: Any) -> Any:
    """Abstract arrays of `abstract`'s shapes with `shardings`: what a restore fills."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)

  def evaluate(self, split: str, params: Any, step: int) -> dict[str, Any]:
    return steps.evaluate_split(self.config, self.task, self.programs.eval, self.data_sh, split,
                                params, step, self.step_key, self.buckets, self.lengths)


def _train_iterator(run: _Run) -> Any:
  """The checkpointable iterator of training batches (length-bucketed when configured)."""
  config, train = run.config, run.task.splits["train"]
  if run.buckets:
    return input_pipeline.BucketedBatches(train, run.lengths["train"], config.batch_size,
                                          config.seed, run.buckets)
  return input_pipeline.train_iterator(train, config.batch_size, config.seed,
                                       config.grain_workers)


def _restore_or_initialize(run: _Run, train_iter: Any, start_over: bool
                           ) -> tuple[int, TrainState]:
  """(first step, state): the newest readable checkpoint (the iterator restored with it), or a
  fresh state, converted from config.init_from when given and saved as step 0."""
  config = run.config
  restored = run.ckpts.restore_latest(run.target(run.programs.abstract, run.state_sh),
                                      train_iter.set_state)
  if restored is not None:
    resume_rules.check_steps(run.workdir, restored[0], config.num_train_steps)
    return restored
  wd.check_start_over(run.workdir, start_over)
  state = run.programs.init(run.init_key)
  if config.get("init_from"):
    state = _convert_from(config, run.cfg, state, run.state_sh, run.workdir)
    # The converted parameters in the run's own checkpoint: it never needs the source again.
    run.ckpts.save(0, state, train_iter.get_state(), force=True)
    run.ckpts.wait()
  return 0, state


def _announce(run: _Run, state: TrainState, first_step: int,
              changes: list[resume_rules.Change]) -> None:
  """The console's first lines (new run, resume or re-evaluation) and, for a new run, its
  parameter count and hyperparameters in metrics.jsonl and TensorBoard."""
  config, workdir = run.config, run.workdir
  num_params = models.count_params(state.params)
  if first_step == 0:
    _say(f"{config.task}: {run.cfg.attention} model with {num_params:,} parameters on "
         f"{jax.device_count()} device(s), {jax.process_count()} process(es); "
         f"workdir {workdir}")
    run.writer.write(0, {"num_params": num_params, "num_devices": jax.device_count()})
    run.writer.write_hparams(flax.traverse_util.flatten_dict(config.to_dict(), sep="."))
  elif first_step >= config.num_train_steps:
    _say(f"{workdir} already finished training at step {first_step}: evaluating its best "
         "checkpoint on the test split again")
  else:
    _say(f"resumed from step {first_step} ({workdir})")
  for c in changes:
    _say(f"resumed with a change: {c} (recorded in {wd.CONFIG_HISTORY_FILE})")


class _StepClock:
  """Time spent in training steps, the one steps/s figure: it runs from the end of a process's
  first step (compilation) and is stopped, once the device finished, around logging,
  evaluation and checkpoint saves. `steps`, `seconds`: counted since the last `take`."""

  def __init__(self):
    self.steps, self.seconds = 0, 0.0
    self._since: float | None = None
    self._compiled = False

  def step_done(self, outputs: Any) -> None:
    """After each step: counts it; the process's first step (compilation) starts the clock."""
    if self._compiled:
      self.steps += 1
      return
    jax.block_until_ready(outputs)
    self._compiled = True
    self._since = time.perf_counter()

  def stop(self, outputs: Any) -> None:
    """Stops the clock once `outputs` are computed."""
    if self._since is not None:
      jax.block_until_ready(outputs)
      self.seconds += time.perf_counter() - self._since
      self._since = None

  def start(self) -> None:
    if self._compiled:
      self._since = time.perf_counter()

  def take(self) -> tuple[int, float]:
    """(steps, seconds) since the last take; resets both."""
    out = (self.steps, self.seconds)
    self.steps, self.seconds = 0, 0.0
    return out


def _train_steps(run: _Run, state: TrainState, first_step: int, train_iter: Any,
                 stop: "_StopFlag") -> tuple[TrainState, int, str | None]:
  """Steps first_step..num_train_steps: logging, validation with best/ kept, checkpoints; a
  SIGTERM/SIGINT saves and stops at the step boundary. Returns (state, step, the stopping
  signal's name or None)."""
  config = run.config
  best_val, _ = wd.best_validation(wd.read_metrics(run.workdir), first_step)
  acc, acc_n = None, 0       # running sums of the step metrics on device, and their count
  first_bad = -1             # first step whose loss was not finite (-1: none), kept on device
  clock = _StepClock()
  step = first_step
  while step < config.num_train_steps:
    state, m = run.programs.train(state, steps.global_batch(next(train_iter), run.data_sh),
                                  run.step_key)
    step += 1
    clock.step_done(m)
    run.ckpts.check()          # a failed asynchronous save stops the run here
    acc, first_bad = steps.accumulate_metrics(m if acc is None else acc, m, first_bad, step,
                                              fresh=acc is None)
    acc_n += 1
    last = step == config.num_train_steps
    is_log = step % config.log_every == 0 or last
    is_eval = step % config.eval_every == 0 or last
    run.progress.tick(step)
    if stop.signal is None and jax.process_count() > 1:
      if run.ckpts.mngr.reached_preemption(step):
        stop.signal = signal.SIGTERM
    stopping = stop.signal    # read once: a signal after this line stops the next step
    if not (is_log or is_eval or step % config.checkpoint_every == 0 or stopping is not None):
      continue
    clock.stop(state)
    _check_finite(run, int(first_bad))
    if is_log and acc_n:
      _log_training(run, step, jax.device_get(acc), acc_n, *clock.take())
      acc, acc_n = None, 0
    if is_eval:
      val = run.evaluate("validation", state.params, step)
      run.writer.write(step, val)
      run.progress.log(step, val)
      if val["val_accuracy"] > best_val:
        best_val = val["val_accuracy"]
        # The score counts from the start; best/ only after save_best_after (Skyformer).
        if step > config.get("save_best_after", 0.0) * config.num_train_steps:
          run.ckpts.save_best(step, state.params)
    run.ckpts.save(step, state, train_iter.get_state(), force=stopping is not None or last)
    if stopping is not None:
      run.ckpts.wait()
      return state, step, signal.Signals(stopping).name
    clock.start()
  run.ckpts.wait()
  return state, step, None


def _check_finite(run: _Run, first_bad: int) -> None:
  """NonFiniteLossError (and WORKDIR/FAILED) if a step's loss was NaN/Inf."""
  if first_bad < 0:
    return
  last = run.ckpts.latest_step()
  msg = f"training loss became NaN/Inf at step {first_bad}; stopping. " + (
      f"The last good checkpoint in {run.ckpts.dir} is kept (step {last})."
      if last is not None else "No checkpoint was saved before it.")
  if jax.process_index() == 0:   # marker read by luna_jax.experiments.results
    with open(wd.path(run.workdir, wd.FAILED_FILE), "w") as f:
      f.write(f"NonFiniteLossError: {msg}\n")
  raise NonFiniteLossError(msg)


def _log_training(run: _Run, step: int, sums: dict[str, Any], n: int, timed_steps: int,
                  seconds: float) -> None:
  """The training record of the `n` steps up to `step` (their mean metrics, learning rate,
  steps/s over the `timed_steps` the clock counted) to metrics.jsonl, TensorBoard, console."""
  config = run.config
  rec = {f"train_{k}": float(v) / n for k, v in sums.items()}
  rec["learning_rate"] = float(learning_rate_schedule(config)(step - 1))
  if n != (step - 1) % config.log_every + 1:   # since a resume, not log_every
    rec["averaged_steps"] = n
  if timed_steps and seconds > 0:
    rec.update(metrics_lib.speed_record(timed_steps, seconds, config.batch_size))
  if (peak := _peak_memory_bytes()) is not None:
    rec["peak_memory_bytes"] = peak
  run.writer.write(step, rec)
  run.progress.log(step, rec)


def _results(run: _Run, state: TrainState, step: int, finished: bool) -> dict[str, Any]:
  """results.json's description of the run (without the final evaluation's numbers)."""
  config = run.config
  results: dict[str, Any] = {
      "task": config.task, "attention": run.cfg.attention, "proj_len": run.cfg.proj_len,
      "seed": config.seed, "num_params": models.count_params(state.params), "step": step,
      "num_train_steps": config.num_train_steps, "finished": finished,
      "protocol": config.get("protocol", "custom"), "data": dict(run.task.provenance),
      "dtype": run.cfg.dtype, "machine": machine_description()}
  if config.get("init_from"):
    results["init_from"] = wd.read_json(wd.path(run.workdir, wd.INIT_FROM_FILE))
  return results


def _write_results(run: _Run, results: dict[str, Any]) -> None:
  """Adds the run's steps/s, writes results.json and says where everything is."""
  workdir = run.workdir
  speed = metrics_lib.run_steps_per_s(wd.read_metrics(workdir))
  if speed is not None:
    results["steps_per_s"] = speed
  if jax.process_index() == 0:
    wd.write_json(wd.path(workdir, wd.RESULTS_FILE), results)
  _say(f"done: test accuracy {results['test_accuracy']:.4f} at step {results['best_step']} "
       f"(best validation {results['best_val_accuracy']:.4f}). Results: "
       f"{wd.path(workdir, wd.RESULTS_FILE)}; metrics: {wd.path(workdir, wd.METRICS_FILE)}; "
       f"curves: tensorboard --logdir {wd.path(workdir, wd.TB_DIR)}")


def _final_evaluation(run: _Run, state: TrainState, step: int) -> dict[str, Any]:
  """Test metrics of the best checkpoint that exists (best/, else the final parameters, which
  then become best/); best_step and best_val_accuracy describe that same checkpoint."""
  ckpts, workdir, writer, evaluate = run.ckpts, run.workdir, run.writer, run.evaluate
  if ckpts.best_step() is None:
    _say(f"no best-validation checkpoint in {ckpts.best_dir}: keeping the step-{step} "
         "parameters as the best")
    ckpts.save_best(step, state.params)
  best_step = ckpts.best_step()
  best_params = ckpts.restore_best(run.target(run.programs.abstract.params, run.state_sh.params))
  val = next((r for r in wd.read_metrics(workdir)
              if r.get("step") == best_step and "val_accuracy" in r), None)
  if val is None:           # no record of it (metrics.jsonl deleted): evaluate again
    val = evaluate("validation", best_params, best_step)
    if best_step == step:
      writer.write(step, val)
  test = evaluate("test", best_params, best_step)
  if jax.process_index() == 0:
    checkpoints.write_params_file(workdir, best_params, best_step)
  writer.write(step, {**test, "test_at_step": best_step})
  run.progress.log(step, {**test, "best_step": float(best_step)})
  return {"best_val_accuracy": val["val_accuracy"], "best_step": best_step, **test}


def _check_source(config: ml_collections.ConfigDict) -> None:
  """config.init_from names a run whose model can become this one (before anything else)."""
  source = os.path.abspath(config.init_from)
  try:
    src_config = resume_rules.load_config(source)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
  transfer.check_compatible(src_config, config, source)


def _convert_from(config: ml_collections.ConfigDict, cfg: models.ModelConfig, state: TrainState,
                  state_sh: Any, workdir: str) -> TrainState:
  """The initial state with every matching parameter taken from config.init_from's best
  checkpoint (luna_jax/transfer.py); writes WORKDIR/init_from.json (what was copied,
  initialised and dropped, and the source's numbers)."""
  source = os.path.abspath(config.init_from)
  try:
    src_config, src_params, src_step = checkpoints.load_params(source, "best")
  except (FileNotFoundError, wd.CheckpointError) as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {e}") from None
  params, report = transfer.transfer(src_params, jax.device_get(state.params),
                                     target_is_luna=models.carries_p(cfg))
  state = state.replace(params=jax.device_put(params, state_sh.params))
  src_results = wd.read_json(wd.path(source, wd.RESULTS_FILE)) or {}
  info = {**resume_rules.best_identity(source), "attention": src_config.model.attention,
          "test_accuracy": src_results.get("test_accuracy"),
          "summary": report.summary(), **report.to_dict()}
  if jax.process_index() == 0:
    wd.write_json(wd.path(workdir, wd.INIT_FROM_FILE), info)
  _say(f"{report.summary()} (from {source}, step {src_step})")
  return state


# ----------------------------------------------------------------------------- process

def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Starts jax.distributed for multi-process runs: explicit coordinator arguments, or
  auto-detection (TPU pod, Slurm, Open MPI) when LUNA_JAX_DISTRIBUTED=1. No-op otherwise."""
  if jax.distributed.is_initialized():
    return
  if coordinator_address or os.environ.get("LUNA_JAX_DISTRIBUTED", "") == "1":
    # CPU-only runs (tests, CPU clusters) need a collectives backend across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif os.environ.get("LUNA_JAX_DISTRIBUTED", "") == "1":
    jax.distributed.initialize()


class _Interrupted(Exception):
  """A SIGTERM/SIGINT during the final evaluation (`_StopFlag.raise_from_now`)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


class _StopFlag:
  """Set by SIGTERM/SIGINT so the loop can save and exit cleanly at a step boundary; after the
  loop (`raise_from_now`), a signal interrupts the final evaluation instead: its checkpoint is
  saved, and the rerun evaluates it."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}
    self._raising = False

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signum
    if self._raising:
      self._raising = False        # once: the cleanup that follows is not interrupted
      raise _Interrupted(signum)

  def raise_from_now(self) -> None:
    """From now on a signal raises _Interrupted (at once if one came already)."""
    if self.signal is not None:
      raise _Interrupted(self.signal)
    self._raising = True

  def restore(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)


def machine_description() -> dict[str, Any]:
  """What ran this: device kind and count, processes, CPU model, jax version."""
  return {"device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "cpu": runtime.cpu_model(),
          "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "malloc": runtime.allocator(),
          "cpu_dispatch": runtime.cpu_dispatch(), "cpu_devices": runtime.cpu_devices_choice()}


def _peak_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _say(message: str) -> None:
  """A console line from process 0."""
  if jax.process_index() == 0:
    print(message, flush=True)
