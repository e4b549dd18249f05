"""Assigns candidates (anchors, proposals) to ground-truth boxes by IoU, and builds RPN targets.

torchvision's `Matcher` for static shapes: padded ground-truth slots carry `valid=False` instead of
being absent, and crowd regions turn would-be negatives into ignored candidates.
"""

import enum
from typing import Optional

import jax
import jax.numpy as jnp

from maskrcnn_jax.ops import boxes as box_ops

# Detectron's TRAIN.CROWD_FILTER_THRESH: a candidate this much inside a crowd region is ignored.
CROWD_IOA_THRESH = 0.7
# A harmless box substituted for padded slots so garbage never reaches IoU or the box coder.
_DUMMY_BOX = (0.0, 0.0, 1.0, 1.0)


class MatchLabel(enum.IntEnum):
  """Outcome of matching one candidate (torchvision Matcher's -2 / -1 / >= 0, renamed)."""
  IGNORE = -1  # between thresholds, padded, or inside a crowd region: no loss at all
  NEGATIVE = 0  # background
  POSITIVE = 1  # foreground, regressed towards its matched ground truth


def sanitize_boxes(boxes: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Replaces the boxes of padded slots by a unit box so that no NaN/inf can leak from them.

  Args:
    boxes: float `[N, 4]` xyxy.
    valid: bool `[N]`.

  Returns:
    float32 `[N, 4]`.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  return jnp.where(valid[:, None], boxes, jnp.asarray(_DUMMY_BOX, jnp.float32))


def match(iou: jnp.ndarray,
          gt_valid: jnp.ndarray,
          fg_thresh: float,
          bg_thresh: float,
          allow_low_quality: bool,
          *,
          candidate_valid: Optional[jnp.ndarray] = None):
  """Matches every candidate to its best ground truth (torchvision `Matcher.__call__`).

  For candidate n with best IoU `q = max_g iou[g, n]` over valid gts:
  `q >= fg_thresh` -> POSITIVE, `q < bg_thresh` -> NEGATIVE, otherwise IGNORE.

  With `allow_low_quality`, torchvision's `set_low_quality_matches_` is applied: for each valid gt,
  every candidate whose IoU with it equals that gt's best IoU (ties included) becomes POSITIVE.
  As in torchvision, such a candidate keeps its own best gt (`argmax_g iou[:, n]`) as its match,
  which is not necessarily the gt that promoted it. One deliberate difference: a gt whose best IoU
  is 0 promotes nothing (torchvision would turn every candidate with zero overlap positive; that
  only happens for degenerate or off-image gt boxes, which torchvision rejects elsewhere).

  Args:
    iou: float `[G, N]` IoU of gt g with candidate n (gt-major, like torchvision).
    gt_valid: bool `[G]`; invalid gts never match and are skipped by the low-quality rule. Pass
      `gt_valid & ~gt_crowd` to exclude crowd regions.
    fg_thresh: Matcher's `high_threshold` (static or traced scalar).
    bg_thresh: Matcher's `low_threshold`.
    allow_low_quality: static bool.
    candidate_valid: optional bool `[N]`; invalid candidates are labelled IGNORE and do not take
      part in the per-gt best-IoU search of the low-quality rule.

  Returns:
    matched_gt: int32 `[N]` index of the best valid gt for every candidate (an in-range index for
      all candidates; meaningful where `labels == POSITIVE`).
    labels: int32 `[N]` of `MatchLabel` values. All NEGATIVE (valid candidates) when no gt is valid.
  """
  iou = jnp.asarray(iou, jnp.float32)
  return _match_rows(lambda g: iou[g], iou.shape[0], jnp.asarray(gt_valid, bool), candidate_valid,
                     fg_thresh, bg_thresh, allow_low_quality, num_candidates=iou.shape[1])


def _match_rows(quality_row, num_rows, eligible, candidate_valid, fg_thresh, bg_thresh,
                allow_low_quality, *, num_candidates, crowd_row=None):
  """The Matcher of `match`, one gt row at a time in a `lax.while_loop`.

  `quality_row(g)` gives gt g's float32 `[N]` IoUs; rows at and past `num_rows` (an int or a
  traced scalar) are never read. With `crowd_row(g)` (bool `[N]`, the candidates inside gt g if
  it is a crowd region), NEGATIVE candidates inside any crowd region become IGNORE, as in
  `apply_crowd_ignore`. A loop rather than reductions over the gt axis because XLA:CPU reduces
  such column-wise layouts 7-14x slower, and because `num_rows` can stop at the last real gt.
  Each row's best IoU is found in the same iteration that compares the row against it, so the
  low-quality rule's equality test sees bit-identical values.
  """
  if candidate_valid is None:
    candidate_valid = jnp.ones((num_candidates,), bool)
  candidate_valid = jnp.asarray(candidate_valid, bool)
  if isinstance(num_rows, int) and num_rows == 0:
    labels = jnp.where(candidate_valid, MatchLabel.NEGATIVE, MatchLabel.IGNORE)
    return jnp.zeros((num_candidates,), jnp.int32), labels.astype(jnp.int32)

  def row(carry):
    g, best, matched_gt, low_quality, in_crowd = carry
    quality = jnp.where(eligible[g] & candidate_valid, quality_row(g), -jnp.inf)
    take = quality > best  # strict: the first gt reaching the maximum wins (torch.max)
    best = jnp.where(take, quality, best)
    matched_gt = jnp.where(take, g, matched_gt)
    if allow_low_quality:  # torchvision set_low_quality_matches_; see `match`
      row_best = jnp.max(quality)
      low_quality = low_quality | ((quality == row_best) & (row_best > 0))
    if crowd_row is not None:
      in_crowd = in_crowd | crowd_row(g)
    return g + 1, best, matched_gt, low_quality, in_crowd

  no = jnp.zeros((num_candidates,), bool)
  init = (jnp.int32(0), jnp.full((num_candidates,), -jnp.inf, jnp.float32),
          jnp.zeros((num_candidates,), jnp.int32), no, no)
  _, best, matched_gt, low_quality, in_crowd = jax.lax.while_loop(
      lambda carry: carry[0] < num_rows, row, init)

  labels = jnp.where(best >= fg_thresh, MatchLabel.POSITIVE,
                     jnp.where(best < bg_thresh, MatchLabel.NEGATIVE, MatchLabel.IGNORE))
  labels = jnp.where(low_quality, MatchLabel.POSITIVE, labels)
  labels = jnp.where(jnp.any(eligible), labels, MatchLabel.NEGATIVE)
  labels = jnp.where(candidate_valid, labels, MatchLabel.IGNORE)
  labels = jnp.where(in_crowd & (labels == MatchLabel.NEGATIVE), MatchLabel.IGNORE, labels)
  return matched_gt, labels.astype(jnp.int32)


def apply_crowd_ignore(labels: jnp.ndarray, crowd_ioa: jnp.ndarray, gt_crowd: jnp.ndarray,
                 ioa_thresh: float = CROWD_IOA_THRESH) -> jnp.ndarray:
  """Turns NEGATIVE candidates lying inside a crowd region into IGNORE.

  A crowd region (COCO `iscrowd=1`) contains unannotated instances, so a candidate inside it must
  not be taught "background" (Detectron's `_filter_crowd_proposals`, with COCO's crowd overlap
  `|candidate ∩ crowd| / |candidate|`). Unlike Detectron we keep POSITIVE candidates: they match an
  annotated instance well and are correct foreground even when that instance stands in a crowd.

  Args:
    labels: int32 `[N]` MatchLabel values.
    crowd_ioa: float `[G, N]` intersection over candidate area,
      `boxes.pairwise_ioa(gt_boxes, candidates)`.
    gt_crowd: bool `[G]`, True for valid crowd gts only.
    ioa_thresh: candidates with IoA >= this with any crowd gt are affected.

  Returns:
    int32 `[N]` labels.
  """
  covered = jnp.any(gt_crowd[:, None] & (crowd_ioa >= ioa_thresh), axis=0)
  return jnp.where(covered & (labels == MatchLabel.NEGATIVE), MatchLabel.IGNORE,
                   labels).astype(jnp.int32)


def match_boxes(gt_boxes: jnp.ndarray,
                gt_valid: jnp.ndarray,
                gt_crowd: jnp.ndarray,
                candidates: jnp.ndarray,
                candidate_valid: jnp.ndarray,
                *,
                fg_thresh: float,
                bg_thresh: float,
                allow_low_quality: bool,
                ignore_crowd: bool = True,
                crowd_ioa_thresh: float = CROWD_IOA_THRESH):
  """IoU matching of candidate boxes to gt boxes with padding and crowd handling.

  The labels and matches are those of `match(pairwise_iou(gt, candidates), ...)` followed by
  `apply_crowd_ignore`, but computed one gt row at a time in a `lax.while_loop` that stops after
  the last valid gt slot: the `[G, N]` IoU and IoA matrices are never formed, and the cost follows
  the image's real instance count, not the padded maximum (like torchvision, which matches the gts
  an image has). For the RPN's 243k anchors of an 800x1216 input and 100 gt slots, the dense form
  builds two 97 MB matrices (IoU and crowd IoA) and took ~200 ms of a CPU train-step profile
  with 8 real gts; this form computes each needed row once and keeps only `[N]` running values
  (`_match_rows`, the loop `match` runs too). Gradients are stopped at the boxes (matching is
  not differentiable).

  Crowd gts are excluded from matching (they never produce positives, as in torchvision and
  detectron2, which drop them); with `ignore_crowd`, negatives inside a crowd region are
  ignored (see `apply_crowd_ignore`).

  Args:
    gt_boxes: float `[G, 4]` xyxy, padded-input pixels; padded slots may hold garbage.
    gt_valid: bool `[G]`.
    gt_crowd: bool `[G]`.
    candidates: float `[N, 4]` xyxy anchors or proposals, same frame; padded slots may hold garbage.
    candidate_valid: bool `[N]`.
    fg_thresh, bg_thresh, allow_low_quality: see `match`.
    ignore_crowd: static bool.
    crowd_ioa_thresh: IoA threshold for crowd regions.

  Returns:
    (matched_gt int32 `[N]`, labels int32 `[N]` MatchLabel), as `match`.
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  gt_crowd = jnp.asarray(gt_crowd, bool) & gt_valid
  eligible = gt_valid & ~gt_crowd
  candidate_valid = jnp.asarray(candidate_valid, bool)
  gt_boxes = jax.lax.stop_gradient(sanitize_boxes(gt_boxes, gt_valid))
  candidates = jax.lax.stop_gradient(sanitize_boxes(candidates, candidate_valid))
  num_gt, num_candidates = gt_boxes.shape[0], candidates.shape[0]
  used = gt_valid if ignore_crowd else eligible
  # Past the last used slot (0 rows for no slots at all).
  num_rows = jnp.max(jnp.where(used, jnp.arange(1, num_gt + 1), 0)) if num_gt else 0

  def box(g):
    return jax.lax.dynamic_slice_in_dim(gt_boxes, g, 1)  # [1, 4]

  def inside_crowd(g):
    # pairwise_ioa(a, b) divides by the area of b: the candidate's, as COCO's iscrowd overlap.
    return gt_crowd[g] & (box_ops.pairwise_ioa(box(g), candidates)[0] >= crowd_ioa_thresh)

  return _match_rows(lambda g: box_ops.pairwise_iou(box(g), candidates)[0], num_rows, eligible,
                     candidate_valid, fg_thresh, bg_thresh, allow_low_quality,
                     num_candidates=num_candidates,
                     crowd_row=inside_crowd if ignore_crowd else None)


def scatter_mask(indices: jnp.ndarray, valid: jnp.ndarray, size: int) -> jnp.ndarray:
  """bool `[size]`, True at `indices[valid]` (duplicate or invalid indices are harmless)."""
  counts = jnp.zeros((size,), jnp.int32).at[indices].add(valid.astype(jnp.int32))
  return counts > 0
