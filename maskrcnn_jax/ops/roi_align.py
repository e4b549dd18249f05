"""RoIAlign and RoIPool, equal to torchvision.ops on one image (FPN levels: `roi_levels.py`).

Features are NHWC without the batch axis (`[H, W, C]`); callers `jax.vmap` over images. Boxes
are xyxy in input-image pixels and `spatial_scale` maps them onto the feature map. Every
function has static output shapes and compiles once per feature/box shape.
"""

import functools

import jax
import jax.numpy as jnp

from maskrcnn_jax import backends
from maskrcnn_jax.ops import boxes as box_ops



def _pair(output_size) -> tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  oh, ow = output_size
  return int(oh), int(ow)


# ----------------------------------------------------------------------------------------------
# RoIAlign
# ----------------------------------------------------------------------------------------------


def _axis_samples(lo, hi, scale, size, pooled: int, grid: int, aligned: bool,
                  adaptive: bool = False):
  """Bilinear taps along one axis, as torchvision's CPU kernel computes them.

  Args:
    lo, hi: float32 `[N]` box start/end in image pixels along this axis.
    scale: float32 scalar or `[N]`, image -> feature map scale.
    size: int32 scalar or `[N]`, feature-map extent along this axis.
    pooled, grid: static output bins and sample slots per bin along this axis.
    aligned: half-pixel offset (torchvision `aligned=True`).
    adaptive: the kernel's `sampling_ratio <= 0` rule: each RoI uses `ceil(bin size)` samples
      (0 for an empty aligned RoI), at most `grid`; the slots past a RoI's own count get weight 0,
      so the shapes stay static and the result is exact for every RoI that needs <= `grid`.

  Returns:
    `(low, high, w_low, w_high, count)`: the first four `[N, pooled, grid]`, int32 neighbour
    indices (always in `[0, size - 1]`) and float32 weights (0 for samples outside the map,
    unused slots or non-finite boxes); `count` float32 `[N]` samples per bin along this axis.
  """
  offset = jnp.float32(0.5 if aligned else 0.0)
  start = lo * scale - offset
  end = hi * scale - offset
  extent = end - start
  if not aligned:
    extent = jnp.maximum(extent, 1.0)  # legacy RoIAlign forces rois to be at least 1x1
  bin_size = box_ops.true_divide(extent, pooled)
  p = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
  i = jnp.arange(grid, dtype=jnp.float32)[None, None, :] + 0.5
  if adaptive:
    count = jnp.minimum(jnp.ceil(bin_size), jnp.float32(grid))
    count = jnp.where(jnp.isfinite(count), count, 0.0)
    used = jnp.arange(grid)[None, None, :] < count[:, None, None]
    # The barrier keeps XLA from folding the per-RoI division into a reciprocal multiply,
    # which would round differently from the kernel's `(i + .5) * bin / grid`.
    step, divisor = jax.lax.optimization_barrier(
        (i * bin_size[:, None, None], jnp.maximum(count, 1.0)[:, None, None]))
    step = step / divisor
  else:
    count = jnp.full(bin_size.shape, grid, jnp.float32)
    used = True
    step = box_ops.true_divide(i * bin_size[:, None, None], grid)
  # Same operation order as torchvision: start + p * bin + (i + .5) * bin / grid.
  pos = (start[:, None, None] + p * bin_size[:, None, None]) + step
  size = jnp.asarray(size)
  size_b = size[:, None, None] if size.ndim else size
  size_f = size_b.astype(jnp.float32)
  inside = (pos >= -1.0) & (pos <= size_f) & jnp.isfinite(pos) & used
  pos = jnp.where(inside, jnp.maximum(pos, 0.0), 0.0)
  low = jnp.floor(pos).astype(jnp.int32)
  at_edge = low >= size_b - 1
  low = jnp.where(at_edge, size_b - 1, low)
  pos = jnp.where(at_edge, low.astype(jnp.float32), pos)
  high = jnp.where(at_edge, low, low + 1)
  frac = pos - low.astype(jnp.float32)
  w_low = jnp.where(inside, 1.0 - frac, 0.0)
  w_high = jnp.where(inside, frac, 0.0)
  return low, high, w_low, w_high, count


