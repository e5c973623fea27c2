"""Tests of the ListOps task: vocabulary, evaluator, reader, load() (generator tests:
test_listops_generator.py)."""
from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from lra_tasks import common, listops, listops_generator
from lra_tasks.common import DataError

SMALL = listops_generator.GeneratorSettings(num_train=150, num_val=25, num_test=25,
                                            min_length=20, max_length=100, max_depth=10,
                                            max_args=10, seed=3)


def make_config(data_dir: str = "", seq_len: int = 64,
                settings: listops_generator.GeneratorSettings = SMALL
                ) -> ml_collections.ConfigDict:
  """A config with the fields listops.load reads."""
  config = ml_collections.ConfigDict()
  config.data_dir = data_dir
  config.seq_len = seq_len
  config.listops = ml_collections.ConfigDict(
      {f: getattr(settings, f) for f in ("num_train", "num_val", "num_test", "min_length",
                                         "max_length", "max_depth", "max_args", "seed")})
  return config


def write(path, text: str) -> str:
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  return str(path)


# ------------------------------------------------------------------------------ vocabulary


def test_vocabulary_is_a_fixed_ordered_tuple():
  assert listops.VOCAB == ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", "0", "1", "2", "3",
                           "4", "5", "6", "7", "8", "9", "<cls>")
  assert (listops.PAD_ID, listops.CLS_ID, listops.VOCAB_SIZE, listops.NUM_CLASSES) == (
      0, 16, 17, 10)


def test_tokenize_drops_parentheses_prepends_cls_and_pads():
  ids = listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )", 8)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [16, 2, 8, 15, 5, 0, 0, 0])
  np.testing.assert_array_equal(listops.tokenize("( ( ( [MAX 2 ) 9 ) ] )", 3), [16, 2, 8])
  np.testing.assert_array_equal(listops.tokenize("[SM 0 [MIN 1 ] ]", 7), [16, 4, 6, 1, 7, 5, 5])


def test_tokenize_rejects_unknown_tokens():
  with pytest.raises(DataError, match=r"\[FOO"):
    listops.tokenize("( [MAX 2 [FOO 1 ] ] )", 16)


# ------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("source, answer", [
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),
    ("[MIN 3 1 4 ]", 1),
    ("[MED 9 0 7 ]", 7),
    ("[MED 1 2 3 4 ]", 2),          # Even count: (2 + 3) / 2 = 2.5 truncates to 2.
    ("[MED 3 8 ]", 5),
    ("[SM 9 8 7 ]", 4),             # 24 mod 10.
    ("[SM [MAX 1 [MED 2 6 ] 3 ] [MIN 9 8 ] 0 ]", 2),  # 4 + 8 + 0 = 12.
    ("7", 7),
])
def test_evaluate_hand_checked(source, answer):
  assert listops.evaluate(source) == answer


def test_evaluate_median_matches_numpy():
  rng = np.random.default_rng(0)
  for _ in range(200):
    args = rng.integers(0, 10, size=rng.integers(2, 11)).tolist()
    assert listops.evaluate(f"[MED {' '.join(map(str, args))} ]") == int(np.median(args))


def test_evaluate_deep_nesting_needs_no_recursion():
  assert listops.evaluate("[MAX 3 " * 5000 + "1" + " ]" * 5000) == 3


@pytest.mark.parametrize("source", [
    "[MAX 2 9", "[MAX ]", "2 3", "]", "( [MAX 2 9 ]", "[MAX 2 9 ] )", "[FOO 1 ]", ""])
def test_evaluate_rejects_malformed(source):
  with pytest.raises(DataError):
    listops.evaluate(source)


# ------------------------------------------------------------------------------ reader


@pytest.fixture(scope="module")
def small_set() -> list[tuple[str, int]]:
  """Generated examples: realistic input for the reader."""
  return list(listops_generator.generate(SMALL))



OFFICIAL = ("Source\tTarget\n"
            "( ( ( [MAX 2 ) 9 ) ] )\t9\n"
            "( ( ( ( [SM 1 ) 2 ) 7 ) ] )\t0\n"
            "( ( ( [MED 3 ) 8 ) ] )\t5\n")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_read_tsv_official_format(tmp_path, newline):
  path = write(tmp_path / "basic_test.tsv", OFFICIAL.replace("\n", newline))
  inputs, targets = listops.read_tsv(path, 6)
  np.testing.assert_array_equal(targets, [9, 0, 5])
  np.testing.assert_array_equal(inputs, [[16, 2, 8, 15, 5, 0],
                                         [16, 4, 7, 8, 13, 5],
                                         [16, 3, 9, 14, 5, 0]])


def test_read_tsv_same_rows_for_any_chunking_and_odd_spacing(tmp_path, monkeypatch, small_set):
  text = "Source\tTarget\n" + "".join(f"{s}\t{t}\n" for s, t in small_set[:30])
  odd = text + "(([MAX  2)9 )] )\t9\r\n\n"  # Unusual spacing, CRLF and a blank line.
  path = write(tmp_path / "a.tsv", odd)
  whole = listops.read_tsv(path, 80, np.uint8)
  monkeypatch.setattr(listops, "_CHUNK_BYTES", 97)
  chunked = listops.read_tsv(path, 80, np.uint8)
  for a, b in zip(whole, chunked):
    np.testing.assert_array_equal(a, b)
  assert whole[0].shape == (31, 80) and whole[0].dtype == np.uint8
  np.testing.assert_array_equal(whole[0][-1, :6], [16, 2, 8, 15, 5, 0])
  np.testing.assert_array_equal(whole[0][:30], [listops.tokenize(s, 80) for s, _ in small_set[:30]])


