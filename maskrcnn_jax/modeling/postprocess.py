"""Box-head outputs -> final detections with static shapes (torchvision
`RoIHeads.postprocess_detections`), and per-detection mask selection."""

from typing import Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import nms as nms_ops


def postprocess_detections(class_logits: jnp.ndarray, box_deltas: jnp.ndarray,
                           proposals: jnp.ndarray, proposal_valid: jnp.ndarray,
                           image_size: jnp.ndarray, *, score_thresh: float, nms_thresh: float,
                           detections_per_img: int, min_box_size: float,
                           bbox_reg_weights: Sequence[float] = box_ops.ROI_BOX_WEIGHTS):
  """Detections of ONE image (vmap over the batch).

  Softmax over K+1 classes; class-specific decode of every proposal; clip to the content size;
  drop the background column; keep candidates with score > `score_thresh`, both sides >=
  `min_box_size` and a valid proposal; class-aware NMS over all P*K candidates (exact); the
  `detections_per_img` best survivors.

  Args:
    class_logits: float32 `[P, K+1]`, column 0 is background.
    box_deltas: float32 `[P, 4(K+1)]`, class-major (`[P, K+1, 4]` flattened).
    proposals: float32 `[P, 4]` xyxy, padded-input pixels.
    proposal_valid: bool `[P]`; invalid proposals may hold garbage.
    image_size: int `[2]` (height, width) of the resized content (traced).

  Returns:
    dict: `boxes` f32 `[D, 4]` (padded-input pixels), `scores` f32 `[D]`, `labels` int32 `[D]`
    (1..K), `valid` bool `[D]`, descending score; invalid slots hold zeros.
  """
  num_props, num_classes = class_logits.shape
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
  deltas = box_deltas.astype(jnp.float32).reshape(num_props, num_classes, 4)
  boxes = box_ops.decode(deltas, proposals[:, None, :].astype(jnp.float32), bbox_reg_weights)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  labels = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32), (num_props, num_classes))
  boxes = boxes[:, 1:].reshape(-1, 4)
  scores = scores[:, 1:].reshape(-1)
  labels = labels[:, 1:].reshape(-1)
  valid = jnp.repeat(proposal_valid, num_classes - 1)
  valid &= (scores > score_thresh) & box_ops.remove_small(boxes, min_box_size)
  keep, keep_valid = nms_ops.batched_nms(boxes, scores, labels, float(nms_thresh),
                                         int(detections_per_img), valid)
  return dict(
      boxes=jnp.where(keep_valid[:, None], boxes[keep], 0.0),
      scores=jnp.where(keep_valid, scores[keep], 0.0),
      labels=jnp.where(keep_valid, labels[keep], 0),
      valid=keep_valid)
