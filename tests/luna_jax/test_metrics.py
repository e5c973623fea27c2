"""luna_jax/metrics.py: the metric writer's TensorBoard side does not drag torch in."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tensorboard_writer_does_not_import_torch_but_leaves_it_importable(tmp_path):
  # A stand-in `torch` on the path (CI has no torch): importing it leaves a mark in sys.modules.
  fake = tmp_path / "site" / "torch"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("__version__ = 'fake'\nTensor = object\n")
  script = textwrap.dedent(f"""
      import glob, os, sys
      sys.path.insert(0, {str(tmp_path / "site")!r})
      from luna_jax import metrics
      w = metrics.MetricWriter({str(tmp_path / "run")!r})
      w.write(3, {{"train_loss": 0.5}})
      w.close()
      assert "torch" not in sys.modules, "tensorboardX imported torch"
      assert glob.glob(os.path.join({str(tmp_path / "run")!r}, "**", "*tfevents*"),
                       recursive=True), "no event file"
      import torch
      assert torch.__version__ == "fake"
      print("OK")
  """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_a_torch_already_imported_is_left_in_place(monkeypatch, tmp_path):
  from luna_jax import metrics
  sentinel = type(sys)("torch")
  sentinel.Tensor = object          # what tensorboardX.writer reads from a torch it finds
  monkeypatch.setitem(sys.modules, "torch", sentinel)
  writer_class = metrics._summary_writer_class()
  assert sys.modules["torch"] is sentinel and writer_class.__name__ == "SummaryWriter"
