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
  it_ds = ds.to_iter_dataset()
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def eval_batches(split: Sequence[dict[str, Any]], global_batch: int, max_examples: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of `split` in order, in batches padded to full size; each batch has a
  float `weights` entry (0 for padding rows). All processes yield the same number of batches."""
  n = len(split) if max_examples <= 0 else min(len(split), max_examples)
  n_proc, idx = jax.process_count(), jax.process_index()
  local = global_batch // n_proc
  num_batches = -(-n // global_batch)
  for b in range(num_batches):
    start = b * global_batch + idx * local
    rows = list(range(start, min(start + local, n)))
    records = [split[r] for r in rows]
    weights = np.zeros((local,), np.float32)
    weights[: len(records)] = 1.0
    while len(records) < local:
      records.append(records[0] if records else split[0])
    batch = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    batch["weights"] = weights
    yield batch
