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

The RoI heads are units (`heads.py`): the box head always runs, then each head of the dict
`build_heads(config)` makes (the mask head when `model.mask_on`, the keypoint head when
`model.keypoint_on`), or of the dict a caller passes to `build_model`. `config.execution.backend` chooses the implementation of the backend-specific
hook points (`maskrcnn_jax/backends`); the parameters are the same for every backend.
"""

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import backends
from maskrcnn_jax.backends import xla
from maskrcnn_jax.modeling import box_head as box_lib
from maskrcnn_jax.modeling import fpn as fpn_lib
from maskrcnn_jax.modeling import heads as heads_lib
from maskrcnn_jax.modeling import keypoint_head as keypoint_lib
from maskrcnn_jax.modeling import mask_head as mask_lib
from maskrcnn_jax.modeling import poolers
from maskrcnn_jax.modeling import resnet as resnet_lib
from maskrcnn_jax.modeling import rpn as rpn_lib
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import sampling

# Spatial size of the dummy image used to create parameters (their shapes do not depend on it).
INIT_IMAGE_HW = (64, 64)


class Backbone(nn.Module):
  """ResNet `body` + `fpn`: images `[B, H, W, 3]` -> `[P2, ..., P6]`, each `[B, H_l, W_l, C]`."""
  config: ml_collections.ConfigDict
  backend: backends.Backend = xla.PLAIN

  @nn.compact
  def __call__(self, images: jnp.ndarray) -> list[jnp.ndarray]:
    feats = resnet_lib.ResNet.from_config(self.config, backend=self.backend, name='body')(images)
    return fpn_lib.FPN(int(self.config.model.fpn.channels), resnet_lib.dtype_of(self.config),
                       self.backend, name='fpn')(feats)


class MaskRCNN(nn.Module):
  """Mask R-CNN / Faster R-CNN with static shapes: backbone, RPN, the box head and `heads`.

  `__call__(images, image_size)` is inference; `losses(batch, key)` is training. Build it with
  `build_model(config)` and its variables with `init_variables`.
  """
  config: ml_collections.ConfigDict
  heads: Mapping[str, heads_lib.RoIHead]
  backend: backends.Backend = xla.PLAIN

  def setup(self):
    self.backbone = Backbone(self.config, self.backend)
    self.rpn = rpn_lib.RPN(self.config, self.backend)
    self.roi_heads = heads_lib.RoIHeads(box_head_of(self), dict(self.heads))
    self.pooler = poolers.Pooler.from_config(self.config)

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
        and each head's outputs, e.g. masks float32 `[B, D, 28, 28]` probabilities of the
        predicted class, in the box frame (the mask head).
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
    """The box head's detections on given proposals `[B, P, 4]` / valid `[B, P]`, then every
    head's outputs for them."""
    pool = functools.partial(self.pooler, feats)
    det = self.roi_heads.box_head_unit.inference(pool, proposals, proposal_valid, image_size)
    for head in self.roi_heads.units.values():
      det.update(head.inference(pool, det))
    return det

  # ------------------------------------------------------------------ training
  def losses(self, batch: dict[str, jnp.ndarray], key: jax.Array
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Training losses of a batch (torchvision `MaskRCNN` in train mode).

    Batch normalisation follows torchvision, which pools the samples of all images: each
    per-image loss is divided by the batch-mean sample count (anchors sampled, RoIs sampled,
    foreground pixels) and the per-image losses are averaged, which equals pooled sum / pooled
    count.

    Args:
      batch: the dict of structures.py (`images`, `image_size`, `gt_boxes`, `gt_labels`,
        `gt_masks` (if mask_on), `gt_crowd`, `gt_valid`).
      key: PRNG key for the anchor and RoI samplers.

    Returns:
      `(total_loss f32 [], metrics)`: metrics holds the float32 scalar loss terms
      `loss_objectness`, `loss_rpn_box_reg`, `loss_classifier`, `loss_box_reg`, each head's
      `loss_*` terms (`loss_mask`), and the per-image means `num_rpn_positive`,
      `num_roi_foreground`, `num_proposals`. The total is the sum of every `loss_*` term.
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
    metrics = {
        'loss_objectness': jnp.mean(rpn_l['loss_objectness']),
        'loss_rpn_box_reg': jnp.mean(rpn_l['loss_rpn_box_reg']),
    }

    # ---- Proposals (no gradient, as torchvision detaches them), RoI sampling, RoI heads.
    proposals, _, proposal_valid = rpn_lib.proposals_from_config(
        cfg, [jax.lax.stop_gradient(o) for o in objectness],
        [jax.lax.stop_gradient(d) for d in deltas], anchors, image_size, train=True)
    pool = functools.partial(self.pooler, feats)
    box = self.roi_heads.box_head_unit
    sample = box.targets(roi_key, proposals, proposal_valid, batch)
    metrics.update(box.loss(pool, sample, batch))
    for head in self.roi_heads.units.values():
      metrics.update(head.loss(pool, sample, batch))

    total = sum(v for k, v in metrics.items() if k.startswith('loss_'))
    metrics.update(
        num_rpn_positive=jnp.mean(rpn_l['num_positive']),
        num_proposals=jnp.mean(jnp.sum(proposal_valid, axis=1).astype(jnp.float32)))
    return total, metrics

  # ------------------------------------------------------------------ initialisation
  def init_forward(self, images: jnp.ndarray) -> None:
    """Touches every parameter with cheap dummy inputs (no NMS, no RoIAlign); for `init`."""
    feats = self.backbone(images)
    self.rpn(feats)
    c = int(self.config.model.fpn.channels)
    self.roi_heads.box_head_unit.init_params(c, feats[0].dtype)
    for head in self.roi_heads.units.values():
      head.init_params(c, feats[0].dtype)


def box_head_of(model: MaskRCNN) -> box_lib.BoxHead:
  """The (unbound) box head of a model, e.g. for its host-side `postprocess`."""
  return box_lib.BoxHead.from_config(model.config)


def build_heads(config: ml_collections.ConfigDict,
                backend: backends.Backend) -> dict[str, heads_lib.RoIHead]:
  """The RoI heads besides the box head that `config.model` enables, by name."""
  out = {}
  if config.model.mask_on:
    out['mask'] = mask_lib.MaskHead.from_config(config, backend)
  if config.model.keypoint_on:
    out['keypoint'] = keypoint_lib.KeypointHead.from_config(config, backend)
  return out


def build_model(config: ml_collections.ConfigDict,
                heads: Optional[Mapping[str, heads_lib.RoIHead]] = None) -> MaskRCNN:
  """The MaskRCNN module for `config` (frozen, so the module is hashable).

  `heads` replaces `build_heads(config, backend)`: pass `{**build_heads(...), 'mine': MyHead()}`
  to add a head of your own without editing this package.
  """
  if not isinstance(config, ml_collections.FrozenConfigDict):
    config = ml_collections.FrozenConfigDict(config)
  backend = backends.get(config.execution.backend)
  if heads is None:
    heads = build_heads(config, backend)
  return MaskRCNN(config, dict(heads), backend)


def init_variables(config: ml_collections.ConfigDict, key: jax.Array,
                   image_hw: Optional[Sequence[int]] = None,
                   model: Optional[MaskRCNN] = None) -> dict[str, Any]:
  """Fresh variables `{'params': ..., 'constants': ...}` (frozen BN at identity).

  Shape-friendly: `jax.eval_shape(functools.partial(init_variables, config), key)` gives the
  tree without allocating, and `jax.jit(...)` with out_shardings materialises it sharded.
  `image_hw` (a padded size; defaults to a small dummy) does not change any parameter shape.
  `model` defaults to `build_model(config)`.
  """
  model = model if model is not None else build_model(config)
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
