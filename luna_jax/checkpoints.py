"""The checkpoints of a run folder (`luna_jax.workdir` names its files): WORKDIR/checkpoints (train
state and grain iterator, orbax) with recovery, WORKDIR/best, the portable parameters file
(PARAMS_FILE) and reading parameters back on one device (`load_params`).

An unreadable checkpoint is moved aside to checkpoints/corrupt-<step>/ and the next older one is
tried; one that cannot be read for a reason other than its content (permissions, resources,
I/O) is kept, and the run stops naming the cause.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any, Callable

import ml_collections

from luna_jax import resume_rules, workdir as wd

STATE_ITEM, DATA_ITER_ITEM = "state", "data_iter"   # the items of a training checkpoint

log = logging.getLogger(__name__)
# jax and orbax are imported where checkpoints are touched, so that reading a run folder
# (luna_jax.experiments.results, .sweep) stays fast.


def _unreadable_file(step_dir: str, error: BaseException) -> str:
  """The file of a checkpoint that `error` came from, as well as can be told."""
  for root, _, files in sorted(os.walk(step_dir)):
    for name in sorted(files):
      file = os.path.join(root, name)
      if name == "_CHECKPOINT_METADATA":          # orbax reads past a bad one of these
        continue
      try:
        with open(file, "rb") as f:
          if f.read(1) not in (b"{", b"["):       # not a JSON file (array data, markers)
            continue
          f.seek(0)
          json.loads(f.read())
      except (OSError, ValueError):
        return file
  files = re.findall(r'local file "([^"]+)"', str(error))
  return files[-1] if files else step_dir


# Errors of the machine, not of a checkpoint's bytes: a checkpoint that raises them is kept.
_NOT_DAMAGE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                      errno.EIO, errno.ETIMEDOUT)


def _not_damage(error: BaseException) -> BaseException | None:
  """The error in `error`'s chain that says reading failed for a reason other than the
  checkpoint's content (permissions, resources, I/O), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (MemoryError, PermissionError)) or (
        isinstance(error, OSError) and error.errno in _NOT_DAMAGE_ERRNOS):
      return error
    error = error.__cause__ or error.__context__
  return None


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().split("\n", 1)[0]
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
  return f"{type(error).__name__}: {text[:limit]}"


def _check_shapes(target: Any, stored: Any, where: str) -> None:
  """ConfigMismatchError if the checkpoint's parameter shapes are not the model's."""
  import jax  # pylint: disable=g-import-not-at-top
  want = {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
  have = {jax.tree_util.keystr(p): tuple(a.shape)
          for p, a in jax.tree_util.tree_flatten_with_path(stored)[0]}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:4]
    detail = "; ".join(f"params{k}: checkpoint {have.get(k, 'absent')}, config "
                       f"{want.get(k, 'absent')}" for k in dict(diff))
    raise wd.ConfigMismatchError(f"{where} holds parameters of another model ({detail}); use a "
                              "new --workdir for this config")


