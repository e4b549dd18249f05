"""detectron2 checkpoints -> our variables: R50-FPN Mask and Keypoint R-CNN `model_final_*.pkl`
and the MSRA ImageNet `R-50.pkl` (Caffe2 names) for backbone initialisation.

Class layout: detectron2's `cls_score` has K+1 rows with background LAST, `bbox_pred` 4K rows
and the mask `predictor` K channels, both without background. Ours put background first at
label 0, so `cls_score` rows are rotated, and `bbox_pred` / mask logits get a zero background
row (never read: postprocessing drops the background column). Class-agnostic `bbox_pred` (4
rows) or masks (1 channel) are tiled over the classes, which computes the same thing.

Caffe2 batch norm is stored folded, as scale `_bn_s` and bias `_bn_b`; we load them as
`weight`/`bias` with `running_mean = 0` and `running_var = 1 - eps`, so that
`weight / sqrt(running_var + eps)` is exactly the stored scale.
"""

import logging
import re
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from maskrcnn_jax.weights import core

# detectron2 MSRA weights: BGR input, Caffe pixel means, unit std (detectron2 config defaults).
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)
DETECTRON2_INPUT = core.InputNorm('BGR', DETECTRON2_PIXEL_MEAN_BGR, DETECTRON2_PIXEL_STD)

D2_BODY_PREFIX = 'backbone.bottom_up.'
# Non-parameter buffers some detectron2 checkpoints carry (anchors, input statistics).
_IGNORED = re.compile(r'(.*\.)?num_batches_tracked|pixel_mean|pixel_std|'
                      r'proposal_generator\.anchor_generator\.cell_anchors\.\d+')
# Caffe2 / MSRA ImageNet weights: the classifier and optimiser momenta are not ours.
_C2_IGNORED = re.compile(r'fc1000_[wb]|pred_[wb]|.*_momentum')

_BN_LEAVES = ('weight', 'bias', 'running_mean', 'running_var')


# ------------------------------------------------------------------------------ class layouts


def _rotate_background_first(w: np.ndarray, axis: int) -> np.ndarray:
  """cls_score: detectron2 `[K+1, ...]` background last -> ours background first."""
  return np.roll(w, 1, axis=axis)


