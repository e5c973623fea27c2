"""pytest.ini: orbax's "Event loop is closed" noise after a failed checkpoint read or save is
filtered; any other unraisable exception is still reported (in a separate pytest run)."""
import shutil
import subprocess
import sys

from tests.conftest import REPO

NOISE = """
import warnings, pytest

def _unraisable(error):
  warnings.warn(pytest.PytestUnraisableExceptionWarning(
      "Exception ignored in: None\\n\\nTraceback (most recent call last):\\n  File \\"x\\"\\n"
      + error + "\\n"))

def test_orbax_closed_loop():
  _unraisable("RuntimeError: Event loop is closed")

def test_other():
  _unraisable("ValueError: something else")
"""


def test_only_the_closed_event_loop_noise_is_filtered(tmp_path):
  shutil.copy(REPO / "pytest.ini", tmp_path / "pytest.ini")
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "test_noise.py").write_text(NOISE)
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "tests"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "2 passed, 1 warning" in out.stdout, out.stdout
  assert "ValueError: something else" in out.stdout
  assert "Event loop is closed" not in out.stdout
