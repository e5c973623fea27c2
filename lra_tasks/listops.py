"""ListOps: a fixed vocabulary, the official TSV format, an evaluator and the loader.

Data comes either from the LRA release (`lra_release/listops-1000/basic_{train,val,test}.tsv`)
or from the built-in generator `lra_tasks.listops_generator`, which follows the official grammar
and serialization and caches its output under `default_cache_dir()/listops/<settings hash>/`:

  python -m lra_tasks.listops_generator --out DIR [--num_train N ...]

`config.listops.tokens` picks which symbols reach the model, as each published pipeline fed
them (`TOKEN_SETS`: "brackets", "no_brackets", "fairseq"); the token set is recorded in the
provenance, so runs of different token sets are never compared or resumed into each other.

The vocabulary and file layout live in `lra_tasks.listops_format` (the generator imports them
from there; this module imports the generator, never the reverse). Provenance (results.json):
a folder holding the generator's marker `common.GENERATED_MARKER` (and the cache the loader
generates itself) is recorded as generated, any other folder as official; both with each file's
sha256.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from lra_tasks import listops_generator
from lra_tasks.common import DataError, TaskData, data_provenance, truncate_len, uses_cls
from lra_tasks.listops_format import (CLS_ID, DIGITS, END, HEADER, NUM_CLASSES, OPERATORS,
                                      PAD_ID, SPLIT_FILES, VOCAB, VOCAB_SIZE)

log = logging.getLogger(__name__)

_TOKEN_IDS = {tok: i for i, tok in enumerate(VOCAB) if i not in (PAD_ID, CLS_ID)}

_DOWNLOAD_HELP = (
    "Download the LRA release archive lra_release.gz "
    "(https://storage.googleapis.com/long-range-arena/lra_release.gz), extract it, and pass "
    "the folder lra_release/listops-1000/ (holding basic_train.tsv, basic_val.tsv, "
    "basic_test.tsv) as --config.data_dir=/path/to/lra_release/listops-1000; or leave "
    "data_dir empty to use the built-in generator.")


# ------------------------------------------------------------------------------ tokens


# What of a source reaches the model, one value per pipeline that published rows used
# (`config.listops.tokens`). Ids are always this module's (the pipelines' own ids are labels of
# the same symbols: set order in LRA's encoder, frequency order in fairseq's dictionary):
# * "brackets": the LRA pipeline after its fix of 2021-03-04 (google-research/long-range-arena
#   c209b2a): operators `[MAX`... and `]` kept, parentheses dropped; 15 symbols, no EOS.
# * "no_brackets": the LRA pipeline before that fix, whose tfds `Tokenizer()` keeps alphanumeric
#   runs only: `[MAX` reads as MAX, and `]`, `(`, `)` vanish; 14 symbols, no EOS. The
#   Nystromformer and Skyformer code dumped these sequences (2,000 ids + 48 zeros) and trained on
#   them; MAX gets `[MAX`'s id here.
# * "fairseq": Luna's fairseq-apollo `long_range_arena` task: the whitespace tokens of its source
#   files, CLS first, EOS appended by fairseq-preprocess, cut to the first max_positions (2001)
#   tokens. Which files the Luna runs preprocessed is not published; we take the release's
#   symbols with parentheses dropped (the `brackets` symbols), because max_positions 2001 is
#   exactly CLS + the longest such source (1,999 symbols; the generator keeps 500 < L < 2000)
#   + EOS, while the raw text with parentheses is ~3L tokens and would lose most rows' ends.
#   That choice is ours, from this arithmetic, not from their code.
TOKEN_SETS = ("brackets", "no_brackets", "fairseq")
EOS_ID = VOCAB_SIZE          # "fairseq" only: one id after the fixed vocabulary


def _split_tokens(source: str, tokens: str = "brackets") -> list[str]:
  """The symbols of a source that the token set `tokens` keeps (vocabulary spellings)."""
  symbols = source.replace("(", " ").replace(")", " ").split()
  if tokens == "no_brackets":
    return [t for t in symbols if t != END]
  return symbols


def check_token_set(tokens: str) -> str:
  """`tokens` if it names a token set, else DataError naming config.listops.tokens."""
  if tokens not in TOKEN_SETS:
    raise DataError(f"config.listops.tokens={tokens!r}; expected one of {TOKEN_SETS}")
  return tokens


def _unknown_token(tokens: Sequence[str]) -> str:
  """The first token that is not in the vocabulary."""
  return next(t for t in tokens if t not in _TOKEN_IDS)


def vocab_size(tokens: str) -> int:
  """Embedding rows of the token set `tokens`: the fixed vocabulary, plus EOS for "fairseq"."""
  return VOCAB_SIZE + (check_token_set(tokens) == "fairseq")


def append_eos(ids_NxS: np.ndarray, start: int = 1) -> np.ndarray:
  """Rows of ids with EOS written after their last symbol where it fits (in place; `start`: the
  first symbol's column, 1 after CLS). A row already full keeps no EOS (fairseq's truncation
  cuts it)."""
  ends_N = start + np.count_nonzero(ids_NxS[:, start:], axis=1)
  fits = np.flatnonzero(ends_N < ids_NxS.shape[1])
  ids_NxS[fits, ends_N[fits]] = EOS_ID
  return ids_NxS


def tokenize(source: str, seq_len: int, tokens: str = "brackets") -> np.ndarray:
  """Token ids of a source under the token set `tokens`: CLS first, then the kept symbols (and
  EOS for "fairseq"), truncated to `seq_len` and padded with PAD_ID."""
  token_set = check_token_set(tokens)
  tokens = _split_tokens(source, token_set)
  try:
    ids = _encode(tokens, seq_len, np.int32)
    return append_eos(ids[None])[0] if token_set == "fairseq" else ids
  except KeyError:
    raise DataError(f"unknown ListOps token {_unknown_token(tokens)!r} in {source[:80]!r}; "
                    f"expected one of {' '.join(_TOKEN_IDS)} and parentheses") from None


def _encode(tokens: Sequence[str], seq_len: int, dtype: Any) -> np.ndarray:
  """Ids of parenthesis-free tokens, CLS first, fixed length; KeyError on an unknown token."""
  ids = np.zeros(seq_len, dtype)
  if seq_len > 0:
    ids[0] = CLS_ID
    n = min(len(tokens), seq_len - 1)
    ids[1:1 + n] = np.fromiter(map(_TOKEN_IDS.__getitem__, tokens), dtype,
                               count=len(tokens))[:n]
  return ids


# ------------------------------------------------------------------------------ evaluation


def _apply(op: str, args: list[int]) -> int:
  """The value of an operator on its arguments."""
  if op == "[MIN":
    return min(args)
  if op == "[MAX":
    return max(args)
  if op == "[SM":
    return sum(args) % 10
  args = sorted(args)  # [MED: int(np.median(args)); values are non-negative.
  n = len(args)
  return (args[(n - 1) // 2] + args[n // 2]) // 2


def evaluate(source: str) -> int:
  """The answer (0..9) of a source in the official serialization."""
  tokens = source.replace("(", " ( ").replace(")", " ) ").split()
  stack: list[tuple[str, list[int]]] = []
  result = None
  parens = 0
  for i, tok in enumerate(tokens):
    if tok == "(":
      parens += 1
      continue
    if tok == ")":
      parens -= 1
      if parens < 0:
        raise DataError(f"unbalanced ')' at token {i} of {source[:80]!r}")
      continue
    if result is not None:
      raise DataError(f"token {tok!r} after the end of the expression in {source[:80]!r}")
    if tok in OPERATORS:
      stack.append((tok, []))
      continue
    if tok == END:
      if not stack:
        raise DataError(f"']' without an operator at token {i} of {source[:80]!r}")
      op, args = stack.pop()
      if not args:
        raise DataError(f"{op} without arguments at token {i} of {source[:80]!r}")
      value = _apply(op, args)
    elif tok in DIGITS:
      value = int(tok)
    else:
      raise DataError(f"unknown ListOps token {tok!r} in {source[:80]!r}")
    if stack:
      stack[-1][1].append(value)
    else:
      result = value
  if stack or result is None or parens:
    raise DataError(f"incomplete ListOps expression {source[:80]!r}")
  return result


# ------------------------------------------------------------------------------ reading


_CHUNK_BYTES = 1 << 25
# The fast path keeps one byte per token: I, A, E, S stand for [MIN, [MAX, [MED, [SM.
_OP_LETTERS = b"IAES"
_SHORT_TOKENS = _OP_LETTERS + b"]0123456789"
_SHORT_IDS = bytes(_TOKEN_IDS[OPERATORS[_OP_LETTERS.index(b)]] if b in _OP_LETTERS
                   else _TOKEN_IDS[chr(b)] if b in _SHORT_TOKENS else 0 for b in range(256))
_IS_SHORT_TOKEN = bytes(b in _SHORT_TOKENS for b in range(256))
_OPS_PACKED = np.array([int.from_bytes(op.encode(), "little") for op in OPERATORS])
_SM_PACKED = int.from_bytes(b"[SM", "little")


def _parse_line(line: bytes, where: str, seq_len: int, dtype: Any, token_set: str = "brackets"
                ) -> tuple[np.ndarray, int] | None:
  """One data row: (ids, target), or None for a blank line; DataError names `where`."""
  try:
    text = line.decode("utf-8").rstrip("\r\n")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
  if not text.strip():
    return None
  cols = text.split("\t")
  if len(cols) != 2:
    raise DataError(f"{where}: expected 2 tab-separated columns (Source, Target), "
                    f"got {len(cols)}")
  target = cols[1].strip()
  if target not in DIGITS:
    raise DataError(f"{where}: expected a Target integer 0..9, got {target[:20]!r}")
  tokens = _split_tokens(cols[0], token_set)
  try:
    return _encode(tokens, seq_len, dtype), int(target)
  except KeyError:
    raise DataError(f"{where}: unknown token {_unknown_token(tokens)!r}; expected one of "
                    f"{' '.join(_TOKEN_IDS)} and parentheses") from None


def _parse_chunk_fast(data: bytes, seq_len: int, dtype: Any, token_set: str = "brackets"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """Rows of whole lines (`data` ends with a newline), or None unless all are plain and valid.

  Gives the same rows as _parse_line for lines of known tokens separated by spaces and
  parentheses, one tab and a one-digit target; anything else is left to _parse_line.
  """
  raw = np.frombuffer(data, np.uint8)
  after_target = np.flatnonzero(raw == ord("\t")) + 2
  after = [raw[np.minimum(after_target + j, raw.size - 1)] for j in range(2)]
  if not np.all((after[0] == ord("\n")) | ((after[0] == ord("\r")) & (after[1] == ord("\n")))):
    return None  # Targets must be one byte: no parenthesis or space is dropped from them.
  letters = data.translate(None, b" ()]0123456789\t\r\n")
  if letters.translate(None, b"[MINAXEDS"):
    return None  # Other bytes.
  # Each `[` must start an operator, and these must hold all the letters.
  brackets = np.flatnonzero(raw == ord("["))
  packed = np.zeros(brackets.size, np.int64)
  for j in range(4):
    packed |= raw[np.minimum(brackets + j, raw.size - 1)].astype(np.int64) << (8 * j)
  packed[(packed & 0xFFFFFF) == _SM_PACKED] = _SM_PACKED  # "[SM" is one byte shorter.
  if not np.isin(packed, _OPS_PACKED).all() or len(letters) != (
      4 * brackets.size - np.count_nonzero(packed == _SM_PACKED)):
    return None
  data = data.translate(None, b"()[MNXD")
  is_token = np.frombuffer(data.translate(_IS_SHORT_TOKEN), np.bool_)
  if np.any(is_token[1:] & is_token[:-1]):
    return None  # Tokens not separated by a space (e.g. "[MIN[MAX" or "2)9").
  # Now one byte per kept token.
  data = data.translate(None, b" ]" if token_set == "no_brackets" else b" ")
  buf = np.frombuffer(data, np.uint8)
  newlines = np.flatnonzero(buf == ord("\n"))
  tabs = np.flatnonzero(buf == ord("\t"))
  if tabs.size != newlines.size:
    return None
  line_starts = np.concatenate([[0], newlines[:-1] + 1])
  if np.any(tabs < line_starts) or np.any(tabs >= newlines):
    return None  # Some line holds no tab, so another holds two.
  target_len = newlines - tabs - 1
  crlf = target_len == 2
  if not np.all((target_len == 1) | crlf) or data.count(b"\r") != np.count_nonzero(crlf):
    return None
  if np.any(buf[tabs[crlf] + 2] != ord("\r")):
    return None
  targets = buf[tabs + 1].astype(np.int32) - ord("0")
  if np.any((targets < 0) | (targets > 9)):
    return None
  ids = np.frombuffer(data.translate(_SHORT_IDS), np.uint8)
  rows = np.zeros((newlines.size, seq_len), dtype)
  if seq_len > 0:
    rows[:, 0] = CLS_ID
    ends = np.minimum(tabs, line_starts + seq_len - 1).tolist()
    for i, (start, end) in enumerate(zip(line_starts.tolist(), ends)):
      rows[i, 1:1 + end - start] = ids[start:end]
  return rows, targets, tabs - line_starts


def _num_symbols(line: bytes, token_set: str = "brackets") -> int:
  """Kept symbols of the Source column of a line that _parse_line accepted."""
  return len(_split_tokens(line.decode("utf-8").split("\t")[0], token_set))


def read_tsv(path: str, seq_len: int, dtype: Any = np.int32, *, allow_truncation: bool = True,
             tokens: str = "brackets") -> tuple[np.ndarray, np.ndarray]:
  """Reads an official ListOps TSV: (inputs [n, seq_len], targets int32 [n]).

  Row i is CLS then the symbols of line i that the token set `tokens` keeps. Rows with more
  symbols than fit (seq_len - 1) are truncated and counted in one warning naming the file, or,
  with allow_truncation=False, refused (DataError naming the first such line). A file without
  data rows is a DataError.
  """
  check_token_set(tokens)
  if not os.path.isfile(path):
    raise DataError(f"ListOps file {path} not found. {_DOWNLOAD_HELP}")
  inputs, targets, lengths, lines, unbalanced = [], [], [], [], []
  with open(path, "rb") as f:
    raw_header = f.readline()
    if raw_header.startswith(b"\xef\xbb\xbf"):
      raise DataError(f"{path}:1: the file starts with a UTF-8 byte order mark (BOM, bytes "
                      "EF BB BF); save it as plain UTF-8 without a BOM")
    header = raw_header.decode("utf-8", "replace").rstrip("\r\n")
    if header.split("\t") != ["Source", "Target"]:
      raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', got {header[:80]!r}")
    line_no = 2  # Of the first line of the next chunk.
    rest = b""
    while True:
      block = f.read(_CHUNK_BYTES)
      data = rest + block
      if not block:
        if data and not data.endswith(b"\n"):
          data += b"\n"
        rest = b""
      else:
        cut = data.rfind(b"\n") + 1
        data, rest = data[:cut], data[cut:]
      if data:
        fast = _parse_chunk_fast(data, seq_len, dtype, tokens)
        if fast is not None:
          fast = fast + (line_no + np.arange(len(fast[1])),)
        else:  # Unusual or bad lines: parse one by one for exact errors.
          rows, counts, numbers = [], [], []
          for i, line in enumerate(data.split(b"\n")[:-1]):
            row = _parse_line(line, f"{path}:{line_no + i}", seq_len, dtype, tokens)
            if row is not None:
              rows.append(row)
              counts.append(_num_symbols(line, tokens))
              numbers.append(line_no + i)
          fast = (np.stack([r for r, _ in rows]) if rows else np.zeros((0, seq_len), dtype),
                  np.array([t for _, t in rows], np.int32), np.array(counts, np.int64),
                  np.array(numbers, np.int64))
        for out, part in zip((inputs, targets, lengths, lines), fast):
          out.append(part)
        unbalanced.append(line_no + _unbalanced_lines(data))
        line_no += data.count(b"\n")
      if not block:
        break
  if not sum(len(t) for t in targets):
    raise DataError(f"{path}: no data rows after the header; expected lines "
                    "'<source><TAB><target 0..9>'")
  _check_lengths(path, np.concatenate(lengths), np.concatenate(lines), seq_len - 1,
                 allow_truncation)
  _report_unbalanced(path, np.concatenate(unbalanced), sum(len(t) for t in targets))
  return np.concatenate(inputs), np.concatenate(targets).astype(np.int32)


def _unbalanced_lines(data: bytes) -> np.ndarray:
  """Indices of the lines of `data` (whole lines, ending with a newline) whose operators and `]`,
  or whose parentheses, do not pair up."""
  raw = np.frombuffer(data, np.uint8)
  ends = np.flatnonzero(raw == ord("\n"))

  def per_line(char: str) -> np.ndarray:
    line_of = np.searchsorted(ends, np.flatnonzero(raw == ord(char)))
    return np.bincount(line_of, minlength=ends.size)

  return np.flatnonzero((per_line("[") != per_line("]")) | (per_line("(") != per_line(")")))


def _report_unbalanced(path: str, line_numbers: np.ndarray, num_rows: int) -> None:
  """One counted warning for rows whose brackets do not balance (read as they are: such a row
  is not a well-formed expression, so its label may not be its value)."""
  if line_numbers.size:
    log.warning("ListOps: %d of %d rows of %s have brackets that do not balance (first: line "
                "%d): read as they are; their expressions are not well formed, so their labels "
                "may not be their values", line_numbers.size, num_rows, path,
                int(line_numbers[0]))

def _check_lengths(path: str, lengths: np.ndarray, lines: np.ndarray, capacity: int,
                   allow_truncation: bool) -> None:
  """Counts (or, unless allowed, refuses) rows with more than `capacity` symbols."""
  long = np.flatnonzero(lengths > capacity)
  if not long.size:
    return
  first = int(long[0])
  if not allow_truncation:
    raise DataError(f"{path}:{lines[first]}: {lengths[first]} symbols, more than the "
                    f"{capacity} that fit in config.seq_len; config.allow_truncation=false "
                    "refuses truncated rows (raise config.seq_len, or allow truncation)")
  log.warning("ListOps: %d of %d rows of %s have more than the %d symbols that fit in "
              "config.seq_len and were truncated (first: line %d); a truncated expression "
              "may not have its label. --config.allow_truncation=false refuses them",
              long.size, lengths.size, path, capacity, lines[first])


class _Records:
  """Random-access records {"inputs": int32[seq_len], "targets": int32[]} over compact arrays."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray):
    self._inputs = inputs
    self._targets = targets

  def __len__(self) -> int:
    return len(self._targets)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"inputs": self._inputs[index].astype(np.int32),
            "targets": np.asarray(self._targets[index], np.int32)}


