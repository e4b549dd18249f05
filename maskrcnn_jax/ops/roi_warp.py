"""RoIWarp (the Mask R-CNN paper's Table 2c middle rows, after MNC): RoIPool's quantised bins,
sampled bilinearly as RoIAlign does, reduced by max or average.

It isolates what RoIAlign changes: the sample grid and bilinear taps are RoIAlign's
(`aligned=False`), the bin boundaries are RoIPool's integers. Same frame and call convention as
`ops/roi_align.py` (one image, NHWC without the batch axis, xyxy boxes in input pixels).
"""

import functools

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import roi_align as roi_ops

WARP_REDUCES = ('max', 'avg')


def _check(sampling_ratio, reduce: str) -> None:
  if int(sampling_ratio) != sampling_ratio or int(sampling_ratio) < 1:
    raise ValueError(f'RoIWarp sampling_ratio must be a static int >= 1, got {sampling_ratio!r}')
  if reduce not in WARP_REDUCES:
    raise ValueError(f'RoIWarp reduce must be one of {WARP_REDUCES}, got {reduce!r}')


def _bin_samples(start, end, size, grid: int):
  """Bilinear taps of `grid` samples per quantised bin along one axis.

  Args:
    start, end: int32 `[N, pooled]` bin extents from `roi_align._pool_bins` (clipped to
      `[0, size]`; `end <= start` is an empty bin).
    size: int32 scalar or `[N]`, the map's extent along this axis.
    grid: static samples per bin.

  Returns:
    `(low, high, w_low, w_high)`, each `[N, pooled, grid]`: int32 neighbour rows in
    `[0, size - 1]` and float32 weights (0 in empty bins).
  """
  size = jnp.asarray(size)
  size_b = size[:, None, None] if size.ndim else size
  s = start[..., None].astype(jnp.float32)
  extent = (end - start)[..., None].astype(jnp.float32)
  i = jnp.arange(grid, dtype=jnp.float32) + 0.5
  # RoIAlign's sample grid (start + (i + .5) * bin / grid) on the integer bin, whose pixel j
  # spans [j, j + 1) with its value at j + 0.5 (the frame of aligned RoIAlign): so a 1-pixel
  # bin sampled once reads exactly that pixel. Samples before the first / past the last pixel
  # centre take its value, as RoIAlign clamps them.
  pos = jnp.maximum(s + i * extent / grid - 0.5, 0.0)
  low = jnp.floor(pos).astype(jnp.int32)
  at_edge = low >= size_b - 1
  low = jnp.where(at_edge, size_b - 1, low)
  pos = jnp.where(at_edge, low.astype(jnp.float32), pos)
  high = jnp.where(at_edge, low, low + 1)
  frac = pos - low.astype(jnp.float32)
  filled = jnp.broadcast_to((end > start)[..., None], pos.shape)
  low = jnp.where(filled, low, 0)
  high = jnp.where(filled, high, 0)
  return low, high, jnp.where(filled, 1.0 - frac, 0.0), jnp.where(filled, frac, 0.0)


