"""ListOps: a fixed vocabulary, the official TSV format, an evaluator and a fast generator.

Data comes either from the LRA release (`lra_release/listops-1000/basic_{train,val,test}.tsv`)
or from the built-in generator, which follows the official grammar and serialization and caches
its output under `default_cache_dir()/listops/<settings hash>/`.

  python -m lra_tasks.listops generate --out DIR [--num_train N ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from lra_tasks.common import (DataError, TaskData, default_cache_dir, official_provenance,
                              uses_cls)

log = logging.getLogger(__name__)

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
# Fixed order: token ids never depend on the process (unlike a vocabulary built from a set).
VOCAB: tuple[str, ...] = ("<pad>",) + OPERATORS + (END,) + DIGITS + ("<cls>",)
PAD_ID = 0
CLS_ID = VOCAB.index("<cls>")
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10

SPLIT_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv",
               "test": "basic_test.tsv"}
HEADER = "Source\tTarget"

_TOKEN_IDS = {tok: i for i, tok in enumerate(VOCAB) if i not in (PAD_ID, CLS_ID)}
_OP_ID0 = VOCAB.index(OPERATORS[0])
_END_ID = VOCAB.index(END)
_DIGIT_ID0 = VOCAB.index("0")
_OPEN_ID, _CLOSE_ID = VOCAB_SIZE, VOCAB_SIZE + 1  # Parentheses: serialization only.
_OP_PROB = 0.25        # A node shallower than max_depth is an operator with this probability.
_TREES_PER_BATCH = 4096
_MAX_BARREN_BATCHES = 200  # Give up after this many batches without a new tree.
_GENERATOR_VERSION = 1  # Bump when the generated data would change; part of the cache key.

_DOWNLOAD_HELP = (
    "Download the LRA release archive lra_release.gz "
    "(https://storage.googleapis.com/long-range-arena/lra_release.gz), extract it, and pass "
    "the folder lra_release/listops-1000/ (holding basic_train.tsv, basic_val.tsv, "
    "basic_test.tsv) as --config.data_dir=/path/to/lra_release/listops-1000; or leave "
    "data_dir empty to use the built-in generator.")


@dataclasses.dataclass(frozen=True)
class GeneratorSettings:
  """Settings of the built-in generator (defaults: the official LRA ListOps set)."""
  num_train: int = 96_000
  num_val: int = 2_000
  num_test: int = 2_000
  min_length: int = 500      # Kept: min_length < length < max_length.
  max_length: int = 2_000
  max_depth: int = 10
  max_args: int = 10
  seed: int = 0

  def __post_init__(self):
    for name in ("num_train", "num_val", "num_test"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
    if self.max_depth < 1:
      raise ValueError(f"max_depth={self.max_depth} must be >= 1")
    if self.max_args < 2:
      raise ValueError(f"max_args={self.max_args} must be >= 2")
    if self.min_length >= self.max_length - 1:
      raise ValueError(f"min_length={self.min_length} must be < max_length - 1 = "
                       f"{self.max_length - 1}")

  def short_hash(self) -> str:
    """A short stable hash of these settings and the generator version."""
    key = json.dumps({"version": _GENERATOR_VERSION, **dataclasses.asdict(self)},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ tokens


def _split_tokens(source: str) -> list[str]:
  """Whitespace tokens of a source with parentheses dropped."""
  return source.replace("(", " ").replace(")", " ").split()


def _unknown_token(tokens: Sequence[str]) -> str:
  """The first token that is not in the vocabulary."""
  return next(t for t in tokens if t not in _TOKEN_IDS)


def tokenize(source: str, seq_len: int) -> np.ndarray:
  """Token ids of a source: CLS first, truncated to `seq_len` and padded with PAD_ID."""
  tokens = _split_tokens(source)
  try:
    return _encode(tokens, seq_len, np.int32)
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


# ------------------------------------------------------------------------------ generation
#
# A batch of trees is stored level by level (breadth first): level d holds arrays `sym` (operator
# index 0..3 or digit 0..9) and `nch` (number of children, 0 for a leaf), and the children of the
# operators of level d, in order, are the nodes of level d + 1, in order. All work is vectorized
# over a level of many trees at once.

_Levels = list[tuple[np.ndarray, np.ndarray]]


def _grow(rng: np.random.Generator, num_trees: int, s: GeneratorSettings
          ) -> tuple[_Levels, np.ndarray]:
  """Random trees (official grammar) and a mask of those with min_length < length < max_length.

  A tree is dropped as soon as its length can no longer stay below max_length, so rejected
  large trees cost little.
  """
  tree = np.arange(num_trees)
  length = np.zeros(num_trees, np.int64)
  alive = np.ones(num_trees, bool)
  levels = []
  for depth in range(1, s.max_depth + 1):
    n = tree.size
    if n == 0:
      break
    if depth < s.max_depth:
      is_op = rng.random(n) < _OP_PROB
    else:
      is_op = np.zeros(n, bool)
    nch = np.where(is_op, rng.integers(2, s.max_args + 1, size=n), 0)
    sym = np.where(is_op, rng.integers(0, len(OPERATORS), size=n), rng.integers(0, 10, size=n))
    levels.append((tree, sym, nch))
    length += np.bincount(tree, weights=1 + is_op, minlength=num_trees).astype(np.int64)
    pending = np.bincount(tree, weights=nch, minlength=num_trees).astype(np.int64)
    alive &= length + pending < s.max_length  # Each pending child adds at least 1.
    grow = alive[tree]
    tree = np.repeat(tree[grow], nch[grow])
  keep = alive & (length > s.min_length) & (length < s.max_length)
  kept = [(sym[keep[tree]], nch[keep[tree]]) for tree, sym, nch in levels]
  return kept, keep


def _serialize(levels: _Levels) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Official serialization and answers of whole trees.

  Returns (codes, starts, sizes, answers): tree i is codes[starts[i]:starts[i] + sizes[i]], with
  codes in VOCAB ids plus _OPEN_ID / _CLOSE_ID for parentheses.

  A node with operator `op` and children c1..ck is folded left into binary pairs
  (((op c1) c2) ... ck) ]) and each pair written `( a b )`:
  `(`*(k+1) op c1 `)` c2 `)` ... ck `)` `]` `)` -- 2k + 4 tokens plus the children.
  """
  sizes, values = [], []
  child_size = child_value = None
  for sym, nch in reversed(levels):  # Bottom up: sizes and values.
    size = np.ones(sym.size, np.int64)
    value = sym.astype(np.int64)
    op = nch > 0
    if op.any():
      k = nch[op]
      seg = np.cumsum(k) - k
      size[op] = 2 * k + 4 + np.add.reduceat(child_size, seg)
      v = child_value
      ordered = np.sort(np.repeat(np.arange(k.size), k) * 10 + v) % 10
      value[op] = np.choose(sym[op], [
          np.minimum.reduceat(v, seg),
          np.maximum.reduceat(v, seg),
          (ordered[seg + (k - 1) // 2] + ordered[seg + k // 2]) // 2,
          np.add.reduceat(v, seg) % 10])
    sizes.append(size)
    values.append(value)
    child_size, child_value = size, value
  sizes.reverse()
  roots = sizes[0]
  tree_starts = np.cumsum(roots) - roots
  codes = np.full(int(roots.sum()), _CLOSE_ID, np.uint8)  # Every unset position is a `)`.
  start = tree_starts
  for d, (sym, nch) in enumerate(levels):  # Top down: positions.
    op = nch > 0
    leaf = ~op
    codes[start[leaf]] = _DIGIT_ID0 + sym[leaf]
    if not op.any():
      break
    s, k, size = start[op], nch[op], sizes[d][op]
    codes[s + k + 1] = _OP_ID0 + sym[op]
    codes[s + size - 2] = _END_ID
    opens = k + 1
    first = np.cumsum(opens) - opens
    codes[np.repeat(s - first, opens) + np.arange(int(opens.sum()))] = _OPEN_ID
    step = sizes[d + 1] + 1  # A child and the `)` after it.
    offset = np.cumsum(step) - step
    seg = np.cumsum(k) - k
    start = np.repeat(s + k + 2 - offset[seg], k) + offset
  return codes, tree_starts, roots, values[-1]


_CODE_STRINGS = np.array(VOCAB + ("(", ")"), dtype=object)


def _codes_to_source(codes: np.ndarray) -> str:
  """The source text of serialization codes."""
  return " ".join(_CODE_STRINGS[codes].tolist())


def serialize(tree: Any) -> str:
  """Official serialization of a tree: a digit, or (operator, [children])."""
  levels: list[tuple[list[int], list[int]]] = []
  frontier = [tree]
  while frontier:
    syms, nchs, nxt = [], [], []
    for node in frontier:
      if isinstance(node, (int, np.integer)):
        if not 0 <= node <= 9:
          raise ValueError(f"a leaf must be a digit 0..9, got {node}")
        syms.append(int(node))
        nchs.append(0)
      else:
        op, children = node
        if not children:
          raise ValueError(f"{op} needs at least one child")
        syms.append(OPERATORS.index(op))
        nchs.append(len(children))
        nxt.extend(children)
    levels.append((syms, nchs))
    frontier = nxt
  codes, _, _, _ = _serialize([(np.array(s), np.array(n)) for s, n in levels])
  return _codes_to_source(codes)


def generate(s: GeneratorSettings) -> Iterator[tuple[str, int]]:
  """Distinct (source, answer) examples, num_train + num_val + num_test of them, in order."""
  total = s.num_train + s.num_val + s.num_test
  seen: set[bytes] = set()
  batch = barren = 0
  while len(seen) < total:
    if barren == _MAX_BARREN_BATCHES:
      raise ValueError(f"found only {len(seen)} of {total} distinct trees for {s}")
    rng = np.random.default_rng([s.seed, batch])
    batch += 1
    barren += 1
    levels, keep = _grow(rng, _TREES_PER_BATCH, s)
    if not keep.any():
      continue
    codes, starts, sizes, answers = _serialize(levels)
    for start, size, answer in zip(starts.tolist(), sizes.tolist(), answers.tolist()):
      tree_codes = codes[start:start + size]
      key = hashlib.blake2b(tree_codes.tobytes(), digest_size=16).digest()
      if key in seen:
        continue
      seen.add(key)
      barren = 0
      yield _codes_to_source(tree_codes), answer
      if len(seen) == total:
        return


def generate_files(out_dir: str, s: GeneratorSettings) -> None:
  """Writes basic_{train,val,test}.tsv for settings `s` into out_dir.

  The files are written to a temporary folder first, so a new out_dir appears only complete.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    examples = generate(s)
    for split, count in (("train", s.num_train), ("validation", s.num_val),
                         ("test", s.num_test)):
      with open(os.path.join(tmp, SPLIT_FILES[split]), "w", encoding="utf-8") as f:
        f.write(HEADER + "\n")
        for _ in range(count):
          source, answer = next(examples)
          f.write(f"{source}\t{answer}\n")
    try:
      os.rename(tmp, out_dir)  # Fails if out_dir exists: replace its files one by one.
    except OSError:
      os.makedirs(out_dir, exist_ok=True)
      for name in SPLIT_FILES.values():
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


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


def _parse_line(line: bytes, where: str, seq_len: int, dtype: Any
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
  tokens = _split_tokens(cols[0])
  try:
    return _encode(tokens, seq_len, dtype), int(target)
  except KeyError:
    raise DataError(f"{where}: unknown token {_unknown_token(tokens)!r}; expected one of "
                    f"{' '.join(_TOKEN_IDS)} and parentheses") from None


def _parse_chunk_fast(data: bytes, seq_len: int, dtype: Any
                      ) -> tuple[np.ndarray, np.ndarray] | None:
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
  data = data.translate(None, b" ")  # Now one byte per token.
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


def _num_symbols(line: bytes) -> int:
  """Symbols of the Source column of a line that _parse_line accepted."""
  return len(_split_tokens(line.decode("utf-8").split("\t")[0]))


def read_tsv(path: str, seq_len: int, dtype: Any = np.int32, *, allow_truncation: bool = True
             ) -> tuple[np.ndarray, np.ndarray]:
  """Reads an official ListOps TSV: (inputs [n, seq_len], targets int32 [n]).

  Row i is CLS then the symbols of line i. Rows with more symbols than fit (seq_len - 1) are
  truncated and counted in one warning naming the file, or, with allow_truncation=False,
  refused (DataError naming the first such line). A file without data rows is a DataError.
  """
  if not os.path.isfile(path):
    raise DataError(f"ListOps file {path} not found. {_DOWNLOAD_HELP}")
  inputs, targets, lengths, lines = [], [], [], []
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
        fast = _parse_chunk_fast(data, seq_len, dtype)
        if fast is not None:
          fast = fast + (line_no + np.arange(len(fast[1])),)
        else:  # Unusual or bad lines: parse one by one for exact errors.
          rows, counts, numbers = [], [], []
          for i, line in enumerate(data.split(b"\n")[:-1]):
            row = _parse_line(line, f"{path}:{line_no + i}", seq_len, dtype)
            if row is not None:
              rows.append(row)
              counts.append(_num_symbols(line))
              numbers.append(line_no + i)
          fast = (np.stack([r for r, _ in rows]) if rows else np.zeros((0, seq_len), dtype),
                  np.array([t for _, t in rows], np.int32), np.array(counts, np.int64),
                  np.array(numbers, np.int64))
        for out, part in zip((inputs, targets, lengths, lines), fast):
          out.append(part)
        line_no += data.count(b"\n")
      if not block:
        break
  if not sum(len(t) for t in targets):
    raise DataError(f"{path}: no data rows after the header; expected lines "
                    "'<source><TAB><target 0..9>'")
  _check_lengths(path, np.concatenate(lengths), np.concatenate(lines), seq_len - 1,
                 allow_truncation)
  return np.concatenate(inputs), np.concatenate(targets).astype(np.int32)


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


def _settings(config: Any) -> GeneratorSettings:
  """The generator settings of `config.listops`; DataError naming the field if out of range."""
  c = config.listops
  for name in ("num_train", "num_val", "num_test"):
    if not config.data_dir and int(c[name]) < 1:
      raise DataError(f"config.listops.{name}={c[name]} must be >= 1: every split needs rows")
  try:
    return GeneratorSettings(
        num_train=int(c.num_train), num_val=int(c.num_val), num_test=int(c.num_test),
        min_length=int(c.min_length), max_length=int(c.max_length),
        max_depth=int(c.max_depth), max_args=int(c.max_args), seed=int(c.seed))
  except ValueError as e:
    raise DataError(f"config.listops.{e}") from None


def cached_data_dir(s: GeneratorSettings) -> str:
  """The folder holding generated data for settings `s`, generating it on first use."""
  folder = os.path.join(default_cache_dir(), "listops", s.short_hash())
  if not all(os.path.isfile(os.path.join(folder, f)) for f in SPLIT_FILES.values()):
    t0 = time.time()
    log.info("ListOps: generating %d train, %d validation and %d test examples into %s "
             "(once; later runs reuse them)", s.num_train, s.num_val, s.num_test, folder)
    generate_files(folder, s)
    log.info("ListOps: generated in %.0f s", time.time() - t0)
  return folder


def load(config: Any) -> TaskData:
  """ListOps splits from config.data_dir, or from the generator when data_dir is empty. Rows
  start with CLS when the model reads it out (`uses_cls`), else with the first symbol."""
  settings = _settings(config)
  data_dir = config.data_dir or cached_data_dir(settings)
  if not os.path.isdir(data_dir):
    raise DataError(f"ListOps data folder {data_dir} not found. {_DOWNLOAD_HELP}")
  cls = uses_cls(config)
  splits = {}
  for split, name in SPLIT_FILES.items():
    # The reader writes CLS first; without CLS read one column more and drop it.
    inputs, targets = read_tsv(os.path.join(data_dir, name), config.seq_len + (not cls),
                               np.uint8,
                               allow_truncation=bool(config.get("allow_truncation", True)))
    if not cls:
      inputs = np.ascontiguousarray(inputs[:, 1:])
    splits[split] = grain.MapDataset.source(_Records(inputs, targets))
  if config.data_dir:
    provenance = official_provenance([os.path.join(data_dir, n) for n in SPLIT_FILES.values()])
  else:
    provenance = {"source": "generated", "generator": "lra_tasks.listops",
                  "generator_version": _GENERATOR_VERSION,
                  "settings": dataclasses.asdict(settings)}
  return TaskData(name="listops", splits=splits, vocab_size=VOCAB_SIZE,
                  num_classes=NUM_CLASSES, seq_len=config.seq_len, pad_id=PAD_ID,
                  provenance=provenance,
                  sources={s: os.path.join(data_dir, n) for s, n in SPLIT_FILES.items()})


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: `generate --out DIR [settings]` writes the three TSV files."""
  parser = argparse.ArgumentParser(prog="python -m lra_tasks.listops")
  commands = parser.add_subparsers(dest="command", required=True)
  gen = commands.add_parser("generate", help="write basic_{train,val,test}.tsv")
  gen.add_argument("--out", required=True, help="output folder")
  for field in dataclasses.fields(GeneratorSettings):
    gen.add_argument(f"--{field.name}", type=int, default=field.default)
  args = parser.parse_args(argv)
  settings = GeneratorSettings(
      **{f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorSettings)})
  generate_files(args.out, settings)
  print(f"wrote {', '.join(SPLIT_FILES.values())} to {args.out}")


if __name__ == "__main__":
  main()
