"""A short training run of every task on tiny data in the official layout (built by the tests)."""
import numpy as np

from configs import image as image_config
from configs import pathfinder as pathfinder_config
from configs import retrieval as retrieval_config
from configs import text as text_config
from luna_jax import metrics as metrics_lib
from luna_jax import trainer
from tests.lra_tasks import tfds_fixtures
from tests.lra_tasks.test_retrieval import write_release


def _tiny(c, seq_len, steps=2):
  c.seq_len = seq_len
  c.batch_size = 8
  c.num_train_steps = c.eval_every = c.checkpoint_every = steps
  c.log_every, c.warmup_steps = 1, 1
  m = c.model
  m.emb_dim, m.mlp_dim, m.num_heads, m.classifier_dim, m.proj_len, m.num_layers = 16, 32, 2, 16, 4, 1
  return c


def _run(c, workdir):
  res = trainer.train_and_evaluate(c, str(workdir))
  losses = [r["train_loss"] for r in metrics_lib.read_metrics(str(workdir)) if "train_loss" in r]
  assert len(losses) == c.num_train_steps and np.isfinite(losses).all()
  assert 0.0 <= res["test_accuracy"] <= 1.0
  return res


def test_text_trains_on_tiny_imdb(tmp_path):
  rng = np.random.default_rng(0)
  rows = [(bytes(rng.integers(32, 127, rng.integers(5, 60)).astype(np.uint8)), i % 2)
          for i in range(24)]
  tfds_fixtures.build_imdb(str(tmp_path / "tfds"), rows[:16], rows[16:])
  c = _tiny(text_config.get_config("luna,quick"), 40)
  c.data_dir = str(tmp_path / "tfds")
  _run(c, tmp_path / "run")


def test_retrieval_trains_on_tiny_aan(tmp_path):
  rows = [f"{i % 2}.0\ta{i}\tb{i}\tdoc one {i}\tdoc two {i * 7}" for i in range(16)]
  write_release(str(tmp_path / "tsv_data"), {"train": rows, "validation": rows[:8],
                                              "test": rows[8:]})
  c = _tiny(retrieval_config.get_config("softmax,quick"), 24)
  c.data_dir = str(tmp_path / "tsv_data")
  _run(c, tmp_path / "run")


def test_image_trains_on_tiny_cifar(tmp_path):
  rng = np.random.default_rng(0)
  rows = [(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), i % 10) for i in range(24)]
  tfds_fixtures.build_cifar10(str(tmp_path / "tfds"), rows[:20], rows[20:])
  c = _tiny(image_config.get_config("luna,quick"), 1025)
  c.data_dir = str(tmp_path / "tfds")
  _run(c, tmp_path / "run")


def test_pathfinder_trains_on_generated_images(tmp_path):
  c = _tiny(pathfinder_config.get_config("luna,quick"), 256)     # 16x16, 4x4 patches
  c.pathfinder.num_images = 80
  res = _run(c, tmp_path / "run")
  assert res["task"] == "pathfinder"
  assert res["data"]["settings"]["resolution"] == 16