def _settings(config: Any) -> listops_generator.GeneratorSettings:
  """The generator settings of `config.listops`; DataError naming the field if out of range."""
  c = config.listops
  for name in ("num_train", "num_val", "num_test"):
    if not config.data_dir and int(c[name]) < 1:
      raise DataError(f"config.listops.{name}={c[name]} must be >= 1: every split needs rows")
  try:
    return listops_generator.GeneratorSettings(
        num_train=int(c.num_train), num_val=int(c.num_val), num_test=int(c.num_test),
        min_length=int(c.min_length), max_length=int(c.max_length),
        max_depth=int(c.max_depth), max_args=int(c.max_args), seed=int(c.seed))
  except ValueError as e:
    raise DataError(f"config.listops.{e}") from None


def token_set(config: Any) -> str:
  """`config.listops.tokens` (default "brackets"), checked."""
  return check_token_set(str((config.get("listops") or {}).get("tokens", "brackets")))


def load(config: Any, splits: Sequence[str] = tuple(SPLIT_FILES)) -> TaskData:
  """ListOps `splits` (default: all three) from config.data_dir, or from the generator when
  data_dir is empty; a folder needs only the files of the splits asked for. Rows start with CLS
  when the model reads it out (`uses_cls`), else with the first symbol."""
  settings = _settings(config)
  data_dir = config.data_dir or listops_generator.cached_data_dir(settings)
  if not os.path.isdir(data_dir):
    raise DataError(f"ListOps data folder {data_dir} not found. {_DOWNLOAD_HELP}")
  cls = uses_cls(config)
  tokens = token_set(config)
  # The reader writes CLS first; without CLS read one column more and drop it. At most
  # truncate_len symbols are kept, then zeros up to seq_len.
  width = min(truncate_len(config) or config.seq_len, config.seq_len - cls) + 1
  files = {split: SPLIT_FILES[split] for split in splits}
  splits = {}
  for split, name in files.items():
    inputs, targets = read_tsv(os.path.join(data_dir, name), width, np.uint8,
                               allow_truncation=bool(config.get("allow_truncation", True)),
                               tokens=tokens)
    if not cls:
      inputs = inputs[:, 1:]
    padded = np.zeros((len(inputs), config.seq_len), np.uint8)
    padded[:, :inputs.shape[1]] = inputs
    if tokens == "fairseq":
      append_eos(padded, start=int(cls))
    splits[split] = grain.MapDataset.source(_Records(padded, targets))
  # Generated (the marker, or the cache this loader generated) or official; files hashed.
  provenance = data_provenance(
      data_dir, [os.path.join(data_dir, n) for n in files.values()],
      generated=None if config.data_dir else listops_generator.generated_provenance(settings))
  provenance["tokens"] = tokens     # the token set is part of the data
  return TaskData(name="listops", splits=splits, vocab_size=vocab_size(tokens),
                  num_classes=NUM_CLASSES, seq_len=config.seq_len, pad_id=PAD_ID,
                  provenance=provenance,
                  sources={s: os.path.join(data_dir, n) for s, n in files.items()})


if __name__ == "__main__":
  raise SystemExit("the ListOps generator moved: python -m lra_tasks.listops_generator --out DIR "
                   "[--num_train N ...]")
