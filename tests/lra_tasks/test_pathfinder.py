"""Tests of the Pathfinder / Path-X reader and the built-in Pathfinder generator."""
from __future__ import annotations

import logging
import os
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from lra_tasks import pathfinder
from lra_tasks import pathfinder_generator as gen
from lra_tasks.common import DataError
from lra_tasks.pathfinder_drawing import make_image, params_for

HARD = "curv_contour_length_14"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  """Keeps every cache (generated sets, decoded pixels) inside the test's tmp_path."""
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path / "cache"))


def make_config(data_dir: str = "", resolution: int = 32, readout: str = "mean",
                seq_len: int | None = None, num_images: int = 20,
                split_seed: int = 0) -> ml_collections.ConfigDict:
  if seq_len is None:
    seq_len = resolution * resolution + int(readout == "cls")
  return ml_collections.ConfigDict({
      "data_dir": data_dir,
      "seq_len": seq_len,
      "model": {"readout": readout},
      "pathfinder": {"resolution": resolution, "difficulty": HARD, "split_seed": split_seed,
                     "num_images": num_images, "gen_seed": 0},
  })


def write_release(root, images_by_batch, labels_by_batch, difficulty=HARD):
  """Writes a hand-made release folder: imgs/<b>/sample_<n>.png plus metadata/<b>.npy."""
  folder = root / difficulty
  (folder / "metadata").mkdir(parents=True)
  for batch, images in enumerate(images_by_batch):
    (folder / "imgs" / str(batch)).mkdir(parents=True)
    lines = []
    for n, (image, label) in enumerate(zip(images, labels_by_batch[batch])):
      path = folder / "imgs" / str(batch) / f"sample_{n}.png"
      if image is None:
        path.write_bytes(b"")                     # an empty PNG, as in the real release
      else:
        Image.fromarray(image).save(path)
      lines.append(f"imgs/{batch} sample_{n}.png {n} {label} 1 14 4 2 0.5 1 2\n")
    (folder / "metadata" / f"{batch}.npy").write_text("".join(lines))
  return folder


def all_records(task):
  return [ds[i] for ds in task.splits.values() for i in range(len(ds))]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  """A small generated set (16 images, two batches of 8)."""
  out = tmp_path_factory.mktemp("gen")
  folder = gen.generate(str(out), 32, HARD, num_images=16, seed=3, batch_size=8)
  return out, folder


def test_generator_writes_release_layout_and_reads_back(generated):
  out, folder = generated
  assert folder == os.path.join(out, "pathfinder32", HARD)
  assert sorted(os.listdir(os.path.join(folder, "metadata"))) == ["0.npy", "1.npy"]
  fields = open(os.path.join(folder, "metadata", "1.npy")).readline().split()
  assert fields[:4] == ["imgs/1", "sample_0.png", "8", "0"]
  assert len(fields) == 11
  images = pathfinder.read_images(pathfinder.find_folder(str(out / "pathfinder32"), 32, HARD),
                                  32)
  assert images.num_records == 16 and not images.skipped
  params = params_for(32, HARD)
  for index in (0, 5, 8, 15):
    image, label = make_image(params, 3, index)
    np.testing.assert_array_equal(images.pixels[index], image)
    assert images.labels[index] == label


def test_generator_labels_balanced(generated):
  _, folder = generated
  labels = [rec.label for rec in pathfinder.read_metadata(folder)]
  assert labels.count(0) == labels.count(1) == 8


def test_generator_deterministic_for_a_seed():
  params = params_for(32, HARD)
  a, label_a = make_image(params, 11, 7)
  b, label_b = make_image(params, 11, 7)
  c, _ = make_image(params, 12, 7)
  np.testing.assert_array_equal(a, b)
  assert label_a == label_b
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("resolution,difficulty",
                         [(16, "curv_contour_length_3"), (32, HARD), (32, "curv_baseline"),
                          (64, "curv_contour_length_9"), (128, HARD)])
def test_generated_images_have_size_and_content(resolution, difficulty):
  params = params_for(resolution, difficulty)
  for index in (0, 1):
    image, label = make_image(params, 0, index)
    assert image.shape == (resolution, resolution) and image.dtype == np.uint8
    assert label == index % 2
    assert image.max() == 255                      # markers at full intensity
    lit = (image > 0).mean()
    assert 0.05 < lit < 0.6, lit                   # contours, not blank or filled
    assert len(np.unique(image)) > 10              # antialiased gray levels


