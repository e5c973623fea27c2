"""The built-in ListOps generator: the official grammar and serialization, vectorized.

It writes the official TSV layout that `lra_tasks.listops` reads (`basic_{train,val,test}.tsv`)
and the marker `common.GENERATED_MARKER` holding `generated_provenance(settings)`, so a folder of
generated data handed in through `config.data_dir` is recorded as generated. With
`config.data_dir` empty, `lra_tasks.listops.load` generates once into
`default_cache_dir()/listops/<settings hash>/` (`cached_data_dir`).

  python -m lra_tasks.listops_generator --out DIR [--num_train N ...] [--workers 16]

Imports: the vocabulary and the file layout come from `lra_tasks.listops_format`, which the
reader `lra_tasks.listops` imports too (one direction: the reader imports this module).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from lra_tasks.common import GENERATED_MARKER, default_cache_dir, write_generated_marker
from lra_tasks.listops_format import END, HEADER, OPERATORS, SPLIT_FILES, VOCAB, VOCAB_SIZE

log = logging.getLogger(__name__)

# This module's import name, recorded in provenance (`__name__` is "__main__" under -m).
GENERATOR = "lra_tasks.listops_generator"
_GENERATOR_VERSION = 1  # Bump when the generated data would change; part of the cache key.
_OP_ID0 = VOCAB.index(OPERATORS[0])
_END_ID = VOCAB.index(END)
_DIGIT_ID0 = VOCAB.index("0")
_OPEN_ID, _CLOSE_ID = VOCAB_SIZE, VOCAB_SIZE + 1  # Parentheses: serialization only.
_OP_PROB = 0.25        # A node shallower than max_depth is an operator with this probability.
_TREES_PER_BATCH = 4096
_MAX_BARREN_BATCHES = 200  # Give up after this many batches without a new tree.


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


def _batch_examples(s: GeneratorSettings, batch: int) -> list[tuple[bytes, str, int]]:
  """(dedup key, source, answer) of the kept trees of one batch, in order; a batch depends only
  on (seed, batch), so batches can be made in any process and order."""
  rng = np.random.default_rng([s.seed, batch])
  levels, keep = _grow(rng, _TREES_PER_BATCH, s)
  if not keep.any():
    return []
  codes, starts, sizes, answers = _serialize(levels)
  out = []
  for start, size, answer in zip(starts.tolist(), sizes.tolist(), answers.tolist()):
    tree_codes = codes[start:start + size]
    key = hashlib.blake2b(tree_codes.tobytes(), digest_size=16).digest()
    out.append((key, _codes_to_source(tree_codes), answer))
  return out


def _batches(s: GeneratorSettings, workers: int) -> Iterator[list[tuple[bytes, str, int]]]:
  """Batches 0, 1, 2, ... in order; with workers > 1, made by that many processes (2 batches
  per worker in flight)."""
  if workers <= 1:
    for batch in itertools.count():
      yield _batch_examples(s, batch)
    return
  ctx = multiprocessing.get_context("spawn")    # no fork of a possibly threaded parent
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    pending: collections.deque = collections.deque()
    batches = itertools.count()
    try:
      while True:
        while len(pending) < 2 * workers:
          pending.append(pool.submit(_batch_examples, s, next(batches)))
        yield pending.popleft().result()
    finally:
      for f in pending:
        f.cancel()


def generate(s: GeneratorSettings, workers: int = 1) -> Iterator[tuple[str, int]]:
  """Distinct (source, answer) examples, num_train + num_val + num_test of them, in order.
  `workers` > 1 makes the batches in that many processes; the examples are the same."""
  total = s.num_train + s.num_val + s.num_test
  seen: set[bytes] = set()
  barren = 0
  batches = _batches(s, workers)
  try:
    while len(seen) < total:
      if barren == _MAX_BARREN_BATCHES:
        raise ValueError(f"found only {len(seen)} of {total} distinct trees for {s}")
      barren += 1
      for key, source, answer in next(batches):
        if key in seen:
          continue
        seen.add(key)
        barren = 0
        yield source, answer
        if len(seen) == total:
          return
  finally:
    batches.close()


def generated_provenance(s: GeneratorSettings) -> dict[str, Any]:
  """What results.json records about data generated with settings `s` (without file hashes),
  and what `generate_files` writes into the marker `common.GENERATED_MARKER`."""
  return {"source": "generated", "generator": GENERATOR,
          "generator_version": _GENERATOR_VERSION, "settings": dataclasses.asdict(s)}


def generate_files(out_dir: str, s: GeneratorSettings, workers: int = 1) -> None:
  """Writes basic_{train,val,test}.tsv for settings `s` and the marker `GENERATED_MARKER`
  (`generated_provenance(s)`) into out_dir; `workers` processes make the trees (same files).

  The files are written to a temporary folder first, so a new out_dir appears only complete.
  """
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    examples = generate(s, workers)
    for split, count in (("train", s.num_train), ("validation", s.num_val),
                         ("test", s.num_test)):
      with open(os.path.join(tmp, SPLIT_FILES[split]), "w", encoding="utf-8") as f:
        f.write(HEADER + "\n")
        for _ in range(count):
          source, answer = next(examples)
          f.write(f"{source}\t{answer}\n")
    examples.close()    # stops the worker processes, if any
    write_generated_marker(tmp, generated_provenance(s))
    try:
      os.rename(tmp, out_dir)  # Fails if out_dir exists: replace its files one by one.
    except OSError:
      os.makedirs(out_dir, exist_ok=True)
      for name in (*SPLIT_FILES.values(), GENERATED_MARKER):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ cache


def cached_data_dir(s: GeneratorSettings) -> str:
  """The folder holding generated data for settings `s`, generating it on first use.

  Folders generated before the marker existed hold only the TSV files and are reused as they
  are: the loader knows it generated them.
  """
  folder = os.path.join(default_cache_dir(), "listops", s.short_hash())
  if not all(os.path.isfile(os.path.join(folder, f)) for f in SPLIT_FILES.values()):
    t0 = time.time()
    log.info("ListOps: generating %d train, %d validation and %d test examples into %s "
             "(once; later runs reuse them)", s.num_train, s.num_val, s.num_test, folder)
    generate_files(folder, s)
    log.info("ListOps: generated in %.0f s", time.time() - t0)
  return folder


# ------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: `--out DIR [settings]` writes the three TSV files and the marker."""
  parser = argparse.ArgumentParser(
      prog="python -m lra_tasks.listops_generator",
      description="Writes basic_{train,val,test}.tsv (the official ListOps layout) and "
                  f"{GENERATED_MARKER} into --out.")
  parser.add_argument("--out", required=True, help="output folder")
  for field in dataclasses.fields(GeneratorSettings):
    parser.add_argument(f"--{field.name}", type=int, default=field.default)
  parser.add_argument("--workers", type=int, default=1,
                      help="processes making the trees (0: one per core); the files are the "
                           "same for any value")
  args = parser.parse_args(argv)
  settings = GeneratorSettings(
      **{f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorSettings)})
  generate_files(args.out, settings, args.workers or os.cpu_count() or 1)
  print(f"wrote {', '.join(SPLIT_FILES.values())} and {GENERATED_MARKER} to {args.out}")


if __name__ == "__main__":
  main()
