"""Checkpoint layout and I/O shared by train, predict, evaluate and convert (orbax).

A checkpoint directory is an orbax `CheckpointManager` directory whose step folders hold items:

    variables  {'params': ..., 'constants': ...}        model variables (every checkpoint)
    train      {'opt_state': ..., 'step': ..., 'rng': ...}  training checkpoints only
    input      JSON: the input iterator's state         training checkpoints only
    meta       JSON: {'label_to_category_id', 'class_names', 'model_config', 'source'}
    checksums  JSON: {item: {leaf path: {'digest', 'shape', 'dtype'}}} of the array items

Every restore recomputes the digests of the arrays it read and refuses a checkpoint whose bytes
changed after it was written (`CheckpointError` naming the item and leaf); checkpoints written
before checksums existed restore with a logged note.

Converted checkpoints (`maskrcnn-jax convert`) hold `variables`, `meta` and `checksums` at step 0,
so every command that reads variables accepts both a training workdir and a converted directory.

Order of precedence when training starts (train.py): a checkpoint in the workdir > an explicit
`run.init_checkpoint` > `run.pretrained_backbone` > scratch.
"""

import hashlib
import json
import logging
import os
import sys
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

VARIABLES = 'variables'
TRAIN = 'train'
INPUT = 'input'
META = 'meta'
CHECKSUMS = 'checksums'
ITEMS = (VARIABLES, TRAIN, INPUT, META, CHECKSUMS)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be read or does not match the config; names the path."""


class CheckpointWriteError(CheckpointError):
  """Writing a checkpoint failed (a full disk, a vanished mount); names the step and directory."""


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
                               item_names=ITEMS)


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
        CHECKSUMS: ocp.args.JsonSave(checksums({VARIABLES: variables})),
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
  `config` first, so a mismatch is reported by field instead of by a shape error, and verifies
  the arrays against their stored checksums (`restore_items`). Never writes.

  A leaf without a sharding is read whole onto this process's first device on every process
  of a multi-process run, and wherever the devices the checkpoint was written from (4 devices,
  a pod's hosts) are not all here, which orbax would otherwise refuse as a topology mismatch.
  """
  meta = read_meta(directory, step)
  if config is not None:
    check_model_config(meta, config, directory)
  step, manager = _open_for_restore(directory, step)
  local = _with_local_sharding(abstract_variables)
  with manager:
    if jax.process_count() > 1:
      restored = restore_items(manager, directory, step, {VARIABLES: local})
    else:
      try:
        restored = restore_items(manager, directory, step, {VARIABLES: abstract_variables})
      except CheckpointError as e:
        if not _is_topology_mismatch(e):
          raise
        restored = restore_items(manager, directory, step, {VARIABLES: local})
  return restored[VARIABLES], meta


def _is_topology_mismatch(e: BaseException) -> bool:
  """Whether orbax refused a restore because the writer's devices are not all here (it then
  needs explicit shardings); read from its message, as orbax has no type for it."""
  while e is not None:
    if 'topology' in str(e).lower():
      return True
    e = e.__cause__
  return False


def _with_local_sharding(tree: Any) -> Any:
  """`tree` with every leaf that has no sharding given this process's first device."""
  local = None

  def leaf(x):
    nonlocal local
    if getattr(x, 'sharding', None) is not None:
      return x
    local = local or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local)

  return jax.tree_util.tree_map(leaf, tree)


# ============================================================================ checksums


def checksums(items: dict[str, Any]) -> dict[str, dict[str, dict]]:
  """{item: {leaf path: {'digest', 'shape', 'dtype'}}} of array trees (item name -> tree).

  The digest is BLAKE2b of the leaf's bytes as the host holds them, so it is independent of
  how orbax chunks, compresses or shards the files; shape and dtype are kept to tell a model
  mismatch (refused before reading) from corruption. A leaf sharded over several hosts, which no
  one host holds whole, has no entry (this code replicates its state, so none does)."""
  return {item: {path: record for path, record in _leaf_records(tree)}
          for item, tree in items.items()}


def _leaf_records(tree: Any):
  """(leaf path, record) per leaf; a leaf `_host_view` maps to None is no leaf any more."""
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(jax.tree_util.tree_map(_host_view, tree))
  host = jax.device_get([leaf for _, leaf in paths_and_leaves])  # one batched transfer
  for (path, _), leaf in zip(paths_and_leaves, host):
    array = np.asarray(leaf)
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # any dtype, bfloat16 too
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    yield _leaf_path(path), {'digest': f'blake2b-128:{digest}', 'shape': list(array.shape),
                             'dtype': str(array.dtype)}


