"""Balanced sampling of matched candidates and the box-head / mask-head training targets.

Static-shape versions of torchvision's `BalancedPositiveNegativeSampler`,
`RoIHeads.select_training_samples` and `project_masks_on_boxes`, written for one image.
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import matching
from maskrcnn_jax.ops import roi_align as roi_align_ops

MatchLabel = matching.MatchLabel
# torchvision RoIHeads: MaskRCNNHeads predict 28 x 28 masks (14 x 14 RoIAlign, one 2x deconv).
MASK_RESOLUTION = 28
# Binarisation threshold of resampled gt masks (detectron2 `BitMasks.crop_and_resize` >= 0.5).
MASK_TARGET_THRESH = 0.5


def max_positives(num_samples: int, positive_fraction: float) -> int:
  """The static cap on positives, `int(num_samples * positive_fraction)` as in torchvision."""
  return int(num_samples * positive_fraction)


# The bit pattern of the smallest normal float32: offsetting random integers by it keeps every
# priority a normal number (denormals may be flushed to zero, which would create ties).
_MIN_NORMAL_BITS = 0x00800000
_PRIORITY_BITS = 30


def _random_priority(key: jax.Array, num: int) -> jnp.ndarray:
  """float32 `[num]` random priorities in [1.2e-38, 4), with 2^30 equally likely values.

  Non-negative float32 values order like their bit patterns read as integers, so random 30-bit
  integers offset into the normal range are uniform random priorities with integer resolution
  (float32 uniforms from `jax.random.uniform` have 2^23 values and tie every few thousand
  anchors). They are floats, not int32, because XLA:CPU has a fast top-k only for float32: an
  int32 `top_k` over the RPN's 243k anchors lowers to a full sort (~55 ms each at 800x1216,
  against ~2 ms).
  """
  bits = jax.random.bits(key, (num,), jnp.uint32) >> (32 - _PRIORITY_BITS)
  return jax.lax.bitcast_convert_type(bits + jnp.uint32(_MIN_NORMAL_BITS), jnp.float32)


def sample_balanced(key: jax.Array, labels: jnp.ndarray, candidate_valid: Optional[jnp.ndarray],
                    num_samples: int, positive_fraction: float):
  """Draws a class-balanced random subset (torchvision `BalancedPositiveNegativeSampler`).

  Up to `P = int(num_samples * positive_fraction)` positives are drawn uniformly without
  replacement; negatives fill the remaining `num_samples - (#positives drawn)` slots. When fewer
  candidates exist, fewer slots are valid. Randomness: one random 30-bit priority per candidate
  (`_random_priority`) and `lax.top_k`, so the cost is two top-k over N and no sort of N.

  Slot order: the drawn positives first, then the drawn negatives, then invalid padding. Every
  positive therefore lies in the first `P` slots (`max_positives`), so a caller may run the mask
  branch on `[:P]` only.

  Args:
    key: PRNG key.
    labels: int `[N]`; `>= MatchLabel.POSITIVE` positive (class labels also work), `== NEGATIVE`
      negative, anything else (IGNORE) never drawn.
    candidate_valid: bool `[N]` or None; invalid candidates are never drawn.
    num_samples: static int, the number of output slots.
    positive_fraction: static float.

  Returns:
    indices: int32 `[num_samples]` into the candidates (0 in invalid slots).
    is_positive: bool `[num_samples]` (False in invalid slots).
    valid: bool `[num_samples]`.
  """
  labels = jnp.asarray(labels)
  num = labels.shape[0]
  cap_pos = max_positives(num_samples, positive_fraction)
  if candidate_valid is None:
    candidate_valid = jnp.ones((num,), bool)
  candidate_valid = jnp.asarray(candidate_valid, bool)
  pos = candidate_valid & (labels >= MatchLabel.POSITIVE)
  neg = candidate_valid & (labels == MatchLabel.NEGATIVE)

  priority = _random_priority(key, num)
  k_pos = min(cap_pos, num)
  k_neg = min(num_samples, num)
  _, pos_idx = jax.lax.top_k(jnp.where(pos, priority, -1.0), k_pos)
  _, neg_idx = jax.lax.top_k(jnp.where(neg, priority, -1.0), k_neg)
  num_pos = jnp.minimum(jnp.sum(pos), cap_pos)
  num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)

  indices = jnp.concatenate([pos_idx, neg_idx]).astype(jnp.int32)
  ok = jnp.concatenate([jnp.arange(k_pos) < num_pos, jnp.arange(k_neg) < num_neg])
  is_positive = jnp.concatenate([jnp.ones((k_pos,), bool), jnp.zeros((k_neg,), bool)])
  short = num_samples - indices.shape[0]
  if short > 0:  # fewer candidates than slots
    indices = jnp.concatenate([indices, jnp.zeros((short,), jnp.int32)])
    ok = jnp.concatenate([ok, jnp.zeros((short,), bool)])
    is_positive = jnp.concatenate([is_positive, jnp.zeros((short,), bool)])
  # Compact: valid slots first, keeping positives before negatives.
  order = jnp.argsort(~ok, stable=True)[:num_samples]
  valid = ok[order]
  return (jnp.where(valid, indices[order], 0), is_positive[order] & valid, valid)


def rpn_targets(key: jax.Array,
                anchors: jnp.ndarray,
                anchor_valid: jnp.ndarray,
                gt_boxes: jnp.ndarray,
                gt_valid: jnp.ndarray,
                gt_crowd: jnp.ndarray,
                *,
                fg_thresh: float = 0.7,
                bg_thresh: float = 0.3,
                allow_low_quality: bool = True,
                batch_size: int = 256,
                positive_fraction: float = 0.5,
                weights: Sequence[float] = box_ops.RPN_BOX_WEIGHTS,
                ignore_crowd: bool = True,
                crowd_ioa_thresh: float = matching.CROWD_IOA_THRESH) -> dict:
  """RPN training targets for one image (torchvision RPN `assign_targets_to_anchors`, then its
  `fg_bg_sampler`).

  Anchors are matched with the RPN thresholds (torchvision: 0.7 / 0.3, low-quality matches on),
  then `batch_size` anchors are sampled with at most `int(batch_size * positive_fraction)`
  positives. As in torchvision, anchors crossing the image border are kept; `anchor_valid` only
  lets the caller drop anchors (e.g. ones centred in the padding). jit/vmap-safe: vmap over images
  with `in_axes=(0, None, None or 0, 0, 0, 0)`.

  Args:
    key: PRNG key for the sampler (one per image).
    anchors: float32 `[A, 4]` xyxy, padded-input pixels (all levels concatenated).
    anchor_valid: bool `[A]`.
    gt_boxes: float32 `[M, 4]` xyxy; gt_valid, gt_crowd: bool `[M]`.
    fg_thresh, bg_thresh, allow_low_quality: matcher settings (config `model.rpn.fg_iou_thresh`,
      `bg_iou_thresh`, `allow_low_quality_matches`).
    batch_size, positive_fraction: static sampler settings (`model.rpn.batch_size_per_image`,
      `positive_fraction`).
    weights: box-coder weights (`model.rpn.bbox_reg_weights`).
    ignore_crowd, crowd_ioa_thresh: `model.roi.ignore_crowd`, `model.roi.crowd_ioa_thresh`.

  Returns:
    dict of per-anchor arrays (all gradient-stopped):
      objectness: float32 `[A]` BCE target, 1 for sampled positives, else 0.
      sampled: bool `[A]` anchors that take part in the objectness loss (the BCE weight).
      positive: bool `[A]` sampled positives (the box-loss mask).
      box_targets: float32 `[A, 4]` encoded deltas of the matched gt; 0 where not `positive`.
      matched_gt: int32 `[A]`; labels: int32 `[A]` matching.MatchLabel before sampling.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  num_anchors = anchors.shape[0]
  anchor_valid = jnp.broadcast_to(jnp.asarray(anchor_valid, bool), (num_anchors,))
  gt_valid = jnp.asarray(gt_valid, bool)
  matched_gt, labels = matching.match_boxes(
      gt_boxes, gt_valid, gt_crowd, anchors, anchor_valid, fg_thresh=fg_thresh,
      bg_thresh=bg_thresh, allow_low_quality=allow_low_quality,
      ignore_crowd=ignore_crowd, crowd_ioa_thresh=crowd_ioa_thresh)
  indices, is_positive, valid = sample_balanced(key, labels, anchor_valid, batch_size,
                                                positive_fraction)
  sampled = matching.scatter_mask(indices, valid, num_anchors)
  positive = matching.scatter_mask(indices, valid & is_positive, num_anchors)

  safe_gt = matching.sanitize_boxes(gt_boxes, gt_valid)[matched_gt]
  safe_anchors = matching.sanitize_boxes(anchors, anchor_valid)
  box_targets = box_ops.encode(safe_gt, safe_anchors, weights)
  box_targets = jnp.where(positive[:, None], box_targets, 0.0)
  out = {
      'objectness': positive.astype(jnp.float32),
      'sampled': sampled,
      'positive': positive,
      'box_targets': box_targets,
      'matched_gt': matched_gt,
      'labels': labels,
  }
  return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def roi_targets(key: jax.Array,
                proposals: jnp.ndarray,
                proposal_valid: jnp.ndarray,
                gt_boxes: jnp.ndarray,
                gt_labels: jnp.ndarray,
                gt_valid: jnp.ndarray,
                gt_crowd: jnp.ndarray,
                *,
                num_samples: int = 512,
                positive_fraction: float = 0.25,
                fg_thresh: float = 0.5,
                bg_thresh: float = 0.5,
                weights: Sequence[float] = box_ops.ROI_BOX_WEIGHTS,
                ignore_crowd: bool = True,
                crowd_ioa_thresh: float = matching.CROWD_IOA_THRESH) -> dict:
  """Samples RoIs for the box and mask heads of one image (torchvision
  `RoIHeads.select_training_samples`).

  The valid, non-crowd gt boxes are appended to the proposals (torchvision `add_gt_proposals`),
  candidates are matched without low-quality matches (IoU in [fg_thresh, 1] foreground,
  [0, bg_thresh) background, torchvision 0.5 / 0.5), and `num_samples` are drawn with at most
  `int(num_samples * positive_fraction)` foreground (`sample_balanced`; foreground first, so all of
  it lies in the first `max_positives(num_samples, positive_fraction)` slots). jit/vmap-safe.

  Args:
    key: PRNG key (one per image).
    proposals: float32 `[P, 4]` xyxy RPN proposals, padded-input pixels (gradient is stopped).
    proposal_valid: bool `[P]`.
    gt_boxes: float32 `[M, 4]`; gt_labels: int32 `[M]` in 1..K; gt_valid, gt_crowd: bool `[M]`.
    num_samples, positive_fraction: static (`model.roi.batch_size_per_image`,
      `positive_fraction`).
    fg_thresh, bg_thresh: `model.roi.fg_iou_thresh`, `bg_iou_thresh`.
    weights: box-coder weights (`model.roi.bbox_reg_weights`).
    ignore_crowd, crowd_ioa_thresh: `model.roi.ignore_crowd`, `crowd_ioa_thresh`.

  Returns:
    dict with S = num_samples (all gradient-stopped):
      rois: float32 `[S, 4]` sampled boxes (padded-input pixels; a unit box in invalid slots).
      labels: int32 `[S]` class of the matched gt for foreground, 0 for background and padding.
      box_targets: float32 `[S, 4]` encoded deltas of the matched gt; 0 where not foreground.
      matched_gt: int32 `[S]` index into the gt arrays (meaningful where foreground).
      valid: bool `[S]`; foreground: bool `[S]`.
  """
  proposals = jnp.asarray(proposals, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  gt_crowd = jnp.asarray(gt_crowd, bool)
  candidates = jnp.concatenate([proposals, jnp.asarray(gt_boxes, jnp.float32)], axis=0)
  candidate_valid = jnp.concatenate([jnp.asarray(proposal_valid, bool), gt_valid & ~gt_crowd])
  candidates = matching.sanitize_boxes(candidates, candidate_valid)
  matched_gt, match_labels = matching.match_boxes(
      gt_boxes, gt_valid, gt_crowd, candidates, candidate_valid, fg_thresh=fg_thresh,
      bg_thresh=bg_thresh, allow_low_quality=False, ignore_crowd=ignore_crowd,
      crowd_ioa_thresh=crowd_ioa_thresh)
  indices, foreground, valid = sample_balanced(key, match_labels, candidate_valid, num_samples,
                                               positive_fraction)
  rois = matching.sanitize_boxes(candidates[indices], valid)
  matched = matched_gt[indices]
  labels = jnp.where(foreground, jnp.asarray(gt_labels, jnp.int32)[matched], 0)
  safe_gt = matching.sanitize_boxes(gt_boxes, gt_valid)[matched]
  box_targets = jnp.where(foreground[:, None], box_ops.encode(safe_gt, rois, weights), 0.0)
  out = {
      'rois': rois,
      'labels': labels,
      'box_targets': box_targets,
      'matched_gt': matched,
      'valid': valid,
      'foreground': foreground,
  }
  return jax.tree_util.tree_map(jax.lax.stop_gradient, out)


def mask_targets(gt_masks: jnp.ndarray,
                 gt_boxes: jnp.ndarray,
                 rois: jnp.ndarray,
                 matched_gt: jnp.ndarray,
                 *,
                 resolution: int = MASK_RESOLUTION,
                 roi_valid: Optional[jnp.ndarray] = None,
                 aligned: bool = False,
                 sampling_ratio: Optional[int] = None,
                 binarize: bool = True,
                 backend: str = 'auto') -> jnp.ndarray:
  """Mask-head targets: each RoI's matched gt mask resampled onto the RoI's `resolution^2` grid.

  Ground-truth masks arrive pre-cropped to their gt box at `S x S` (structures.py), because
  full-resolution masks (100 instances x 800 x 1344 per image) would dominate host-to-device
  traffic and memory; the TPU Mask R-CNN does the same. Resampling a crop instead of the full mask
  is exact up to the crop's own resolution: the RoI is mapped into the crop's frame
  (`(x - gt_x1) * S / gt_w`), the crop is padded with one row/column of zeros on every side (the
  mask is 0 outside its gt box), and RoIAlign with `aligned=True` reads it, pixel j of the crop
  covering `[j, j + 1)`.

  `aligned` names the convention emulated in the image frame: `False` reproduces torchvision's
  `project_masks_on_boxes` (legacy RoIAlign on the full mask, which samples the mask half a pixel
  right/down of the sampling points); `True` is detectron2's `crop_and_resize`. torchvision uses
  adaptive sampling (`ceil(roi_size / 28)` points per bin on the full mask); we use a static
  `sampling_ratio`, by default `ceil(S / resolution)`, which matches it for RoIs about the size of
  their gt box. torchvision keeps the resampled values as soft BCE targets; `binarize=True`
  thresholds at 0.5 like detectron2 and the TPU implementation.

  Args:
    gt_masks: `[M, S, S]` (any dtype; 0/1 values) masks cropped to `gt_boxes`.
    gt_boxes: float32 `[M, 4]` xyxy boxes the masks were cropped to, padded-input pixels.
    rois: float32 `[R, 4]` xyxy RoIs in the same frame.
    matched_gt: int32 `[R]` gt index of each RoI.
    resolution: static output size.
    roi_valid: optional bool `[R]`; invalid RoIs get all-zero targets.
    aligned: see above (config `model.roi.aligned`).
    sampling_ratio: static samples per bin side; None -> `ceil(S / resolution)`.
    binarize: threshold at 0.5.
    backend: static `execution.backend` value of the RoIAlign that resamples the crops.

  Returns:
    float32 `[R, resolution, resolution]`.
  """
  num_gt, crop_h, crop_w = gt_masks.shape
  num_rois = rois.shape[0]
  if sampling_ratio is None:
    sampling_ratio = max(1, math.ceil(max(crop_h, crop_w) / resolution))
  matched_gt = jnp.clip(jnp.asarray(matched_gt, jnp.int32), 0, num_gt - 1)
  if roi_valid is None:
    roi_valid = jnp.ones((num_rois,), bool)
  roi_valid = jnp.asarray(roi_valid, bool)
  rois = matching.sanitize_boxes(rois, roi_valid)
  gt = matching.sanitize_boxes(jnp.asarray(gt_boxes, jnp.float32)[matched_gt], roi_valid)

  shift = 0.0 if aligned else 0.5  # legacy RoIAlign reads the mask at sample point + 0.5 px
  gt_w = jnp.maximum(gt[:, 2] - gt[:, 0], 1e-6)
  gt_h = jnp.maximum(gt[:, 3] - gt[:, 1], 1e-6)
  scale_x = (crop_w / gt_w)[:, None]
  scale_y = (crop_h / gt_h)[:, None]
  pad = 1.0  # one zero row/column before the crop
  xs = (rois[:, 0::2] + shift - gt[:, 0:1]) * scale_x + pad
  ys = (rois[:, 1::2] + shift - gt[:, 1:2]) * scale_y + pad
  crop_boxes = jnp.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=-1)

  crops = jnp.asarray(gt_masks)[matched_gt].astype(jnp.float32)
  crops = jnp.pad(crops, ((0, 0), (1, 1), (1, 1)))[..., None]  # [R, S+2, S+2, 1]

  def one(crop, box):
    out = roi_align_ops.roi_align(crop, box[None], resolution, 1.0, sampling_ratio, True,
                                  backend=backend)
    return out[0, :, :, 0]

  targets = jax.vmap(one)(crops, crop_boxes)
  if binarize:
    targets = (targets >= MASK_TARGET_THRESH).astype(jnp.float32)
  targets = jnp.where(roi_valid[:, None, None], targets, 0.0)
  return jax.lax.stop_gradient(targets)