def _prepend_background(w: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
  """`[n * per_class, ...]` rows (no background) -> `[(K+1) * per_class, ...]`.

  n = K: a zero background block is added in front; n = 1 (class-agnostic): tiled K+1 times.
  """
  n = w.shape[0] // per_class
  if n == 1 and num_classes > 2:
    return np.concatenate([w] * num_classes, axis=0)
  return np.concatenate([np.zeros((per_class,) + w.shape[1:], w.dtype), w], axis=0)


def _class_transforms(num_classes: int) -> dict[tuple[str, str], Any]:
  """(our module, leaf) -> transform to our layout for the class-specific layers."""
  def cls_w(w):
    return core.dense_kernel(_rotate_background_first(w, 0))

  def box_w(w):
    return core.dense_kernel(_prepend_background(w, 4, num_classes))

  def mask_w(w):
    return core.conv_kernel(_prepend_background(w, 1, num_classes))

  return {
      ('cls_score', 'kernel'): cls_w,
      ('cls_score', 'bias'): lambda b: _rotate_background_first(b, 0),
      ('bbox_pred', 'kernel'): box_w,
      ('bbox_pred', 'bias'): lambda b: _prepend_background(b, 4, num_classes),
      ('mask_fcn_logits', 'kernel'): mask_w,
      ('mask_fcn_logits', 'bias'): lambda b: _prepend_background(b, 1, num_classes),
  }


# ------------------------------------------------------------------------------ names


def _body_module(mods: tuple[str, ...], prefix: str) -> Optional[str]:
  """detectron2 name of a ResNet-body module (ours: torchvision names)."""
  if mods == ('conv1',):
    return prefix + 'stem.conv1'
  if mods == ('bn1',):
    return prefix + 'stem.conv1.norm'
  if len(mods) >= 3 and (m := re.fullmatch(r'layer(\d)', mods[0])):
    block = f'{prefix}res{int(m[1]) + 1}.{mods[1]}'
    rest = mods[2:]
    if rest == ('downsample', '0'):
      return block + '.shortcut'
    if rest == ('downsample', '1'):
      return block + '.shortcut.norm'
    if len(rest) == 1 and (c := re.fullmatch(r'conv(\d)', rest[0])):
      return f'{block}.conv{c[1]}'
    if len(rest) == 1 and (b := re.fullmatch(r'bn(\d)', rest[0])):
      return f'{block}.conv{b[1]}.norm'
  return None


def _head_module(mods: tuple[str, ...]) -> Optional[str]:
  if mods[:2] == ('backbone', 'fpn') and len(mods) == 3:
    m = re.fullmatch(r'(inner|layer)_blocks_(\d+)', mods[2])
    if m:  # block i reads C_{i+2}
      kind = 'lateral' if m[1] == 'inner' else 'output'
      return f'backbone.fpn_{kind}{int(m[2]) + 2}'
    return None
  names = {
      ('rpn', 'head', 'conv'): 'proposal_generator.rpn_head.conv',
      ('rpn', 'head', 'cls_logits'): 'proposal_generator.rpn_head.objectness_logits',
      ('rpn', 'head', 'bbox_pred'): 'proposal_generator.rpn_head.anchor_deltas',
      ('roi_heads', 'box_predictor', 'cls_score'): 'roi_heads.box_predictor.cls_score',
      ('roi_heads', 'box_predictor', 'bbox_pred'): 'roi_heads.box_predictor.bbox_pred',
      ('roi_heads', 'mask_predictor', 'conv5_mask'): 'roi_heads.mask_head.deconv',
      ('roi_heads', 'mask_predictor', 'mask_fcn_logits'): 'roi_heads.mask_head.predictor',
  }
  if mods in names:
    return names[mods]
  if mods[:2] == ('roi_heads', 'box_head') and len(mods) == 3:
    m = re.fullmatch(r'fc(\d+)', mods[2])  # our fc6, fc7 are detectron2's fc1, fc2
    return f'roi_heads.box_head.fc{int(m[1]) - 5}' if m else None
  if mods[:2] == ('roi_heads', 'mask_head') and len(mods) == 3:
    return f'roi_heads.mask_head.{mods[2]}' if re.fullmatch(r'mask_fcn\d+', mods[2]) else None
  if mods[:2] == ('roi_heads', 'keypoint_head') and len(mods) == 3:
    # KRCNNConvDeconvUpsampleHead names its convs conv_fcn1.. as we do.
    return f'roi_heads.keypoint_head.{mods[2]}' if re.fullmatch(r'conv_fcn\d+', mods[2]) else None
  if mods == ('roi_heads', 'keypoint_predictor', 'kps_score_lowres'):
    # Its ConvTranspose2d(512, K, 4, stride 2, padding 1), torchvision's kps_score_lowres.
    return 'roi_heads.keypoint_head.score_lowres'
  return None


def rule(path: core.Path, num_classes: int, body_prefix: str = D2_BODY_PREFIX
         ) -> Optional[core.Rule]:
  """detectron2 source of our variable `path` (collection first), or None."""
  mods, leaf = path[1:-1], path[-1]
  if mods[:2] == ('backbone', 'body'):
    module = _body_module(mods[2:], body_prefix)
  else:
    module = _head_module(mods)
  if module is None or leaf not in ('kernel', 'bias') + _BN_LEAVES:
    return None
  transform = _class_transforms(num_classes).get((mods[-1], leaf)) if core.is_class_specific(
      path) else None
  return core.Source(f'{module}.{"weight" if leaf == "kernel" else leaf}',
                     transform or core.default_layout(path))


def c2_rule(path: core.Path, bn_eps: float) -> Optional[core.Rule]:
  """Caffe2 / MSRA (`R-50.pkl`) source of our ResNet-body variable `path`, or None."""
  mods, leaf = path[3:-1], path[-1]
  if path[1:3] != ('backbone', 'body'):
    return None
  if mods in (('conv1',), ('bn1',)):
    stem = 'conv1' if mods == ('conv1',) else 'res_conv1_bn'
    return _c2_leaf(stem, leaf, path, bn_eps)
  if len(mods) < 3 or not (m := re.fullmatch(r'layer(\d)', mods[0])):
    return None
  block = f'res{int(m[1]) + 1}_{mods[1]}'
  rest = mods[2:]
  if rest == ('downsample', '0'):
    return _c2_leaf(block + '_branch1', leaf, path, bn_eps)
  if rest == ('downsample', '1'):
    return _c2_leaf(block + '_branch1_bn', leaf, path, bn_eps)
  if len(rest) == 1 and (c := re.fullmatch(r'(conv|bn)(\d)', rest[0])):
    branch = f'{block}_branch2{"abc"[int(c[2]) - 1]}'
    return _c2_leaf(branch if c[1] == 'conv' else branch + '_bn', leaf, path, bn_eps)
  return None


def _c2_leaf(name: str, leaf: str, path: core.Path, bn_eps: float) -> Optional[core.Rule]:
  if leaf == 'kernel':
    return core.Source(f'{name}_w', core.conv_kernel)
  if leaf == 'bias' and path[0] == 'params':  # conv bias (norm='none')
    return core.Source(f'{name}_b', lambda w: w)
  folded = {'weight': core.Source(f'{name}_s', lambda w: w),
            'bias': core.Source(f'{name}_b', lambda w: w),
            'running_mean': core.Fill(0.0, 'Caffe2 BN is stored folded'),
            'running_var': core.Fill(1.0 - bn_eps, 'Caffe2 BN is stored folded; +eps gives 1')}
  return folded.get(leaf)


def is_c2_format(state_dict: Mapping[str, Any]) -> bool:
  """True for Caffe2/Detectron1 names (`conv1_w`, `res2_0_branch2a_w`, ...)."""
  return 'conv1_w' in state_dict or any(k.startswith('res2_0_branch') for k in state_dict)


# ------------------------------------------------------------------------------ public


def from_detectron2(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                    allow_class_mismatch: bool = False, key: Optional[jax.Array] = None,
                    source: str = 'detectron2 state dict') -> dict:
  """Our variables `{'params', 'constants'}` from a detectron2 Mask/Faster/Keypoint R-CNN R-FPN
  model (`configs/detectron2_keypointrcnn_r50_fpn.py` for the keypoint models: detectron2's one
  class-agnostic keypoint set is label 1's channels).

  Args:
    state_dict: `{name: array}`, e.g. `load_state_dict('model_final_f10217.pkl')` (the
      `'model'` entry of a detectron2 model-zoo pickle).
    config: the model config; `configs/detectron2_maskrcnn_r50_fpn.py` reproduces detectron2's
      inference (BGR Caffe input, stride in the 1x1 conv, 81 labels, aligned RoIAlign).
    allow_class_mismatch: if the class count (rows of `cls_score`) differs from
      `config.model.num_classes`, re-initialise the class-specific layers (logged).
    key: PRNG key for that re-initialisation (default `jax.random.key(0)`).

  Returns:
    `{'params': ..., 'constants': ...}` of float32 numpy arrays; label 0 is background and
    detectron2's class i is our label i + 1.

  Raises:
    core.WeightsMismatchError / core.ClassCountMismatchError, naming every offending tensor.
  """
  sd = core.to_numpy_state_dict(state_dict)
  if is_c2_format(sd):
    raise core.WeightsMismatchError(
        f'{source} has Caffe2/MSRA names (e.g. conv1_w): an ImageNet backbone, not a detectron2 '
        'detector; load it with config.run.pretrained_backbone (load_pretrained_backbone)')
  num_classes = int(config.model.num_classes)
  cls = sd.get('roi_heads.box_predictor.cls_score.weight')
  key = jax.random.key(0) if key is None else key
  flat = core.assign(
      sd, core.abstract_variables(config), lambda p: rule(p, num_classes), source=source,
      ignore=lambda k: bool(_IGNORED.fullmatch(k)), allow_class_mismatch=allow_class_mismatch,
      class_count=None if cls is None else int(cls.shape[0]), num_classes=num_classes,
      init_fn=lambda: core.init_variables_flat(config, key))
  core.warn_input_norm(source, DETECTRON2_INPUT, config)
  if not config.model.backbone.stride_in_1x1:
    logging.warning('%s: detectron2 MSRA ResNets put the stride in the 1x1 conv; '
                    'config.model.backbone.stride_in_1x1 is False', source)
  return core.unflatten(flat)


def backbone_rules(state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict):
  """`(rule, ignore)` for loading only the ResNet body from a detectron2 or Caffe2 checkpoint."""
  if is_c2_format(state_dict):
    eps = float(config.model.backbone.bn_eps)
    return (lambda p: c2_rule(p, eps)), lambda k: bool(_C2_IGNORED.fullmatch(k))
  return ((lambda p: rule(p, int(config.model.num_classes))),
          lambda k: not k.startswith(D2_BODY_PREFIX) or bool(_IGNORED.fullmatch(k)))
