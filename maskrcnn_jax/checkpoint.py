"""Checkpoint layout and I/O shared by train, predict, evaluate and convert (orbax).

A checkpoint directory is an orbax `CheckpointManager` directory whose step folders hold items:

    variables  {'params': ..., 'constants': ...}        model variables (every checkpoint)
    train      {'opt_state': ..., 'step': ..., 'rng': ...}  training checkpoints only
    input      JSON: the input iterator's state         training checkpoints only
    meta       JSON: {'label_to_category_id', 'class_names', 'model_config', 'source'}

Converted checkpoints (`maskrcnn-jax convert`) hold `variables` and `meta` at step 0, so every
command that reads variables accepts both a training workdir and a converted directory.

Order of precedence when training starts (train.py): a checkpoint in the workdir > an explicit
`run.init_checkpoint` > `run.pretrained_backbone` > scratch.
"""

import json
import logging
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

VARIABLES = 'variables'
TRAIN = 'train'
INPUT = 'input'
META = 'meta'


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read or does not match the config; names the path."""


def model_config_json(config: ml_collections.ConfigDict) -> dict:
  """The part of a config that fixes the variables' shapes (stored and compared on restore)."""
  return json.loads(config.model.to_json())


def make_manager(directory: str, *, max_to_keep: Optional[int] = None,
                 read_only: bool = False, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (saves atomically: orbax writes a temp dir, renames)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=(VARIABLES, TRAIN, INPUT, META))


def latest_step(directory: str) -> Optional[int]:
  if not os.path.isdir(directory):
    return None
  with make_manager(directory, read_only=True) as manager:
    return manager.latest_step()


def save_variables(directory: str, variables: Any, meta: dict, step: int = 0) -> None:
  """Writes a variables-only checkpoint (used by `convert`)."""
  with make_manager(directory, async_save=False) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        VARIABLES: ocp.args.StandardSave(variables),
        META: ocp.args.JsonSave(jsonable(meta)),
    }))
    manager.wait_until_finished()


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  step, manager = _open_for_restore(directory, step)
  with manager:
    try:
      return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # orbax raises many types; give one clear message
      raise CheckpointError(f'cannot read the meta item of checkpoint {directory} step {step}: '
                            f'{e}') from e


def restore_variables(directory: str, abstract_variables: Any, config=None,
                      step: Optional[int] = None) -> tuple[Any, dict]:
  """Restores `variables` (shaped like `abstract_variables`, a tree of ShapeDtypeStructs or
  arrays, whose shardings are kept) and `meta`. Checks the stored model config against
  `config` first, so a mismatch is reported by field instead of by a shape error. Never writes.
  """
  meta = read_meta(directory, step)
  if config is not None:
    check_model_config(meta, config, directory)
  step, manager = _open_for_restore(directory, step)
  with manager:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          VARIABLES: ocp.args.StandardRestore(abstract_variables)}))
    except Exception as e:
      raise CheckpointError(f'checkpoint {directory} step {step} does not match the model built '
                            f'from the config: {e}') from e
  return restored[VARIABLES], meta


def check_model_config(meta: dict, config, directory: str) -> None:
  """Refuses a checkpoint whose stored structure differs from `config`'s.

  Compared: `config.model` and the input normalisation (`structure_meta`). A difference that
  changes a variable's shape is always refused (the shape-relevant fields are found by building
  the variable shapes of the stored and the current config, not from a list). Any other
  difference changes the function the weights compute (`stride_in_1x1`, anchor sizes,
  `roi.aligned`, the channel order and pixel statistics...) and is refused too, unless
  `config.run.allow_config_mismatch` is True, which warns naming the fields. Exempt: the
  training-only fields of `TRAINING_ONLY_FIELDS` and the inference thresholds `model.test.*`
  (logged at INFO), and the execution knobs, which are not part of the structure.
  """
  stored_model = meta.get('model_config')
  if stored_model is None:
    return
  current = structure_meta(config)
  stored = {'model': stored_model, 'input': meta.get('input_config')}
  if stored['input'] is None:  # written before the normalisation was stored: cannot check it
    stored['input'] = current['input_config']
  diffs = sorted(_diff(stored, {'model': current['model_config'],
                                'input': current['input_config']}))
  diffs = [d for d in diffs if d[0] not in _MOVED_FIELDS]
  if not diffs:
    return
  shape_fields = _shape_fields(config, stored_model,
                               [d for d in diffs if d[0].startswith('model.')])

  def lines(ds):
    return ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, a, b in ds)
  shaped = [d for d in diffs if d[0] in shape_fields]
  if shaped:
    raise CheckpointError(f'checkpoint {directory} was written for a different model (variable '
                          f'shapes differ): {lines(shaped)}')
  free = [d for d in diffs if d[0].startswith('model.test.') or d[0] in TRAINING_ONLY_FIELDS]
  structural = [d for d in diffs if d not in free]
  if free:
    logging.info('checkpoint %s: inference/training settings differ from the config (allowed): '
                 '%s', directory, lines(free))
  if not structural:
    return
  if not bool(config.run.get('allow_config_mismatch', False)):
    raise CheckpointError(
        f'checkpoint {directory} was written with a different model structure, which changes '
        f'what its weights compute: {lines(structural)}. Fix the config, or pass '
        '--config.run.allow_config_mismatch=True to use the weights anyway')
  logging.warning('checkpoint %s: using weights written for a different structure '
                  '(run.allow_config_mismatch=True): %s', directory, lines(structural))


