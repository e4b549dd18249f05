"""Box arithmetic on `xyxy` boxes: areas, overlaps, clipping and the R-CNN box coder.

Pure `jax.numpy`, written for one image (callers `jax.vmap` over a batch). Boxes are float32
`[..., 4]` as `(x1, y1, x2, y2)` in absolute pixels with integer pixel corners (no `+1`), as in
torchvision and detectron2. Also the numeric helper the other ops share: `true_divide`.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# torchvision models/detection/_utils.py: BoxCoder(bbox_xform_clip=math.log(1000.0 / 16)).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# Box-coder weights (wx, wy, ww, wh): torchvision's RPN uses (1, 1, 1, 1), its box head
# (10, 10, 5, 5).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def true_divide(a: jnp.ndarray, d) -> jnp.ndarray:
  """`a / d` with IEEE division also for a constant `d`.

  XLA rewrites division by a constant into multiplication by its reciprocal, which is off by an
  ulp for many divisors; torchvision divides, and roi_pool's floor/ceil of bin edges, RoIAlign's
  sample positions and the mask paster's scale must see the same float values.
  """
  _, den = jax.lax.optimization_barrier((a, jnp.full(a.shape, d, a.dtype)))
  return a / den


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Areas `(x2 - x1) * (y2 - y1)` of float `[..., 4]` boxes -> `[...]` (negative if inverted)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _intersection(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise intersection areas of `a [N, 4]` and `b [M, 4]` -> `[N, M]`."""
  lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
  rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Intersection over union of every pair (torchvision `box_iou`), 0 where the union is 0.

  Args:
    a: float `[N, 4]` xyxy boxes.
    b: float `[M, 4]` xyxy boxes in the same frame.

  Returns:
    float `[N, M]` IoU values in [0, 1].
  """
  inter = _intersection(a, b)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def pairwise_ioa(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Intersection over the area of `b` for every pair, 0 where `b` has no area.

  Used for crowd regions: `a` are candidates, `b` the crowd boxes; detectron2 `pairwise_ioa`
  and the COCO evaluator's `iscrowd` overlap.

  Args:
    a: float `[N, 4]` xyxy boxes.
    b: float `[M, 4]` xyxy boxes.

  Returns:
    float `[N, M]` `|a ∩ b| / |b|`.
  """
  inter = _intersection(a, b)
  area_b = area(b)[None, :]
  return jnp.where(area_b > 0, inter / jnp.where(area_b > 0, area_b, 1.0), 0.0)


def clip_boxes(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
  """Clips `[..., 4]` xyxy boxes to `[0, width] x [0, height]` (torchvision `clip_boxes_to_image`).

  `height` and `width` may be Python numbers or traced scalars (e.g. the content size of a padded
  image).
  """
  height = jnp.asarray(height, boxes.dtype)
  width = jnp.asarray(width, boxes.dtype)
  x1 = jnp.clip(boxes[..., 0], 0.0, width)
  y1 = jnp.clip(boxes[..., 1], 0.0, height)
  x2 = jnp.clip(boxes[..., 2], 0.0, width)
  y2 = jnp.clip(boxes[..., 3], 0.0, height)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def remove_small(boxes: jnp.ndarray, min_size: float) -> jnp.ndarray:
  """bool `[...]`: True where width >= min_size and height >= min_size (torchvision
  `remove_small_boxes`, returned as a mask instead of indices so shapes stay static)."""
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w >= min_size) & (h >= min_size)


def _centers_sizes(boxes: jnp.ndarray):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: jnp.ndarray, reference: jnp.ndarray,
           weights: Sequence[float] = RPN_BOX_WEIGHTS) -> jnp.ndarray:
  """Regression targets that turn `reference` into `boxes` (torchvision `BoxCoder.encode_single`).

  `dx = wx * (cx - cx_ref) / w_ref`, `dw = ww * log(w / w_ref)` and likewise for y/h, with
  `w = x2 - x1` and `cx = x1 + 0.5 w` (no `+1`).

  Args:
    boxes: float `[..., 4]` xyxy target boxes (e.g. matched ground truth).
    reference: float `[..., 4]` xyxy anchors or proposals, broadcastable with `boxes`. Must have
      positive width and height (degenerate references give inf/nan, as in torchvision).
    weights: `(wx, wy, ww, wh)`; RPN `(1, 1, 1, 1)`, box head `(10, 10, 5, 5)`.

  Returns:
    float `[..., 4]` deltas `(dx, dy, dw, dh)`.
  """
  wx, wy, ww, wh = weights
  cx, cy, w, h = _centers_sizes(boxes)
  rcx, rcy, rw, rh = _centers_sizes(reference)
  dx = wx * (cx - rcx) / rw
  dy = wy * (cy - rcy) / rh
  dw = ww * jnp.log(w / rw)
  dh = wh * jnp.log(h / rh)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas: jnp.ndarray, reference: jnp.ndarray,
           weights: Sequence[float] = RPN_BOX_WEIGHTS,
           clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
  """Applies `deltas` to `reference` boxes (torchvision `BoxCoder.decode_single`).

  `dw / ww` and `dh / wh` are clamped from above at `clamp` (default log(1000/16)) before `exp`,
  so a prediction can grow a box by at most 62.5x.

  Args:
    deltas: float `[..., 4]` `(dx, dy, dw, dh)`.
    reference: float `[..., 4]` xyxy anchors or proposals, broadcastable with `deltas`.
    weights: `(wx, wy, ww, wh)` used when encoding.
    clamp: upper bound on the scaled log size deltas.

  Returns:
    float `[..., 4]` xyxy boxes in the frame of `reference` (not clipped).
  """
  wx, wy, ww, wh = weights
  deltas = deltas.astype(reference.dtype)
  rcx, rcy, rw, rh = _centers_sizes(reference)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, clamp)
  cx = dx * rw + rcx
  cy = dy * rh + rcy
  half_w = 0.5 * (jnp.exp(dw) * rw)
  half_h = 0.5 * (jnp.exp(dh) * rh)
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
