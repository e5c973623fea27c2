"""ListOps token sets (`config.listops.tokens`): what each published pipeline fed its model.

The rows are `tests/fixtures/listops_rows.tsv` (the official serialization: parentheses around
every argument pair, `[MAX ... ]` operators); the expected ids below are derived by hand from
each row and the fixed vocabulary ("<pad>" 0, "[MIN" 1, "[MAX" 2, "[MED" 3, "[SM" 4, "]" 5,
digits 6..15, "<cls>" 16, EOS 17 for "fairseq").
"""
from __future__ import annotations

import os
import shutil

import ml_collections
import numpy as np
import pytest

from configs import listops as listops_config
from lra_tasks import listops
from lra_tasks.common import DataError
from luna_jax import resume_rules

FIXTURE = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "listops_rows.tsv")

# Row 1: ( ( ( [MAX 2 ) 9 ) ] )                      = [MAX 2 9 ]
# Row 2: ... = [SM 2 5 [SM 6 7 [MIN 9 4 2 ] ] ]
# Row 3: ... = [MIN 0 0 [MED 6 [MIN 4 3 ] 2 ] 6 ]
BRACKETS = [[2, 8, 15, 5],
            [4, 8, 11, 4, 12, 13, 1, 15, 10, 8, 5, 5, 5],
            [1, 6, 6, 3, 12, 1, 10, 9, 5, 8, 5, 12, 5]]
NO_BRACKETS = [[2, 8, 15],                                 # MAX 2 9
               [4, 8, 11, 4, 12, 13, 1, 15, 10, 8],        # SM 2 5 SM 6 7 MIN 9 4 2
               [1, 6, 6, 3, 12, 1, 10, 9, 8, 12]]          # MIN 0 0 MED 6 MIN 4 3 2 6
TARGETS = [9, 2, 0]


def padded(rows: list[list[int]], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int64)
  for i, r in enumerate(rows):
    out[i, :min(len(r), length)] = r[:length]
  return out


def config_for(data_dir: str, tokens: str, seq_len: int, readout: str = "cls",
               truncate_len: int = 0) -> ml_collections.ConfigDict:
  c = listops_config.get_config("quick")
  c.data_dir, c.seq_len, c.truncate_len = data_dir, seq_len, truncate_len
  c.model.readout = readout
  c.listops.tokens = tokens
  return c


@pytest.fixture(name="release")
def fixture_release(tmp_path) -> str:
  """A folder in the release layout whose three splits are the fixture rows."""
  for name in listops.SPLIT_FILES.values():
    shutil.copy(FIXTURE, tmp_path / name)
  return str(tmp_path)


def inputs_of(data) -> np.ndarray:
  test = data.splits["test"]
  return np.stack([test[i]["inputs"] for i in range(len(test))])


@pytest.mark.parametrize("tokens, seq_len, readout, expected", [
    # The fixed LRA pipeline: `]` kept, CLS first when read out.
    ("brackets", 16, "cls", padded([[16] + r for r in BRACKETS], 16)),
    ("brackets", 16, "mean", padded(BRACKETS, 16)),
    # Before the fix: alphanumeric runs only; MAX keeps `[MAX`'s id.
    ("no_brackets", 12, "mean_padded", padded(NO_BRACKETS, 12)),
    # fairseq: CLS, the symbols, EOS.
    ("fairseq", 16, "cls", padded([[16] + r + [17] for r in BRACKETS], 16)),
])
def test_each_token_set_reads_a_known_row_as_its_pipeline(release, tokens, seq_len, readout,
                                                         expected):
  data = listops.load(config_for(release, tokens, seq_len, readout))
  np.testing.assert_array_equal(inputs_of(data), expected)
  np.testing.assert_array_equal([data.splits["test"][i]["targets"] for i in range(3)], TARGETS)
  assert data.provenance["tokens"] == tokens
  assert data.vocab_size == (18 if tokens == "fairseq" else 17)


