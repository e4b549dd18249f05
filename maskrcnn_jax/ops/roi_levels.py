"""FPN level assignment and the multilevel RoI operators (torchvision `MultiScaleRoIAlign`):
each RoI pooled from its level by RoIAlign, RoIPool or RoIWarp, in one computation.

Built on `roi_align.py` and `roi_warp.py` (one image, `[H, W, C]` features, xyxy boxes in
input-image pixels); callers `jax.vmap` over images.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import roi_align
from maskrcnn_jax.ops import roi_warp

# The private helpers of roi_align.py are this package's own, shared by design.
# pylint: disable=protected-access

# torchvision LevelMapper: floor(k0 + log2(sqrt(area) / s0) + eps).
LEVEL_EPS = 1e-6


@functools.partial(jax.jit, static_argnames=('min_level', 'max_level', 'canonical_level',
                                             'canonical_scale'))
def assign_levels(boxes: jnp.ndarray, min_level: int, max_level: int, canonical_level: int = 4,
                  canonical_scale: float = 224) -> jnp.ndarray:
  """FPN level of each RoI (FPN paper eq. 1, torchvision `LevelMapper`).

  `floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)` clipped to
  `[min_level, max_level]`; empty, inverted or non-finite boxes go to `min_level`.

  Args:
    boxes: float `[N, 4]` xyxy in input pixels.

  Returns:
    int32 `[N]` absolute levels (e.g. 2..5).
  """
  boxes = boxes.astype(jnp.float32)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  scale = jnp.sqrt(jnp.maximum(area, 0.0))
  level = jnp.floor(canonical_level + jnp.log2(box_ops.true_divide(scale, canonical_scale))
                    + jnp.float32(LEVEL_EPS))
  level = jnp.where(jnp.isnan(level), min_level, level)
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('output_size', 'sampling_ratio', 'aligned',
                                             'min_level', 'canonical_level', 'canonical_scale',
                                             'op', 'warp_reduce', 'backend',
                                             'max_sampling_ratio'))
def multilevel_roi_align(features: Sequence[jnp.ndarray], boxes: jnp.ndarray, output_size,
                         sampling_ratio: int = 2, aligned: bool = False, min_level: int = 2,
                         canonical_level: int = 4, canonical_scale: float = 224,
                         op: str = 'align', backend: str = 'auto',
                         warp_reduce: str = 'max', max_sampling_ratio: int = 4) -> jnp.ndarray:
  """Pools each RoI from its FPN level (torchvision `MultiScaleRoIAlign`) in one computation.

  The levels are flattened into one `[sum_l H_l * W_l, C]` buffer; each RoI gathers from its
  level through a per-RoI offset, size and scale `2**-level`, so only the assigned level is
  read and one compile serves any mix of levels.

  Args:
    features: sequence of float `[H_l, W_l, C]` maps for levels `min_level, min_level + 1, ...`.
    boxes: float `[N, 4]` xyxy in input pixels.
    output_size: static int or `(oh, ow)`.
    sampling_ratio, aligned, max_sampling_ratio: as in `roi_align` (used by op='align').
    min_level: level of `features[0]`; the last map is level `min_level + len(features) - 1`.
    canonical_level, canonical_scale: `assign_levels` parameters.
    op: 'align' (RoIAlign), 'pool' (RoIPool) or 'warp' (RoIWarp, `ops/roi_warp.py`: RoIPool's
      bins sampled bilinearly, `sampling_ratio` per axis, reduced by `warp_reduce`).
    warp_reduce: 'max' or 'avg', used by op='warp'.
    backend: static `execution.backend` value (RoIAlign's gather).

  Returns:
    `[N, oh, ow, C]` in the features' dtype.
  """
  features = [jnp.asarray(f) for f in features]
  boxes = jnp.asarray(boxes)
  num_levels = len(features)
  max_level = min_level + num_levels - 1
  c = features[0].shape[-1]
  dtype = features[0].dtype
  shapes = np.array([f.shape[:2] for f in features], np.int32)
  starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]).astype(np.int32)
  flat = jnp.concatenate([f.reshape(-1, c).astype(dtype) for f in features], axis=0)
  level = assign_levels(boxes, min_level, max_level, canonical_level, canonical_scale)
  k = level - min_level
  heights = jnp.asarray(shapes[:, 0])[k]
  widths = jnp.asarray(shapes[:, 1])[k]
  offsets = jnp.asarray(starts)[k]
  scales = jnp.asarray(2.0 ** -np.arange(min_level, max_level + 1), jnp.float32)[k]
  if op == 'align':
    roi_align._check_sampling(sampling_ratio, max_sampling_ratio)
    idx, wts = roi_align._bin_taps(boxes, scales, heights, widths,
                         offsets, output_size, sampling_ratio, aligned, max_sampling_ratio)
    return roi_align._weighted_gather(flat, idx, wts, backend).astype(dtype)
  if op == 'pool':
    return roi_align._roi_pool_flat(flat, boxes, scales, heights, widths, offsets, output_size)
  if op == 'warp':
    return roi_warp.roi_warp_flat(flat, boxes, scales, heights, widths, offsets, output_size,
                                  int(sampling_ratio), warp_reduce, backend).astype(dtype)
  raise ValueError(f"op must be 'align', 'pool' or 'warp', got {op!r}")
