"""Checkpoints that cannot be read or do not match the config give a clear error, touch nothing."""
import os
import re

import jax
import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax.modeling import mask_rcnn
from synthetic import read_tree


def _abstract(config):
  return jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))


def _zeros(config):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), _abstract(config))


def test_round_trip_and_meta(tiny_config, tmp_path):
  variables = _zeros(tiny_config)
  leaves = jax.tree_util.tree_leaves(variables)
  leaves[0][...] = 3.0
  meta = {'label_to_category_id': {1: 7}, 'class_names': ['cat'],
          'model_config': ckpt.model_config_json(tiny_config)}
  ckpt.save_variables(str(tmp_path), variables, meta)
  restored, got_meta = ckpt.restore_variables(str(tmp_path), _abstract(tiny_config), tiny_config)
  np.testing.assert_array_equal(jax.tree_util.tree_leaves(restored)[0], leaves[0])
  assert got_meta['label_to_category_id'] == {'1': 7} and got_meta['class_names'] == ['cat']
  assert ckpt.latest_step(str(tmp_path)) == 0


def test_config_mismatch_names_the_field_and_leaves_files(tiny_config, tmp_path):
  ckpt.save_variables(str(tmp_path), _zeros(tiny_config),
                      {'model_config': ckpt.model_config_json(tiny_config)})
  before = read_tree(tmp_path)
  other = tiny_config.copy_and_resolve_references()
  other.model.num_classes = 7
  with pytest.raises(ckpt.CheckpointError, match=r'model\.num_classes: checkpoint 5 vs config 7'):
    ckpt.restore_variables(str(tmp_path), _abstract(other), other)
  assert read_tree(tmp_path) == before


def test_unreadable_checkpoint_is_a_clear_error(tiny_config, tmp_path):
  ckpt.save_variables(str(tmp_path), _zeros(tiny_config),
                      {'model_config': ckpt.model_config_json(tiny_config)})
  for root, _, files in os.walk(tmp_path):  # corrupt every array file of the variables item
    if os.sep + ckpt.VARIABLES in root:
      for name in files:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'not a checkpoint')
  before = read_tree(tmp_path)
  with pytest.raises(ckpt.CheckpointError, match=str(tmp_path)):
    ckpt.restore_variables(str(tmp_path), _abstract(tiny_config), tiny_config)
  assert read_tree(tmp_path) == before
  with pytest.raises(ckpt.CheckpointError, match='does not exist'):
    ckpt.restore_variables(str(tmp_path / 'missing'), _abstract(tiny_config))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ckpt.CheckpointError, match='no checkpoint steps'):
    ckpt.restore_variables(str(empty), _abstract(tiny_config))


# ---------------------------------------------------------------------------- corruption


