"""LRA Retrieval: ACL Anthology Network document matching at the byte level.

Reads the release TSVs `new_aan_pairs.{train,eval,test}.tsv` (train / validation / test) from
`lra_release/tsv_data/`. Each line has exactly 5 tab-separated fields `label, id1, id2, text1,
text2` with no header; the label parses as a float that must be 0 or 1 ("1.0", "0", ...). A line
with any other number of fields is an error naming the file and line: a tab inside a document
would make the split between the two texts ambiguous, and the release has none. Empty lines are
skipped. Lines are read as raw bytes, so the tokens are the UTF-8 bytes of the file (a file
starting with a UTF-8 BOM is an error). Empty documents are kept and counted in a warning;
documents cut to `seq_len` are counted in a notice.

Records are `{"inputs": int32[2, seq_len], "targets": int32[]}`: row 0 is text1, row 1 is text2,
each tokenized on its own with `lra_tasks.byte_tokens` (byte b is b + 1, pad 0, and with
`config.model.readout == "cls"`, the default, `[CLS=257, bytes..., EOS=258, 0...]`). Loading
keeps each document's first `seq_len - #specials` bytes in one flat uint8 buffer and tokenizes
lazily in a grain `.map`, so records are cheap to hold and memory is bounded by
2 * rows * seq_len bytes.

Config fields: `data_dir` (the `lra_release/tsv_data/` folder; a folder holding `tsv_data/` or
`lra_release/tsv_data/` also works), `seq_len` (per document), `model.readout`, and optional
`append_eos` (default: on when CLS is used) and `truncate_len` (at most that many bytes per
document, then zeros up to `seq_len`: the small protocol's 4,000 + 96).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from etils import epath
import grain
import numpy as np

from lra_tasks import byte_tokens
from lra_tasks.common import (DataError, TaskData, official_provenance, truncate_len,
                              uses_cls)

log = logging.getLogger(__name__)

FILES = {"train": "new_aan_pairs.train.tsv", "validation": "new_aan_pairs.eval.tsv",
         "test": "new_aan_pairs.test.tsv"}
NUM_CLASSES = 2
NUM_FIELDS = 5
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"

_FIELDS_DOC = "label, id1, id2, text1, text2"
_SUBDIRS = ("", "tsv_data", "lra_release/tsv_data", "lra_release/lra_release/tsv_data")


class DocumentPairs:
  """Random-access source of `{"text1": uint8[n1], "text2": uint8[n2], "label": int32[]}`."""

  def __init__(self, data: np.ndarray, offsets: np.ndarray, labels: np.ndarray, path: str):
    self.data = data          # uint8[total]: text1 of row 0, text2 of row 0, text1 of row 1, ...
    self.offsets = offsets    # int64[2 * rows + 1]: document k is data[offsets[k]:offsets[k+1]]
    self.labels = labels      # int32[rows]
    self.path = path

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = range(len(self))[index]  # Bounds check; negative indices allowed.
    o = self.offsets
    return {"text1": self.data[o[2 * index]:o[2 * index + 1]],
            "text2": self.data[o[2 * index + 1]:o[2 * index + 2]],
            "label": self.labels[index]}

  def __repr__(self) -> str:
    return f"DocumentPairs({self.path!r}, rows={len(self)})"


def _parse_label(raw: bytes, path: str, lineno: int) -> int:
  """The 0/1 label of one row; DataError naming the line otherwise."""
  try:
    value = float(raw)
  except ValueError:
    value = math.nan
  if value not in (0.0, 1.0):
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
      raise DataError(f"{path}, line 1: the file starts with a UTF-8 byte order mark (BOM, "
                      "bytes EF BB BF); save it as plain UTF-8 without a BOM")
    raise DataError(f"{path}, line {lineno}: label {raw.decode('utf-8', 'replace')!r} is not 0 "
                    f"or 1; expected a float label 0/1 (e.g. '1.0' or '0') in the first of "
                    f"{NUM_FIELDS} tab-separated fields ({_FIELDS_DOC}).")
  return int(value)


def read_tsv(path: str | epath.PathLike, max_doc_bytes: int) -> DocumentPairs:
  """Reads one AAN pairs TSV, keeping the first `max_doc_bytes` bytes of each document."""
  path = epath.Path(path)
  data = bytearray()   # Grows in place: peak memory stays near the final buffer size.
  ends: list[int] = []
  labels: list[int] = []
  truncated, empty, first_empty = 0, 0, 0
  with path.open("rb") as f:
    for lineno, line in enumerate(f, start=1):
      if line.endswith(b"\n"):
        line = line[:-1]
      if line.endswith(b"\r"):
        line = line[:-1]
      if not line:
        continue
      fields = line.split(b"\t")
      if len(fields) != NUM_FIELDS:
        raise DataError(f"{path}, line {lineno}: expected {NUM_FIELDS} tab-separated fields "
                        f"({_FIELDS_DOC}), found {len(fields)}.")
      labels.append(_parse_label(fields[0], str(path), lineno))
      for doc in (fields[3], fields[4]):
        if not doc.strip():
          empty += 1
          first_empty = first_empty or lineno
        truncated += len(doc) > max_doc_bytes
        data += memoryview(doc)[:max_doc_bytes]
        ends.append(len(data))
  if not labels:
    raise DataError(f"{path} holds no rows; expected lines of {NUM_FIELDS} tab-separated fields "
                    f"({_FIELDS_DOC}).")
  if empty:
    log.warning("Retrieval: %d of %d documents in %s are empty (first on line %d); they are "
                "kept as documents without bytes", empty, 2 * len(labels), path, first_empty)
  if truncated:
    log.info("Retrieval: %d of %d documents in %s are longer than %d bytes and were cut to "
             "their first %d (the LRA protocol)", truncated, 2 * len(labels), path,
             max_doc_bytes, max_doc_bytes)
  offsets = np.asarray([0] + ends, np.int64)
  return DocumentPairs(np.frombuffer(data, np.uint8), offsets, np.asarray(labels, np.int32),
                       str(path))


def find_release_dir(data_dir: str | epath.PathLike) -> epath.Path:
  """The folder under `data_dir` that holds all three TSVs; DataError naming them if none does."""
  base = epath.Path(data_dir).expanduser()
  for sub in _SUBDIRS:
    folder = base / sub if sub else base
    if all((folder / name).exists() for name in FILES.values()):
      return folder
  missing = [name for name in FILES.values() if not (base / name).exists()]
  raise DataError(
      f"Retrieval (AAN) data not found: {base} lacks {', '.join(missing)} (expected "
      f"{', '.join(FILES.values())}). Download the LRA release archive lra_release.gz "
      f"({RELEASE_URL}), extract it, and point --config.data_dir at its lra_release/tsv_data/ "
      "folder.")


@dataclasses.dataclass(frozen=True)
class TokenizePair(grain.transforms.Map):
  """DocumentPairs record -> {"inputs": int32[2, seq_len], "targets": int32[]}."""
  seq_len: int
  cls: bool
  eos: bool
  limit: int = 0               # at most this many bytes per document (0: all that fit)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    docs = [byte_tokens.encode(element[k], self.seq_len, cls=self.cls, eos=self.eos,
                               limit=self.limit)
            for k in ("text1", "text2")]
    return {"inputs": np.stack(docs), "targets": np.asarray(element["label"], np.int32)}


def load(config: Any) -> TaskData:
  """Loads the AAN pairs from `config.data_dir`, each document as `config.seq_len` byte tokens."""
  cls = uses_cls(config)
  eos = bool(config.get("append_eos", cls))
  seq_len = int(config.seq_len)
  limit = truncate_len(config)
  max_doc_bytes = byte_tokens.max_bytes(seq_len, cls=cls, eos=eos, limit=limit)
  if not config.get("data_dir"):
    raise DataError(f"config.data_dir is empty; point it at the lra_release/tsv_data/ folder "
                    f"of lra_release.gz ({RELEASE_URL}) that holds {', '.join(FILES.values())}.")
  folder = find_release_dir(config.data_dir)
  tokenize = TokenizePair(seq_len, cls, eos, limit)
  splits = {split: grain.MapDataset.source(read_tsv(folder / name, max_doc_bytes)).map(tokenize)
            for split, name in FILES.items()}
  return TaskData(name="retrieval", splits=splits,
                  vocab_size=byte_tokens.vocab_size(cls=cls, eos=eos), num_classes=NUM_CLASSES,
                  seq_len=seq_len, pad_id=byte_tokens.PAD_ID, num_docs=2,
                  provenance=official_provenance([folder / n for n in FILES.values()]),
                  sources={s: str(folder / n) for s, n in FILES.items()})
