"""Mask R-CNN (He et al. 2017) with a ResNet-FPN backbone: inference and training losses.

Static shapes throughout: every array size comes from the config and the padded input size.

Variables (two collections; tree paths mirror torchvision `maskrcnn_resnet50_fpn` state-dict
keys, shown on the right; tests/modeling/test_mask_rcnn.py checks the map is one-to-one):

    params/backbone/body/conv1/kernel               backbone.body.conv1.weight
    params/backbone/body/layer{s}/{b}/conv{i}/kernel  backbone.body.layer{s}.{b}.conv{i}.weight
    params/backbone/body/layer{s}/0/downsample/0/kernel
                                                    backbone.body.layer{s}.0.downsample.0.weight
    params/backbone/fpn/inner_blocks_{i}/{kernel,bias}  backbone.fpn.inner_blocks.{i}.0.*
    params/backbone/fpn/layer_blocks_{i}/{kernel,bias}  backbone.fpn.layer_blocks.{i}.0.*
    params/rpn/head/conv/{kernel,bias}              rpn.head.conv.0.0.*
    params/rpn/head/{cls_logits,bbox_pred}/*        rpn.head.{cls_logits,bbox_pred}.*
    params/roi_heads/box_head/fc{6,7}/*             roi_heads.box_head.fc{6,7}.*
    params/roi_heads/box_predictor/{cls_score,bbox_pred}/*   roi_heads.box_predictor.*
    params/roi_heads/mask_head/mask_fcn{i}/*        roi_heads.mask_head.{i-1}.0.* (torchvision
                                                    >= 0.13; roi_heads.mask_head.mask_fcn{i} before)
    params/roi_heads/mask_predictor/{conv5_mask,mask_fcn_logits}/*  roi_heads.mask_predictor.*
    constants/backbone/body/{bn1, layer{s}/{b}/bn{i}, layer{s}/0/downsample/1}/
        {weight,bias,running_mean,running_var}      the FrozenBatchNorm2d buffers

Array conversions from torch: every conv kernel (ConvTranspose2d `conv5_mask` included) is
`weight.transpose(2, 3, 1, 0)`, every dense kernel is `weight.T`; biases and buffers are as is.
fc6 flattens RoI features in torchvision's (C, H, W) order and RPN delta channels are
anchor-major (`a * 4 + k`), so no other permutation is needed. detectron2 names map by stage
(`stem.conv1` -> `conv1`, `res{s+1}.{b}` -> `layer{s}/{b}`, `shortcut` -> `downsample`; its
`conv.norm` holds the BN) and its MSRA weights need `stride_in_1x1=True` and BGR input.
With `config.model.mask_on = False` the mask modules do not exist (plain Faster R-CNN).
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax.modeling import fpn as fpn_lib
from maskrcnn_jax.modeling import postprocess as post_lib
from maskrcnn_jax.modeling import resnet as resnet_lib
from maskrcnn_jax.modeling import roi_heads as roi_lib
from maskrcnn_jax.modeling import rpn as rpn_lib
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import sampling

# Spatial size of the dummy image used to create parameters (their shapes do not depend on it).
INIT_IMAGE_HW = (64, 64)


class Backbone(nn.Module):
  """ResNet `body` + `fpn`: images `[B, H, W, 3]` -> `[P2, ..., P6]`, each `[B, H_l, W_l, C]`."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    feats = resnet_lib.ResNet.from_config(self.config, name='body')(images)
    return fpn_lib.FPN(int(self.config.model.fpn.channels), resnet_lib.dtype_of(self.config),
                       name='fpn')(feats)