def _host_view(leaf: Any) -> Any:
  """What this host can read of a leaf: itself, one local replica, or None (sharded)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    return leaf.addressable_data(0) if leaf.is_fully_replicated else None
  return leaf


def _leaf_path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def restore_items(manager: ocp.CheckpointManager, directory: str, step: int,
                  arrays: dict[str, Any], json_items: tuple[str, ...] = ()) -> dict:
  """Restores the array items `arrays` (item name -> target tree of arrays or
  ShapeDtypeStructs, whose shapes, dtypes and shardings the result takes) and the JSON items
  `json_items` of checkpoint `step`, checking each array item against its stored checksums.

  Raises CheckpointError naming `directory` and `step` and saying what is wrong: a leaf whose
  stored shape differs from the target's (before anything is read), a missing item, an
  unreadable (truncated, cut short, corrupt) file, or a leaf whose bytes changed after it was
  written ("... is corrupt: item variables, leaf params/...: checksum mismatch").
  """
  stored = _read_checksums(manager, directory, step)
  if stored is not None:
    for item, target in arrays.items():
      _check_shapes(directory, step, item, target, stored.get(item, {}))
  args = {item: ocp.args.StandardRestore(target) for item, target in arrays.items()}
  args.update({item: ocp.args.JsonRestore() for item in json_items})
  missing = [item for item in args if not os.path.isdir(_item_dir(directory, step, item))]
  if missing:
    raise CheckpointError(
        f'checkpoint {directory} step {step} is incomplete: item {missing[0]} is missing '
        f'({_item_dir(directory, step, missing[0])} does not exist); it was cut short or copied '
        'in part')
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax and tensorstore raise many types; say which case this is
    drop_closed_loop_reports()
    raise _read_error(directory, step, list(args), e) from e
  if stored is not None:
    for item in arrays:
      _verify(directory, step, item, restored[item], stored.get(item, {}))
  return restored


def _item_dir(directory: str, step: int, item: str) -> str:
  return os.path.join(directory, str(step), item)


def _read_checksums(manager, directory: str, step: int) -> Optional[dict]:
  if not os.path.isdir(_item_dir(directory, step, CHECKSUMS)):
    logging.info('checkpoint %s step %d has no checksums (written before they were stored); '
                 'its arrays are restored unverified', directory, step)
    return None
  try:
    return manager.restore(step, args=ocp.args.Composite(**{
        CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'checkpoint {directory} step {step}: cannot read its {CHECKSUMS} '
                          f'item ({_item_dir(directory, step, CHECKSUMS)}), so its arrays cannot '
                          f'be verified: {_first_line(e)}') from e


def _check_shapes(directory: str, step: int, item: str, target: Any, stored: dict) -> None:
  wrong = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(target):
    name, shape = _leaf_path(path), tuple(getattr(leaf, 'shape', ()))
    record = stored.get(name)
    if record is not None and tuple(record['shape']) != shape:
      wrong.append(f'{name} is {tuple(record["shape"])} in the checkpoint, {shape} in the model')
  if wrong:
    more = f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''
    raise CheckpointError(f'checkpoint {directory} step {step} does not match the model built '
                          f'from the config: item {item}: {"; ".join(wrong[:3])}{more}')


def _verify(directory: str, step: int, item: str, restored: Any, stored: dict) -> None:
  for name, record in _leaf_records(restored):
    want = stored.get(name)
    if want is None or want['dtype'] != record['dtype']:
      continue  # a leaf the checkpoint did not record, or one restored into another dtype
    if want['digest'] != record['digest']:
      raise CheckpointError(
          f'checkpoint {directory} step {step} is corrupt: item {item}, leaf {name}: checksum '
          'mismatch (its bytes changed after they were written: a failing disk, a torn copy or '
          'flipped bits); use another step or a fresh copy')


def _read_error(directory: str, step: int, items: list, e: Exception) -> CheckpointError:
  """The error for a failed orbax restore of `items`: a model mismatch when orbax says the
  trees differ, else an unreadable item, named from the file path in the message when it
  holds one."""
  text = str(e)
  if 'structures do not match' in text:
    return CheckpointError(f'checkpoint {directory} step {step} does not match the model built '
                           f'from the config (the variable trees differ): {_first_line(e)}')
  named = [item for item in items if f'{os.sep}{step}{os.sep}{item}' in text]
  return CheckpointError(
      f'checkpoint {directory} step {step}: cannot read item {", ".join(named or items)}: a file '
      f'is missing, truncated or corrupt ({_first_line(_naming_a_file(e))})')


def _naming_a_file(e: BaseException) -> BaseException:
  """The innermost error in `e`'s chain whose message names a file (tensorstore's, under
  orbax's wrappers), else `e`."""
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return next((x for x in reversed(chain) if 'file' in str(x).lower()), chain[0])


def drop_closed_loop_reports() -> None:
  """Silences the echoes of a failed restore or save: tensorstore still completes the reads
  or writes orbax gave up on, and each completion tries to wake orbax's event loop, closed by
  then, which Python reports as an unraisable `RuntimeError: Event loop is closed` with a
  traceback (dozens to hundreds of lines, around the one error that matters). Drops exactly
  those; any other unraisable goes to the hook there was. Idempotent."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_reports', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


def _first_line(e: BaseException, limit: int = 400) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line if len(line) <= limit else line[:limit] + '...'


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
  stored_model = _with_legacy_fields(stored_model)
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
        'roi.smooth_l1_beta', 'roi.ignore_crowd', 'roi.crowd_ioa_thresh',
        'keypoint_head.loss_normalizer'))
# `model.*` fields added after checkpoints were first written, with the value that computes
# what a checkpoint written without the field computed: an older checkpoint is compared as if
# it stored that value (so it loads into today's default config, and is refused where a
# config asks for something else, e.g. `roi_op=warp` or `rpn.rank_by=logit`).
LEGACY_DEFAULTS = {
    'model.roi.pool_level': 0,  # FPN level assignment
    'model.roi.warp_reduce': 'max',  # read only with roi_op='warp', which did not exist
    'model.roi.max_sampling_ratio': 4,  # read only with sampling_ratio=0, which was refused
    'model.rpn.rank_by': 'probability',
    'model.test.drop_empty_boxes': False,
    'model.test.keypoint_score': 'logit',
}


def _with_legacy_fields(stored_model: dict) -> dict:
  """A copy of a stored `model` config with `LEGACY_DEFAULTS` filled in where it lacks them."""
  out = json.loads(json.dumps(stored_model))
  for field, value in LEGACY_DEFAULTS.items():
    node, keys = out, field.split('.')[1:]
    for k in keys[:-1]:
      if not isinstance(node.get(k), dict):
        break
      node = node[k]
    else:
      node.setdefault(keys[-1], value)
  return out


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

