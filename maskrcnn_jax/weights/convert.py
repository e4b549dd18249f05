"""Entry points used by the CLI and train.py: `convert_file` (a whole detector -> a checkpoint
directory) and `load_pretrained_backbone` (a ResNet body into freshly initialised variables).
"""

import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import structures
from maskrcnn_jax.weights import coco_categories
from maskrcnn_jax.weights import core
from maskrcnn_jax.weights import detectron2
from maskrcnn_jax.weights import safe_io
from maskrcnn_jax.weights import torchvision

SOURCES = ('torchvision', 'detectron2')
BODY = ('backbone', 'body')


def _label_space(source: str, num_classes: int) -> tuple[dict[int, int], list[str]]:
  if source == 'torchvision' and num_classes == coco_categories.TORCHVISION_NUM_CLASSES:
    return coco_categories.torchvision_label_space()
  if source == 'detectron2' and num_classes == coco_categories.DETECTRON2_NUM_CLASSES:
    return coco_categories.detectron2_label_space()
  logging.warning('%d classes is not the COCO label space of %s models: writing placeholder '
                  'class names and an identity label -> category id map', num_classes, source)
  return coco_categories.generic_label_space(num_classes)


def convert_variables(source: str, path: str, config: ml_collections.ConfigDict, *,
                      allow_class_mismatch: bool = False, key: Optional[jax.Array] = None
                      ) -> tuple[dict, dict]:
  """Reads and converts a checkpoint file; returns `(variables, meta)` (see `convert_file`)."""
  if source not in SOURCES:
    raise ValueError(f'unknown checkpoint source {source!r}; expected one of {SOURCES}')
  structures.validate_config(config)
  state_dict = safe_io.load_state_dict(path)
  convert = (torchvision.from_torchvision if source == 'torchvision'
             else detectron2.from_detectron2)
  variables = convert(state_dict, config, allow_class_mismatch=allow_class_mismatch, key=key,
                      source=f'{source} checkpoint {path}')
  label_to_category_id, class_names = _label_space(source, int(config.model.num_classes))
  norm = torchvision.TORCHVISION_INPUT if source == 'torchvision' else detectron2.DETECTRON2_INPUT
  meta = {
      'label_to_category_id': label_to_category_id,
      'class_names': class_names[1:],  # K names for labels 1..K, as data/coco.py stores them
      **ckpt.structure_meta(config),
      'source': f'{source}:{os.path.abspath(path)}',
      # The pixel normalisation the converted weights were trained with (read back by
      # load_pretrained_backbone); predict/evaluate use config.input, which must match it.
      'input_normalization': norm.as_dict(),
  }
  return variables, meta


def convert_file(source: str, path: str, out_dir: str, config: ml_collections.ConfigDict,
                 allow_class_mismatch: bool = False, key: Optional[jax.Array] = None) -> dict:
  """`maskrcnn-jax convert`: converts a torchvision `.pth` or detectron2 `.pkl` detector into a
  checkpoint directory (step 0: `variables` + `meta`) that predict / evaluate / train read.

  Args:
    source: 'torchvision' or 'detectron2'.
    path: the checkpoint file (`.pth`/`.pt` read by torch or the built-in zip reader; `.pkl`
      read by the restricted unpickler; `.npz` of a state dict also works).
    out_dir: the new checkpoint directory (must not hold a checkpoint yet).
    config: the model config the variables are for.
    allow_class_mismatch: re-initialise class-specific layers if the class counts differ.

  Returns:
    The meta dict written next to the variables.
  """
  if ckpt.latest_step(out_dir) is not None:
    raise ckpt.CheckpointError(f'{out_dir} already holds a checkpoint; choose a new --out')
  variables, meta = convert_variables(source, path, config,
                                      allow_class_mismatch=allow_class_mismatch, key=key)
  ckpt.save_variables(out_dir, variables, meta)
  logging.info('wrote %s weights from %s to %s', source, path, out_dir)
  return meta


# ------------------------------------------------------------------------------ backbone init