def _host_copy(tree: Any) -> Any:
  """The replicated state as host numpy arrays: one device-to-host copy per leaf. (Given the
  jax.Arrays themselves, orbax slices every leaf once per local replica to share the writing:
  on 8 host devices that is ~800 dispatches and 0.6 s per save of a tiny model. The state is
  replicated, so the primary host writes it whole; restores still return sharded jax.Arrays.)
  Copies, not views of the device buffers: the next (donating) train step may reuse those while
  the asynchronous save still writes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))

class Checkpoints:
  """WORKDIR/checkpoints (train state + data iterator, saved asynchronously every `every`
  steps, newest `keep` kept) and WORKDIR/best (parameters of one step, saved synchronously).

  A save that fails stops the run at the first step after it fails (`check`), naming the
  error; its unfinished folder is removed and older checkpoints stay intact."""

  def __init__(self, workdir: str, *, keep: int, every: int):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self.dir = wd.path(workdir, wd.CHECKPOINTS_DIR)
    self.best_dir = wd.path(workdir, wd.BEST_DIR)
    policies = ocp.checkpoint_managers
    self.mngr = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True,
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(every),
                policies.PreemptionCheckpointingPolicy()])),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITER_ITEM: ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        self.best_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, enable_async_checkpointing=False),
        item_handlers=ocp.StandardCheckpointHandler())
    self._pending: int | None = None
    self._failed_steps: list[int] = []
    self._threads_before_save: set[threading.Thread] = set()

  # -- restore

  def restore_latest(self, target: Any, set_iter_state: Callable[[Any], None]
                     ) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, its data iterator state given to
    `set_iter_state`; None if there is none. An unreadable one (its iterator state refused too)
    is logged (file and reason) and moved to checkpoints/corrupt-<step>/; CheckpointError if
    every checkpoint is unreadable."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    moved = []
    for step in sorted(self.mngr.all_steps(), reverse=True):
      step_dir = os.path.join(self.dir, str(step))
      try:
        meta = self.mngr.item_metadata(step)[STATE_ITEM]
        _check_shapes(target.params, meta["params"], step_dir)
        restored = self.mngr.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            DATA_ITER_ITEM: ocp.args.JsonRestore()}))
        set_iter_state(restored[DATA_ITER_ITEM])
        return step, restored[STATE_ITEM]
      except wd.ConfigMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if (cause := _not_damage(e)) is not None:
          raise wd.CheckpointError(
              f"cannot read checkpoint step {step} in {self.dir} ({_first_line(cause)}), which "
              "does not show that it is damaged: nothing was moved; fix the cause and rerun"
          ) from e
        moved.append(self._move_aside(step, step_dir, e))
    if moved:
      raise wd.CheckpointError(f"no readable checkpoint in {self.dir}: moved "
                            f"{', '.join(moved)} aside (see the messages above); rerun with "
                            "--start_over to train again from step 0 (replacing best/ and "
                            "results.json)")
    return None

  def _move_aside(self, step: int, step_dir: str, error: BaseException) -> str:
    culprit = _unreadable_file(step_dir, error)
    dest = os.path.join(self.dir, f"{wd.CORRUPT_PREFIX}{step}")
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(self.dir, f"{wd.CORRUPT_PREFIX}{step}-{n}")
    if wd.is_primary():
      log.warning("checkpoint step %d is unreadable: %s (%s); moved it to %s and trying an "
                  "older one", step, culprit, _first_line(error), dest)
      os.rename(step_dir, dest)
    wd.sync(f"luna_jax_move_aside_{step}")
    self.mngr.reload()
    return os.path.basename(dest)

  # -- training checkpoints

  def save(self, step: int, state: Any, data_iter_state: Any, force: bool = False) -> None:
    """Starts an asynchronous save if the policy (or `force`) says so."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    if not (force or self.mngr.should_save(step)):
      return
    threads = set(threading.enumerate())
    try:
      started = self.mngr.save(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(_host_copy(state)),
          DATA_ITER_ITEM: ocp.args.JsonSave(data_iter_state)}), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(self._pending if self._pending is not None else step, e)
    if started:
      self._pending = step
      self._threads_before_save = threads

  def check(self) -> None:
    """Raises CheckpointError if the last asynchronous save has failed (cheap; every step)."""
    if self._pending is not None and not self.mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the last save; CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def _failed(self, step: int | None, error: BaseException) -> None:
    self._pending = None
    self._failed_steps.append(step)    # its folder is removed by close(), once nothing writes
    self.mngr.reload()
    older = [s for s in self.mngr.all_steps() if step is None or s < step]
    kept = (f"checkpoint step {max(older)} is intact; fix the cause and rerun the same command "
            "to resume from it" if older else "there is no earlier checkpoint")
    raise wd.CheckpointError(f"saving checkpoint step {step} to {self.dir} failed "
                          f"({_first_line(error)}); the run stopped there and {kept}") from error

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  # -- best

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def save_best(self, step: int, params: Any) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    try:
      self.best.save(step, args=ocp.args.StandardSave(_host_copy(params)), force=True)
      self.best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._remove_tmp(self.best_dir, step)
      raise wd.CheckpointError(f"saving the best parameters (step {step}) to {self.best_dir} "
                            f"failed ({_first_line(e)}); the run stopped there") from e

  def prune_best_after(self, step: int) -> None:
    """Deletes best/ steps after `step` (they belong to a run that is being redone)."""
    for s in self.best.all_steps():
      if s > step:
        if wd.is_primary():
          log.info("removing %s/%d: it is newer than the restored step %d", self.best_dir, s,
                   step)
        self.best.delete(s)

  def restore_best(self, target: Any) -> Any:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    step = self.best.latest_step()
    try:
      _check_shapes(target, self.best.item_metadata(step), os.path.join(self.best_dir,
                                                                        str(step)))
      return self.best.restore(step, args=ocp.args.StandardRestore(target))
    except wd.ConfigMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      step_dir = os.path.join(self.best_dir, str(step))
      raise wd.CheckpointError(f"the best checkpoint {step_dir} is unreadable: "
                            f"{_unreadable_file(step_dir, e)} ({_first_line(e)}); delete it "
                            "and rerun to evaluate the latest parameters instead") from e

  @staticmethod
  def _remove_tmp(folder: str, step: int | None) -> None:
    if wd.is_primary():
      for p in glob.glob(os.path.join(folder, f"{step}{wd.TMP_MARKER}*")):
        shutil.rmtree(p, ignore_errors=True)

  def close(self) -> None:
    """Waits for a pending save (errors are logged, not raised: call `wait` first to get
    them), closes both managers and removes what failed saves left."""
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      log.error("checkpoint save failed: %s", _first_line(e))
    self.mngr.close()
    self.best.close()
    if self._failed_steps:
      # The other items of a failed save go on writing in orbax's threads: let them finish
      # before removing their folder (bounded: a thread that never ends only costs the wait).
      deadline = time.time() + 30
      for t in set(threading.enumerate()) - self._threads_before_save:
        if t is not threading.current_thread() and not t.daemon:
          t.join(max(deadline - time.time(), 0.0))
      for step in self._failed_steps:
        self._remove_tmp(self.dir, step)


