"""Tests for lra_tasks.retrieval on tiny AAN-style TSV files the test writes."""
from __future__ import annotations

import os
import re

import ml_collections
import numpy as np
import pytest

from lra_tasks import retrieval
from lra_tasks.common import SPLITS, DataError

ROWS = {
    "train": ["1.0\tp1\tp2\tab\tc", "0\tp3\tp4\t\u00e9\t" + "x" * 20, "0.0\tp5\tp6\t\tz",
              "1\tp7\tp8\tq\tr"],
    "validation": ["1.0\ta\tb\tfoo\tbar", "0\tc\td\tbaz\tqux"],
    "test": ["0.0\te\tf\thello\tworld"],
}


def write_release(folder: str, rows=ROWS, line_end: str = "\n") -> str:
  os.makedirs(folder, exist_ok=True)
  for split, name in retrieval.FILES.items():
    with open(os.path.join(folder, name), "w", encoding="utf-8", newline="") as f:
      f.write("".join(row + line_end for row in rows[split]))
  return folder


def make_config(data_dir: str, seq_len: int = 8, readout: str = "cls",
                **extra) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"data_dir": data_dir, "seq_len": seq_len, "model": {"readout": readout}, **extra})


def test_tokens_labels_and_layout(tmp_path):
  data = retrieval.load(make_config(write_release(str(tmp_path))))
  train = data.splits["train"]
  records = [train[i] for i in range(len(train))]
  for r in records:
    assert r["inputs"].shape == (2, 8) and r["inputs"].dtype == np.int32
    assert r["targets"].shape == () and r["targets"].dtype == np.int32
  assert [int(r["targets"]) for r in records] == [1, 0, 0, 1]
  np.testing.assert_array_equal(records[0]["inputs"], [[257, 98, 99, 258, 0, 0, 0, 0],
                                                       [257, 100, 258, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(records[1]["inputs"], [[257, 0xC4, 0xAA, 258, 0, 0, 0, 0],
                                                       [257] + [121] * 6 + [258]])
  np.testing.assert_array_equal(records[2]["inputs"][0], [257, 258, 0, 0, 0, 0, 0, 0])
  assert (data.name, data.vocab_size, data.num_classes, data.seq_len, data.pad_id,
          data.num_docs) == ("retrieval", 259, 2, 8, 0, 2)
  assert [len(data.splits[s]) for s in SPLITS] == [4, 2, 1]


def test_without_cls_and_crlf(tmp_path):
  data = retrieval.load(make_config(write_release(str(tmp_path), line_end="\r\n"), seq_len=4,
                                    readout="mean"))
  record = data.splits["train"][1]
  np.testing.assert_array_equal(record["inputs"], [[0xC4, 0xAA, 0, 0], [121] * 4])
  np.testing.assert_array_equal(data.splits["test"][0]["inputs"],
                                [[105, 102, 109, 109], [120, 112, 115, 109]])
  assert data.vocab_size == 257


def test_nested_release_folder_and_blank_lines(tmp_path):
  rows = dict(ROWS, test=ROWS["test"] + ["", ""])
  write_release(str(tmp_path / "lra_release" / "tsv_data"), rows)
  data = retrieval.load(make_config(str(tmp_path)))
  assert len(data.splits["test"]) == 1


@pytest.mark.parametrize("bad_row, expected", [
    ("1.0\tp1\tp2\tonly four", "expected 5 tab-separated fields .*found 4"),
    ("1.0\tp1\tp2\ta\tb\tc", "expected 5 tab-separated fields .*found 6"),
    ("yes\tp1\tp2\ta\tb", "label 'yes' is not 0 or 1"),
    ("2.0\tp1\tp2\ta\tb", "label '2.0' is not 0 or 1"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, expected):
  rows = dict(ROWS, validation=[ROWS["validation"][0], bad_row])
  write_release(str(tmp_path), rows)
  path = os.path.join(str(tmp_path), "new_aan_pairs.eval.tsv")
  with pytest.raises(DataError, match=f"{re.escape(path)}, line 2: {expected}"):
    retrieval.load(make_config(str(tmp_path)))


def test_missing_files_say_what_to_download(tmp_path):
  with open(tmp_path / "new_aan_pairs.train.tsv", "w") as f:
    f.write(ROWS["train"][0] + "\n")
  with pytest.raises(DataError) as err:
    retrieval.load(make_config(str(tmp_path)))
  message = str(err.value)
  assert "new_aan_pairs.eval.tsv, new_aan_pairs.test.tsv (expected" in message
  for part in ("lra_release.gz", retrieval.RELEASE_URL, "lra_release/tsv_data/",
               "--config.data_dir", str(tmp_path)):
    assert part in message


def test_empty_file_is_an_error(tmp_path):
  write_release(str(tmp_path), dict(ROWS, test=[]))
  with pytest.raises(DataError, match="new_aan_pairs.test.tsv holds no rows"):
    retrieval.load(make_config(str(tmp_path)))
