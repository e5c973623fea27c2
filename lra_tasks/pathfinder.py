"""LRA Pathfinder (32x32) and Path-X (128x128): pixel tokens from the release PNGs.

Records are `{"inputs": int32[seq_len], "targets": int32[]}` with 2 classes (1: the two
markers are connected). Each grayscale image is flattened row-major to resolution**2 tokens
with values 0..255. With `config.model.readout == "cls"` CLS id 256 is prepended (vocabulary
257); otherwise (the Pathfinder default, mean readout) the vocabulary is 256. There is no
padding (pad_id None): black pixels (0) are ordinary tokens, unless `config.black_is_padding`
(`common.pixel_pad_id`: pad_id 0, the small protocol).

Data layout (the LRA release `lra_release.gz`):

  <data_dir>/<difficulty>/imgs/<batch>/sample_<n>.png
  <data_dir>/<difficulty>/metadata/<batch>.npy     plain text, one line per image:
      imgs/<batch> sample_<n>.png <index> <label> ...

`data_dir` is the release folder `lra_release/pathfinder32` (Pathfinder) or
`lra_release/pathfinder128` (Path-X); `lra_release/` itself or the difficulty folder are
found too. Metadata files are read in numeric order, then one seeded permutation of all
records gives the 80/10/10 train/validation/test split. Empty or unreadable images are skipped
(and counted in the log) after splitting, so one bad file does not move the others; an image of
another size or of a PNG mode other than 8-bit grayscale ('L') is an error naming the file.
Decoded pixels are cached as .npy under `default_cache_dir()/pathfinder/decoded/`, keyed by the
folder path, the metadata files' sizes and times and every listed image's size and modification
time (an image rewritten in place is decoded again), and memory-mapped.

With `config.data_dir` empty, `config.pathfinder.num_images` images are made once by
`lra_tasks.pathfinder_generator` under
`default_cache_dir()/pathfinder/<res>_<difficulty>_<num>_<seed>/pathfinder<res>/`.
Provenance (results.json): a difficulty folder holding the generator's marker
`common.GENERATED_MARKER` (and the cache this loader generates itself) is recorded as
generated, any other as official; both with the sha256 of each metadata file.

Config fields: `data_dir`, `seq_len`, `model.readout`, `black_is_padding`, and
`pathfinder.{resolution, difficulty, split_seed, num_images, gen_seed}`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, NamedTuple

import grain
import numpy as np
from PIL import Image

from lra_tasks import pathfinder_generator
from lra_tasks.common import (DataError, TaskData, data_provenance, default_cache_dir,
                              pixel_pad_id, uses_cls)

log = logging.getLogger(__name__)

NUM_CLASSES = 2
CLS_ID = 256
PIXEL_VOCAB = 256
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
_CACHE_VERSION = 1
_LOG_EVERY = 20_000


@dataclasses.dataclass(frozen=True)
class PathfinderImages:
  """All images of one release folder, one row per metadata record, in metadata order."""
  pixels: np.ndarray            # uint8[num_records, res, res]; rows of skipped images are 0
  labels: np.ndarray            # int32[num_records]: 0/1, or -1 for a skipped image
  skipped: tuple[str, ...]      # paths of the empty, unreadable or missing images

  @property
  def num_records(self) -> int:
    return len(self.labels)


def _missing_message(data_dir: str, resolution: int, difficulty: str, tried: list[str]) -> str:
  return (
      f"Pathfinder data not found: no '{difficulty}/metadata' folder under "
      f"config.data_dir={data_dir!r} (looked in {tried}). Download the LRA release "
      f"lra_release.gz ({RELEASE_URL}, about 8 GB) and extract it (tar xzf lra_release.gz); "
      f"then set config.data_dir to lra_release/pathfinder32 for Pathfinder or "
      f"lra_release/pathfinder128 for Path-X (for config.pathfinder.resolution={resolution}: "
      f"lra_release/pathfinder{resolution}), the folder that holds the difficulty folder "
      f"{difficulty}/ (config.pathfinder.difficulty) with imgs/ and metadata/. Or leave "
      f"config.data_dir empty to generate a built-in set of config.pathfinder.num_images "
      f"images.")


def find_folder(data_dir: str, resolution: int, difficulty: str) -> str:
  """The difficulty folder (holding imgs/ and metadata/) for `data_dir`; DataError if none."""
  data_dir = os.path.expanduser(data_dir)
  release = f"pathfinder{resolution}"
  tried = [os.path.join(data_dir, difficulty),
           data_dir,
           os.path.join(data_dir, release, difficulty),
           os.path.join(data_dir, "lra_release", release, difficulty)]
  for folder in tried:
    if os.path.isdir(os.path.join(folder, "metadata")):
      return folder
  raise DataError(_missing_message(data_dir, resolution, difficulty, tried))


def _metadata_files(folder: str) -> list[str]:
  """Metadata files of `folder` in numeric order (0.npy, 1.npy, ..., 10.npy)."""
  meta_dir = os.path.join(folder, "metadata")
  names = [n for n in os.listdir(meta_dir) if n.endswith(".npy") and not n.startswith(".")]
  if not names:
    raise DataError(f"{meta_dir}: no metadata files (<batch>.npy) found")

  def key(name: str) -> tuple[int, int, str]:
    stem = name[:-len(".npy")]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)

  return [os.path.join(meta_dir, n) for n in sorted(names, key=key)]


class MetadataRecord(NamedTuple):
  """One metadata line: the image it names, its label, and where the line is."""
  path: str
  label: int
  source: str             # "<metadata file>, line <n>"


def read_metadata(folder: str) -> list[MetadataRecord]:
  """The records of every metadata line of `folder`, in order."""
  records = []
  for path in _metadata_files(folder):
    with open(path, encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, start=1):
        fields = line.split()
        if not fields:
          continue
        if len(fields) < 4:
          raise DataError(
              f"{path}, line {lineno}: expected at least 4 space-separated fields (image "
              f"folder, file name, index, label 0/1), got {len(fields)}: {line.strip()!r}")
        label = fields[3]
        try:
          value = float(label)
        except ValueError:
          value = -1.0
        if value not in (0.0, 1.0):
          raise DataError(f"{path}, line {lineno}: expected label 0 or 1 in field 4, got "
                          f"{label!r}: {line.strip()!r}")
        records.append(MetadataRecord(os.path.join(folder, fields[0], fields[1]), int(value),
                                      f"{path}, line {lineno}"))
  if not records:
    raise DataError(f"{os.path.join(folder, 'metadata')}: the metadata files list no images")
  return records


def _decode(record: MetadataRecord, resolution: int) -> np.ndarray | None:
  """uint8[res, res] pixels of one PNG, or None if it is missing, empty or unreadable."""
  try:
    with Image.open(record.path) as image:
      image.load()
      if image.size != (resolution, resolution):
        raise DataError(
            f"{record.path} (listed in {record.source}): image is {image.size[0]}x"
            f"{image.size[1]}, expected {resolution}x{resolution} "
            f"(config.pathfinder.resolution={resolution})")
      if image.mode != "L":
        raise DataError(
            f"{record.path} (listed in {record.source}): PNG mode {image.mode!r}, expected "
            "8-bit grayscale 'L' as in the LRA release; convert the images (PIL: "
            "image.convert('L')) or check that data_dir points at Pathfinder data")
      return np.asarray(image, dtype=np.uint8)
  except DataError:
    raise
  except (OSError, SyntaxError, ValueError):       # missing, empty, truncated, not a PNG
    return None


def _decode_all(records: list[MetadataRecord], resolution: int,
                pixels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """Decodes every record into `pixels`; returns labels (-1 where skipped) and skipped paths."""
  labels = np.full(len(records), -1, np.int32)
  skipped = []
  t0 = time.time()
  for i, record in enumerate(records):
    image = _decode(record, resolution)
    if image is None:
      skipped.append(record.path)
    else:
      pixels[i] = image
      labels[i] = record.label
    if (i + 1) % _LOG_EVERY == 0:
      log.info("Pathfinder: decoded %d of %d images (%.0f images/s)", i + 1, len(records),
               (i + 1) / max(time.time() - t0, 1e-9))
  return labels, tuple(skipped)


def _cache_key(folder: str, resolution: int, records: list[MetadataRecord]) -> str:
  """Hash of what the decoded pixels depend on: the metadata files and every listed image's
  path, size and modification time (an image rewritten in place changes the key)."""
  stats = []
  for path in _metadata_files(folder):
    st = os.stat(path)
    stats.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
  for record in records:
    try:
      st = os.stat(record.path)
      stats.append((record.path, st.st_size, st.st_mtime_ns))
    except OSError:
      stats.append((record.path, -1, -1))
  blob = json.dumps([_CACHE_VERSION, os.path.realpath(folder), resolution, stats])
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_images(folder: str, resolution: int, cache: bool = True) -> PathfinderImages:
  """Reads (or loads from the decode cache) every image of a difficulty folder."""
  records = read_metadata(folder)
  cache_dir = os.path.join(default_cache_dir(), "pathfinder", "decoded",
                           _cache_key(folder, resolution, records)) if cache else None
  if cache_dir and os.path.exists(os.path.join(cache_dir, "info.json")):
    images = _load_cached(cache_dir)
    _log_skipped(folder, images)
    return images
  log.info("Pathfinder: decoding %d images of %s (once; later runs reuse them)", len(records),
           folder)
  t0 = time.time()
  tmp = None
  if cache_dir:
    try:
      os.makedirs(os.path.dirname(cache_dir), exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cache_dir))
    except OSError as e:
      log.warning("Pathfinder: cannot write the decode cache (%s); decoding in memory", e)
  try:
    shape = (len(records), resolution, resolution)
    if tmp:
      pixels = np.lib.format.open_memmap(os.path.join(tmp, "pixels.npy"), "w+", np.uint8, shape)
    else:
      pixels = np.zeros(shape, np.uint8)
    labels, skipped = _decode_all(records, resolution, pixels)
    if len(skipped) == len(records):
      raise DataError(f"{folder}: none of the {len(records)} images listed in metadata/ could "
                      f"be read (first: {records[0].path})")
    log.info("Pathfinder: decoded %d images of %s in %.1f s", len(records), folder,
             time.time() - t0)
    if tmp:
      pixels.flush()
      del pixels
      np.save(os.path.join(tmp, "labels.npy"), labels)
      with open(os.path.join(tmp, "info.json"), "w") as f:
        json.dump({"folder": os.path.realpath(folder), "skipped": list(skipped)}, f)
      try:
        os.rename(tmp, cache_dir)
      except OSError:
        if not os.path.exists(os.path.join(cache_dir, "info.json")):
          raise                                 # not a lost race with another process
      images = _load_cached(cache_dir)
      _log_skipped(folder, images)
      return images
    images = PathfinderImages(pixels=pixels, labels=labels, skipped=skipped)
    _log_skipped(folder, images)
    return images
  finally:
    if tmp and os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(cache_dir: str) -> PathfinderImages:
  with open(os.path.join(cache_dir, "info.json")) as f:
    info = json.load(f)
  return PathfinderImages(pixels=np.load(os.path.join(cache_dir, "pixels.npy"), mmap_mode="r"),
                          labels=np.load(os.path.join(cache_dir, "labels.npy")),
                          skipped=tuple(info["skipped"]))


def _log_skipped(folder: str, images: PathfinderImages) -> None:
  if images.skipped:
    log.warning("Pathfinder: skipped %d of %d images in %s (empty, unreadable or "
                "missing), e.g. %s", len(images.skipped), images.num_records, folder,
                images.skipped[0])


def split_positions(num_records: int, seed: int) -> dict[str, np.ndarray]:
  """Disjoint sorted record positions for train/validation/test (80/10/10), from `seed`."""
  order = np.random.default_rng(seed).permutation(num_records)
  num_train = int(num_records * SPLIT_FRACTIONS["train"])
  num_val = int(num_records * SPLIT_FRACTIONS["validation"])
  return {"train": np.sort(order[:num_train]),
          "validation": np.sort(order[num_train:num_train + num_val]),
          "test": np.sort(order[num_train + num_val:])}


class PixelRecords:
  """Random access to `{"inputs", "targets"}` records of chosen rows of decoded images.

  Pickles without the pixels when they are memory-mapped (workers reopen the file).
  """

  def __init__(self, images: PathfinderImages, rows: np.ndarray, cls: bool):
    self._pixels = images.pixels
    self._path = getattr(images.pixels, "filename", None)
    self._labels = images.labels
    self._rows = np.asarray(rows, np.int64)
    self._cls = cls

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    row = int(self._rows[i])
    tokens = np.asarray(self._pixels[row], np.int32).reshape(-1)
    if self._cls:
      tokens = np.concatenate([np.array([CLS_ID], np.int32), tokens])
    return {"inputs": tokens, "targets": np.asarray(self._labels[row], np.int32)}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    if self._path:
      state["_pixels"] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    if self._pixels is None:
      self._pixels = np.load(self._path, mmap_mode="r")

  def __repr__(self) -> str:
    return f"PixelRecords({len(self)} rows, cls={self._cls})"


def generated_data_dir(resolution: int, difficulty: str, num_images: int, seed: int) -> str:
  """The release folder of a built-in generated set, generating it (atomically) if absent."""
  name = f"{resolution}_{difficulty}_{num_images}_{seed}"
  parent = os.path.join(default_cache_dir(), "pathfinder")
  base = os.path.join(parent, name)
  release = os.path.join(base, f"pathfinder{resolution}")
  if os.path.isdir(os.path.join(release, difficulty, "metadata")):
    return release
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  try:
    workers = min(os.cpu_count() or 1, 4) if num_images >= 4000 else 1
    log.info("Pathfinder: generating %d %dx%d images (%s, seed %d) with %d worker(s) into %s "
             "(once; later runs reuse them)", num_images, resolution, resolution, difficulty,
             seed, workers, base)
    pathfinder_generator.generate(tmp, resolution, difficulty, num_images, seed,
                                  workers=workers)
    try:
      os.rename(tmp, base)
    except OSError:
      if not os.path.isdir(os.path.join(release, difficulty, "metadata")):
        raise                                   # not a lost race: a real error
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return release


def expected_seq_len(resolution: int, cls: bool) -> int:
  """Tokens per image: resolution**2 pixels, plus one for CLS."""
  return resolution * resolution + int(cls)


def load(config: Any) -> TaskData:
  """Pathfinder / Path-X splits of `{"inputs": int32[seq_len], "targets": int32[]}`."""
  pf = config.pathfinder
  resolution = int(pf.resolution)
  if resolution <= 0:
    raise ValueError(f"config.pathfinder.resolution must be positive, got {resolution}")
  cls = uses_cls(config)
  seq_len = expected_seq_len(resolution, cls)
  if config.seq_len != seq_len:
    raise DataError(
        f"config.seq_len={config.seq_len} does not match Pathfinder at resolution "
        f"{resolution}: expected {seq_len} ({resolution}*{resolution} pixels"
        f"{' + CLS' if cls else ''}, model.readout={config.model.readout!r})")
  data_dir = config.data_dir
  if not data_dir:
    data_dir = generated_data_dir(resolution, pf.difficulty, int(pf.num_images),
                                  int(pf.gen_seed))
  folder = find_folder(data_dir, resolution, pf.difficulty)
  # Generated (the marker, or the cache this loader generated) or official; the metadata
  # files, which list every image with its label, are hashed.
  provenance = data_provenance(
      folder, _metadata_files(folder),
      generated=None if config.data_dir else pathfinder_generator.generated_provenance(
          resolution, pf.difficulty, int(pf.num_images), int(pf.gen_seed)))
  images = read_images(folder, resolution)
  kept = images.labels >= 0
  splits = {}
  for split, positions in split_positions(images.num_records, int(pf.split_seed)).items():
    rows = positions[kept[positions]]
    splits[split] = grain.MapDataset.source(PixelRecords(images, rows, cls))
  source = (f"{folder}, {int(kept.sum())} readable images" if config.data_dir else
            f"config.pathfinder.num_images={int(pf.num_images)} is too few")
  return TaskData(name="pathx" if resolution == 128 else "pathfinder", splits=splits,
                  vocab_size=PIXEL_VOCAB + int(cls), num_classes=NUM_CLASSES, seq_len=seq_len,
                  pad_id=pixel_pad_id(config), provenance=provenance,
                  sources=dict.fromkeys(splits, source))