@pytest.mark.parametrize("tokens", ["brackets", "no_brackets"])
def test_fast_reader_agrees_with_the_line_parser(small_set, tokens):
  body = "".join(f"{s}\t{t}\n" for s, t in small_set[:20]).encode()
  fast = listops._parse_chunk_fast(body, 80, np.int32, tokens)
  assert fast is not None  # Plain official lines take the vectorized path.
  np.testing.assert_array_equal(fast[0],
                                [listops.tokenize(s, 80, tokens) for s, _ in small_set[:20]])
  np.testing.assert_array_equal(fast[2], [len(listops._split_tokens(s, tokens))
                                          for s, _ in small_set[:20]])
  # Randomly damaged lines: whatever the fast path accepts, the line parser reads the same way.
  rng = np.random.default_rng(0)
  alphabet = b" ()[]MINAXEDS0123456789\t\r\nx"
  accepted = 0
  for _ in range(400):
    line = bytearray(body.split(b"\n")[rng.integers(20)])
    for _ in range(2):
      line.insert(rng.integers(len(line) + 1), alphabet[rng.integers(len(alphabet))])
      del line[rng.integers(len(line))]
    fast = listops._parse_chunk_fast(bytes(line) + b"\n", 80, np.int32, tokens)
    if fast is not None:
      accepted += 1
      rows = [listops._parse_line(part, "x", 80, np.int32, tokens)
              for part in bytes(line).split(b"\n")]
      rows = [r for r in rows if r is not None]
      np.testing.assert_array_equal(fast[0], [r for r, _ in rows])
      np.testing.assert_array_equal(fast[1], [t for _, t in rows])
  assert accepted > 20


@pytest.mark.parametrize("text, expected", [
    ("[MAX 2 9 ]\t9\n", ":1: expected the header 'Source<TAB>Target'"),
    (OFFICIAL + "[MAX 1 2 ]\t2\textra\n", ":5: expected 2 tab-separated columns"),
    (OFFICIAL + "[MAX 1 2 ]\n", ":5: expected 2 tab-separated columns"),
    (OFFICIAL + "[MAX 1 2 ]\tx\n", ":5: expected a Target integer 0..9"),
    (OFFICIAL + "[MAX 1 2 ]\t12\n", ":5: expected a Target integer 0..9"),
    (OFFICIAL + "[MAX 1 [FOO 2 ] ]\t2\n", ":5: unknown token '[FOO'"),
    (OFFICIAL + "[MAX 1 [MIN2 ] ]\t2\n", ":5: unknown token '[MIN2'"),
])
@pytest.mark.parametrize("chunk_bytes", [97, 1 << 20])
def test_read_tsv_errors_name_file_and_line(tmp_path, monkeypatch, text, expected, chunk_bytes):
  monkeypatch.setattr(listops, "_CHUNK_BYTES", chunk_bytes)
  path = write(tmp_path / "bad.tsv", text)
  with pytest.raises(DataError) as error:
    listops.read_tsv(path, 16)
  assert f"{path}{expected}" in str(error.value)


def test_missing_data_says_what_to_download(tmp_path):
  with pytest.raises(DataError) as error:
    listops.load(make_config(data_dir=str(tmp_path / "nowhere")))
  for words in ("lra_release.gz", "lra_release/listops-1000", "basic_train.tsv",
                "--config.data_dir", str(tmp_path / "nowhere")):
    assert words in str(error.value)
  with pytest.raises(DataError, match="listops-1000"):
    listops.read_tsv(str(tmp_path / "basic_train.tsv"), 16)


# ------------------------------------------------------------------------------ load


def test_load_generates_once_into_the_cache(tmp_path, monkeypatch, small_set):
  monkeypatch.setenv("LUNA_JAX_CACHE", str(tmp_path))
  data = listops.load(make_config())
  folder = tmp_path / "listops" / SMALL.short_hash()
  assert sorted(os.listdir(folder)) == sorted([*listops.SPLIT_FILES.values(),
                                               common.GENERATED_MARKER])
  assert os.listdir(tmp_path / "listops") == [SMALL.short_hash()]  # No temporary folders left.
  assert (data.name, data.vocab_size, data.num_classes, data.seq_len, data.pad_id) == (
      "listops", 17, 10, 64, 0)
  assert {k: len(v) for k, v in data.splits.items()} == {"train": 150, "validation": 25,
                                                         "test": 25}
  record = data.splits["validation"][3]
  assert record["inputs"].dtype == np.int32 and record["inputs"].shape == (64,)
  assert record["targets"].dtype == np.int32 and record["targets"].shape == ()
  np.testing.assert_array_equal(record["inputs"], listops.tokenize(small_set[153][0], 64))
  assert int(record["targets"]) == small_set[153][1]

  def no_generation(*args):
    raise AssertionError("regenerated")
  monkeypatch.setattr(listops_generator, "generate_files", no_generation)
  again = listops.load(make_config())
  np.testing.assert_array_equal(again.splits["train"][0]["inputs"],
                                data.splits["train"][0]["inputs"])
  from_dir = listops.load(make_config(data_dir=str(folder)))
  assert int(from_dir.splits["test"][-1]["targets"]) == small_set[-1][1]
