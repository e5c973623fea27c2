"""Metric writing: JSON lines (`metrics.jsonl`) plus TensorBoard event files (tensorboardX, no
TensorFlow), only on process 0, and a console progress line."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping

import jax

METRICS_FILE = "metrics.jsonl"


def _plain(v: Any) -> Any:
  try:
    return v.item()
  except AttributeError:
    return v


class MetricWriter:
  """Appends `{"step": s, **metrics}` to WORKDIR/metrics.jsonl and mirrors scalars to
  WORKDIR/tb. A no-op on processes other than 0."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.active and tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int) -> None:
    """Drops records logged after `step` (a resumed run recomputes them identically)."""
    if not self.active or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of WORKDIR/metrics.jsonl (empty if there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A one-line progress display with steps/s and ETA. On a terminal it redraws in place; in
  non-interactive logs it prints only at the given log points."""

  def __init__(self, total_steps: int, first_step: int):
    self.total, self.first = total_steps, first_step
    self.t0 = time.time()
    self.tty = sys.stdout.isatty() and jax.process_index() == 0

  def rate(self, step: int) -> float:
    done = step - self.first
    return done / max(time.time() - self.t0, 1e-9)

  def line(self, step: int, metrics: Mapping[str, Any]) -> str:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    parts += [f"{k} {_plain(v):.4g}" for k, v in metrics.items()
              if isinstance(_plain(v), float) and not k.endswith("_per_s")]
    parts += [f"{rate:.2f} steps/s", f"ETA {_fmt_time(eta)}"]
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