def _bin_taps(boxes, scale, heights, widths, offsets, output_size, sampling_ratio, aligned,
              max_sampling_ratio: int = 4):
  """Flat gather indices (int32) and weights (float32), both `[N, oh, ow, K]`, of the
  K = 4 * s^2 bilinear taps of every bin; the weights include the 1 / count average.

  `s` is `sampling_ratio`, or `max_sampling_ratio` slots for the adaptive ratio 0 (see
  `_axis_samples`)."""
  oh, ow = _pair(output_size)
  adaptive = int(sampling_ratio) == 0
  g = int(max_sampling_ratio) if adaptive else int(sampling_ratio)
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  yl, yh, wyl, wyh, gy = _axis_samples(boxes[:, 1], boxes[:, 3], scale, heights, oh, g, aligned,
                                       adaptive)
  xl, xh, wxl, wxh, gx = _axis_samples(boxes[:, 0], boxes[:, 2], scale, widths, ow, g, aligned,
                                       adaptive)
  n = boxes.shape[0]
  idx, wts = _tap_grid((yl, yh, wyl, wyh), (xl, xh, wxl, wxh), widths, offsets)
  idx = idx.reshape(n, oh, ow, 4 * g * g)
  if adaptive:  # torchvision: count = max(grid_h * grid_w, 1)
    inv_count = (1.0 / jnp.maximum(gy * gx, 1.0)).reshape((-1,) + (1,) * 6)
  else:
    inv_count = jnp.float32(1.0 / max(g * g, 1))
  wts = (wts * inv_count).reshape(n, oh, ow, 4 * g * g)
  return idx, wts


def _tap_grid(y_taps, x_taps, widths, offsets):
  """Flat row indices (int32) and bilinear weights (float32), both
  `[N, oh, ow, gy, gx, 2, 2]`, of every bin's samples from the per-axis taps `(low, high,
  w_low, w_high)` (each `[N, bins, samples]`) of `_axis_samples`. Axes: y-sample, x-sample,
  y-neighbour, x-neighbour; the x-neighbour innermost, which the CPU gather relies on.
  `widths` / `offsets`: row stride and first row in the flat buffer, scalars or per-RoI."""
  yl, yh, wyl, wyh = y_taps
  xl, xh, wxl, wxh = x_taps
  widths = jnp.asarray(widths)
  row_stride = widths.reshape((-1,) + (1,) * 6) if widths.ndim else widths
  offsets = jnp.asarray(offsets)
  base = offsets.reshape((-1,) + (1,) * 6) if offsets.ndim else offsets
  rows = jnp.stack([yl, yh], axis=-1)[:, :, None, :, None, :, None]
  cols = jnp.stack([xl, xh], axis=-1)[:, None, :, None, :, None, :]
  wy = jnp.stack([wyl, wyh], axis=-1)[:, :, None, :, None, :, None]
  wx = jnp.stack([wxl, wxh], axis=-1)[:, None, :, None, :, None, :]
  return base + rows * row_stride + cols, wy * wx


def _weighted_gather(flat, idx, wts, backend: str):
  """`sum_k wts[..., k] * flat[idx[..., k]]`, float32 `[N, oh, ow, C]` (0 RoIs allowed)."""
  n, oh, ow, _ = idx.shape
  if n == 0:
    return jnp.zeros((0, oh, ow, flat.shape[-1]), jnp.float32)
  return backends.get(backend).weighted_row_gather(flat, idx, wts)


def _check_sampling(sampling_ratio, max_sampling_ratio):
  if int(sampling_ratio) != sampling_ratio or int(sampling_ratio) < 0:
    raise ValueError(f'sampling_ratio must be a static int >= 0 (0 = adaptive), got '
                     f'{sampling_ratio!r}')
  if int(sampling_ratio) == 0 and (int(max_sampling_ratio) != max_sampling_ratio
                                   or int(max_sampling_ratio) < 1):
    raise ValueError('max_sampling_ratio (the cap of the adaptive sampling ratio 0) must be a '
                     f'static int >= 1, got {max_sampling_ratio!r}')


@functools.partial(jax.jit, static_argnames=('output_size', 'spatial_scale', 'sampling_ratio',
                                             'aligned', 'backend', 'max_sampling_ratio'))
