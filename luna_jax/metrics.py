"""Metric writing: JSON lines (`metrics.jsonl`) plus TensorBoard event files (tensorboardX, no
TensorFlow), only on process 0; the console progress line; console logging for train.py."""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Mapping, Sequence

import jax

from luna_jax import workdir as wd

METRICS_FILE = wd.METRICS_FILE
# Loggers whose INFO notices (data generation, recovery, counted data warnings) reach the console.
CONSOLE_LOGGERS = ("luna_jax", "lra_tasks")


def _plain(v: Any) -> Any:
  try:
    return v.item()
  except AttributeError:
    return v


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without importing torch. tensorboardX.writer tries
  `import torch` only to accept torch tensors (none are passed here); where torch is installed
  that import took 2.5 s and 190 MB of RSS on the development machine. A torch this process
  already imported is left alone, and `import torch` works again afterwards."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None     # `import torch` raises ImportError while this entry is None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends `{"step": s, **metrics}` to WORKDIR/metrics.jsonl (non-finite values as null) and
  mirrors scalars to WORKDIR/tb. A no-op on processes other than 0. Which records survive a
  restart is `luna_jax.workdir.start_at`."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = wd.path(workdir, METRICS_FILE)
    self._tb = None
    if self.active and tensorboard:
      self._tb = _summary_writer_class()(wd.path(workdir, wd.TB_DIR))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(wd.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    if self._tb is not None:
      self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in hparams.items()))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


read_metrics = wd.read_metrics


def speed_record(steps: int, seconds: float, batch_size: int) -> dict[str, float]:
  """A training record's speed: `steps_per_s` (the one steps/s figure: training steps per second
  of time spent in training steps, without evaluation, logging, checkpoint saves or
  compilation), `timed_steps` (the steps it counts) and `examples_per_s`."""
  return {"steps_per_s": steps / seconds, "timed_steps": steps,
          "examples_per_s": steps * batch_size / seconds}


def run_steps_per_s(records: Sequence[Mapping[str, Any]]) -> float | None:
  """results.json's steps/s: the records' timed steps over their time (records without
  `timed_steps`, written before it existed, count as one step each); None without any."""
  steps = seconds = 0.0
  for r in records:
    speed = r.get("steps_per_s")
    if isinstance(speed, (int, float)) and speed > 0:
      n = r.get("timed_steps", 1)
      steps, seconds = steps + n, seconds + n / speed
  return steps / seconds if seconds > 0 else None


class Progress:
  """A one-line progress display with steps/s and ETA. On a terminal it redraws in place; in
  non-interactive logs it prints only at the given log points. The speed is the last training
  record's `steps_per_s` (`speed_record`), the figure metrics.jsonl holds."""

  def __init__(self, total_steps: int, first_step: int):
    self.total, self.first = total_steps, first_step
    self.steps_per_s: float | None = None
    self.tty = sys.stdout.isatty() and jax.process_index() == 0

  def line(self, step: int, metrics: Mapping[str, Any]) -> str:
    """`step s/total | metrics | steps/s | ETA`; speed and ETA once a training record gave a
    speed, ETA only before the end."""
    if isinstance(metrics.get("steps_per_s"), (int, float)):
      self.steps_per_s = float(metrics["steps_per_s"])
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {_plain(v):.4g}" for k, v in metrics.items()
              if isinstance(_plain(v), float) and not k.endswith("_per_s")]
    if self.steps_per_s is not None:
      parts.append(f"{self.steps_per_s:.2f} steps/s")
      if step < self.total:
        parts.append(f"ETA {_fmt_time((self.total - step) / self.steps_per_s)}")
    return " | ".join(parts)

  def tick(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Redraws the terminal line (no-op when not a terminal)."""
    if self.tty:
      sys.stdout.write("\r" + self.line(step, metrics or {})[:150].ljust(150))
      sys.stdout.flush()

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    if self.tty:
      sys.stdout.write("\r" + " " * 150 + "\r")
    print(self.line(step, metrics), flush=True)


def _fmt_time(seconds: float) -> str:
  if seconds != seconds or seconds == float("inf"):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _ConsoleFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    text = record.getMessage()
    return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _NoOrbaxTracebacks(logging.Filter):
  """Orbax logs the error of a failed save, with its traceback, several times from its threads;
  the trainer reports it once (workdir.CheckpointError), so orbax's errors are left out and its
  warnings are shown without tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      if record.levelno >= logging.ERROR:
        return False
      record.exc_info, record.exc_text = None, None
    return True


def _closed_event_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _quiet_closed_event_loops() -> None:
  """Orbax's writer threads, stopped by a failed save, report "Event loop is closed" for each
  pending write as it is collected (unraisable) or as their thread ends: noise after the
  CheckpointError that says what failed. Other such errors are printed as before."""
  unraisable, thread = sys.unraisablehook, threading.excepthook

  def unraisable_hook(args):
    if not _closed_event_loop(args.exc_value):
      unraisable(args)

  def thread_hook(args):
    if not _closed_event_loop(args.exc_value):
      thread(args)

  sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


def setup_console_logging(verbose: bool) -> None:
  """Console for train.py: library logging (absl, jax, orbax, grain) shows warnings only, and
  this project's notices (`CONSOLE_LOGGERS`) are plain stdout lines. With `verbose` every
  library's INFO logging is kept as absl formats it."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if verbose:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.get_absl_handler().addFilter(_NoOrbaxTracebacks())
  _quiet_closed_event_loops()
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(_ConsoleFormatter())
  for name in CONSOLE_LOGGERS:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
