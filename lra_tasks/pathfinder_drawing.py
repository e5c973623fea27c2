"""One Pathfinder image, drawn from the published LRA parameters (`make_image`).

Each image holds two circular markers, two long contours made of short dashed "paddles", and
shorter distractor contours. Label 1: both markers sit at the two ends of one long contour.
Label 0: each marker sits at one end of a different long contour (both of the target length),
so every image has two long contours, two markers and two free contour ends whatever its label.
In negatives the marker-to-marker distance is taken from a contour grown like a positive one,
so that distance alone does not give the label away.

Parameters (`params_for`; lengths in output pixels). 32x32: the published LRA values (padding 1,
paddle length 2, thickness 0.5, margin 1, marker radius 1.5, antialias scale 2, seed distance 7,
continuity 1.0, 20 // distractor_length distractors, snake contrast 2, paddle contrast 0.75).
64x64: the published changes (marker radius 2.5, seed distance 12, thickness 1, continuity 1.8,
22 // distractor_length distractors, contrast 0.8) and, as our choice, paddle length 4, margin 2
and padding 2 (twice the 32x32 values, matching the doubled thickness). 16x16 is ours, for a
quick set a small model learns in minutes on a CPU (not an LRA setting): the 32x32 lengths with
paddle thickness 1, seed distance 4 and no distractors; with `curv_contour_length_3` (3 paddles
per contour, also ours) it is configs/pathfinder.py:quick. 128x128 (Path-X) is our
extrapolation: lengths four times the 32x32 values (paddle length 8, margin 4, thickness 2,
padding 4), marker radius 5, seed distance 24, continuity 3.6, 24 // distractor_length
distractors, contrast 0.8. Contour length (paddles in each long contour) is 14
(`curv_contour_length_14`), 9 (`curv_contour_length_9`), 6 (`curv_baseline`) or 3
(`curv_contour_length_3`, ours); distractors have max(1, contour_length // 3) paddles.

How we read the parameters (our interpretation, not the original code):
- continuity c: each paddle turns from the previous one by an angle drawn uniformly from
  [-a, a] with a = 2 * atan(c / paddle_length): 53 degrees at 32x32, 48.5 at 64 and 128.
- snake contrast k and paddle contrast p: each contour is drawn at an intensity picked
  uniformly from k levels evenly spaced over [p, 1] (times 255); markers are drawn at 255.
  The last metadata field (number of paddle contrasts) is k.
- seed distance: the least distance between the two marker centres.
- a marker sits half a margin plus its radius beyond its contour's end paddle.
- contours keep about `paddle_margin` pixels (at least three quarters of it: the check runs on
  a raster) from other contours and markers, and from their own non-adjacent paddles, so
  contours never touch or cross. Long contours are placed first, then the distractors (one is
  dropped in the rare case it does not fit anywhere).
- drawing: every paddle is a flat-ended bar, markers are discs, both with a one-pixel
  antialiasing ramp at `antialias_scale` times the resolution, then box-downsampled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np

DIFFICULTIES: dict[str, int] = {
    "curv_contour_length_3": 3,          # ours, for the 16x16 quick set (not an LRA difficulty)
    "curv_baseline": 6,
    "curv_contour_length_9": 9,
    "curv_contour_length_14": 14,
}
RESOLUTIONS = (16, 32, 64, 128)

_GRID = 128              # raster cells per side for clearance checks
_ANGLES = 64             # paddle directions of the precomputed clearance masks
_CANDIDATES = 8          # turn angles tried at once for each paddle
_LONG_SEARCH = 10        # search steps allowed per paddle of a long contour
_SHORT_SEARCH = 3        # search steps allowed per paddle of a distractor
_CONTOUR_TRIES = 20      # restarts of one contour before the image is restarted
_IMAGE_TRIES = 100       # restarts of one image before giving up


@dataclasses.dataclass(frozen=True)
class PathfinderParams:
  """Drawing parameters for one resolution and difficulty (lengths in output pixels)."""
  resolution: int
  contour_length: int
  padding: float
  paddle_length: float
  paddle_thickness: float
  paddle_margin: float
  marker_radius: float
  antialias_scale: int
  seed_distance: float
  continuity: float
  distractor_budget: int
  snake_contrast: int
  paddle_contrast: float

  @property
  def distractor_length(self) -> int:
    return max(1, self.contour_length // 3)

  @property
  def num_distractors(self) -> int:
    return self.distractor_budget // self.distractor_length

  @property
  def max_turn(self) -> float:
    """Largest turn between consecutive paddles, in radians."""
    return 2.0 * math.atan(self.continuity / self.paddle_length)


# params_for's per-resolution settings; 16 is ours (the quick set, configs/pathfinder.py:quick).
_PER_RESOLUTION = {
    16: dict(padding=1, paddle_length=2, paddle_thickness=1, paddle_margin=1, marker_radius=1.5,
             seed_distance=4, continuity=1.0, distractor_budget=0, paddle_contrast=0.75),
    32: dict(padding=1, paddle_length=2, paddle_thickness=0.5, paddle_margin=1, marker_radius=1.5,
             seed_distance=7, continuity=1.0, distractor_budget=20, paddle_contrast=0.75),
    64: dict(padding=2, paddle_length=4, paddle_thickness=1, paddle_margin=2, marker_radius=2.5,
             seed_distance=12, continuity=1.8, distractor_budget=22, paddle_contrast=0.8),
    128: dict(padding=4, paddle_length=8, paddle_thickness=2, paddle_margin=4, marker_radius=5,
              seed_distance=24, continuity=3.6, distractor_budget=24, paddle_contrast=0.8),
}


def params_for(resolution: int, difficulty: str) -> PathfinderParams:
  """The parameters used for `resolution` (16, 32, 64 or 128) and `difficulty`."""
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"unknown Pathfinder difficulty {difficulty!r}; expected one of "
                     f"{sorted(DIFFICULTIES)}")
  length = DIFFICULTIES[difficulty]
  common = dict(resolution=resolution, contour_length=length, antialias_scale=2,
                snake_contrast=2)
  if resolution in _PER_RESOLUTION:
    return PathfinderParams(**_PER_RESOLUTION[resolution], **common)
  raise ValueError(f"unsupported Pathfinder resolution {resolution}; expected one of "
                   f"{RESOLUTIONS}")


def _point_segment_distance2(px: float, py: float, ax: float, ay: float, bx: float,
                             by: float) -> float:
  """Squared distance from point p to segment [a, b]."""
  vx, vy = bx - ax, by - ay
  wx, wy = px - ax, py - ay
  vv = vx * vx + vy * vy
  t = 0.0 if vv == 0.0 else min(max((wx * vx + wy * vy) / vv, 0.0), 1.0)
  dx, dy = wx - t * vx, wy - t * vy
  return dx * dx + dy * dy


def _segment_distance2(a: tuple[float, float, float, float],
                       b: tuple[float, float, float, float]) -> float:
  """Squared distance between segments a = (x0, y0, x1, y1) and b; 0 where they cross."""
  ax, ay, bx, by = a
  cx, cy, dx, dy = b
  ux, uy, vx, vy = bx - ax, by - ay, dx - cx, dy - cy
  if ((ux * (cy - ay) - uy * (cx - ax)) * (ux * (dy - ay) - uy * (dx - ax)) < 0
      and (vx * (ay - cy) - vy * (ax - cx)) * (vx * (by - cy) - vy * (bx - cx)) < 0):
    return 0.0
  return min(_point_segment_distance2(ax, ay, cx, cy, dx, dy),
             _point_segment_distance2(bx, by, cx, cy, dx, dy),
             _point_segment_distance2(cx, cy, ax, ay, bx, by),
             _point_segment_distance2(dx, dy, ax, ay, bx, by))


class _Random:
  """Uniform random numbers drawn from `numpy` in blocks and handed out as Python floats."""

  def __init__(self, seed: int, index: int):
    self._rng = np.random.default_rng([seed, index])
    self._buffer: list[float] = []
    self._pos = 0

  def uniform(self, lo: float, hi: float, n: int) -> list[float]:
    """`n` numbers drawn uniformly from [lo, hi)."""
    if self._pos + n > len(self._buffer):
      self._buffer = self._rng.random(max(1024, n)).tolist()
      self._pos = 0
    out = self._buffer[self._pos:self._pos + n]
    self._pos += n
    return [lo + (hi - lo) * u for u in out]


class _Item(NamedTuple):
  """A placed paddle (segment) or marker (a = b), with the contour it belongs to."""
  seg: tuple[float, float, float, float]
  radius: float
  owner: int
  serial: int            # paddle number in its contour; -1 / contour length for its markers
  angle: float           # paddle direction (radians); 0 for markers
  zone: tuple[float, float, float, float]    # box where a new paddle's axis may conflict

  @property
  def is_marker(self) -> bool:
    return self.seg[:2] == self.seg[2:]


@functools.lru_cache(maxsize=16)
def _zone_masks(p: PathfinderParams) -> tuple[np.ndarray, np.ndarray, int]:
  """Raster masks of where a new paddle's axis is too close to a placed item.

  Returns bool[_ANGLES, w, w] for paddles starting at the centre of cell (a, a) and pointing
  at each of _ANGLES directions, bool[w, w] for a marker centred there, and a.
  """
  c = _GRID / p.resolution
  half = p.paddle_thickness / 2
  reach_paddle = (2 * half + p.paddle_margin) * c
  reach_marker = (p.marker_radius + half + p.paddle_margin) * c
  length = p.paddle_length * c
  anchor = int(math.ceil(length + max(reach_paddle, reach_marker))) + 1
  w = 2 * anchor + 1
  grid = np.arange(w, dtype=np.float64) - anchor           # cell centres minus the anchor's
  px, py = grid[None, None, :], grid[None, :, None]
  theta = np.arange(_ANGLES) * (2 * math.pi / _ANGLES)
  vx = (length * np.cos(theta))[:, None, None]
  vy = (length * np.sin(theta))[:, None, None]
  t = np.clip((px * vx + py * vy) / (length * length), 0.0, 1.0)
  paddles = (px - t * vx) ** 2 + (py - t * vy) ** 2 < reach_paddle ** 2
  marker = px[0] ** 2 + py[0] ** 2 < reach_marker ** 2
  paddles.flags.writeable = marker.flags.writeable = False     # shared through the cache
  return paddles, marker, anchor


class _Scene:
  """The paddles and markers placed so far.

  Contours already finished ("committed") are also kept as a raster of the places where a new
  paddle's axis would come closer than the clearance; the contour being grown is checked
  exactly against itself.
  """

  def __init__(self, p: PathfinderParams):
    self.items: list[_Item] = []
    self.committed = 0
    self.half = p.paddle_thickness / 2
    self.clearance = p.paddle_margin
    self.cells_per_px = _GRID / p.resolution
    self._masks, self._marker_mask, self._anchor = _zone_masks(p)
    self._border = self._masks.shape[-1] + 1
    size = _GRID + 2 * self._border
    self._blocked = np.zeros((size, size), bool)
    self._flat = memoryview(self._blocked.reshape(-1))
    self._stride = size
    # Points along a candidate paddle checked against the raster, at most clearance / 2 apart.
    n = int(math.ceil(p.paddle_length / (p.paddle_margin / 2))) + 1
    self._fractions = [i / (n - 1) for i in range(n)]

  def add(self, seg: tuple[float, float, float, float], radius: float, owner: int,
          serial: int, angle: float = 0.0) -> None:
    reach = radius + self.half + self.clearance
    x0, y0, x1, y1 = seg
    zone = (min(x0, x1) - reach, max(x0, x1) + reach, min(y0, y1) - reach,
            max(y0, y1) + reach)
    self.items.append(_Item(seg, radius, owner, serial, angle, zone))

  def truncate(self, n: int) -> None:
    """Drops the items added after the first `n` (never committed ones)."""
    del self.items[max(n, self.committed):]

  def commit(self) -> None:
    """Adds the items placed since the last commit to the raster."""
    c, b = self.cells_per_px, self._border - self._anchor
    w = self._masks.shape[-1]
    for it in self.items[self.committed:]:
      x, y = int(it.seg[0] * c) + b, int(it.seg[1] * c) + b
      if it.is_marker:
        mask = self._marker_mask
      else:
        mask = self._masks[int(round(it.angle / (2 * math.pi) * _ANGLES)) % _ANGLES]
      view = self._blocked[y:y + w, x:x + w]
      np.logical_or(view, mask, out=view)
    self.committed = len(self.items)

  def _clear_of_own(self, seg: tuple[float, float, float, float], radius: float,
                    stop: int) -> bool:
    """Whether `seg` keeps the clearance from the uncommitted items before index `stop`."""
    x0, y0, x1, y1 = seg
    xlo, xhi = (x0, x1) if x0 < x1 else (x1, x0)
    ylo, yhi = (y0, y1) if y0 < y1 else (y1, y0)
    extra = radius - self.half                  # zones are sized for paddle candidates
    for i in range(self.committed, stop):
      it = self.items[i]
      zx0, zx1, zy0, zy1 = it.zone
      if zx0 - extra > xhi or zx1 + extra < xlo or zy0 - extra > yhi or zy1 + extra < ylo:
        continue
      reach = radius + it.radius + self.clearance
      if _segment_distance2(seg, it.seg) < reach * reach:
        return False
    return True

  def paddle_free(self, seg: tuple[float, float, float, float]) -> bool:
    """Whether a new paddle `seg` keeps the clearance from all but the last item placed."""
    x0, y0, x1, y1 = seg
    c, b, stride, flat = self.cells_per_px, self._border, self._stride, self._flat
    dx, dy = x1 - x0, y1 - y0
    for f in self._fractions:
      if flat[(int((y0 + f * dy) * c) + b) * stride + int((x0 + f * dx) * c) + b]:
        return False
    return self._clear_of_own(seg, self.half, len(self.items) - 1)

  def marker_free(self, x: float, y: float, radius: float, start: bool) -> bool:
    """Whether a marker at (x, y) keeps the clearance from everything but its own paddle."""
    seg = (x, y, x, y)
    for it in self.items[:self.committed]:
      reach = radius + it.radius + self.clearance
      if _segment_distance2(seg, it.seg) < reach * reach:
        return False
    return start or self._clear_of_own(seg, radius, len(self.items) - 1)


def _inside(x: float, y: float, lo: float, hi: float) -> bool:
  return lo <= x <= hi and lo <= y <= hi


def _grow_contour(scene: _Scene, rng: _Random, p: PathfinderParams, owner: int,
                  num_paddles: int, anchor: tuple[float, float], start_marker: bool,
                  end_marker: bool, min_end_distance: float = 0.0,
                  search: int = _LONG_SEARCH) -> tuple[float, float] | None:
  """Adds one contour from `anchor` (its start marker's centre, or its first point).

  Paddles are grown one at a time, each turning by a random angle; when no candidate fits,
  the search backs up a paddle (bounded depth-first search). On success the contour is
  committed and the centre where an end marker goes is returned (the marker is placed only
  if `end_marker`; it must lie `min_end_distance` from `anchor`). Returns None, with the scene
  unchanged, when the contour does not fit.
  """
  items = scene.items
  n0 = len(items)
  half = p.paddle_thickness / 2
  r = p.marker_radius
  lo, hi = p.padding + half, p.resolution - p.padding - half
  mlo, mhi = p.padding + r, p.resolution - p.padding - r
  ax, ay = anchor
  if start_marker:
    if not (_inside(ax, ay, mlo, mhi) and scene.marker_free(ax, ay, r, start=True)):
      return None
    scene.add((ax, ay, ax, ay), r, owner, -1)
  # Search state, one entry per placed paddle: [candidate angles, index of the one in use].
  levels: list[list] = []
  budget = search * num_paddles + 1          # + 1: the final end check

  def try_from(k: int, angles: list[float], start: int) -> int:
    """Places the first fitting candidate of paddle k from index `start`; returns it or -1."""
    if k == 0:
      ex, ey, gap = ax, ay, (r + p.paddle_margin / 2 if start_marker else 0.0)
    else:
      ex, ey, gap = items[-1].seg[2], items[-1].seg[3], p.paddle_margin
    for j in range(start, len(angles)):
      ux, uy = math.cos(angles[j]), math.sin(angles[j])
      x0, y0 = ex + gap * ux, ey + gap * uy
      x1, y1 = x0 + p.paddle_length * ux, y0 + p.paddle_length * uy
      if not (_inside(x0, y0, lo, hi) and _inside(x1, y1, lo, hi)):
        continue
      seg = (x0, y0, x1, y1)
      if scene.paddle_free(seg):
        scene.add(seg, half, owner, k, angles[j])
        return j
    return -1

  while budget > 0:
    budget -= 1
    k = len(levels)
    if k < num_paddles:                       # propose candidates for paddle k
      if k == 0:
        angles = rng.uniform(0.0, 2 * math.pi, _CANDIDATES)
      else:
        prev_angles, j = levels[-1]
        angles = [prev_angles[j] + t for t in rng.uniform(-p.max_turn, p.max_turn, _CANDIDATES)]
      j = try_from(k, angles, 0)
      if j >= 0:
        levels.append([angles, j])
        continue
    else:                                     # all paddles placed: check the end
      angles, j = levels[-1]
      dist = r + p.paddle_margin / 2
      cx = items[-1].seg[2] + dist * math.cos(angles[j])
      cy = items[-1].seg[3] + dist * math.sin(angles[j])
      if (_inside(cx, cy, mlo, mhi)
          and math.hypot(cx - ax, cy - ay) >= min_end_distance
          and (not end_marker or scene.marker_free(cx, cy, r, start=False))):
        if end_marker:
          scene.add((cx, cy, cx, cy), r, owner, num_paddles)
        scene.commit()
        return cx, cy
    # Back up: drop the last paddle and try its next fitting candidate.
    while levels:
      items.pop()
      angles, j = levels[-1]
      j = try_from(len(levels) - 1, angles, j + 1)
      if j >= 0:
        levels[-1][1] = j
        break
      levels.pop()
    if not levels:
      break
  scene.truncate(n0)
  return None


def _random_point(rng: _Random, p: PathfinderParams, margin: float) -> tuple[float, float]:
  x, y = rng.uniform(p.padding + margin, p.resolution - p.padding - margin, 2)
  return x, y


def _compose(rng: _Random, p: PathfinderParams, label: int) -> _Scene | None:
  """Places the long contours, markers and distractors of one image, or None if stuck."""
  scene = _Scene(p)
  r = p.marker_radius
  # Contour 0 carries the first marker at its start; in positives also the second at its end.
  first, end_centre = (0.0, 0.0), None
  for _ in range(_CONTOUR_TRIES):
    first = _random_point(rng, p, r)
    end_centre = _grow_contour(scene, rng, p, 0, p.contour_length, first, True, label == 1,
                               min_end_distance=p.seed_distance)
    if end_centre is not None:
      break
  if end_centre is None:
    return None
  # Contour 1: unmarked in positives; in negatives it starts at the second marker, placed at
  # the distance that contour 0's own end has.
  distance = math.hypot(end_centre[0] - first[0], end_centre[1] - first[1])
  mlo, mhi = p.padding + r, p.resolution - p.padding - r
  for _ in range(_CONTOUR_TRIES):
    if label == 1:
      anchor = _random_point(rng, p, r)
    else:
      anchors = [(first[0] + distance * math.cos(a), first[1] + distance * math.sin(a))
                 for a in rng.uniform(0.0, 2 * math.pi, _CANDIDATES)]
      anchors = [a for a in anchors if _inside(a[0], a[1], mlo, mhi)]
      if not anchors:
        continue
      anchor = anchors[0]
    if _grow_contour(scene, rng, p, 1, p.contour_length, anchor, label == 0, False) is not None:
      break
  else:
    return None
  for d in range(p.num_distractors):
    for _ in range(_CONTOUR_TRIES):
      anchor = _random_point(rng, p, 0)
      if _grow_contour(scene, rng, p, 2 + d, p.distractor_length, anchor, False, False,
                       search=_SHORT_SEARCH) is not None:
        break
  return scene


def _stamps(items: list[_Item], s: int, rad: float, fade: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Coverage patches float32[n, w, w] of same-shaped items, with their top-left corners."""
  seg = np.array([it.seg for it in items], np.float32) * s
  ax, ay, bx, by = seg.T
  extent = float(np.hypot(bx - ax, by - ay).max()) + 2 * rad + 2
  w = int(math.ceil(extent)) + 1
  x0 = np.floor(np.minimum(ax, bx) - rad - 1).astype(np.int64)
  y0 = np.floor(np.minimum(ay, by) - rad - 1).astype(np.int64)
  grid = np.arange(w, dtype=np.float32) + 0.5
  xs = (x0 - ax)[:, None, None] + grid[None, None, :]
  ys = (y0 - ay)[:, None, None] + grid[None, :, None]
  length = np.hypot(bx - ax, by - ay)
  if float(length.max()) == 0.0:                      # markers: discs
    cover = np.clip(rad + 0.5 - np.sqrt(xs * xs + ys * ys), 0.0, 1.0)
  else:                                               # paddles: flat-ended bars
    ux = ((bx - ax) / length)[:, None, None]
    uy = ((by - ay) / length)[:, None, None]
    along = xs * ux + ys * uy
    across = np.abs(ys * ux - xs * uy)
    cover = (np.clip(rad + 0.5 - across, 0.0, 1.0)
             * np.clip(np.minimum(along, length[:, None, None] - along) + 0.5, 0.0, 1.0))
  if fade is not None:
    cover *= fade[:, None, None]
  return cover, x0, y0


def _render(scene: _Scene, intensity: np.ndarray, p: PathfinderParams) -> np.ndarray:
  """Rasterises the scene (antialiased at `antialias_scale`) to uint8[res, res].

  Paddles are flat-ended bars (so the gaps between them stay visible), drawn at their
  contour's intensity; markers are discs at full intensity.
  """
  s = p.antialias_scale
  size = p.resolution * s
  pad = int(math.ceil((p.paddle_length + 2 * p.marker_radius + 2) * s)) + 2
  canvas = np.zeros((size + 2 * pad, size + 2 * pad), np.float32)
  paddles = [it for it in scene.items if not it.is_marker]
  markers = [it for it in scene.items if it.is_marker]
  groups = []
  if paddles:
    fade = intensity[[it.owner for it in paddles]].astype(np.float32)
    groups.append(_stamps(paddles, s, p.paddle_thickness / 2 * s, fade))
  if markers:
    groups.append(_stamps(markers, s, p.marker_radius * s, None))
  for cover, xs, ys in groups:
    w = cover.shape[-1]
    for patch, x, y in zip(cover, (xs + pad).tolist(), (ys + pad).tolist()):
      view = canvas[y:y + w, x:x + w]
      np.maximum(view, patch, out=view)
  canvas = canvas[pad:pad + size, pad:pad + size]
  small = canvas.reshape(p.resolution, s, p.resolution, s).mean(axis=(1, 3))
  return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


def make_image(params: PathfinderParams, seed: int, index: int) -> tuple[np.ndarray, int]:
  """Image `index` of the set with base `seed`: (uint8[res, res], label)."""
  rng = _Random(seed, index)
  label = index % 2
  for _ in range(_IMAGE_TRIES):
    scene = _compose(rng, params, label)
    if scene is not None:
      break
  else:
    raise RuntimeError(f"could not lay out Pathfinder image {index} (seed {seed}) with {params}")
  levels = np.linspace(params.paddle_contrast, 1.0, params.snake_contrast)
  owners = max(it.owner for it in scene.items) + 1
  intensity = levels[[min(int(u), len(levels) - 1)
                      for u in rng.uniform(0, len(levels), owners)]]
  return _render(scene, intensity, params), label