def roi_warp_flat(flat, boxes, scale, heights, widths, offsets, output_size,
                  sampling_ratio: int, reduce: str, backend: str):
  """RoIWarp over a flat `[P, C]` buffer of one or more maps (see `multilevel_roi_align`).

  `scale`, `heights`, `widths` and `offsets` are scalars or per-RoI `[N]` arrays: the map each
  RoI reads, its size and its first row in `flat`. Returns float32 `[N, oh, ow, C]`.
  """
  _check(sampling_ratio, reduce)
  oh, ow = roi_ops._pair(output_size)  # pylint: disable=protected-access
  g = sampling_ratio
  n, c = boxes.shape[0], flat.shape[-1]
  if n == 0:
    return jnp.zeros((0, oh, ow, c), jnp.float32)
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  # Non-finite boxes (padding garbage) become empty bins, as in RoIPool.
  finite = jnp.all(jnp.isfinite(boxes), axis=-1)
  boxes = jnp.where(finite[:, None], boxes, 0.0)
  pool_bins = roi_ops._pool_bins  # pylint: disable=protected-access
  ys, ye = pool_bins(boxes[:, 1], boxes[:, 3], scale, heights, oh)
  xs, xe = pool_bins(boxes[:, 0], boxes[:, 2], scale, widths, ow)
  ye = jnp.where(finite[:, None], ye, ys)
  yl, yh, wyl, wyh = _bin_samples(ys, ye, heights, g)
  xl, xh, wxl, wxh = _bin_samples(xs, xe, widths, g)
  # RoIAlign's tap layout ([N, oh, ow, iy, ix, y-neighbour, x-neighbour]).
  tap_grid = roi_ops._tap_grid  # pylint: disable=protected-access
  idx, wts = tap_grid((yl, yh, wyl, wyh), (xl, xh, wxl, wxh), widths, offsets)
  gather = roi_ops._weighted_gather  # pylint: disable=protected-access
  if reduce == 'avg':
    inv_count = jnp.float32(1.0 / (g * g))
    return gather(flat, idx.reshape(n, oh, ow, 4 * g * g),
                  (wts * inv_count).reshape(n, oh, ow, 4 * g * g), backend)
  # Max: each sample is its own 4-tap row of the gather, then the maximum over the samples.
  # An empty bin's samples all have weight 0, so its maximum is 0, RoIPool's empty-bin value.
  idx = jnp.moveaxis(idx.reshape(n, oh, ow, g * g, 4), 3, 1).reshape(n * g * g, oh, ow, 4)
  wts = jnp.moveaxis(wts.reshape(n, oh, ow, g * g, 4), 3, 1).reshape(n * g * g, oh, ow, 4)
  samples = gather(flat, idx, wts, backend).reshape(n, g * g, oh, ow, c)
  return jnp.max(samples, axis=1)


@functools.partial(jax.jit, static_argnames=('output_size', 'spatial_scale', 'sampling_ratio',
                                             'reduce', 'backend'))
def roi_warp(features: jnp.ndarray, boxes: jnp.ndarray, output_size, spatial_scale: float,
             sampling_ratio: int = 2, reduce: str = 'max', backend: str = 'auto') -> jnp.ndarray:
  """RoIWarp of one image: quantised bins, bilinear samples, max (default) or average.

  Bins are exactly `roi_pool`'s (torchvision): the corners are scaled and rounded (halves away
  from zero), the RoI spans `round(x1)..round(x2)` inclusive, bin `p` covers the integer range
  `[floor(p * bin), ceil((p + 1) * bin))` clipped to the map. Inside each bin,
  `sampling_ratio` samples per axis sit at `start + (i + 0.5) * (end - start) / sampling_ratio`
  in the frame where pixel `j` spans `[j, j + 1)` (its value at `j + 0.5`, as in
  `roi_align(aligned=True)`), read bilinearly; samples outside the outermost pixel centres take
  the edge pixel's value. So one sample in a 1-pixel bin reads that pixel, and RoIWarp differs
  from RoIPool only by its bilinear samples and from aligned RoIAlign only by the quantised
  bins. The bin outputs the maximum of its samples (`reduce='max'`, the paper's Table 2c
  RoIWarp row, 27.2 AP) or their mean (`'avg'`, 27.1 AP there). An empty bin (clipped away, or
  a non-finite box) outputs 0.

  Gradients flow to `features` (through the bilinear weights of the maximal sample, or of all
  samples for 'avg'), none to `boxes`.

  Args:
    features: float `[H, W, C]`.
    boxes: float `[N, 4]` xyxy in input-image pixels.
    output_size: static int or `(oh, ow)`.
    spatial_scale: static float, feature pixels per image pixel.
    sampling_ratio: static int >= 1, samples per bin along each axis.
    reduce: static 'max' | 'avg'.
    backend: static `execution.backend` value (the gather's form).

  Returns:
    `[N, oh, ow, C]` in `features.dtype`.
  """
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  h, w, c = features.shape
  out = roi_warp_flat(features.reshape(h * w, c), boxes, jnp.float32(spatial_scale),
                      jnp.int32(h), jnp.int32(w), jnp.int32(0), output_size,
                      int(sampling_ratio), reduce, backend)
  return out.astype(features.dtype)