# Fields that only change how a model is trained, not what its weights compute at inference.
TRAINING_ONLY_FIELDS = frozenset(
    f'model.{k}' for k in (
        'backbone.freeze_at', 'rpn.pre_nms_topk_train', 'rpn.post_nms_topk_train',
        'rpn.fg_iou_thresh', 'rpn.bg_iou_thresh', 'rpn.allow_low_quality_matches',
        'rpn.batch_size_per_image', 'rpn.positive_fraction', 'rpn.box_loss',
        'rpn.smooth_l1_beta', 'roi.fg_iou_thresh', 'roi.bg_iou_thresh',
        'roi.batch_size_per_image', 'roi.positive_fraction', 'roi.box_loss',
        'roi.smooth_l1_beta', 'roi.ignore_crowd', 'roi.crowd_ioa_thresh'))
# Stored by older versions under `model`, now execution knobs (`config.execution`).
_MOVED_FIELDS = frozenset({'model.mask_head.loss_chunk'})


def structure_meta(config) -> dict:
  """What a checkpoint stores of its config's structure: `model_config` (all of
  `config.model`) and `input_config` (the channel order and pixel statistics the weights
  expect)."""
  i = config.input
  return {'model_config': model_config_json(config),
          'input_config': {'channel_order': str(i.channel_order),
                           'pixel_mean': [float(v) for v in i.pixel_mean],
                           'pixel_std': [float(v) for v in i.pixel_std]}}


def _variable_shapes(config) -> dict:
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  tree = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _with_model_fields(config, stored_model: dict, fields):
  """`config` with the given `model.*` fields set to their stored values, or None if the
  stored values cannot be set (a field this version does not have)."""
  out = config.copy_and_resolve_references()
  try:
    for field in fields:
      node = out.model
      keys = field.split('.')[1:]
      value = stored_model
      for k in keys:
        value = value[k]
      for k in keys[:-1]:
        node = node[k]
      node[keys[-1]] = _normalise(value)
  except (KeyError, TypeError, AttributeError, ValueError):
    return None
  return out


def _shape_fields(config, stored_model: dict, diffs) -> set:
  """The differing `model.*` fields that change a variable shape, each found by building the
  variable shapes with only that field at its stored value."""
  if not diffs:
    return set()
  current = _variable_shapes(config)
  whole = _with_model_fields(config, stored_model, [d[0] for d in diffs])
  try:
    if whole is not None and _variable_shapes(whole) == current:
      return set()
  except Exception:  # pylint: disable=broad-except  (an invalid combination: test one by one)
    pass
  out = set()
  for field, _, _ in diffs:
    one = _with_model_fields(config, stored_model, [field])
    try:
      if one is None or _variable_shapes(one) != current:
        out.add(field)
    except Exception:  # pylint: disable=broad-except  (cannot build it: treat it as structural)
      out.add(field)
  return out


def _diff(a, b, prefix=''):
  """(dotted field, a's value, b's value) for every leaf where two nested dicts differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f'{prefix}{k}' if not prefix else f'{prefix}.{k}')
  elif _normalise(a) != _normalise(b):
    yield (prefix, a, b)


def _normalise(x):
  if isinstance(x, (list, tuple)):
    return tuple(_normalise(v) for v in x)
  return x


def _open_for_restore(directory: str, step: Optional[int]):
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory {directory} does not exist')
  manager = make_manager(directory, read_only=True)
  if step is None:
    step = manager.latest_step()
  if step is None:
    manager.close()
    raise CheckpointError(f'{directory} holds no checkpoint steps')
  return step, manager


def jsonable(x):
  """`x` with numpy/jax scalars and arrays turned into JSON types and dict keys into str."""
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, jax.Array) or isinstance(x, np.ndarray):
    return np.asarray(x).tolist()
  return x