def roi_align(features: jnp.ndarray, boxes: jnp.ndarray, output_size, spatial_scale: float,
              sampling_ratio: int = 2, aligned: bool = False,
              backend: str = 'auto', max_sampling_ratio: int = 4) -> jnp.ndarray:
  """RoIAlign of one image, equal to `torchvision.ops.roi_align` with the same arguments.

  Each output bin averages `sampling_ratio**2` bilinear samples placed on a regular grid inside
  the bin. As in torchvision's kernel: samples with a coordinate < -1 or > size contribute 0,
  coordinates in [-1, 0] are clamped to 0 and those past the last pixel to it; legacy mode
  (`aligned=False`) forces each RoI to be at least 1x1 feature pixels; `aligned=True` shifts
  boxes by -0.5 pixel (half-pixel centres). Degenerate and empty boxes are valid inputs.

  Implementation: the `K = 4 * sampling_ratio**2` bilinear taps of every bin are turned into
  flat row indices and weights (`[N, oh, ow, K]`, the 1/count average folded in), and each bin
  is one weighted sum of K feature rows accumulated in float32, the backend's
  `weighted_row_gather` (one gather in the plain form; chunked, in order of position and with
  a scatter-add backward on XLA:CPU, see `backends/cpu_gather.py`).

  Gradients flow to `features` only (the same values torchvision's backward gives). The gradient
  with respect to `boxes` is defined as zero (`stop_gradient`), matching torchvision, which
  returns no gradient for rois. RoIs with non-finite coordinates (garbage in padded slots)
  output 0 and contribute no gradient.

  Args:
    features: float `[H, W, C]` feature map (float32 or bfloat16; sums are done in float32).
    boxes: float `[N, 4]` xyxy boxes in input-image pixels.
    output_size: static int or `(oh, ow)`.
    spatial_scale: static float, feature pixels per image pixel (e.g. 1/4 for P2).
    sampling_ratio: static int, samples per bin along each axis; 0 is torchvision's and
      detectron2's adaptive `ceil(RoI side / output size)` per RoI and axis, realised as a
      static grid of `max_sampling_ratio` slots per axis whose unused slots weigh 0: exact for
      every RoI that needs at most `max_sampling_ratio`, capped there for larger ones.
    aligned: static bool, half-pixel offset (detectron2 ROIAlignV2); torchvision Mask R-CNN v1
      uses False.
    backend: static `execution.backend` value ('auto', 'xla' or 'cpu').
    max_sampling_ratio: static int >= 1, the adaptive ratio's cap (used only when
      `sampling_ratio == 0`; the gather then reads `4 * max_sampling_ratio**2` taps a bin).

  Returns:
    `[N, oh, ow, C]` in `features.dtype`.
  """
  _check_sampling(sampling_ratio, max_sampling_ratio)
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  h, w, c = features.shape
  idx, wts = _bin_taps(boxes, jnp.float32(spatial_scale), jnp.int32(h), jnp.int32(w),
                       jnp.int32(0), output_size, sampling_ratio, aligned, max_sampling_ratio)
  out = _weighted_gather(features.reshape(h * w, c), idx, wts, backend)
  return out.astype(features.dtype)


# ----------------------------------------------------------------------------------------------
# RoIPool
# ----------------------------------------------------------------------------------------------


def _round_half_away(x):
  """C `round()` (halves away from zero), exact in float32."""
  a = jnp.abs(x)
  r = jnp.floor(a)
  r = r + (a - r >= 0.5).astype(x.dtype)
  return jnp.sign(x) * r


def _pool_bins(lo, hi, scale, size, pooled: int):
  """Integer bin extents `[N, pooled]` (start, end) along one axis, torchvision CPU kernel."""
  # Clipped so that the int32 cast is defined; such boxes are far outside any map anyway.
  start = jnp.clip(_round_half_away(lo * scale), -2.0**30, 2.0**30).astype(jnp.int32)
  end = jnp.clip(_round_half_away(hi * scale), -2.0**30, 2.0**30).astype(jnp.int32)
  extent = jnp.maximum(end - start + 1, 1)  # roi_pool counts both end pixels
  bin_size = box_ops.true_divide(extent.astype(jnp.float32), pooled)
  p = jnp.arange(pooled, dtype=jnp.float32)[None, :]
  bstart = jnp.floor(p * bin_size[:, None]).astype(jnp.int32)
  bend = jnp.ceil((p + 1.0) * bin_size[:, None]).astype(jnp.int32)
  size = jnp.asarray(size)
  size_b = size[:, None] if size.ndim else size
  bstart = jnp.clip(bstart + start[:, None], 0, size_b)
  bend = jnp.clip(bend + start[:, None], 0, size_b)
  return bstart, bend


