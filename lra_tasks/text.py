"""LRA Text: IMDB sentiment at the byte level, read from a TFDS array_record build without TF.

Records are `{"inputs": int32[seq_len], "targets": int32[]}` (0 = negative, 1 = positive).
Token ids come from `lra_tasks.byte_tokens`: byte b is b + 1, pad is 0, CLS 257, EOS 258. With
`config.model.readout == "cls"` (the default here, as in Luna) a review reads
`[CLS, bytes..., EOS, 0...]`, so Luna's 4000 bytes need `seq_len = 4002`; otherwise only bytes
and padding. Longer reviews are cut (the LRA protocol); records are tokenized lazily, so they are
not counted. Splits: train = TFDS `train`; validation = test = TFDS `test` (LRA reuses the test
set for validation).

Config fields: `data_dir` (the TFDS data dir holding `imdb_reviews/plain_text/<version>/`, or
that version folder itself; empty means $TFDS_DATA_DIR or ~/tensorflow_datasets), `seq_len`,
`model.readout`, and optional `append_eos` (default: on when CLS is used) and `truncate_len`
(at most that many bytes, then zeros up to `seq_len`: the small protocol's 1,000 + 24).

Building the data (once, on any machine with TensorFlow; training hosts need no TF):

  pip install tensorflow-cpu importlib_resources
  # M: a directory holding aclImdb_v1.tar.gz
  #    (http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz, 84,125,825 bytes)
  # D: the TFDS data dir to create
  python -c "import tensorflow_datasets as tfds; tfds.builder('imdb_reviews/plain_text', \
      data_dir='D', file_format='array_record').download_and_prepare(\
      download_config=tfds.download.DownloadConfig(manual_dir='M'))"

Then copy `D/imdb_reviews/` to the training machine and pass `--config.data_dir=D`.
`file_format="array_record"` matters: the TFDS default (tfrecord) cannot be read at random
access without TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from etils import epath
import grain
import numpy as np

from lra_tasks import byte_tokens
from lra_tasks.common import (DataError, TaskData, official_provenance, truncate_len,
                              uses_cls)

TFDS_NAME = "imdb_reviews"
TFDS_CONFIG = "plain_text"
NUM_CLASSES = 2

BUILD_RECIPE = """\
Build it once on a machine with TensorFlow (training hosts need no TF):
  pip install tensorflow-cpu importlib_resources
  put {archive} ({url}) in a manual directory M, then run
  python -c "import tensorflow_datasets as tfds; tfds.builder('{builder}', data_dir='D', \
file_format='array_record').download_and_prepare(\
download_config=tfds.download.DownloadConfig(manual_dir='M'))"
and point --config.data_dir=D (copy D/{name}/ to the training machine if needed)."""

_IMDB_RECIPE = dict(archive="aclImdb_v1.tar.gz",
                    url="http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                    builder=f"{TFDS_NAME}/{TFDS_CONFIG}", name=TFDS_NAME)

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def _version_key(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in version.split("."))


def open_tfds_build(name: str, config_name: str | None, data_dir: str | None,
                    recipe: dict[str, str], splits: tuple[str, ...]) -> Any:
  """Returns a read-only TFDS builder for the newest array_record build of `name` in `data_dir`.

  `data_dir` is a TFDS data dir (holding `<name>/[<config_name>/]<version>/`) or such a version
  folder itself. Raises DataError naming what to build when it is missing, is a tfrecord
  build, or lacks one of `splits`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = epath.Path(data_dir or os.environ.get(
      "TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))).expanduser()
  if (data_dir / "dataset_info.json").exists():
    version_dir = data_dir
  else:
    root = data_dir.joinpath(name, *([config_name] if config_name else []))
    versions = []
    if root.is_dir():
      versions = [v.name for v in root.iterdir() if _VERSION_RE.match(v.name)
                  and (v / "dataset_info.json").exists()]
    if not versions:
      raise DataError(
          f"The TFDS dataset `{name}` prepared in array_record format was not found under "
          f"{data_dir} (expected {root}/<version>/dataset_info.json).\n"
          + BUILD_RECIPE.format(**recipe))
    version_dir = root / max(versions, key=_version_key)

  builder = tfds.builder_from_directory(version_dir)
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if str(file_format) != "array_record":
    raise DataError(
        f"The TFDS dataset `{name}` at {version_dir} is prepared as {file_format}, but reading "
        "it without TensorFlow needs file_format='array_record'. Rebuild it into a fresh "
        "data_dir:\n" + BUILD_RECIPE.format(**recipe) + "\nor convert this build (needs "
        f"TensorFlow): tfds convert_format --dataset_version_dir={version_dir} "
        "--out_file_format=array_record --out_dir=<new version dir>")
  missing = [s for s in splits if s not in builder.info.splits]
  if missing:
    raise DataError(f"The TFDS dataset `{name}` at {version_dir} has splits "
                    f"{sorted(builder.info.splits)}, expected also {missing}.")
  return builder


def tfds_provenance(builder: Any) -> dict[str, Any]:
  """Provenance of a prepared TFDS dataset: name, version and its dataset_info.json's sha256."""
  info = os.path.join(str(builder.data_dir), "dataset_info.json")
  return official_provenance([info], tfds=builder.info.full_name)


@dataclasses.dataclass(frozen=True)
class TokenizeText(grain.transforms.Map):
  """TFDS IMDB record -> {"inputs": int32[seq_len], "targets": int32[]}."""
  seq_len: int
  cls: bool
  eos: bool
  limit: int = 0               # at most this many bytes (config.truncate_len; 0: what fits)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"inputs": byte_tokens.encode(element["text"], self.seq_len, cls=self.cls,
                                         eos=self.eos, limit=self.limit),
            "targets": np.asarray(element["label"], np.int32)}


def load(config: Any) -> TaskData:
  """Loads IMDB from `config.data_dir` as byte-level records of length `config.seq_len`."""
  cls = uses_cls(config)
  eos = bool(config.get("append_eos", cls))
  seq_len = int(config.seq_len)
  byte_tokens.max_bytes(seq_len, cls=cls, eos=eos)  # Fails early if seq_len is too short.
  builder = open_tfds_build(TFDS_NAME, TFDS_CONFIG, config.get("data_dir"), _IMDB_RECIPE,
                            ("train", "test"))
  tokenize = TokenizeText(seq_len, cls, eos, truncate_len(config))
  train = grain.MapDataset.source(builder.as_data_source(split="train")).map(tokenize)
  test = grain.MapDataset.source(builder.as_data_source(split="test")).map(tokenize)
  return TaskData(name="text", splits={"train": train, "validation": test, "test": test},
                  vocab_size=byte_tokens.vocab_size(cls=cls, eos=eos),
                  num_classes=NUM_CLASSES, seq_len=seq_len, pad_id=byte_tokens.PAD_ID,
                  provenance=tfds_provenance(builder),
                  sources={"train": f"{builder.data_dir}, TFDS split 'train'",
                           "validation": f"{builder.data_dir}, TFDS split 'test'",
                           "test": f"{builder.data_dir}, TFDS split 'test'"})