def test_truncation_per_token_set(release):
  # The small protocol's form: at most truncate_len symbols, then zeros to seq_len.
  data = listops.load(config_for(release, "no_brackets", 12, "mean_padded", truncate_len=6))
  np.testing.assert_array_equal(inputs_of(data), padded([r[:6] for r in NO_BRACKETS], 12))
  # fairseq cuts [CLS, symbols, EOS] to seq_len: a long row loses its EOS and its last symbols.
  data = listops.load(config_for(release, "fairseq", 8, "cls"))
  np.testing.assert_array_equal(inputs_of(data), [[16, 2, 8, 15, 5, 17, 0, 0],
                                                  [16, 4, 8, 11, 4, 12, 13, 1],
                                                  [16, 1, 6, 6, 3, 12, 1, 10]])
  # brackets without CLS: the first seq_len symbols.
  data = listops.load(config_for(release, "brackets", 5, "mean"))
  np.testing.assert_array_equal(inputs_of(data), padded(BRACKETS, 5))


def test_tokenize_agrees_with_the_reader():
  sources = [line.split("\t")[0] for line in open(FIXTURE).read().splitlines()[1:]]
  for tokens in listops.TOKEN_SETS:
    got = [listops.tokenize(s, 16, tokens) for s in sources]
    rows = BRACKETS if tokens != "no_brackets" else NO_BRACKETS
    eos = [17] if tokens == "fairseq" else []
    np.testing.assert_array_equal(got, padded([[16] + r + eos for r in rows], 16))


def test_unknown_token_set_names_the_field(release):
  with pytest.raises(DataError, match=r"config.listops.tokens='curly'.*brackets"):
    listops.load(config_for(release, "curly", 16))


@pytest.mark.parametrize("arg, tokens", [
    ("softmax,small", "no_brackets"), ("luna,small,l=16", "no_brackets"),
    ("performer,skyformer", "no_brackets"), ("softmax", "no_brackets"),
    ("luna,l=256", "fairseq"), ("quick", "brackets"), ("softmax,quick", "brackets")])
def test_each_protocol_reads_the_tokens_of_its_published_rows(arg, tokens):
  c = listops_config.get_config(arg)
  assert c.listops.tokens == tokens
  if "small" in arg or "skyformer" in arg:
    # 2,000 symbols + 48 zeros, as the Nystromformer/Skyformer pickles held them.
    assert (c.seq_len, c.truncate_len, c.model.readout) == (2048, 2000, "mean_padded")


def test_a_resume_with_another_token_set_is_refused(tmp_path):
  c = listops_config.get_config("quick")
  stored = resume_rules.config_dict(c)
  c.listops.tokens = "no_brackets"
  changes = resume_rules.config_changes(stored, c)
  assert [(ch.field, ch.old, ch.new, ch.kind) for ch in changes] == [
      ("listops.tokens", "brackets", "no_brackets", resume_rules.MODEL_DATA)]


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_rows_whose_brackets_do_not_balance_are_counted(tmp_path, monkeypatch, caplog,
                                                        chunk_bytes):
  monkeypatch.setattr(listops, "_CHUNK_BYTES", chunk_bytes)
  rows = open(FIXTURE).read().splitlines()
  rows[2] = rows[2].replace("] ) ) ] )", ") ) ] )", 1)         # a `]` removed from row 2
  rows[3] = rows[3].replace("( ( ( ( (", "( ( ( (", 1)         # a `(` removed from row 3
  path = tmp_path / "basic_test.tsv"
  path.write_text("\n".join(rows) + "\n")
  with caplog.at_level("WARNING", logger="lra_tasks.listops"):
    inputs, _ = listops.read_tsv(str(path), 16)
  assert len(inputs) == 3
  warnings = [r.getMessage() for r in caplog.records if "do not balance" in r.getMessage()]
  assert len(warnings) == 1
  assert f"2 of 3 rows of {path} have brackets that do not balance (first: line 3)" in warnings[0]
  caplog.clear()
  with caplog.at_level("WARNING", logger="lra_tasks.listops"):
    listops.read_tsv(FIXTURE, 16)
  assert not any("do not balance" in r.getMessage() for r in caplog.records)
