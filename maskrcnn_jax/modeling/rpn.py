"""Region proposal network: the shared conv head and static-shape proposal generation.

The head mirrors torchvision `RPNHead` (`conv`, `cls_logits`, `bbox_pred`); proposal generation
mirrors torchvision `RegionProposalNetwork.filter_proposals`, with fixed-size outputs + `valid`.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import backends
from maskrcnn_jax.backends import xla
from maskrcnn_jax.modeling import resnet
from maskrcnn_jax.ops import anchors as anchors_lib
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import nms as nms_ops

# torchvision RPNHead: normal(std=0.01) weights, zero bias, for all three convs.
rpn_init = nn.initializers.normal(stddev=0.01)


def level_strides(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Strides 2**l of the FPN levels min_level..max_level (P2..P6: 4..64)."""
  f = config.model.fpn
  return tuple(2**l for l in range(f.min_level, f.max_level + 1))


def num_anchors(config: ml_collections.ConfigDict) -> int:
  """A, anchors per location."""
  a = config.model.anchors
  return anchors_lib.num_anchors_per_location(a.sizes, a.aspect_ratios)


def anchors_for(config: ml_collections.ConfigDict, image_hw: Sequence[int]) -> list[np.ndarray]:
  """Per-level float32 numpy anchors `[H_l * W_l * A, 4]` (xyxy, padded-input pixels) for a
  padded input `image_hw` (static). Anchors cover the padding too, as in torchvision."""
  a = config.model.anchors
  return anchors_lib.generate_anchors(tuple(int(s) for s in image_hw), level_strides(config),
                                      a.sizes, a.aspect_ratios, offset=float(a.offset),
                                      round_base=bool(a.round_base),
                                      stride_from_grid=bool(a.stride_from_grid))


class RPNHead(nn.Module):
  """3x3 conv + ReLU shared over levels, then 1x1 objectness (A) and 1x1 deltas (4A).

  Input: list of `[B, H_l, W_l, C]`. Output: `(objectness, deltas)`, lists of float32
  `[B, H_l * W_l * A]` and `[B, H_l * W_l * A, 4]`, flattened location-major, anchor-minor
  (the anchors' order). Delta channel `a * 4 + k` is anchor a, coordinate k (torchvision's
  `view(N, A, 4, H, W)` layout), so converted 1x1 weights need no permutation.
  """
  num_anchors: int
  channels: int
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=rpn_init,
              bias_init=nn.initializers.zeros,
              conv_general_dilated=self.backend.conv_general_dilated)
    self.conv = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), **kw)
    self.cls_logits = nn.Conv(self.num_anchors, (1, 1), **kw)
    self.bbox_pred = nn.Conv(4 * self.num_anchors, (1, 1), **kw)

  def __call__(self, feats: Sequence[jnp.ndarray]):
    objectness, deltas = [], []
    for x in feats:
      b = x.shape[0]
      t = nn.relu(self.conv(x))
      logits, box = self._predict(t)
      objectness.append(logits.astype(jnp.float32).reshape(b, -1))
      deltas.append(box.astype(jnp.float32).reshape(b, -1, 4))
    return objectness, deltas

  def _predict(self, t: jnp.ndarray):
    """`(cls_logits(t), bbox_pred(t))`, or the backend's `pointwise_pair` of the two convs'
    parameters (one matmul on XLA:CPU); the parameters stay the two torchvision-named convs."""
    pair = self.backend.pointwise_pair
    if pair is None or self.is_initializing():
      return self.cls_logits(t), self.bbox_pred(t)
    params = self.variables['params']
    t, ka, ba, kb, bb = nn.dtypes.promote_dtype(
        t, params['cls_logits']['kernel'], params['cls_logits']['bias'],
        params['bbox_pred']['kernel'], params['bbox_pred']['bias'], dtype=self.dtype)
    return pair(t, (ka, ba), (kb, bb))


class RPN(nn.Module):
  """Container mirroring torchvision `RegionProposalNetwork` (parameters under `head`)."""
  config: ml_collections.ConfigDict
  backend: backends.Backend = xla.PLAIN

  def setup(self):
    self.head = RPNHead(num_anchors(self.config), int(self.config.model.fpn.channels),
                        resnet.dtype_of(self.config), self.backend)

  def __call__(self, feats: Sequence[jnp.ndarray]):
    return self.head(feats)


