"""Byte-level tokenizer shared by the Text and Retrieval tasks.

Token ids: 0 is padding, byte b (0..255) is b + 1, CLS is 257 and EOS is 258. The ids are fixed
whether or not CLS/EOS are used, so a checkpoint's embedding rows always mean the same thing.
A sequence with both specials reads `[CLS, b_0 + 1, ..., b_{n-1} + 1, EOS, 0, ..., 0]`: the bytes
are truncated so that CLS + bytes + EOS fit in `seq_len`, and EOS follows the last kept byte.
"""
from __future__ import annotations

import numpy as np

PAD_ID = 0
BYTE_OFFSET = 1
CLS_ID = 257
EOS_ID = 258


def vocab_size(*, cls: bool, eos: bool) -> int:
  """257 (pad + 256 bytes) without special tokens, 259 when CLS or EOS is used."""
  return EOS_ID + 1 if (cls or eos) else 256 + BYTE_OFFSET


def max_bytes(seq_len: int, *, cls: bool, eos: bool, limit: int = 0) -> int:
  """How many bytes of a document fit in `seq_len` next to the special tokens, at most `limit`
  (0: no limit; `lra_tasks.common.truncate_len`)."""
  n = seq_len - int(cls) - int(eos)
  if n < 1:
    raise ValueError(f"seq_len={seq_len} leaves no room for bytes next to "
                     f"{int(cls) + int(eos)} special token(s).")
  return min(n, limit) if limit > 0 else n


def encode(data: bytes | np.ndarray, seq_len: int, *, cls: bool, eos: bool, limit: int = 0
           ) -> np.ndarray:
  """Returns int32[seq_len] token ids of `data` (bytes or uint8 array): at most `limit` bytes
  (0: all that fit), then zeros."""
  raw = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
  raw = raw[:max_bytes(seq_len, cls=cls, eos=eos, limit=limit)]
  out = np.zeros((seq_len,), np.int32)
  start = int(cls)
  if cls:
    out[0] = CLS_ID
  out[start:start + raw.size] = raw.astype(np.int32) + BYTE_OFFSET
  if eos:
    out[start + raw.size] = EOS_ID
  return out
