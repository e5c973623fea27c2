"""A Pathfinder image generator written from the published LRA parameters.

The images (contours, markers, labels, the parameters of each resolution and difficulty, and
how we read them) are drawn by `lra_tasks.pathfinder_drawing`; this module writes a set of them
to files, in batches, with one or more worker processes, and is the command line.

Output is the LRA release layout, readable by `lra_tasks.pathfinder`:

  <out>/pathfinder<res>/<difficulty>/imgs/<batch>/sample_<n>.png     8-bit grayscale
  <out>/pathfinder<res>/<difficulty>/metadata/<batch>.npy            plain text, one line each:
    imgs/<batch> sample_<n>.png <index> <label> <continuity> <contour_length>
    <distractor_length> <paddle_length> <paddle_thickness> <paddle_margin> <num_paddle_contrasts>
  <out>/pathfinder<res>/<difficulty>/GENERATED.json                   `generated_provenance`

The marker `common.GENERATED_MARKER` sits in the difficulty folder, the folder the reader's
`find_folder` returns, so the loader records the set as generated however `config.data_dir`
names it.

`n` counts within the batch and `index` over the whole set. Labels alternate (index % 2), so
any even count is exactly balanced. Image `index` is drawn from its own random stream seeded by
(seed, index) (`pathfinder_drawing.make_image`): output does not depend on batch size, worker
count or resumption.

  python -m lra_tasks.pathfinder_generator --out DIR --resolution 32 \
      --difficulty curv_contour_length_14 --num_images 200000 --seed 0 --workers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import time
from typing import Any, Sequence

from PIL import Image

from lra_tasks.common import write_generated_marker
from lra_tasks.pathfinder_drawing import (DIFFICULTIES, RESOLUTIONS, PathfinderParams,
                                          make_image, params_for)

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 15.0     # seconds between the generator's progress lines

# This module's import name, recorded in provenance (`__name__` is "__main__" under -m).
GENERATOR = "lra_tasks.pathfinder_generator"

DEFAULT_BATCH_SIZE = 1000
SETTINGS_FILE = ".generator.json"    # hidden, beside imgs/ and metadata/


def metadata_line(params: PathfinderParams, batch: int, n: int, index: int, label: int) -> str:
  """One metadata line in the LRA release format."""
  p = params
  return (f"imgs/{batch} sample_{n}.png {index} {label} {p.continuity:g} {p.contour_length} "
          f"{p.distractor_length} {p.paddle_length:g} {p.paddle_thickness:g} "
          f"{p.paddle_margin:g} {p.snake_contrast}\n")


def _write_batch(args: tuple[str, PathfinderParams, int, int, int, int]) -> int:
  """Writes one batch folder and its metadata file (last, atomically); returns images made."""
  root, params, seed, batch, start, stop = args
  meta_path = os.path.join(root, "metadata", f"{batch}.npy")
  if os.path.exists(meta_path):
    return 0                                  # finished by an earlier run
  img_dir = os.path.join(root, "imgs", str(batch))
  os.makedirs(img_dir, exist_ok=True)
  lines = []
  for n, index in enumerate(range(start, stop)):
    image, label = make_image(params, seed, index)
    Image.fromarray(image).save(os.path.join(img_dir, f"sample_{n}.png"), format="PNG")
    lines.append(metadata_line(params, batch, n, index, label))
  tmp = os.path.join(root, "metadata", f".{batch}.npy.tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, meta_path)
  return stop - start


def generated_provenance(resolution: int, difficulty: str, num_images: int,
                         seed: int) -> dict[str, Any]:
  """What results.json records about a generated set (without file hashes), and what
  `generate` writes into the marker `common.GENERATED_MARKER`. The images do not depend on
  batch size or worker count, so these are not part of it."""
  return {"source": "generated", "generator": GENERATOR,
          "settings": {"resolution": resolution, "difficulty": difficulty,
                       "num_images": num_images, "seed": seed}}


def generate(out_dir: str, resolution: int = 32, difficulty: str = "curv_contour_length_14",
             num_images: int = 1000, seed: int = 0, workers: int = 1,
             batch_size: int = DEFAULT_BATCH_SIZE) -> str:
  """Writes `num_images` images in the release layout under `out_dir`; returns the folder.

  The returned folder is `<out_dir>/pathfinder<resolution>/<difficulty>`; it also gets the
  marker `common.GENERATED_MARKER` (`generated_provenance`). Batches whose metadata file
  already exists are kept, so an interrupted run can be resumed with the same arguments (other
  arguments for the same folder raise ValueError).
  """
  params = params_for(resolution, difficulty)
  if num_images <= 0 or batch_size <= 0:
    raise ValueError(f"num_images and batch_size must be positive, got {num_images} and "
                     f"{batch_size}")
  root = os.path.join(out_dir, f"pathfinder{resolution}", difficulty)
  os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
  os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
  settings = dict(params=dataclasses.asdict(params), num_images=num_images, seed=seed,
                  batch_size=batch_size)
  settings_path = os.path.join(root, SETTINGS_FILE)
  if os.path.exists(settings_path):
    with open(settings_path) as f:
      previous = json.load(f)
    if previous != settings:
      raise ValueError(f"{root} holds images generated with other settings ({previous}); "
                       f"use another --out folder or delete it")
  else:
    with open(settings_path, "w") as f:
      json.dump(settings, f)
  # Before any image, so even a partial set is never taken for the official release.
  write_generated_marker(root, generated_provenance(resolution, difficulty, num_images, seed))
  jobs = [(root, params, seed, b, start, min(start + batch_size, num_images))
          for b, start in enumerate(range(0, num_images, batch_size))]
  t0 = time.time()
  made, last_log = 0, t0

  def progress(count: int) -> None:
    """A console line every PROGRESS_EVERY_S seconds and at the end, not one per batch."""
    nonlocal made, last_log
    made += count
    now = time.time()
    if made < num_images and now - last_log < PROGRESS_EVERY_S:
      return
    last_log = now
    log.info("Pathfinder generator: %d of %d images in %.0f s (%.0f images/s)", made,
             num_images, now - t0, made / max(now - t0, 1e-9))

  if workers <= 1 or len(jobs) == 1:
    for job in jobs:
      progress(_write_batch(job))
  else:
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
      for count in pool.imap_unordered(_write_batch, jobs):
        progress(count)
  return root


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", required=True, help="output folder (gets pathfinder<res>/...)")
  parser.add_argument("--resolution", type=int, default=32, choices=RESOLUTIONS)
  parser.add_argument("--difficulty", default="curv_contour_length_14",
                      choices=sorted(DIFFICULTIES))
  parser.add_argument("--num_images", type=int, default=200_000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  root = generate(args.out, args.resolution, args.difficulty, args.num_images, args.seed,
                  args.workers, args.batch_size)
  print(root)


if __name__ == "__main__":
  main()
