"""One writer per run folder (`WorkdirLock`): a run holds WORKDIR/LOCK while it writes; a second
writer fails naming the holder. A lock left by a dead process on this host is taken over with a
warning; one of another host is never taken over (delete the file once that process is gone).
The folder and its other files are `luna_jax.workdir`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any, Mapping

from luna_jax import workdir as wd

log = logging.getLogger(__name__)


def _this_process() -> dict[str, Any]:
  return {"host": socket.gethostname(), "pid": os.getpid()}


def _holder(file: str) -> dict[str, Any] | None:
  """The {"host", "pid"} in a lock file; None if it is gone or unreadable."""
  try:
    with open(file) as f:
      holder = json.loads(f.read())
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _is_alive(holder: Mapping[str, Any] | None, file: str) -> bool:
  """Whether the lock's holder may still run: a process of another host always may; on this
  host, whether its pid exists. A lock without a readable holder (a writer killed between
  creating and filling it) counts as held for its first 10 seconds."""
  if holder is None:
    try:
      return time.time() - os.path.getmtime(file) < 10
    except OSError:
      return False
  if holder.get("host") != socket.gethostname():
    return True
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):
    return True
  except (TypeError, ValueError):
    return False
  return True


def lock_holder(workdir: str) -> dict[str, Any] | None:
  """The live holder ({"host", "pid"}) of WORKDIR/LOCK, or None if the folder is free."""
  file = wd.path(workdir, wd.LOCK_FILE)
  if not os.path.exists(file):
    return None
  holder = _holder(file)
  return (holder or {"host": "?", "pid": "?"}) if _is_alive(holder, file) else None


def _busy_message(workdir: str, holder: Mapping[str, Any] | None) -> str:
  who = (f"process {holder.get('pid')} on host {holder.get('host')}" if holder
         else "a process that is starting")
  return (f"{workdir} is in use by {who} ({wd.path(workdir, wd.LOCK_FILE)}): one run writes a "
          "folder at a time; wait for it to end, or delete that file if the process is gone")


def _make_folder(workdir: str) -> str | None:
  """Creates `workdir` (WorkdirError naming the cause); returns the topmost folder it created
  (None if it existed)."""
  top, parent = None, workdir
  while not os.path.exists(parent):
    top, parent = parent, os.path.dirname(parent)
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError:
    raise wd.WorkdirError(f"the workdir {workdir} is a file, not a folder") from None
  except NotADirectoryError:
    raise wd.WorkdirError(f"the workdir {workdir} lies under {_file_above(workdir)}, which is a "
                       "file, not a folder") from None
  except OSError as e:
    raise wd.WorkdirError(f"cannot create the workdir {workdir}: {e.strerror}") from None
  if not os.path.isdir(workdir):
    raise wd.WorkdirError(f"the workdir {workdir} is a file, not a folder")
  return top


def _file_above(workdir: str) -> str:
  parent = workdir
  while parent != os.path.dirname(parent) and not os.path.isfile(parent):
    parent = os.path.dirname(parent)
  return parent


class WorkdirLock:
  """Holds WORKDIR/LOCK while a run writes the folder (module docstring); creates the folder,
  and on release removes the folders it created if they are still empty."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.file = wd.path(workdir, wd.LOCK_FILE)
    self._held = False
    self._created: str | None = None

  def __enter__(self) -> "WorkdirLock":
    if wd.is_primary():
      self._created = _make_folder(self.workdir)
      try:
        self._acquire()
      except BaseException:
        self._remove_created()
        raise
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._held and (_holder(self.file) or {}).get("pid") == os.getpid():
      os.remove(self.file)
    self._held = False
    self._remove_created()

  def _acquire(self) -> None:
    for _ in range(3):
      try:
        fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_stale()
        continue
      except OSError as e:
        raise wd.WorkdirError(f"cannot write in the workdir {self.workdir}: {e.strerror} "
                           f"(creating {self.file})") from None
      with os.fdopen(fd, "w") as f:
        f.write(wd.dumps(_this_process()) + "\n")
      self._held = True
      return
    raise wd.WorkdirBusyError(_busy_message(self.workdir, _holder(self.file)))

  def _take_over_stale(self) -> None:
    """Removes the lock of a dead process (with a warning); WorkdirBusyError if it lives."""
    holder = _holder(self.file)
    if _is_alive(holder, self.file):
      raise wd.WorkdirBusyError(_busy_message(self.workdir, holder))
    log.warning("%s: taking over the lock of process %s on this host, which has ended",
                self.file, (holder or {}).get("pid", "?"))
    try:
      os.remove(self.file)
    except FileNotFoundError:
      pass

  def _remove_created(self) -> None:
    folder = self.workdir
    while self._created is not None:
      try:
        os.rmdir(folder)
      except OSError:
        break
      if folder == self._created:
        break
      folder = os.path.dirname(folder)