def _read_checkpoint_dir(path: str) -> tuple[dict[str, np.ndarray], Optional[core.InputNorm]]:
  """Flat `{our path string: array}` of a checkpoint directory, and its input normalisation."""
  meta = ckpt.read_meta(path)
  with ckpt.make_manager(path, read_only=True) as manager:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(**{
        ckpt.VARIABLES: ocp.args.StandardRestore()}))[ckpt.VARIABLES]
  flat = {core.path_str(p): np.asarray(v) for p, v in core.flatten(restored).items()}
  norm = meta.get('input_normalization')
  return flat, (core.InputNorm(norm['channel_order'], tuple(norm['pixel_mean']),
                               tuple(norm['pixel_std'])) if norm else None)


def load_pretrained_backbone(path: str, params: Any, constants: Any,
                             config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """Replaces the ResNet body (`backbone/body`) of `params`/`constants` with pretrained weights.

  `path` may be:
    * a torchvision `.pth`: an ImageNet ResNet (`resnet50-*.pth`; `fc.*` ignored) or a detector
      (`backbone.body.*` used, the rest ignored);
    * a detectron2 `.pkl`: the MSRA ImageNet `R-50.pkl` (Caffe2 names) or a detectron2 detector
      (`backbone.bottom_up.*` used);
    * a checkpoint directory (`maskrcnn-jax convert` output or a training workdir): its
      `backbone/body` variables.
  Only the body is loaded (FPN and heads keep their initialisation; use `run.init_checkpoint`
  with a converted directory to start from a whole detector). Missing, unexpected (inside the
  body) and wrongly shaped tensors raise `core.WeightsMismatchError` listing them. If the
  weights expect another input normalisation than `config.input` (e.g. MSRA's BGR Caffe
  statistics under an RGB ImageNet config) the stem is adapted to the config
  (`core.adapt_stem_to_input`, logged).

  Args:
    params, constants: the model's freshly initialised trees (numpy or jax arrays, possibly
      sharded); container types and shardings are preserved.

  Returns:
    `(params, constants)` with the body replaced.
  """
  targets = {}
  for coll, tree in (('params', params), ('constants', constants)):
    for p, leaf in core.flatten(tree).items():
      if p[:2] == BODY:
        targets[(coll,) + p] = jax.ShapeDtypeStruct(np.shape(leaf), np.float32)
  if not targets:
    raise core.WeightsMismatchError('the model has no backbone/body variables to load')
  desc = f'pretrained backbone {path}'
  config_norm = core.InputNorm.of_config(config)
  if os.path.isdir(path):
    state_dict, weights_norm = _read_checkpoint_dir(path)
    rule = lambda p: core.Source(core.path_str(p), lambda w: w)
    ignore = lambda k: k.split('/')[1:3] != list(BODY)
    weights_norm = weights_norm or config_norm
  else:
    state_dict = core.to_numpy_state_dict(safe_io.load_state_dict(path))
    if detectron2.is_c2_format(state_dict) or any(
        k.startswith(detectron2.D2_BODY_PREFIX) for k in state_dict):
      rule, ignore = detectron2.backbone_rules(state_dict, config)
      weights_norm = detectron2.DETECTRON2_INPUT
      if not config.model.backbone.stride_in_1x1:
        logging.warning('%s: detectron2/MSRA ResNets put the stride in the 1x1 conv but '
                        'config.model.backbone.stride_in_1x1 is False', desc)
    else:
      state_dict = torchvision.normalise_state_dict(state_dict)
      rule, ignore = torchvision.backbone_rules(state_dict)
      weights_norm = torchvision.TORCHVISION_INPUT
  flat = core.assign(state_dict, targets, rule, source=desc, ignore=ignore)
  if not weights_norm.close_to(config_norm):
    core.adapt_stem_to_input(flat, BODY, weights_norm, config_norm)
  logging.info('loaded %d backbone tensors from %s', len(flat), path)
  return _replace(params, 'params', flat), _replace(constants, 'constants', flat)


def _replace(tree: Any, coll: str, flat: dict[core.Path, np.ndarray]) -> Any:
  def fn(path, leaf):
    key = (coll,) + tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
    if key not in flat:
      return leaf
    value = flat[key].astype(np.asarray(leaf).dtype if not isinstance(leaf, jax.Array)
                             else leaf.dtype)
    if isinstance(leaf, jax.Array):
      return jax.device_put(value, leaf.sharding)
    return value
  return jax.tree_util.tree_map_with_path(fn, tree)
