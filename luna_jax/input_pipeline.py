"""grain input pipelines: a checkpointable, seeded, per-process-sharded training iterator and
padded evaluation batches."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np


def train_iterator(split: Sequence[dict[str, Any]], global_batch: int, seed: int,
                   num_workers: int = 0) -> grain.DatasetIterator:
  """Endless shuffled batches of this process's share of the global batch.

  Every epoch is reshuffled from `seed`; the returned iterator's state (`get_state`) is saved
  with the checkpoints so a resumed run continues with the very next batch.
  """
  n_proc, idx = jax.process_count(), jax.process_index()
  ds = split if isinstance(split, grain.MapDataset) else grain.MapDataset.source(split)
  ds = ds.seed(seed).shuffle().repeat(None)
  # Process i takes rows [i * local, (i + 1) * local) of every global batch, so the global batch
  # (and each example's dropout mask) is the same whatever the number of processes.
  ds = ds.batch(global_batch // n_proc, drop_remainder=True)[idx::n_proc]
  # A few batches ahead on two threads: batching in-memory rows is cheap, and grain's default
  # (16 threads, 500 batches) makes every run start by assembling 500 batches.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def eval_batches(split: Sequence[dict[str, Any]], global_batch: int, max_examples: int = 0,
                 drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of `split` in order, in batches padded to full size; each batch has a
  float `weights` entry (0 for padding rows). All processes yield the same number of batches.
  `drop_last` leaves out the last partial batch (a torch DataLoader's drop_last)."""
  n = len(split) if max_examples <= 0 else min(len(split), max_examples)
  if drop_last:
    n -= n % global_batch
  num_batches = -(-n // global_batch)
  for b in range(num_batches):
    yield _local_batch(split, range(b * global_batch, min((b + 1) * global_batch, n)),
                       global_batch)


def eval_stream_batches(split: Sequence[dict[str, Any]], global_batch: int, seed: int,
                        evaluation: int, num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation `evaluation` (1, 2, ...) of an endless reshuffled stream of `split`: its batches
  [(evaluation - 1) * num_batches, evaluation * num_batches), as `eval_batches` gives them.

  The stream is epochs of full batches (the last partial batch of each epoch is dropped), each
  epoch a permutation drawn from (seed, epoch): what the Nystromformer LRA code's validation
  loop read, the next `num_batches` batches at each evaluation. A function of `evaluation`
  alone, so a resumed run evaluates on exactly the batches the uninterrupted run would."""
  n = len(split)
  per_epoch = n // global_batch
  if per_epoch < 1:
    raise ValueError(f"the validation split has {n} examples, fewer than one batch of "
                     f"{global_batch}: an evaluation stream needs full batches")
  perms: dict[int, np.ndarray] = {}
  for b in range((evaluation - 1) * num_batches, evaluation * num_batches):
    epoch, j = divmod(b, per_epoch)
    if epoch not in perms:
      perms[epoch] = np.random.default_rng([seed, _STREAM_TAG, epoch]).permutation(n)
    rows = perms[epoch][j * global_batch:(j + 1) * global_batch]
    yield _local_batch(split, rows.tolist(), global_batch)


_STREAM_TAG = 0x5E1      # keeps the stream's permutations apart from other uses of the seed


def _local_batch(split: Sequence[dict[str, Any]], rows: Sequence[int], global_batch: int
                 ) -> dict[str, np.ndarray]:
  """This process's share of the global batch of `rows`, padded to full size with weight 0."""
  n_proc, idx = jax.process_count(), jax.process_index()
  local = global_batch // n_proc
  records = [split[r] for r in rows[idx * local:(idx + 1) * local]]
  weights = np.zeros((local,), np.float32)
  weights[: len(records)] = 1.0
  while len(records) < local:
    records.append(records[0] if records else split[0])
  batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  batch["weights"] = weights
  return batch


# ----------------------------------------------------------------------------- length buckets

def bucket_lengths(seq_len: int, num_buckets: int, multiple: int = 64) -> tuple[int, ...]:
  """`num_buckets` static sequence lengths up to `seq_len` (evenly spaced, rounded up to a
  multiple of `multiple`; the last is seq_len itself): a handful of shapes, a handful of
  compiles."""
  if num_buckets <= 1:
    return (seq_len,)
  edges = {min(seq_len, -(-(seq_len * (i + 1) // num_buckets) // multiple) * multiple)
           for i in range(num_buckets)}
  return tuple(sorted(edges | {seq_len}))


def padded_length(inputs: np.ndarray, pad_id: int) -> np.ndarray:
  """Position after the last non-pad token along the last axis (0 if none), so that cropping
  to it keeps every real token wherever padding sits."""
  real = np.asarray(inputs) != pad_id
  last = real.shape[-1] - np.argmax(real[..., ::-1], axis=-1)
  return np.where(real.any(axis=-1), last, 0)


def example_lengths(split: Sequence[dict[str, Any]], pad_id: int) -> np.ndarray:
  """Length to keep per example (the longest document of two-document records): [n] int."""
  out = np.zeros((len(split),), np.int64)
  for i in range(len(split)):
    out[i] = np.max(padded_length(np.asarray(split[i]["inputs"]), pad_id))
  return out


class BucketedBatches:
  """Endless shuffled batches drawn from length buckets, each cropped to its bucket's length.

  Epoch e: the examples are permuted with (seed, e); each goes to the smallest bucket that
  holds it; every bucket is cut into global batches (a bucket's last partial batch is dropped
  for that epoch, as `drop_remainder` does); the batch order is shuffled with (seed, e). A batch
  is the same whatever the number of processes; process i gets rows [i * local, (i+1) * local).
  Padding is masked everywhere, so a cropped batch computes what the uncropped one does.
  `get_state` / `set_state` (JSON) resume at the very next batch.
  """

  def __init__(self, split: Sequence[dict[str, Any]], lengths: np.ndarray, global_batch: int,
               seed: int, buckets: Sequence[int]):
    self.split, self.lengths = split, np.asarray(lengths)
    self.global_batch, self.seed, self.buckets = global_batch, seed, tuple(buckets)
    self.n_proc, self.proc = jax.process_count(), jax.process_index()
    if global_batch % self.n_proc:
      raise ValueError(f"batch {global_batch} is not divisible by {self.n_proc} processes")
    self.epoch, self.position = 0, 0
    self._plan_epoch, self._plan = -1, []

  def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(bucket length, example indices)] of one epoch, in order."""
    if epoch != self._plan_epoch:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(len(self.lengths))
      bucket_of = np.searchsorted(np.asarray(self.buckets), self.lengths[order])
      batches = []
      for b, length in enumerate(self.buckets):
        members = order[bucket_of == b]
        for start in range(0, len(members) - self.global_batch + 1, self.global_batch):
          batches.append((length, members[start:start + self.global_batch]))
      self._plan = [batches[i] for i in rng.permutation(len(batches))]
      self._plan_epoch = epoch
      if not self._plan:
        raise ValueError(f"no bucket holds a full batch of {self.global_batch} examples")
    return self._plan

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    plan = self.plan(self.epoch)
    length, rows = plan[self.position]
    self.position += 1
    if self.position == len(plan):
      self.epoch, self.position = self.epoch + 1, 0
    local = self.global_batch // self.n_proc
    records = [self.split[int(r)] for r in rows[self.proc * local:(self.proc + 1) * local]]
    batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    batch["inputs"] = batch["inputs"][..., :length]
    return batch

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


def bucketed_eval_batches(split: Sequence[dict[str, Any]], lengths: np.ndarray,
                          global_batch: int, buckets: Sequence[int], max_examples: int = 0
                          ) -> Iterator[dict[str, np.ndarray]]:
  """`eval_batches` over the same examples (the first `max_examples`), grouped by bucket and
  cropped to it; padded rows have weight 0. Sums over all batches equal the unbucketed ones."""
  n = len(split) if max_examples <= 0 else min(len(split), max_examples)
  n_proc, idx = jax.process_count(), jax.process_index()
  local = global_batch // n_proc
  bucket_of = np.searchsorted(np.asarray(buckets), np.asarray(lengths)[:n])
  for b, length in enumerate(buckets):
    members = np.flatnonzero(bucket_of == b)
    for start in range(0, len(members), global_batch):
      rows = members[start:start + global_batch][idx * local:(idx + 1) * local].tolist()
      records = [split[r] for r in rows]
      weights = np.zeros((local,), np.float32)
      weights[:len(records)] = 1.0
      filler = records[0] if records else split[int(members[0])]
      records += [filler] * (local - len(records))
      batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
      batch["inputs"] = batch["inputs"][..., :length]
      batch["weights"] = weights
      yield batch
