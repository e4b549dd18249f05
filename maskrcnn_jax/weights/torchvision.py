"""torchvision checkpoints -> our variables: `maskrcnn_resnet50_fpn` (v1) and ImageNet ResNets.

Our variable tree mirrors torchvision's module names (see modeling/mask_rcnn.py), so the map is
mostly `/` -> `.` plus layouts: conv OIHW -> HWIO, Linear `W.T`, ConvTranspose2d
`[in, out, kh, kw]` -> `[kh, kw, out, in]`. fc6 needs no row permutation because our box head
flattens RoI features in torchvision's (C, H, W) order. Pre-0.13 (legacy) names of the RPN conv,
FPN blocks and mask head (e.g. the published COCO weights' `rpn.head.conv.weight`) are accepted.
"""

import logging
import re
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from maskrcnn_jax import structures
from maskrcnn_jax.weights import core

# torchvision detection models normalise RGB input with ImageNet statistics (0..255 units).
TORCHVISION_INPUT = core.InputNorm('RGB', tuple(structures.TORCHVISION_PIXEL_MEAN),
                                   tuple(structures.TORCHVISION_PIXEL_STD))
DETECTOR_BODY_PREFIX = 'backbone.body.'

# BatchNorm's update counter: no inference meaning, absent from FrozenBatchNorm2d checkpoints.
_IGNORED = re.compile(r'(.*\.)?num_batches_tracked')
# Names used before torchvision 0.13 (module `_version` < 2) -> current names.
LEGACY_RENAMES = (
    (re.compile(r'rpn\.head\.conv\.(weight|bias)'), lambda m: f'rpn.head.conv.0.0.{m[1]}'),
    (re.compile(r'backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(weight|bias)'),
     lambda m: f'backbone.fpn.{m[1]}_blocks.{m[2]}.0.{m[3]}'),
    (re.compile(r'roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)'),
     lambda m: f'roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}'),
)
_LEAF = {'kernel': 'weight', 'bias': 'bias', 'weight': 'weight', 'running_mean': 'running_mean',
         'running_var': 'running_var'}


def normalise_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """numpy float32 arrays under current (>= 0.13) torchvision names."""
  return core.rename_keys(core.to_numpy_state_dict(state_dict), LEGACY_RENAMES)


def _module_name(mods: tuple[str, ...], body_prefix: str) -> Optional[str]:
  """torchvision module name of our module path (without collection and leaf)."""
  if mods[:2] == ('backbone', 'body'):
    return body_prefix + '.'.join(mods[2:])
  if mods[:2] == ('backbone', 'fpn') and len(mods) == 3:
    m = re.fullmatch(r'(inner|layer)_blocks_(\d+)', mods[2])
    return f'backbone.fpn.{m[1]}_blocks.{m[2]}.0' if m else None
  if mods == ('rpn', 'head', 'conv'):
    return 'rpn.head.conv.0.0'
  if mods[:2] == ('roi_heads', 'mask_head') and len(mods) == 3:
    m = re.fullmatch(r'mask_fcn(\d+)', mods[2])
    return f'roi_heads.mask_head.{int(m[1]) - 1}.0' if m else None
  if mods[:2] == ('roi_heads', 'keypoint_head') and len(mods) == 3:
    # KeypointRCNNHeads is a Sequential of (Conv2d, ReLU) pairs: conv i is entry 2 (i - 1).
    m = re.fullmatch(r'conv_fcn(\d+)', mods[2])
    return f'roi_heads.keypoint_head.{2 * (int(m[1]) - 1)}' if m else None
  if mods[0] in ('rpn', 'roi_heads'):
    return '.'.join(mods)
  return None


def rule(path: core.Path, body_prefix: str = DETECTOR_BODY_PREFIX) -> Optional[core.Rule]:
  """torchvision source of our variable `path` (collection first), or None."""
  module = _module_name(path[1:-1], body_prefix)
  if module is None or path[-1] not in _LEAF:
    return None
  return core.Source(f'{module}.{_LEAF[path[-1]]}', core.default_layout(path))


def from_torchvision(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict, *,
                     allow_class_mismatch: bool = False, key: Optional[jax.Array] = None,
                     source: str = 'torchvision state dict') -> dict:
  """Our variables `{'params', 'constants'}` from a torchvision Mask, Faster or Keypoint R-CNN
  state dict.

  Args:
    state_dict: `{name: array}` of `maskrcnn_resnet50_fpn` (or any torchvision
      `MaskRCNN`/`FasterRCNN` with a `resnet_fpn_backbone`), numpy arrays or torch tensors.
    config: the model config (`configs/torchvision_maskrcnn_r50_fpn.py` reproduces torchvision's
      inference; shapes must agree: depth, widths, num_classes, mask_on).
    allow_class_mismatch: if the state dict's class count differs from
      `config.model.num_classes`, re-initialise `cls_score`, `bbox_pred` and `mask_fcn_logits`
      from the model's own initialiser (logged) instead of raising.
    key: PRNG key for that re-initialisation (default `jax.random.key(0)`).

  Returns:
    `{'params': ..., 'constants': ...}` nested dicts of float32 numpy arrays, the tree
    `mask_rcnn.init_variables(config, ...)` has.

  Raises:
    core.WeightsMismatchError: missing / unused / wrongly shaped tensors, all listed by name.
    core.ClassCountMismatchError: class counts differ and allow_class_mismatch is False.
  """
  sd = normalise_state_dict(state_dict)
  cls = sd.get('roi_heads.box_predictor.cls_score.weight')
  key = jax.random.key(0) if key is None else key
  flat = core.assign(
      sd, core.abstract_variables(config), rule, source=source,
      ignore=lambda k: bool(_IGNORED.fullmatch(k)), allow_class_mismatch=allow_class_mismatch,
      class_count=None if cls is None else int(cls.shape[0]),
      num_classes=int(config.model.num_classes),
      init_fn=lambda: core.init_variables_flat(config, key))
  core.warn_input_norm(source, TORCHVISION_INPUT, config)
  return core.unflatten(flat)


def backbone_rules(state_dict: Mapping[str, np.ndarray]):
  """`(rule, ignore)` for loading only the ResNet body from a torchvision state dict.

  A detector state dict (`backbone.body.*`) contributes its body, everything else is ignored; a
  classification ResNet (`conv1.weight`, `layer1.0...`, `fc.*`) contributes all but `fc`.
  """
  if any(k.startswith(DETECTOR_BODY_PREFIX) for k in state_dict):
    prefix = DETECTOR_BODY_PREFIX
    ignore = lambda k: not k.startswith(prefix) or bool(_IGNORED.fullmatch(k))
  else:
    prefix = ''
    ignore = lambda k: k.startswith('fc.') or bool(_IGNORED.fullmatch(k))
  logging.info('torchvision backbone weights: body prefix %r', prefix)
  return (lambda path: rule(path, prefix)), ignore
