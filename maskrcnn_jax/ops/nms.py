"""Greedy non-maximum suppression with static output shapes, jit- and vmap-safe.

The result is exactly textbook greedy NMS (torchvision `nms` semantics): visit boxes by
descending score, ties broken by the lower input index, keep a box unless it overlaps an already
kept box with IoU > threshold. It returns a fixed number of slots plus a `valid` mask.

Algorithm: sort once, then a `lax.while_loop` whose every iteration keeps the first still-active
box in score order and deactivates the boxes it suppresses: O(N) work per kept box, stopping
after `max_output` keeps or when no box is active. No N x N IoU matrix is formed, so N can be
the ~90000 class-aware candidates of the box head's postprocess.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _sorted_order(scores: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Stable descending order of `scores`, invalid entries last (lower index wins ties)."""
  key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
  return jnp.argsort(key, stable=True).astype(jnp.int32)


def _iou_one_to_many(box: jnp.ndarray, boxes: jnp.ndarray, areas: jnp.ndarray,
                     box_area: jnp.ndarray) -> jnp.ndarray:
  """IoU of `box [4]` with `boxes [N, 4]`, computed as torchvision's CPU kernel does."""
  w = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0.0)
  h = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0.0)
  inter = w * h
  # 0/0 gives nan, which is never > threshold: empty boxes never suppress (as in torchvision).
  return inter / (box_area + areas - inter)


def _greedy(boxes, scores, labels, valid, iou_threshold, max_output):
  n = boxes.shape[0]
  order = _sorted_order(scores, valid)
  sboxes = boxes.astype(jnp.float32)[order]
  slabels = None if labels is None else labels[order]
  active0 = valid[order]
  areas = (sboxes[:, 2] - sboxes[:, 0]) * (sboxes[:, 3] - sboxes[:, 1])
  positions = jnp.arange(n, dtype=jnp.int32)

  def cond(state):
    count, active, _ = state
    return (count < max_output) & jnp.any(active)

  def body(state):
    count, active, kept = state
    i = jnp.argmax(active).astype(jnp.int32)  # first still-active box in score order
    iou = _iou_one_to_many(sboxes[i], sboxes, areas, areas[i])
    suppress = iou > iou_threshold
    if slabels is not None:
      suppress &= slabels == slabels[i]
    active = active & ~suppress & (positions != i)
    kept = kept.at[count].set(i)
    return count + 1, active, kept

  kept0 = jnp.zeros((max_output,), jnp.int32)
  count, _, kept = lax.while_loop(cond, body, (jnp.int32(0), active0, kept0))
  keep_valid = jnp.arange(max_output) < count
  indices = jnp.where(keep_valid, order[kept], 0)
  return indices, keep_valid


@functools.partial(jax.jit, static_argnames=('iou_threshold', 'max_output'))
def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, max_output: int,
        valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy NMS of one image's boxes with a static number of outputs.

  Args:
    boxes: float `[N, 4]` xyxy boxes.
    scores: float `[N]` scores.
    iou_threshold: static float; a box is suppressed by a kept box when IoU > threshold.
    max_output: static int, number of output slots.
    valid: optional bool `[N]`; invalid boxes are never kept and never suppress (their contents
      may be garbage, including nan).

  Returns:
    `(indices int32 [max_output], keep_valid bool [max_output])`: kept input indices in
    descending score order; slots past the number kept hold index 0 and `keep_valid` False.
  """
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  return _greedy(boxes, scores, None, valid, iou_threshold, max_output)


@functools.partial(jax.jit, static_argnames=('iou_threshold', 'max_output'))
def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, labels: jnp.ndarray,
                iou_threshold: float, max_output: int, valid: jnp.ndarray | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Class-aware NMS: boxes only suppress boxes of the same label (torchvision `batched_nms`).

  Instead of torchvision's per-label coordinate offset, overlaps between different labels are
  masked out, which gives the same kept set without the float rounding of shifted coordinates.

  Args:
    boxes, scores, iou_threshold, max_output, valid: as in `nms`.
    labels: int `[N]` category (or level) of each box.

  Returns:
    As `nms`: `(indices int32 [max_output], keep_valid bool [max_output])`, descending score.
  """
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  return _greedy(boxes, scores, labels, valid, iou_threshold, max_output)
