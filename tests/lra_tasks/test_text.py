"""Tests for lra_tasks.text on a tiny imdb_reviews build made without TensorFlow."""
from __future__ import annotations

import sys

import ml_collections
import numpy as np
import pytest

from lra_tasks import text
from lra_tasks.common import SPLITS, DataError

try:
  from tests.lra_tasks import tfds_fixtures
except ImportError:
  import tfds_fixtures

TRAIN = [("ab", 1), ("\u00e9", 0), ("x" * 20, 1), ("", 0)]
TEST = [("hi", 0), ("yo!", 1), ("z" * 30, 0)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("tfds"))
  tfds_fixtures.build_imdb(path, TRAIN, TEST)
  return path


def make_config(data_dir: str, seq_len: int = 12, readout: str = "cls",
                **extra) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"data_dir": data_dir, "seq_len": seq_len, "model": {"readout": readout}, **extra})


def contents(split) -> list[tuple[tuple[int, ...], int]]:
  """The split's (inputs, target) pairs in sorted order (TFDS shuffles records at build time)."""
  out = []
  for i in range(len(split)):
    record = split[i]
    assert record["inputs"].dtype == np.int32 and record["targets"].dtype == np.int32
    assert record["targets"].shape == ()
    out.append((tuple(record["inputs"].tolist()), int(record["targets"])))
  return sorted(out)


def pad(ids: list[int], seq_len: int = 12) -> tuple[int, ...]:
  return tuple(ids + [0] * (seq_len - len(ids)))


def test_cls_eos_bytes_truncation_and_padding(data_dir):
  data = text.load(make_config(data_dir))
  assert contents(data.splits["train"]) == sorted([
      (pad([257, 98, 99, 258]), 1),                 # "ab": byte + 1
      (pad([257, 0xC3 + 1, 0xA9 + 1, 258]), 0),     # "é" is two UTF-8 bytes
      (tuple([257] + [ord("x") + 1] * 10 + [258]), 1),  # truncated to 12 - CLS - EOS bytes
      (pad([257, 258]), 0),                         # empty review
  ])
  assert "tensorflow" not in sys.modules


def test_task_data_and_splits(data_dir):
  data = text.load(make_config(data_dir))
  assert set(data.splits) == set(SPLITS)
  assert [len(data.splits[s]) for s in SPLITS] == [4, 3, 3]
  assert contents(data.splits["validation"]) == contents(data.splits["test"])
  assert contents(data.splits["test"]) == sorted([
      (pad([257, 105, 106, 258]), 0), (pad([257, 122, 112, 34, 258]), 1),
      (tuple([257] + [123] * 10 + [258]), 0)])
  assert (data.name, data.vocab_size, data.num_classes, data.seq_len, data.pad_id,
          data.num_docs) == ("text", 259, 2, 12, 0, 1)


def test_without_cls_only_bytes(data_dir):
  data = text.load(make_config(data_dir, seq_len=4, readout="mean"))
  assert contents(data.splits["train"]) == sorted([
      ((98, 99, 0, 0), 1), ((0xC4, 0xAA, 0, 0), 0), ((121,) * 4, 1), ((0, 0, 0, 0), 0)])
  assert data.vocab_size == 257


def test_cls_without_eos(data_dir):
  data = text.load(make_config(data_dir, seq_len=4, append_eos=False))
  assert ((257, 121, 121, 121), 1) in contents(data.splits["train"])
  assert data.vocab_size == 259


def test_data_dir_may_be_the_version_folder(data_dir):
  data = text.load(make_config(f"{data_dir}/imdb_reviews/plain_text/1.0.0"))
  assert len(data.splits["train"]) == 4


def test_seq_len_too_short():
  with pytest.raises(ValueError, match="seq_len=2"):
    text.load(make_config("/nonexistent", seq_len=2))


def test_missing_dataset_says_how_to_build(tmp_path):
  with pytest.raises(DataError) as err:
    text.load(make_config(str(tmp_path)))
  message = str(err.value)
  for part in ("`imdb_reviews` prepared in array_record format was not found under",
               str(tmp_path), "tensorflow-cpu", "aclImdb_v1.tar.gz",
               "tfds.builder('imdb_reviews/plain_text'", "file_format='array_record'",
               "DownloadConfig(manual_dir=", "--config.data_dir="):
    assert part in message


def test_tfrecord_build_asks_for_array_record(tmp_path):
  version_dir = tfds_fixtures.build_imdb(str(tmp_path), [("a", 0)], [("b", 1)])
  tfds_fixtures.set_file_format(version_dir, "tfrecord")
  with pytest.raises(DataError, match="prepared as tfrecord.*needs file_format='array_record'"):
    text.load(make_config(str(tmp_path)))