def test_generator_resumes_and_rejects_other_settings(tmp_path):
  folder = gen.generate(str(tmp_path), 32, HARD, num_images=4, seed=1, batch_size=2)
  png = os.path.join(folder, "imgs", "1", "sample_1.png")
  before = open(png, "rb").read()
  os.remove(os.path.join(folder, "metadata", "1.npy"))
  os.remove(png)
  gen.generate(str(tmp_path), 32, HARD, num_images=4, seed=1, batch_size=2)
  assert open(png, "rb").read() == before
  with pytest.raises(ValueError, match="other settings"):
    gen.generate(str(tmp_path), 32, HARD, num_images=4, seed=2, batch_size=2)


def test_reader_hand_written_release_skips_empty_png(tmp_path, caplog):
  rng = np.random.default_rng(0)
  batch0 = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(6)]
  batch1 = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(4)]
  batch1[2] = None                                 # empty file
  labels = [[0, 1, 1, 0, 1, 0], [1, 0, 1, 1]]
  write_release(tmp_path / "pathfinder32", [batch0, batch1], labels)
  with caplog.at_level(logging.WARNING):
    task = pathfinder.load(make_config(str(tmp_path / "pathfinder32")))
  assert "skipped 1 of 10" in caplog.text and "sample_2.png" in caplog.text
  assert task.name == "pathfinder" and task.num_classes == 2 and task.vocab_size == 256
  records = all_records(task)
  assert len(records) == 9
  expected = {arr.tobytes(): lab for arr, lab in zip(batch0 + batch1, labels[0] + labels[1])
              if arr is not None}
  for rec in records:
    assert rec["inputs"].shape == (1024,) and rec["inputs"].dtype == np.int32
    assert rec["targets"].shape == () and rec["targets"].dtype == np.int32
    key = rec["inputs"].astype(np.uint8).tobytes()
    assert expected.pop(key) == int(rec["targets"])   # row-major pixels, matching label
  assert not expected
  # The same folder is found from lra_release/ and from the difficulty folder itself.
  assert pathfinder.find_folder(str(tmp_path), 32, HARD) == str(tmp_path / "pathfinder32" / HARD)
  assert (pathfinder.find_folder(str(tmp_path / "pathfinder32" / HARD), 32, HARD)
          == str(tmp_path / "pathfinder32" / HARD))


def test_decoded_pixels_are_cached(tmp_path, monkeypatch):
  images = [np.full((32, 32), i, np.uint8) for i in range(4)]
  folder = write_release(tmp_path, [images], [[0, 1, 0, 1]])
  first = pathfinder.read_images(str(folder), 32)
  monkeypatch.setattr(pathfinder, "_decode", lambda *a: pytest.fail("decoded again"))
  second = pathfinder.read_images(str(folder), 32)
  np.testing.assert_array_equal(first.pixels, second.pixels)
  assert isinstance(second.pixels, np.memmap)
  records = pathfinder.PixelRecords(second, np.arange(4), cls=False)
  clone = pickle.loads(pickle.dumps(records))      # as grain workers get it
  np.testing.assert_array_equal(clone[3]["inputs"], np.full(1024, 3))


def test_split_is_deterministic_disjoint_80_10_10():
  a = pathfinder.split_positions(1000, seed=5)
  b = pathfinder.split_positions(1000, seed=5)
  c = pathfinder.split_positions(1000, seed=6)
  assert [len(a[s]) for s in ("train", "validation", "test")] == [800, 100, 100]
  for split in a:
    np.testing.assert_array_equal(a[split], b[split])
  assert not np.array_equal(a["test"], c["test"])
  union = np.concatenate(list(a.values()))
  assert len(np.unique(union)) == 1000 and union.min() == 0 and union.max() == 999


