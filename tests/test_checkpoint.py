"""Checkpoints that cannot be read or do not match the config give a clear error, touch nothing."""
import os

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
