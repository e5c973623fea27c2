"""Matplotlib views of attention maps (works headless: figures are built without pyplot).

* `heatmaps`: one panel per map (head), padded rows/columns masked (drawn in grey), optional token
  labels (`listops_labels`), block-averaged down to at most `max_size` cells per side.
* `image_grid`: maps whose columns are pixels, each row reshaped to the image grid: where one
  query pixel attends, or what one Luna P slot gathers (a pack-map row).
* `block_average`: NaN-aware block mean for long sequences.

Every function returns a `matplotlib.figure.Figure`; `save_figure` writes it as PNG. In a
notebook, `IPython.display.display(fig)` shows it.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import matplotlib
from matplotlib.figure import Figure
import numpy as np

from lra_tasks import listops

MASK_COLOR = "lightgrey"


def block_average(a: np.ndarray, max_size: int) -> np.ndarray:
  """Block mean over the last two axes (the last one for 1-D input) so each is <= max_size.

  Blocks are ceil(size / max_size) long; the last block of an axis may be shorter. NaNs
  (masked cells) are ignored; a block with only NaNs stays NaN.
  """
  if max_size <= 0:
    raise ValueError(f"max_size={max_size} must be positive")
  a = np.asarray(a, np.float64)
  axes = (-1,) if a.ndim == 1 else (-2, -1)
  for axis in axes:
    size = a.shape[axis]
    k = math.ceil(size / max_size)
    if k <= 1:
      continue
    pad = -size % k
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    a = np.pad(a, widths, constant_values=np.nan)
    a = np.moveaxis(a, axis, -1)
    a = a.reshape(*a.shape[:-1], a.shape[-1] // k, k)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN blocks
      a = np.nanmean(a, axis=-1)
    a = np.moveaxis(a, -1, axis)
  return a


def mask_map(a_QxK: np.ndarray, row_mask_Q: np.ndarray | None = None,
             col_mask_K: np.ndarray | None = None) -> np.ndarray:
  """Float copy of a [..., Q, K] map with NaN at rows/columns whose mask is False."""
  a = np.array(a_QxK, np.float64)
  if row_mask_Q is not None:
    a[..., ~np.asarray(row_mask_Q, bool), :] = np.nan
  if col_mask_K is not None:
    a[..., ~np.asarray(col_mask_K, bool)] = np.nan
  return a


def listops_labels(tokens_N: Sequence[int]) -> list[str]:
  """ListOps token ids -> their strings (`lra_tasks.listops.VOCAB`)."""
  return [listops.VOCAB[int(t)] for t in tokens_N]


def _cmap(name: str):
  return matplotlib.colormaps[name].with_extremes(bad=MASK_COLOR)


def _set_labels(ax, axis: str, labels: Sequence[str] | None, size: int) -> None:
  """Tick labels when they fit (at most ~64 shown: every k-th), else plain positions."""
  if labels is None:
    return
  labels = list(labels)
  if len(labels) != size:   # downsampled: labels no longer match the cells
    return
  step = max(1, math.ceil(size / 64))
  ticks = np.arange(0, size, step)
  fontsize = 5 if size > 32 else 7
  if axis == "x":
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
  else:
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)


def heatmaps(maps_HxQxK: np.ndarray, *, row_mask: np.ndarray | None = None,
             col_mask: np.ndarray | None = None, titles: Sequence[str] | None = None,
             row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
             xlabel: str = "key", ylabel: str = "query", suptitle: str | None = None,
             max_size: int = 256, ncols: int | None = None, cmap: str = "viridis",
             panel_size: float = 3.2, shared_scale: bool = False) -> Figure:
  """One heatmap per map of a [H, Q, K] stack (a single [Q, K] map is fine too).

  Rows where `row_mask` is False and columns where `col_mask` is False (padding) are drawn in
  grey. Maps larger than `max_size` per side are block-averaged (labels are then dropped).
  """
  maps = np.asarray(maps_HxQxK)
  if maps.ndim == 2:
    maps = maps[None]
  maps = block_average(mask_map(maps, row_mask, col_mask), max_size)
  h = maps.shape[0]
  ncols = ncols or min(h, 4)
  nrows = math.ceil(h / ncols)
  # Room for the tick labels when they are drawn (about 0.08 inch per label).
  width = max(panel_size, 0.08 * len(col_labels) if col_labels is not None else 0.0)
  height = max(panel_size, 0.08 * len(row_labels) if row_labels is not None else 0.0)
  fig = Figure(figsize=(width * ncols + 0.6, height * nrows + 0.6), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  vmax = np.nanmax(maps) if shared_scale and np.isfinite(maps).any() else None
  for i, ax in enumerate(axes.flat):
    if i >= h:
      ax.set_axis_off()
      continue
    im = ax.imshow(maps[i], cmap=_cmap(cmap), vmin=0.0, vmax=vmax, interpolation="nearest",
                   aspect="auto")
    ax.set_title(titles[i] if titles is not None else f"head {i}", fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=6)
    _set_labels(ax, "x", col_labels, maps.shape[-1])
    _set_labels(ax, "y", row_labels, maps.shape[-2])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  return fig


def image_grid(rows_KxN: np.ndarray, resolution: int, *, offset: int = 0,
               titles: Sequence[str] | None = None, image: np.ndarray | None = None,
               marks: Sequence[tuple[int, int] | None] | None = None,
               suptitle: str | None = None, ncols: int | None = None, cmap: str = "magma",
               panel_size: float = 2.4, colorbar: bool = True) -> Figure:
  """Each row of a [K, N] map reshaped to the `resolution` x `resolution` pixel grid.

  Args:
    rows_KxN: K maps over N positions (e.g. pack rows: what each P slot gathers; or one query
      pixel's attention row).
    resolution: image side (32 for Image/Pathfinder, 128 for Path-X).
    offset: index of the first pixel position (1 when a CLS token is prepended).
    titles: one per row.
    image: optional [resolution, resolution] input image, drawn as the first panel.
    marks: optional (row, col) per map, drawn as a cyan cross (e.g. the query pixel).
    suptitle: figure title.
    ncols: panels per row of the figure.
    cmap: colormap of the maps.
    panel_size: inches per panel.
    colorbar: a colour scale beside every map (each map has its own scale, from 0).
  """
  rows = np.atleast_2d(np.asarray(rows_KxN, np.float64))
  npix = resolution * resolution
  if rows.shape[-1] < offset + npix:
    raise ValueError(f"maps have {rows.shape[-1]} positions; need offset {offset} + "
                     f"{resolution}x{resolution}")
  grids = rows[:, offset:offset + npix].reshape(-1, resolution, resolution)
  panels = ([("input", np.asarray(image, np.float64), "gray")] if image is not None else [])
  for k, g in enumerate(grids):
    panels.append((titles[k] if titles is not None else f"map {k}", g, cmap))
  ncols = ncols or min(len(panels), 6)
  nrows = math.ceil(len(panels) / ncols)
  fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.4), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  first_map = 1 if image is not None else 0
  for i, ax in enumerate(axes.flat):
    ax.set_xticks([])
    ax.set_yticks([])
    if i >= len(panels):
      ax.set_axis_off()
      continue
    title, g, cm = panels[i]
    k = i - first_map
    im = ax.imshow(g, cmap=_cmap(cm), interpolation="nearest", vmin=0.0 if k >= 0 else None)
    ax.set_title(title, fontsize=8)
    if colorbar and k >= 0:
      cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
      cb.ax.tick_params(labelsize=5)
      cb.formatter.set_powerlimits((-2, 2))
    if marks is not None and k >= 0 and marks[k] is not None:
      r, c = marks[k]
      ax.plot([c], [r], marker="+", color="cyan", markersize=8, mew=1.5)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  return fig


def save_figure(fig: Figure, path: str, dpi: int = 100) -> str:
  """Writes `fig` as PNG (creating the folder); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  return path