def test_malformed_metadata_names_file_and_line(tmp_path):
  folder = write_release(tmp_path, [[np.zeros((32, 32), np.uint8)] * 2], [[0, 1]])
  meta = folder / "metadata" / "0.npy"
  meta.write_text("imgs/0 sample_0.png 0 1\nimgs/0 sample_1.png 1\n")
  with pytest.raises(DataError, match=r"0\.npy, line 2: expected at least 4"):
    pathfinder.read_metadata(str(folder))
  meta.write_text("imgs/0 sample_0.png 0 1\n\nimgs/0 sample_1.png 1 2\n")
  with pytest.raises(DataError, match=r"0\.npy, line 3: expected label 0 or 1"):
    pathfinder.read_metadata(str(folder))


def test_wrong_image_size_raises(tmp_path):
  folder = write_release(tmp_path, [[np.zeros((32, 32), np.uint8),
                                     np.zeros((16, 16), np.uint8)]], [[0, 1]])
  with pytest.raises(DataError, match=r"sample_1\.png \(listed in .*0\.npy, line 2\): "
                     r"image is 16x16, expected 32x32"):
    pathfinder.read_images(str(folder), 32)


def test_missing_folder_says_what_to_download(tmp_path):
  with pytest.raises(DataError) as err:
    pathfinder.load(make_config(str(tmp_path / "nowhere")))
  message = str(err.value)
  for part in ("lra_release.gz", "lra_release/pathfinder32", "lra_release/pathfinder128",
               HARD, "empty"):
    assert part in message


def test_no_padding_black_pixels_are_tokens_and_cls(tmp_path):
  images = [np.zeros((32, 32), np.uint8)] * 10
  write_release(tmp_path, [images], [[0, 1] * 5])
  task = pathfinder.load(make_config(str(tmp_path)))
  assert task.pad_id is None and task.seq_len == 1024
  record = task.splits["train"][0]
  np.testing.assert_array_equal(record["inputs"], np.zeros(1024, np.int32))
  cls_task = pathfinder.load(make_config(str(tmp_path), readout="cls"))
  assert cls_task.vocab_size == 257 and cls_task.seq_len == 1025 and cls_task.pad_id is None
  inputs = cls_task.splits["train"][0]["inputs"]
  assert inputs.shape == (1025,) and inputs[0] == 256 and not inputs[1:].any()
  with pytest.raises(DataError, match=r"config\.seq_len=1024"):
    pathfinder.load(make_config(str(tmp_path), readout="cls", seq_len=1024))


def test_empty_data_dir_generates_once_into_cache(tmp_path, monkeypatch):
  calls = []
  real_generate = gen.generate

  def counting_generate(*args, **kwargs):
    calls.append(args)
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(gen, "generate", counting_generate)
  first = pathfinder.load(make_config(num_images=20))
  assert len(calls) == 1
  cached = tmp_path / "cache" / "pathfinder" / f"32_{HARD}_20_0" / "pathfinder32" / HARD
  assert (cached / "metadata" / "0.npy").exists()
  assert not [n for n in os.listdir(tmp_path / "cache" / "pathfinder") if n.startswith(".")]
  second = pathfinder.load(make_config(num_images=20))
  assert len(calls) == 1                           # reused, not generated again
  assert {s: len(d) for s, d in first.splits.items()} == {"train": 16, "validation": 2,
                                                          "test": 2}
  for split in first.splits:
    for i in range(len(first.splits[split])):
      np.testing.assert_array_equal(first.splits[split][i]["inputs"],
                                    second.splits[split][i]["inputs"])
  labels = [int(r["targets"]) for r in all_records(first)]
  assert labels.count(1) == 10


def test_generator_logs_progress_at_most_every_interval_and_at_the_end(tmp_path, caplog,
                                                                      monkeypatch):
  monkeypatch.setattr(gen, "PROGRESS_EVERY_S", 3600.0)
  with caplog.at_level(logging.INFO, logger=gen.__name__):
    gen.generate(str(tmp_path), 32, HARD, num_images=8, seed=1, batch_size=2)   # 4 batches
  lines = [r.getMessage() for r in caplog.records if "Pathfinder generator" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("Pathfinder generator: 8 of 8 images")
  monkeypatch.setattr(gen, "PROGRESS_EVERY_S", 0.0)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger=gen.__name__):
    gen.generate(str(tmp_path / "b"), 32, HARD, num_images=8, seed=1, batch_size=2)
  assert sum("Pathfinder generator" in r.getMessage() for r in caplog.records) == 4