class MaskRCNN(nn.Module):
  """Mask R-CNN / Faster R-CNN (`config.model.mask_on`) with static shapes.

  `__call__(images, image_size)` is inference; `losses(batch, key)` is training. Build it with
  `build_model(config)` and its variables with `init_variables`.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    self.backbone = Backbone(self.config)
    self.rpn = rpn_lib.RPN(self.config)
    self.roi_heads = roi_lib.RoIHeads(self.config)

  # ------------------------------------------------------------------ inference
  def __call__(self, images: jnp.ndarray, image_size: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Detections for a batch.

    Args:
      images: float `[B, H, W, 3]` normalised, padded to a size bucket (H, W divisible by 32).
      image_size: int32 `[B, 2]` (height, width) of the resized content inside the padding.

    Returns:
      dict with D = `config.model.test.detections_per_img`:
        boxes  float32 `[B, D, 4]` xyxy, padded-input pixels;
        scores float32 `[B, D]`; labels int32 `[B, D]` (1..K); valid bool `[B, D]`;
        masks  float32 `[B, D, 28, 28]` probabilities of the predicted class, in the box frame
               (only when `config.model.mask_on`).
      Slots with valid False hold zeros.

    With `mutable=['intermediates']` the 'intermediates' collection also receives `features`
    (P2..P6), `objectness` and `rpn_deltas` (per level), `proposals` `[B, P, 4]`,
    `proposal_scores` and `proposal_valid` `[B, P]`.
    """
    cfg = self.config
    feats = self.backbone(images)
    objectness, deltas = self.rpn(feats)
    anchors = rpn_lib.anchors_for(cfg, images.shape[1:3])
    proposals, proposal_scores, proposal_valid = rpn_lib.proposals_from_config(
        cfg, objectness, deltas, anchors, image_size, train=False)
    for name, value in (('features', feats), ('objectness', objectness), ('rpn_deltas', deltas),
                        ('proposals', proposals), ('proposal_scores', proposal_scores),
                        ('proposal_valid', proposal_valid)):
      self.sow('intermediates', name, value, reduce_fn=lambda _, x: x, init_fn=lambda: None)
    return self.detect(feats, proposals, proposal_valid, image_size)

  def detect(self, feats: Sequence[jnp.ndarray], proposals: jnp.ndarray,
             proposal_valid: jnp.ndarray, image_size: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Box head + postprocess (+ mask head) on given proposals `[B, P, 4]` / valid `[B, P]`."""
    cfg = self.config
    m = cfg.model
    b, p = proposals.shape[:2]
    x = roi_lib.roi_features(cfg, feats, proposals, int(m.roi.box_output_size))
    class_logits, box_deltas = self.roi_heads.box(x.reshape((b * p,) + x.shape[2:]))
    post = functools.partial(
        post_lib.postprocess_detections, score_thresh=float(m.test.score_thresh),
        nms_thresh=float(m.test.nms_thresh), detections_per_img=int(m.test.detections_per_img),
        min_box_size=float(m.test.min_box_size), bbox_reg_weights=tuple(m.roi.bbox_reg_weights))
    det = jax.vmap(post)(class_logits.reshape(b, p, -1), box_deltas.reshape(b, p, -1),
                         proposals, proposal_valid, image_size)
    if m.mask_on:
      d = det['boxes'].shape[1]
      x = roi_lib.roi_features(cfg, feats, det['boxes'], int(m.roi.mask_output_size))
      # Only each detection's own class channel (torchvision `maskrcnn_inference` picks it
      # from all K+1), as probabilities.
      logits = self.roi_heads.mask(x.reshape((b * d,) + x.shape[2:]), det['labels'].reshape(-1))
      masks = jax.nn.sigmoid(logits.reshape((b, d) + logits.shape[1:]))
      det['masks'] = jnp.where(det['valid'][:, :, None, None], masks, 0.0)
    return det

  # ------------------------------------------------------------------ training
  def losses(self, batch: dict[str, jnp.ndarray], key: jax.Array
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Training losses of a batch (torchvision `MaskRCNN` in train mode).

    Batch normalisation follows torchvision, which pools the samples of all images: each
    per-image loss is divided by the batch-mean sample count (anchors sampled, RoIs sampled,
    foreground RoIs) and the per-image losses are averaged, which equals pooled sum / pooled count.

    Args:
      batch: the dict of structures.py (`images`, `image_size`, `gt_boxes`, `gt_labels`,
        `gt_masks` (if mask_on), `gt_crowd`, `gt_valid`).
      key: PRNG key for the anchor and RoI samplers.

    Returns:
      `(total_loss f32 [], metrics)`: metrics holds the float32 scalar loss terms
      `loss_objectness`, `loss_rpn_box_reg`, `loss_classifier`, `loss_box_reg`, (`loss_mask`) and
      the per-image means `num_rpn_positive`, `num_roi_foreground`, `num_proposals`.
    """
    cfg = self.config
    m = cfg.model
    images, image_size = batch['images'], batch['image_size']
    gt_boxes, gt_valid = batch['gt_boxes'], batch['gt_valid']
    gt_crowd = batch['gt_crowd']
    num_images = images.shape[0]
    rpn_key, roi_key = jax.random.split(key)

    feats = self.backbone(images)
    objectness, deltas = self.rpn(feats)
    anchors = rpn_lib.anchors_for(cfg, images.shape[1:3])

    # ---- RPN loss.
    all_anchors = jnp.asarray(np.concatenate(anchors))
    anchor_valid = jnp.ones(all_anchors.shape[:1], bool)
    rpn_fn = functools.partial(
        sampling.rpn_targets, anchors=all_anchors, anchor_valid=anchor_valid,
        fg_thresh=float(m.rpn.fg_iou_thresh), bg_thresh=float(m.rpn.bg_iou_thresh),
        allow_low_quality=bool(m.rpn.allow_low_quality_matches),
        batch_size=int(m.rpn.batch_size_per_image),
        positive_fraction=float(m.rpn.positive_fraction),
        weights=tuple(m.rpn.bbox_reg_weights), ignore_crowd=bool(m.roi.ignore_crowd),
        crowd_ioa_thresh=float(m.roi.crowd_ioa_thresh))
    rpn_t = jax.vmap(lambda k, b, v, c: rpn_fn(k, gt_boxes=b, gt_valid=v, gt_crowd=c))(
        jax.random.split(rpn_key, num_images), gt_boxes, gt_valid, gt_crowd)
    rpn_norm = jnp.mean(jnp.sum(rpn_t['sampled'], axis=1).astype(jnp.float32))
    rpn_l = jax.vmap(functools.partial(
        loss_ops.rpn_loss, box_loss=m.rpn.box_loss, beta=float(m.rpn.smooth_l1_beta),
        normalizer=rpn_norm))(jnp.concatenate(objectness, axis=1),
                              jnp.concatenate(deltas, axis=1), rpn_t)

    # ---- Proposals (no gradient, as torchvision detaches them) and RoI sampling.
    proposals, _, proposal_valid = rpn_lib.proposals_from_config(
        cfg, [jax.lax.stop_gradient(o) for o in objectness],
        [jax.lax.stop_gradient(d) for d in deltas], anchors, image_size, train=True)
    num_samples = int(m.roi.batch_size_per_image)
    roi_fn = functools.partial(
        sampling.roi_targets, num_samples=num_samples,
        positive_fraction=float(m.roi.positive_fraction), fg_thresh=float(m.roi.fg_iou_thresh),
        bg_thresh=float(m.roi.bg_iou_thresh), weights=tuple(m.roi.bbox_reg_weights),
        ignore_crowd=bool(m.roi.ignore_crowd), crowd_ioa_thresh=float(m.roi.crowd_ioa_thresh))
    roi_t = jax.vmap(roi_fn)(jax.random.split(roi_key, num_images), proposals, proposal_valid,
                             gt_boxes, batch['gt_labels'], gt_valid, gt_crowd)

    # ---- Box head loss.
    rois = roi_t['rois']
    x = roi_lib.roi_features(cfg, feats, rois, int(m.roi.box_output_size))
    class_logits, box_deltas = self.roi_heads.box(x.reshape((-1,) + x.shape[2:]))
    roi_norm = jnp.mean(jnp.sum(roi_t['valid'], axis=1).astype(jnp.float32))
    box_l = jax.vmap(functools.partial(
        loss_ops.fastrcnn_loss, box_loss=m.roi.box_loss, beta=float(m.roi.smooth_l1_beta),
        normalizer=roi_norm))(class_logits.reshape(num_images, num_samples, -1),
                              box_deltas.reshape(num_images, num_samples, -1),
                              roi_t['labels'], roi_t['box_targets'], roi_t['valid'])

    metrics = {
        'loss_objectness': jnp.mean(rpn_l['loss_objectness']),
        'loss_rpn_box_reg': jnp.mean(rpn_l['loss_rpn_box_reg']),
        'loss_classifier': jnp.mean(box_l['loss_classifier']),
        'loss_box_reg': jnp.mean(box_l['loss_box_reg']),
    }

    # ---- Mask head loss on the foreground RoIs: roi_targets puts all of them in the first
    # max_positives slots, so a static slice holds every one.
    if m.mask_on:
      num_fg_slots = sampling.max_positives(num_samples, float(m.roi.positive_fraction))
      fg = roi_t['foreground'][:, :num_fg_slots]
      mask_rois = rois[:, :num_fg_slots]
      labels = roi_t['labels'][:, :num_fg_slots]
      matched = roi_t['matched_gt'][:, :num_fg_slots]
      x = roi_lib.roi_features(cfg, feats, mask_rois, int(m.roi.mask_output_size))
      targets = jax.vmap(functools.partial(
          sampling.mask_targets, resolution=int(m.mask_head.resolution),
          aligned=bool(m.roi.aligned)))(batch['gt_masks'], gt_boxes, mask_rois, matched,
                                        roi_valid=fg)
      # Only each RoI's ground-truth class channel; with loss_chunk only the slots that hold
      # a foreground RoI. torchvision normalises by the batch's foreground pixel count.
      bce = self.roi_heads.mask_bce_sum(x, labels, targets, fg, int(m.mask_head.loss_chunk))
      pixels = jnp.sum(fg).astype(jnp.float32) * targets.shape[-2] * targets.shape[-1]
      metrics['loss_mask'] = jnp.where(pixels > 0, bce / jnp.maximum(pixels, 1.0), 0.0)

    total = sum(metrics.values())
    metrics.update(
        num_rpn_positive=jnp.mean(rpn_l['num_positive']),
        num_roi_foreground=jnp.mean(box_l['num_foreground']),
        num_proposals=jnp.mean(jnp.sum(proposal_valid, axis=1).astype(jnp.float32)))
    return total, metrics

  # ------------------------------------------------------------------ initialisation
  def init_forward(self, images: jnp.ndarray) -> None:
    """Touches every parameter with cheap dummy inputs (no NMS, no RoIAlign); for `init`."""
    m = self.config.model
    feats = self.backbone(images)
    self.rpn(feats)
    c = int(m.fpn.channels)
    s = int(m.roi.box_output_size)
    self.roi_heads.box(jnp.zeros((1, s, s, c), feats[0].dtype))
    if m.mask_on:
      s = int(m.roi.mask_output_size)
      self.roi_heads.mask(jnp.zeros((1, s, s, c), feats[0].dtype))


def build_model(config: ml_collections.ConfigDict) -> MaskRCNN:
  """The MaskRCNN module for `config` (frozen, so the module is hashable)."""
  if not isinstance(config, ml_collections.FrozenConfigDict):
    config = ml_collections.FrozenConfigDict(config)
  return MaskRCNN(config)


def init_variables(config: ml_collections.ConfigDict, key: jax.Array,
                   image_hw: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """Fresh variables `{'params': ..., 'constants': ...}` (frozen BN at identity).

  Shape-friendly: `jax.eval_shape(functools.partial(init_variables, config), key)` gives the
  tree without allocating, and `jax.jit(...)` with out_shardings materialises it sharded.
  `image_hw` (a padded size; defaults to a small dummy) does not change any parameter shape.
  """
  model = build_model(config)
  h, w = image_hw if image_hw is not None else INIT_IMAGE_HW
  images = jnp.zeros((1, int(h), int(w), 3), jnp.float32)
  variables = model.init(key, images, method=MaskRCNN.init_forward)
  return dict(variables)


def frozen_param_prefixes(config: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
  """Param-tree path prefixes frozen by `config.model.backbone.freeze_at`.

  freeze_at=1 -> stem (`backbone/body/conv1`), 2 -> + `layer1` (torchvision trainable_layers=3),
  ..., 5 -> the whole ResNet body. FrozenBN constants are never trainable.
  """
  names = resnet_lib.frozen_stages(config.model.backbone.freeze_at)
  stage_module = {'stem': 'conv1'}
  return [('backbone', 'body', stage_module.get(n, n)) for n in names]


def trainable_mask(params: Any, config: ml_collections.ConfigDict) -> Any:
  """Bool pytree like `params`: False for leaves under a frozen prefix (for optax.masked)."""
  prefixes = frozen_param_prefixes(config)

  def keep(path, _):
    names = tuple(getattr(k, 'key', getattr(k, 'name', str(k))) for k in path)
    return not any(names[:len(p)] == p for p in prefixes)

  return jax.tree_util.tree_map_with_path(keep, params)


def count_params(tree: Any) -> int:
  """Total number of elements over the leaves of a (shape) tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