# ----------------------------------------------------------------------------- inspection

def _local_target(tree: Any) -> Any:
  """Abstract arrays on the first local device, shaped like checkpoint metadata `tree`."""
  import jax  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def write_params_file(workdir: str, params: Any, step: int) -> str:
  """WORKDIR/PARAMS_FILE: `params` (host arrays) and their step, written atomically."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  data = flax.serialization.msgpack_serialize(
      {"step": int(step), "params": jax.device_get(params)})
  file = wd.path(workdir, wd.PARAMS_FILE)
  tmp = f"{file}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, file)
  return file


def read_params_file(folder: str) -> tuple[Any, int]:
  """(params as numpy arrays, step) of FOLDER/PARAMS_FILE; FileNotFoundError if absent,
  ValueError naming the file if it is not one."""
  import flax.serialization  # pylint: disable=g-import-not-at-top
  file = wd.path(folder, wd.PARAMS_FILE)
  with open(file, "rb") as f:
    raw = f.read()
  try:
    data = flax.serialization.msgpack_restore(raw)
    return data["params"], int(data["step"])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{file}: not a parameters file written by luna_jax "
                     f"({type(e).__name__}: {_first_line(e)})") from None


def _readable(step_dir: str, restore: Callable[[], Any]) -> Any:
  """restore(), or CheckpointError naming the unreadable file of `step_dir` and why."""
  try:
    return restore()
  except Exception as e:  # pylint: disable=broad-except
    raise wd.CheckpointError(f"the checkpoint {step_dir} is unreadable: "
                          f"{_unreadable_file(step_dir, e)} ({_first_line(e)})") from e


def load_params(workdir: str, which: str = "auto") -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, params, step) of a train_and_evaluate workdir, on one local device whatever
  topology saved them; or of a committed results folder (config.json and PARAMS_FILE only).

  Args:
    workdir: the training workdir, or a folder holding config.json and PARAMS_FILE.
    which: "best" (WORKDIR/best/<step>, params only; else PARAMS_FILE), "latest" (the newest
      training checkpoint WORKDIR/checkpoints/<step>/state) or "auto" (best if present, else
      latest).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if which not in ("auto", "best", "latest"):
    raise ValueError(f"which={which!r}; expected 'auto', 'best' or 'latest'")
  workdir = os.path.abspath(workdir)   # orbax needs absolute paths
  config = resume_rules.load_config(workdir)
  best_dir, ckpt_dir = wd.path(workdir, wd.BEST_DIR), wd.path(workdir, wd.CHECKPOINTS_DIR)
  if which in ("auto", "best") and os.path.isdir(best_dir):
    with ocp.CheckpointManager(best_dir, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
      if (step := mngr.latest_step()) is not None:
        def best():
          target = _local_target(mngr.item_metadata(step))
          return mngr.restore(step, args=ocp.args.StandardRestore(target))
        return config, _readable(os.path.join(best_dir, str(step)), best), step
  if which in ("auto", "latest") and os.path.isdir(ckpt_dir):
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(),
                DATA_ITER_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers) as mngr:
      if (step := mngr.latest_step()) is not None:
        def latest():
          target = _local_target(mngr.item_metadata(step)[STATE_ITEM])
          return mngr.restore(step, args=ocp.args.Composite(**{
              STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]["params"]
        return config, _readable(os.path.join(ckpt_dir, str(step)), latest), step
  if which in ("auto", "best") and os.path.isfile(wd.path(workdir, wd.PARAMS_FILE)):
    params, step = read_params_file(workdir)
    return config, params, step
  raise FileNotFoundError(f"no {which} checkpoint under {workdir!r} (looked in {best_dir}, "
                          f"{ckpt_dir} and {wd.PARAMS_FILE})")
