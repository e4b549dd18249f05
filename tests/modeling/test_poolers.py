"""Tests for maskrcnn_jax.modeling.poolers: FPN level assignment and the single-level option
`model.roi.pool_level` for every RoI operator."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import structures
from maskrcnn_jax.modeling import poolers
from maskrcnn_jax.ops import roi_align as roi_ops
from maskrcnn_jax.ops import roi_levels
from maskrcnn_jax.ops import roi_warp

OPS = ('align', 'pool', 'warp')


def _config(op, pool_level, aligned=True):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.roi_op = op
  c.model.roi.aligned = aligned
  c.model.roi.pool_level = pool_level
  c.model.roi.canonical_scale = 56
  return c


def _inputs(seed=0, batch=2, n=24, size=128):
  """P2..P6 of a `size`-pixel image and boxes of every scale, some leaving the image."""
  rng = np.random.default_rng(seed)
  feats = [jnp.asarray(rng.normal(size=(batch, size >> k, size >> k, 4)).astype(np.float32))
           for k in range(2, 7)]
  xy = rng.uniform(-10, size, (batch, n, 2))
  wh = np.exp(rng.uniform(np.log(2), np.log(size), (batch, n, 2)))
  return feats, jnp.asarray(np.concatenate([xy, xy + wh], -1).astype(np.float32))


def _single_map_op(op, feat, boxes, level, aligned):
  """The one-image op of `op` on one map at stride 2**level, called directly."""
  scale = 2.0**-level
  if op == 'align':
    return roi_ops.roi_align(feat, boxes, 5, scale, 2, aligned)
  if op == 'pool':
    return roi_ops.roi_pool(feat, boxes, 5, scale)
  return roi_warp.roi_warp(feat, boxes, 5, scale, 2, 'max')


@pytest.mark.parametrize('op', OPS)
@pytest.mark.parametrize('level', [4, 5])
def test_pool_level_reads_exactly_that_level(op, level):
  """Every RoI, small or large, is pooled from P_level: equal to the single-map op on that
  level's features, image by image; and different from the FPN assignment."""
  feats, boxes = _inputs(seed=level)
  pooler = poolers.Pooler.from_config(_config(op, level))
  assert pooler.levels == (level, level)
  out = pooler(feats, boxes, 5)
  for b in range(boxes.shape[0]):
    want = _single_map_op(op, feats[level - 2][b], boxes[b], level, aligned=True)
    np.testing.assert_allclose(out[b], want, atol=1e-5)
  # The FPN assignment sends most of these boxes elsewhere, so its output differs.
  fpn = poolers.Pooler.from_config(_config(op, 0))(feats, boxes, 5)
  assigned = np.asarray(roi_levels.assign_levels(boxes.reshape(-1, 4), 2, 5, 4, 56))
  assert (assigned != level).mean() > 0.3
  differs = np.abs(np.asarray(fpn - out)).reshape(-1, 5 * 5 * 4).max(-1) > 1e-4
  assert not differs[assigned == level].any()
  assert differs[assigned != level].mean() > 0.8  # boxes off the map read zeros at any level


@pytest.mark.parametrize('op', OPS)
def test_pool_level_equals_the_multilevel_op_forced_to_that_level(op):
  """Same answer as `multilevel_roi_align` on all of P2..P5 with every RoI's level forced to 5
  (boxes scaled up for the assignment, the op then run on the true boxes' map)."""
  feats, boxes = _inputs(seed=7, batch=1)
  out = poolers.Pooler.from_config(_config(op, 5, aligned=False))(feats, boxes, 5)[0]
  # canonical_scale tiny: every box is assigned to the top level, P5.
  forced = roi_levels.multilevel_roi_align([f[0] for f in feats[:4]], boxes[0], 5, 2, False,
                                        min_level=2, canonical_scale=1e-3, op=op)
  assert set(np.asarray(roi_levels.assign_levels(boxes[0], 2, 5, 4, 1e-3)).tolist()) == {5}
  np.testing.assert_allclose(out, forced, atol=1e-5)


def test_pool_level_zero_is_the_fpn_assignment():
  feats, boxes = _inputs(seed=3, batch=1)
  pooler = poolers.Pooler.from_config(_config('align', 0))
  assert pooler.levels == (2, 5)
  want = roi_levels.multilevel_roi_align([f[0] for f in feats[:4]], boxes[0], 5, 2, True,
                                      min_level=2, canonical_scale=56)
  np.testing.assert_allclose(pooler(feats, boxes, 5)[0], want, atol=1e-6)


def test_config_validation_names_the_fields():
  c = _config('warp', 0)
  structures.validate_config(c)
  c.model.roi.pool_level = 6
  structures.validate_config(c)  # P6 exists (a max-pool of P5)
  for bad in (1, 7, -1):
    c.model.roi.pool_level = bad
    with pytest.raises(structures.ConfigError, match='model.roi.pool_level'):
      structures.validate_config(c)
  c = _config('warp', 0)
  c.model.roi.warp_reduce = 'sum'
  with pytest.raises(structures.ConfigError, match='model.roi.warp_reduce'):
    structures.validate_config(c)
  c = _config('warp', 0)
  c.model.roi.sampling_ratio = 0  # adaptive: RoIAlign only
  with pytest.raises(structures.ConfigError, match='model.roi.sampling_ratio'):
    structures.validate_config(c)
  c = _config('warp', 0)
  c.model.roi_op = 'warp2'
  with pytest.raises(structures.ConfigError, match='model.roi_op'):
    structures.validate_config(c)
