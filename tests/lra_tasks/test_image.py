"""Tests for lra_tasks.image on a tiny cifar10 build made without TensorFlow."""
from __future__ import annotations

import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from lra_tasks import image
from lra_tasks.common import SPLITS, DataError

try:
  from tests.lra_tasks import tfds_fixtures
except ImportError:
  import tfds_fixtures

NUM_TRAIN, NUM_TEST = 20, 4
# First row of image 0: red, green, blue, white, then black; luma per PIL convert("L").
KNOWN_RGB = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]
KNOWN_GRAY = [76, 150, 29, 255, 0]


def make_image(value: int) -> np.ndarray:
  """A gray image whose last pixel (and most others) is `value`; image 0 is black + KNOWN_RGB."""
  img = np.full((32, 32, 3), value, np.uint8)
  if value == 0:
    img[0, :len(KNOWN_RGB)] = KNOWN_RGB
  return img


def rows(values) -> list[tuple[np.ndarray, int]]:
  return [(make_image(v), v % 10) for v in values]


TRAIN = rows(range(NUM_TRAIN))          # Image i: gray level i, label i % 10.
TEST = rows(range(100, 100 + NUM_TEST))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds_fixtures.build_cifar10(path, TRAIN, TEST)
  return path


def make_config(data_dir: str, seq_len: int = 1025,
                readout: str = "cls") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"data_dir": data_dir, "seq_len": seq_len, "model": {"readout": readout}})


def records(split) -> list[dict[str, np.ndarray]]:
  return [split[i] for i in range(len(split))]


def test_grayscale_known_pixels():
  rgb = np.array([KNOWN_RGB], np.uint8)
  np.testing.assert_array_equal(image.to_grayscale(rgb), [KNOWN_GRAY])


def test_grayscale_matches_pil_convert_l():
  rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  np.testing.assert_array_equal(image.to_grayscale(rgb),
                                np.asarray(Image.fromarray(rgb).convert("L")))


def test_single_channel_is_kept():
  gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  np.testing.assert_array_equal(image.to_grayscale(gray), gray[..., 0])


def test_tokens_with_cls(data_dir):
  data = image.load(make_config(data_dir))
  assert (data.name, data.vocab_size, data.num_classes, data.seq_len, data.pad_id,
          data.num_docs) == ("image", 257, 10, 1025, None, 1)
  for record in records(data.splits["train"]) + records(data.splits["validation"]):
    inputs, value = record["inputs"], int(record["inputs"][-1])
    assert inputs.shape == (1025,) and inputs.dtype == np.int32
    assert record["targets"].shape == () and record["targets"].dtype == np.int32
    assert inputs[0] == image.CLS_ID and int(record["targets"]) == value % 10
    expected = image.to_grayscale(make_image(value)).reshape(-1)
    np.testing.assert_array_equal(inputs[1:], expected)
  assert "tensorflow" not in sys.modules


def test_black_pixels_are_tokens(data_dir):
  data = image.load(make_config(data_dir))
  black = [r["inputs"] for r in records(data.splits["train"]) + records(data.splits["validation"])
           if r["inputs"][-1] == 0]
  assert len(black) == 1
  np.testing.assert_array_equal(black[0][:6], [image.CLS_ID] + KNOWN_GRAY)
  assert data.pad_id is None and np.sum(black[0] == 0) == 1024 - 4


def test_without_cls(data_dir):
  data = image.load(make_config(data_dir, seq_len=1024, readout="mean"))
  inputs = data.splits["test"][0]["inputs"]
  assert inputs.shape == (1024,) and data.vocab_size == 256
  assert 100 <= inputs[0] < 100 + NUM_TEST and np.all(inputs == inputs[0])


def test_ninety_ten_split_of_train(data_dir):
  data = image.load(make_config(data_dir))
  assert [len(data.splits[s]) for s in SPLITS] == [18, 2, 4]
  train = [int(r["inputs"][-1]) for r in records(data.splits["train"])]
  validation = [int(r["inputs"][-1]) for r in records(data.splits["validation"])]
  test = [int(r["inputs"][-1]) for r in records(data.splits["test"])]
  assert sorted(train + validation) == list(range(NUM_TRAIN))
  assert sorted(test) == list(range(100, 100 + NUM_TEST))


def test_tensor_image_feature(tmp_path, data_dir):
  tfds_fixtures.build_cifar10(str(tmp_path), TRAIN, TEST, tensor_image=True)
  from_tensor = image.load(make_config(str(tmp_path))).splits["train"]
  from_png = image.load(make_config(data_dir)).splits["train"]
  key = lambda rs: sorted((tuple(r["inputs"].tolist()), int(r["targets"])) for r in rs)
  assert key(records(from_tensor)) == key(records(from_png))


def test_wrong_seq_len(data_dir):
  with pytest.raises(ValueError, match="config.seq_len=1024.*1025"):
    image.load(make_config(data_dir, seq_len=1024))


def test_missing_dataset_says_how_to_build(tmp_path):
  with pytest.raises(DataError) as err:
    image.load(make_config(str(tmp_path)))
  message = str(err.value)
  for part in ("`cifar10` prepared in array_record format was not found under", str(tmp_path),
               "tensorflow-cpu", "cifar-10-binary.tar.gz", "tfds.builder('cifar10'",
               "file_format='array_record'", "DownloadConfig(manual_dir=",
               "--config.data_dir="):
    assert part in message
