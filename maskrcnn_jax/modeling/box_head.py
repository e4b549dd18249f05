"""The box head (Fast R-CNN): a RoI head unit with torchvision's layers, sampling, loss and
detections (`TwoMLPHead`, `FastRCNNPredictor`, `fastrcnn_loss`, `postprocess_detections`).

Parameters: `roi_heads/box_head/fc{6,7}` and `roi_heads/box_predictor/{cls_score,bbox_pred}`.
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax.modeling import heads
from maskrcnn_jax.modeling import resnet
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import nms as nms_ops
from maskrcnn_jax.ops import sampling

# torch nn.Linear default (kaiming_uniform_(a=sqrt(5))): U(+-1/sqrt(fan_in)).
fc_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# detectron2 FastRCNNOutputLayers: normal(0.01) for class scores, normal(0.001) for deltas.
cls_score_init = nn.initializers.normal(stddev=0.01)
bbox_pred_init = nn.initializers.normal(stddev=0.001)


class TwoMLPHead(nn.Module):
  """Flatten `[N, S, S, C]` in torchvision's (C, S, S) order, then `num_fc` fc+ReLU layers
  named fc6, fc7, ... -> `[N, fc_dim]`. fc6's kernel is torchvision's `fc6.weight.T`."""
  fc_dim: int = 1024
  num_fc: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for i in range(self.num_fc):
      x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=fc_init, name=f'fc{6 + i}')(x))
    return x


class FastRCNNPredictor(nn.Module):
  """`cls_score` (K+1 logits incl. background 0) and class-specific `bbox_pred` (4(K+1))."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    scores = nn.Dense(self.num_classes, kernel_init=cls_score_init, name='cls_score', **kw)(x)
    deltas = nn.Dense(4 * self.num_classes, kernel_init=bbox_pred_init, name='bbox_pred', **kw)(x)
    return scores.astype(jnp.float32), deltas.astype(jnp.float32)


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