def _roi_pool_flat(flat, boxes, scale, heights, widths, offsets, output_size):
  """Max over each bin of the flat map; argmax found by a loop over bin offsets, then gathered
  so that gradients reach the max element (torchvision's backward)."""
  oh, ow = _pair(output_size)
  if boxes.shape[0] == 0:
    return jnp.zeros((0, oh, ow, flat.shape[-1]), flat.dtype)
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  # Non-finite boxes (padding garbage) become empty bins.
  finite = jnp.all(jnp.isfinite(boxes), axis=-1)
  boxes = jnp.where(finite[:, None], boxes, 0.0)
  ys, ye = _pool_bins(boxes[:, 1], boxes[:, 3], scale, heights, oh)
  xs, xe = _pool_bins(boxes[:, 0], boxes[:, 2], scale, widths, ow)
  ye = jnp.where(finite[:, None], ye, ys)
  widths = jnp.asarray(widths)
  row_stride = widths[:, None, None] if widths.ndim else widths
  offsets = jnp.asarray(offsets)
  base = offsets[:, None, None] if offsets.ndim else offsets
  ys3, ye3 = ys[:, :, None], ye[:, :, None]
  xs3, xe3 = xs[:, None, :], xe[:, None, :]
  empty = (ye3 <= ys3) | (xe3 <= xs3)  # [N, oh, ow]
  max_h = jnp.max(jnp.where(empty, 0, ye3 - ys3))
  max_w = jnp.max(jnp.where(empty, 0, xe3 - xs3))
  n, c = boxes.shape[0], flat.shape[-1]
  flat_f32 = jax.lax.stop_gradient(flat).astype(jnp.float32)

  def scan_row(dy, carry):
    def scan_col(dx, carry):
      best, arg = carry
      y = ys3 + dy
      x = xs3 + dx
      inside = (y < ye3) & (x < xe3)
      index = base + jnp.minimum(y, ye3 - 1) * row_stride + jnp.minimum(x, xe3 - 1)
      index = jnp.where(inside & ~empty, index, 0)
      vals = flat_f32.at[index].get(mode='promise_in_bounds')
      better = inside[..., None] & (vals > best)  # strict: first maximum in row-major order
      return jnp.where(better, vals, best), jnp.where(better, index[..., None], arg)
    return jax.lax.fori_loop(0, max_w, scan_col, carry)

  best0 = jnp.full((n, oh, ow, c), -jnp.finfo(jnp.float32).max, jnp.float32)
  arg0 = jnp.zeros((n, oh, ow, c), jnp.int32)
  _, arg = jax.lax.fori_loop(0, max_h, scan_row, (best0, arg0))
  chan = jnp.arange(c, dtype=jnp.int32)
  out = flat[arg, chan]
  return jnp.where(empty[..., None], jnp.zeros((), flat.dtype), out)


@functools.partial(jax.jit, static_argnames=('output_size', 'spatial_scale'))
def roi_pool(features: jnp.ndarray, boxes: jnp.ndarray, output_size,
             spatial_scale: float) -> jnp.ndarray:
  """RoIPool of one image, equal to `torchvision.ops.roi_pool`.

  Box corners are scaled and rounded (halves away from zero), the RoI spans
  `round(x1)..round(x2)` inclusive (at least 1 pixel), bin `p` covers
  `[floor(p * bin), ceil((p + 1) * bin))` clipped to the map, and outputs the maximum (0 for an
  empty bin). Gradients flow to the first maximal element of each bin; none to `boxes`.
  The maximum is found by a loop over offsets inside the bins whose trip count is (largest bin
  height) x (largest bin width) of the call: cheap for FPN-assigned RoIs, whose bins span a few
  feature pixels, slow for bins of tens of pixels.

  Args:
    features: float `[H, W, C]`.
    boxes: float `[N, 4]` xyxy in input-image pixels.
    output_size: static int or `(oh, ow)`.
    spatial_scale: static float.

  Returns:
    `[N, oh, ow, C]` in `features.dtype`.
  """
  features, boxes = jnp.asarray(features), jnp.asarray(boxes)
  h, w, c = features.shape
  return _roi_pool_flat(features.reshape(h * w, c), boxes, jnp.float32(spatial_scale),
                        jnp.int32(h), jnp.int32(w), jnp.int32(0), output_size)
