"""LRA Image: grayscale CIFAR-10 as pixel tokens, read from a TFDS array_record build without TF.

Records are `{"inputs": int32[seq_len], "targets": int32[]}` with 10 classes. Each RGB image is
converted to 8-bit luma with the ITU-R 601-2 weights that PIL's `convert("L")` uses,
L = (19595 R + 38470 G + 7471 B + 2**15) >> 16, i.e. 0.299 R + 0.587 G + 0.114 B rounded to
nearest, then flattened row-major to 1024 tokens with values 0..255. With
`config.model.readout == "cls"` (the default here, as in Luna) CLS id 256 is prepended, so
`seq_len` is 1025 and the vocabulary 257; otherwise `seq_len` is 1024 and the vocabulary 256.
There is no padding (pad_id None): black pixels (0) are ordinary tokens, unless
`config.black_is_padding` (`common.pixel_pad_id`: pad_id 0, the small protocol).

Splits follow LRA: train = TFDS `train[:90%]` (45,000), validation = `train[90%:]` (5,000),
test = TFDS `test` (10,000), using TFDS split slicing.

Config fields: `data_dir` (the TFDS data dir holding `cifar10/<version>/`, or that version
folder itself; empty means $TFDS_DATA_DIR or ~/tensorflow_datasets), `seq_len`,
`model.readout`, `black_is_padding`. The `image` feature may be a TFDS `Image` (decoded with PIL, as in the real
build) or a uint8 `Tensor` of shape [H, W, 3] or [H, W, 1].

Building the data (once, on any machine with TensorFlow; training hosts need no TF):

  pip install tensorflow-cpu importlib_resources
  # M: a directory holding cifar-10-binary.tar.gz
  #    (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, 170,052,171 bytes)
  # D: the TFDS data dir to create
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10', data_dir='D', \
      file_format='array_record').download_and_prepare(\
      download_config=tfds.download.DownloadConfig(manual_dir='M'))"

Then copy `D/cifar10/` to the training machine and pass `--config.data_dir=D`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from lra_tasks.common import DataError, TaskData, pixel_pad_id, uses_cls
from lra_tasks.text import open_tfds_build, tfds_provenance

TFDS_NAME = "cifar10"
NUM_CLASSES = 10
CLS_ID = 256
SPLITS = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}

_CIFAR_RECIPE = dict(archive="cifar-10-binary.tar.gz",
                     url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                     builder=TFDS_NAME, name=TFDS_NAME)


def to_grayscale(image_HxWxC: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3] RGB -> uint8[H, W] luma, exactly as PIL's `convert("L")`; [H, W, 1] is kept."""
  if image_HxWxC.ndim == 3 and image_HxWxC.shape[-1] == 1:
    return image_HxWxC[..., 0].astype(np.uint8)
  rgb = image_HxWxC.astype(np.uint32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return luma.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class TokenizeImage(grain.transforms.Map):
  """TFDS CIFAR record -> {"inputs": int32[(cls) + H*W], "targets": int32[]}."""
  cls: bool

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    pixels = to_grayscale(np.asarray(element["image"])).reshape(-1).astype(np.int32)
    if self.cls:
      pixels = np.concatenate([np.full((1,), CLS_ID, np.int32), pixels])
    return {"inputs": pixels, "targets": np.asarray(element["label"], np.int32)}


def load(config: Any) -> TaskData:
  """Loads grayscale CIFAR-10 from `config.data_dir` as 1024 pixel tokens (plus optional CLS)."""
  cls = uses_cls(config)
  builder = open_tfds_build(TFDS_NAME, None, config.get("data_dir"), _CIFAR_RECIPE,
                            ("train", "test"))
  shape = tuple(builder.info.features["image"].shape)
  if len(shape) != 3 or shape[-1] not in (1, 3) or None in shape:
    raise DataError(f"The TFDS dataset `{TFDS_NAME}` has images of shape {shape}; expected a "
                    "fixed [height, width, 3] (or 1) shape.")
  seq_len = shape[0] * shape[1] + int(cls)
  if int(config.seq_len) != seq_len:
    raise ValueError(f"config.seq_len={config.seq_len}, but {shape[0]}x{shape[1]} images "
                     f"{'with' if cls else 'without'} CLS give {seq_len} tokens.")
  tokenize = TokenizeImage(cls)
  splits = {name: grain.MapDataset.source(builder.as_data_source(split=tfds_split)).map(tokenize)
            for name, tfds_split in SPLITS.items()}
  return TaskData(name="image", splits=splits, vocab_size=CLS_ID + int(cls),
                  num_classes=NUM_CLASSES, seq_len=seq_len, pad_id=pixel_pad_id(config),
                  provenance=tfds_provenance(builder))
