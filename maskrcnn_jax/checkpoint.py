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
  stored = meta.get('model_config')
  if stored is None:
    return
  current = model_config_json(config)
  diffs = sorted(_diff(stored, current))
  shape_fields = [d for d in diffs if _shape_relevant(d[0])]
  if shape_fields:
    lines = ', '.join(f'model.{k}: checkpoint {a!r} vs config {b!r}' for k, a, b in shape_fields)
    raise CheckpointError(f'checkpoint {directory} was written for a different model: {lines}')
  if diffs:
    logging.info('checkpoint %s model config differs in non-shape fields: %s', directory,
                 ', '.join(d[0] for d in diffs))


# Config fields that change variable shapes; others (thresholds, top-k) may differ freely.
_SHAPE_PREFIXES = ('num_classes', 'mask_on', 'backbone.depth', 'backbone.width', 'fpn.',
                   'anchors.aspect_ratios', 'box_head.', 'mask_head.conv_dim',
                   'mask_head.num_convs', 'mask_head.resolution', 'roi.box_output_size',
                   'roi.mask_output_size')


def _shape_relevant(key: str) -> bool:
  return any(key == p or key.startswith(p) for p in _SHAPE_PREFIXES)


def _diff(a, b, prefix=''):
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

