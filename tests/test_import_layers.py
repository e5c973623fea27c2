"""Import direction: the library never imports the configs, and the ListOps generator never
imports the reader (each check in a fresh interpreter, so other tests' imports do not count)."""
import subprocess
import sys

from tests.conftest import REPO


def _modules_after(code: str) -> set[str]:
  out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
  return set(out.stdout.split())


def test_the_library_does_not_import_the_configs():
  loaded = _modules_after("import luna_jax.trainer, luna_jax.workdir, luna_jax.evaluate\n"
                          "from luna_jax import resume_rules; resume_rules._defaults()")
  assert "luna_jax.trainer" in loaded
  assert not {m for m in loaded if m == "configs" or m.startswith("configs.")}


def test_listops_generator_does_not_import_the_reader():
  loaded = _modules_after("import lra_tasks.listops_generator")
  assert "lra_tasks.listops_format" in loaded and "lra_tasks.listops" not in loaded