def generate_proposals(objectness: Sequence[jnp.ndarray], deltas: Sequence[jnp.ndarray],
                       anchors: Sequence[np.ndarray], image_size: jnp.ndarray, *,
                       pre_nms_topk: int, post_nms_topk: int, nms_thresh: float,
                       min_size: float, score_thresh: float = 0.0,
                       bbox_reg_weights: Sequence[float] = box_ops.RPN_BOX_WEIGHTS,
                       rank_by: str = 'probability'):
  """Proposals of ONE image (vmap over the batch), torchvision `filter_proposals` semantics.

  Per level: top `min(pre_nms_topk, N_l)` anchors by objectness; decode; clip to the content
  size; drop boxes smaller than `min_size` or with probability below `score_thresh`; NMS at
  `nms_thresh` within each level (class-aware NMS with the level as the class); then the best
  `post_nms_topk` over all levels by objectness (`rank_by`).

  Args:
    objectness: per level, float `[N_l]` logits.
    deltas: per level, float `[N_l, 4]` box deltas.
    anchors: per level, `[N_l, 4]` xyxy anchors (static).
    image_size: int `[2]` (height, width) of the resized content inside the padding (traced).
    pre_nms_topk, post_nms_topk, nms_thresh, min_size, score_thresh: static config values.
    bbox_reg_weights: RPN box-coder weights.
    rank_by: static 'probability' (torchvision: float32 sigmoid, ties to the lower level) or
      'logit' (detectron2) for NMS and the final top-k.

  Returns:
    `(boxes float32 [post_nms_topk, 4], scores float32 [post_nms_topk] (sigmoid probabilities),
    valid bool [post_nms_topk])`, descending score; xyxy boxes in padded-input pixels.
  """
  boxes_l, logits_l, levels_l = [], [], []
  for level, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
    k = min(int(pre_nms_topk), obj.shape[0])
    logits, idx = jax.lax.top_k(obj, k)
    anc = jnp.asarray(anc)[idx]
    boxes_l.append(box_ops.decode(dlt[idx], anc, bbox_reg_weights))
    logits_l.append(logits)
    levels_l.append(jnp.full((k,), level, jnp.int32))
  boxes = jnp.concatenate(boxes_l)
  logits = jnp.concatenate(logits_l)
  levels = jnp.concatenate(levels_l)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  scores = jax.nn.sigmoid(logits)
  valid = box_ops.remove_small(boxes, min_size) & (scores >= score_thresh)
  # Exact: batched NMS by level then the top post_nms_topk is torchvision's batched_nms + keep[:n].
  # torchvision sorts by the float32 probability, which ties for logits above ~10 (all 1.0
  # above ~17); its ties then go to the lower level. detectron2 sorts by the logit itself.
  rank = logits if rank_by == 'logit' else scores
  keep, keep_valid = nms_ops.batched_nms(boxes, rank, levels, float(nms_thresh),
                                         int(post_nms_topk), valid)
  return boxes[keep], jnp.where(keep_valid, scores[keep], 0.0), keep_valid


def proposals_from_config(config: ml_collections.ConfigDict, objectness, deltas, anchors,
                          image_size, train: bool):
  """`generate_proposals` vmapped over the batch with the train or test settings of the config.

  Args:
    objectness, deltas: lists as returned by `RPNHead` (`[B, N_l]`, `[B, N_l, 4]`).
    anchors: per level `[N_l, 4]`.
    image_size: int32 `[B, 2]`.
  """
  r = config.model.rpn
  fn = lambda o, d, s: generate_proposals(
      o, d, anchors, s,
      pre_nms_topk=r.pre_nms_topk_train if train else r.pre_nms_topk_test,
      post_nms_topk=r.post_nms_topk_train if train else r.post_nms_topk_test,
      nms_thresh=r.nms_thresh, min_size=r.min_size, score_thresh=r.score_thresh,
      bbox_reg_weights=tuple(r.bbox_reg_weights), rank_by=str(r.get('rank_by', 'probability')))
  return jax.vmap(fn)(list(objectness), list(deltas), image_size)
