"""Tiny TFDS array_record builds of `imdb_reviews` and `cifar10`, written without TensorFlow.

The builders carry the real dataset names, versions and feature specs and are not registered,
so `<data_dir>/imdb_reviews/plain_text/1.0.0/` and `<data_dir>/cifar10/3.0.2/` look to a reader
exactly like the real builds. Images are handed to TFDS as PIL images, which TFDS encodes to PNG
with PIL (a numpy array would need TensorFlow).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

tfds.disable_progress_bar()


def _info(builder: tfds.core.DatasetBuilder,
          features: tfds.features.FeaturesDict) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(builder=builder, features=features)


def build_imdb(data_dir: str, train: Sequence[tuple[str | bytes, int]],
               test: Sequence[tuple[str | bytes, int]]) -> str:
  """Writes (text, label) pairs as `imdb_reviews/plain_text/1.0.0`; returns the version dir."""

  class ImdbReviews(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "imdb_reviews"
    code_path = None  # No checksums file to look up next to this code.
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="plain_text")]

    def _info(self):
      return _info(self, tfds.features.FeaturesDict({
          "text": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, rows):
      for i, (text, label) in enumerate(rows):
        yield i, {"text": text, "label": label}

  builder = ImdbReviews(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def build_cifar10(data_dir: str, train: Sequence[tuple[np.ndarray, int]],
                  test: Sequence[tuple[np.ndarray, int]], *, tensor_image: bool = False) -> str:
  """Writes (uint8[32, 32, 3], label) pairs as `cifar10/3.0.2`; returns the version dir.

  The `image` feature is a PNG-encoded `Image` as in the real build, or a uint8 `Tensor` when
  `tensor_image` is set.
  """
  image_feature = (tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8) if tensor_image
                   else tfds.features.Image(shape=(32, 32, 3)))

  class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "cifar10"
    code_path = None  # No checksums file to look up next to this code.
    VERSION = tfds.core.Version("3.0.2")

    def _info(self):
      return _info(self, tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "image": image_feature,
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples("train", train),
              "test": self._generate_examples("test", test)}

    def _generate_examples(self, split, rows):
      for i, (image, label) in enumerate(rows):
        yield i, {"id": f"{split}_{i:05d}", "label": label,
                  "image": image if tensor_image else Image.fromarray(image)}

  builder = Cifar10(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def set_file_format(version_dir: str, file_format: str) -> None:
  """Rewrites the build's recorded file format (to fake a tfrecord build without TF)."""
  path = os.path.join(version_dir, "dataset_info.json")
  with open(path) as f:
    info = json.load(f)
  info["fileFormat"] = file_format
  with open(path, "w") as f:
    json.dump(info, f)