def _random(config, seed=0):
  """Variables of `config` with random values (zeros would hide a flipped byte)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                                _abstract(config))


def _saved(config, directory):
  variables = _random(config)
  ckpt.save_variables(str(directory), variables, ckpt.structure_meta(config))
  return variables


def _largest_array_file(directory):
  files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names
           if os.sep + ckpt.VARIABLES + os.sep in root and os.path.basename(root) == 'd']
  return max(files, key=os.path.getsize)


def _flip_bytes(path, count=64, stride=97):
  data = bytearray(open(path, 'rb').read())
  middle = len(data) // 2
  for i in range(count):
    data[middle + i * stride] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def _differs(a, b):
  return any(np.any(np.asarray(x) != y)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_flipped_bits_are_refused_naming_item_and_leaf(tiny_config, tmp_path, caplog):
  import logging
  import shutil
  caplog.set_level(logging.INFO)
  variables = _saved(tiny_config, tmp_path / 'ck')
  _flip_bytes(_largest_array_file(tmp_path / 'ck'))
  # The same damaged files without their checksums, as a checkpoint of an older version.
  shutil.copytree(tmp_path / 'ck', tmp_path / 'old')
  shutil.rmtree(tmp_path / 'old' / '0' / ckpt.CHECKSUMS)
  try:
    unverified, _ = ckpt.restore_variables(str(tmp_path / 'old'), _abstract(tiny_config))
  except ckpt.CheckpointError as e:  # the flip broke the compressed stream instead
    assert str(tmp_path / 'old') in str(e) and 'cannot read item variables' in str(e)
    pattern = r': cannot read item variables| is corrupt'
  else:  # it loads (as it did before checksums): the values really changed ...
    assert _differs(unverified, variables)
    assert 'has no checksums' in caplog.text
    pattern = r' is corrupt: item variables, leaf params/\S+: checksum mismatch'
  # ... and with its checksums it is refused, naming checkpoint, step, item and leaf.
  with pytest.raises(ckpt.CheckpointError,
                     match=rf'checkpoint {re.escape(str(tmp_path / "ck"))} step 0({pattern})'):
    ckpt.restore_variables(str(tmp_path / 'ck'), _abstract(tiny_config), tiny_config)


def test_changed_value_is_refused_even_when_the_files_decode(tiny_config, tmp_path):
  """A value changed consistently (as by a tool that rewrote the arrays) decodes cleanly; only
  the stored digest can tell, and it names the leaf."""
  import orbax.checkpoint as ocp
  variables = _saved(tiny_config, tmp_path / 'ck')
  leaf_path, leaf = jax.tree_util.tree_leaves_with_path(variables)[3]
  leaf.reshape(-1)[0] += 1.0
  with ocp.CheckpointManager(str(tmp_path / 'ck'), item_names=ckpt.ITEMS) as manager:
    stored = manager.restore(0, args=ocp.args.Composite(**{
        ckpt.CHECKSUMS: ocp.args.JsonRestore()}))[ckpt.CHECKSUMS]
  with ocp.CheckpointManager(str(tmp_path / 'other'), item_names=ckpt.ITEMS) as manager:
    manager.save(0, args=ocp.args.Composite(**{
        ckpt.VARIABLES: ocp.args.StandardSave(variables),
        ckpt.META: ocp.args.JsonSave(ckpt.structure_meta(tiny_config)),
        ckpt.CHECKSUMS: ocp.args.JsonSave(stored)}))  # the digests of the unchanged values
  name = '/'.join(str(k.key) for k in leaf_path)
  with pytest.raises(ckpt.CheckpointError,
                     match=rf'step 0 is corrupt: item variables, leaf {name}: checksum mismatch'):
    ckpt.restore_variables(str(tmp_path / 'other'), _abstract(tiny_config), tiny_config)


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


@pytest.mark.parametrize('damage,message', [
    ('truncate array file', r'step 0: cannot read item variables: a file is missing, truncated'),
    ('delete array file', r'step 0: cannot read item variables: a file is missing, truncated'),
    ('delete _METADATA', r'step 0: cannot read item variables: .*_METADATA'),
    ('delete item', r'step 0 is incomplete: item variables is missing'),
    ('truncate checksums', r'step 0: cannot read its checksums item'),
])
def test_truncated_or_missing_files_say_so(tiny_config, tmp_path, damage, message):
  import shutil
  _saved(tiny_config, tmp_path)
  step_dir = tmp_path / '0'
  if damage == 'truncate array file':
    _truncate(_largest_array_file(tmp_path))
  elif damage == 'delete array file':
    os.remove(_largest_array_file(tmp_path))
  elif damage == 'delete _METADATA':
    os.remove(step_dir / ckpt.VARIABLES / '_METADATA')
  elif damage == 'delete item':
    shutil.rmtree(step_dir / ckpt.VARIABLES)
  else:
    _truncate(step_dir / ckpt.CHECKSUMS / 'metadata')
  pattern = rf'checkpoint {re.escape(str(tmp_path))} {message}'
  with pytest.raises(ckpt.CheckpointError, match=pattern) as info:
    ckpt.restore_variables(str(tmp_path), _abstract(tiny_config), tiny_config)
  assert 'does not match' not in str(info.value)


def test_shape_mismatch_without_a_stored_config_is_refused(tiny_config, tmp_path):
  """Orbax silently restores into a target of another shape; the stored shapes catch it even
  when the checkpoint holds no model config to compare."""
  ckpt.save_variables(str(tmp_path), _random(tiny_config), {})
  other = tiny_config.copy_and_resolve_references()
  other.model.num_classes = 7
  pattern = (r'does not match the model built from the config: item variables: '
             r'params/roi_heads/\S+ is \(.*\) in the checkpoint, \(.*\) in the model')
  with pytest.raises(ckpt.CheckpointError, match=pattern):
    ckpt.restore_variables(str(tmp_path), _abstract(other))


def test_checkpoint_without_checksums_restores_with_a_note(tiny_config, tmp_path, caplog):
  """Checkpoints written before checksums were stored still load, unverified, saying so."""
  import logging
  import shutil
  variables = _saved(tiny_config, tmp_path)
  shutil.rmtree(tmp_path / '0' / ckpt.CHECKSUMS)
  caplog.set_level(logging.INFO)
  restored, _ = ckpt.restore_variables(str(tmp_path), _abstract(tiny_config), tiny_config)
  assert not _differs(restored, variables)
  assert f'checkpoint {tmp_path} step 0 has no checksums' in caplog.text


def test_a_checkpoint_without_later_fields_loads_as_their_legacy_values(tiny_config):
  """A checkpoint written before a `model.*` field existed (LEGACY_DEFAULTS) is compared as if
  it stored the value that reproduces its behaviour: it loads into the default config and is
  refused by a config that asks for another behaviour."""
  meta = ckpt.structure_meta(tiny_config)
  for field in ckpt.LEGACY_DEFAULTS:  # as an older version wrote it
    node = meta['model_config']
    *parents, leaf = field.split('.')[1:]
    for k in parents:
      node = node[k]
    del node[leaf]
  ckpt.check_model_config(meta, tiny_config, 'old-ckpt')  # no difference
  other = tiny_config.copy_and_resolve_references()
  other.model.rpn.rank_by = 'logit'
  with pytest.raises(ckpt.CheckpointError, match=r"model.rpn.rank_by: checkpoint 'probability' "
                                                 r"vs config 'logit'"):
    ckpt.check_model_config(meta, other, 'old-ckpt')
  # Each legacy value is the base config's default: a new checkpoint stores the same.
  for field, value in ckpt.LEGACY_DEFAULTS.items():
    node = tiny_config
    for k in field.split('.'):
      node = node[k]
    assert node == value, field
