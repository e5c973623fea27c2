"""Shape of the source tree: no Python file of the package, the tasks or the configs is over
MAX_LINES lines (issue 28: split a module that grows past it by what its parts hold)."""
import os

from tests.conftest import REPO

MAX_LINES = 500
FOLDERS = ("luna_jax", "lra_tasks", "configs")


def _python_files(folder: str) -> list[str]:
  """The .py files under `folder` of the repository, as repository-relative paths."""
  found = []
  for root, dirs, files in os.walk(os.path.join(REPO, folder)):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
    found += [os.path.relpath(os.path.join(root, f), REPO) for f in sorted(files)
              if f.endswith(".py")]
  return found


def _line_count(path: str) -> int:
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return sum(1 for _ in f)


def test_no_python_file_over_max_lines():
  files = [p for folder in FOLDERS for p in _python_files(folder)]
  assert files, f"no .py files found under {FOLDERS} in {REPO}"
  too_long = {p: n for p in files if (n := _line_count(p)) > MAX_LINES}
  assert not too_long, (
      f"{len(too_long)} file(s) over {MAX_LINES} lines: "
      + ", ".join(f"{p} ({n} lines)" for p, n in sorted(too_long.items())))