class BoxHead(heads.RoIHead):
  """The box head unit. It samples the RoIs every other head trains on (`targets`), so besides
  the contract of `heads.RoIHead` its `inference` takes proposals and returns the detections.

  Attributes:
    head: `model.box_head` (`fc_dim`, `num_fc`).
    roi: `model.roi` (sampling, box coder, `box_output_size`, loss).
    test: `model.test` (score/NMS thresholds, detections per image).
    num_classes: K + 1.
  """
  head: ml_collections.ConfigDict
  roi: ml_collections.ConfigDict
  test: ml_collections.ConfigDict
  num_classes: int
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'BoxHead':
    m = config.model
    return cls(m.box_head, m.roi, m.test, int(m.num_classes), resnet.dtype_of(config))

  def setup(self):
    self.box_head = TwoMLPHead(int(self.head.fc_dim), int(self.head.num_fc), self.dtype)
    self.box_predictor = FastRCNNPredictor(int(self.num_classes), self.dtype)

  def __call__(self, x):
    """`x [N, 7, 7, C] -> (class_logits f32 [N, K+1], box_deltas f32 [N, 4(K+1)])`."""
    return self.box_predictor(self.box_head(x))

  def init_params(self, channels: int, dtype: Any) -> None:
    s = int(self.roi.box_output_size)
    self(jnp.zeros((1, s, s, channels), dtype))

  def targets(self, key: jax.Array, proposals: jnp.ndarray, proposal_valid: jnp.ndarray,
              batch: Mapping[str, jnp.ndarray]) -> heads.RoISample:
    """Samples `roi.batch_size_per_image` RoIs per image from the proposals `[B, P, 4]` and the
    gt (`sampling.roi_targets`, one key per image); no gradient flows through them."""
    r = self.roi
    num_samples = int(r.batch_size_per_image)
    fn = functools.partial(
        sampling.roi_targets, num_samples=num_samples,
        positive_fraction=float(r.positive_fraction), fg_thresh=float(r.fg_iou_thresh),
        bg_thresh=float(r.bg_iou_thresh), weights=tuple(r.bbox_reg_weights),
        ignore_crowd=bool(r.ignore_crowd), crowd_ioa_thresh=float(r.crowd_ioa_thresh))
    num_images = proposals.shape[0]
    t = jax.vmap(fn)(jax.random.split(key, num_images), proposals, proposal_valid,
                     batch['gt_boxes'], batch['gt_labels'], batch['gt_valid'], batch['gt_crowd'])
    return heads.RoISample(
        t['rois'], t['labels'], t['box_targets'], t['matched_gt'], t['valid'], t['foreground'],
        sampling.max_positives(num_samples, float(r.positive_fraction)))

  def loss(self, pool: heads.Pool, sample: heads.RoISample,
           batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """`loss_classifier` and `loss_box_reg` (torchvision `fastrcnn_loss`, normalised by the
    batch's sampled RoI count) and the logged `num_roi_foreground`."""
    del batch
    r = self.roi
    b, s = sample.labels.shape
    x = pool(sample.rois, int(r.box_output_size))
    class_logits, box_deltas = self(x.reshape((-1,) + x.shape[2:]))
    norm = jnp.mean(jnp.sum(sample.valid, axis=1).astype(jnp.float32))
    out = jax.vmap(functools.partial(
        loss_ops.fastrcnn_loss, box_loss=r.box_loss, beta=float(r.smooth_l1_beta),
        normalizer=norm))(class_logits.reshape(b, s, -1), box_deltas.reshape(b, s, -1),
                          sample.labels, sample.box_targets, sample.valid)
    return {'loss_classifier': jnp.mean(out['loss_classifier']),
            'loss_box_reg': jnp.mean(out['loss_box_reg']),
            'num_roi_foreground': jnp.mean(out['num_foreground'])}

  def inference(self, pool: heads.Pool, proposals: jnp.ndarray, proposal_valid: jnp.ndarray,
                image_size: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Detections `boxes [B, D, 4]` (padded-input pixels), `scores`, `labels`, `valid` `[B, D]`
    from proposals `[B, P, 4]` / `[B, P]` (`postprocess_detections`)."""
    r, t = self.roi, self.test
    b, p = proposals.shape[:2]
    x = pool(proposals, int(r.box_output_size))
    class_logits, box_deltas = self(x.reshape((b * p,) + x.shape[2:]))
    post = functools.partial(
        postprocess_detections, score_thresh=float(t.score_thresh),
        nms_thresh=float(t.nms_thresh), detections_per_img=int(t.detections_per_img),
        min_box_size=float(t.min_box_size), bbox_reg_weights=tuple(r.bbox_reg_weights))
    return jax.vmap(post)(class_logits.reshape(b, p, -1), box_deltas.reshape(b, p, -1),
                          proposals, proposal_valid, image_size)

  def postprocess(self, detections: Mapping[str, Any], slot: int, boxes: np.ndarray,
                  original_hw: Sequence[int], resized_hw: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    del original_hw, resized_hw
    valid = np.asarray(detections['valid'][slot])
    return {'boxes': boxes[valid], 'scores': np.asarray(detections['scores'][slot])[valid],
            'labels': np.asarray(detections['labels'][slot])[valid].astype(np.int32)}


def clip_and_drop_empty(boxes: np.ndarray, valid: np.ndarray, original_hw: Sequence[int]
                        ) -> tuple[np.ndarray, np.ndarray]:
  """detectron2's `detector_postprocess` (`model.test.drop_empty_boxes`): original-frame boxes
  clipped to the image, and `valid` cleared where a clipped side is not > 0. Returns
  `(boxes float32 [D, 4], valid bool [D])`; the masks are then pasted with the clipped boxes."""
  h, w = (np.float32(s) for s in original_hw)
  b = np.asarray(boxes, np.float32).copy()
  b[:, 0::2] = np.clip(b[:, 0::2], 0, w)
  b[:, 1::2] = np.clip(b[:, 1::2], 0, h)
  nonempty = (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)
  return b, np.asarray(valid, bool) & nonempty


def boxes_to_original(boxes: np.ndarray, original_hw: Sequence[int],
                      resized_hw: Sequence[int]) -> np.ndarray:
  """float32 `[D, 4]` xyxy from the resized input frame to original-image pixels (torchvision
  `transform.resize_boxes`: per-axis float32 ratios original / resized)."""
  ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
  ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
  ratio = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
  return (np.asarray(boxes) * ratio).astype(np.float32)
