"""detectron2's visible-keypoint proposal filter is a no-op for our keypoint loss.

detectron2 trains its keypoint head only on the foreground proposals whose matched ground truth
has a visible keypoint inside the proposal box (`select_proposals_with_visible_keypoints`, box
edges included). Ours runs the head on every foreground slot; a keypoint outside its RoI or
invisible already has no valid heatmap target, so a RoI the filter would drop adds nothing to
the loss sum or the valid count, and the 'fixed' normaliser (images x K x foreground slots) does
not count RoIs. Shown here on random cases: the loss and its gradient (head parameters and
pooled features) are the same with the filter applied as a foreground mask and without it, for
both normalisers, while the filter does drop RoIs.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maskrcnn_jax.modeling import heads
from maskrcnn_jax.modeling import keypoint_head

B, S, M, K, C = 2, 8, 3, 3, 8  # images, foreground slots, gt slots, keypoints, channels
POOL = 14


def detectron2_filter(rois, gt_keypoints, matched_gt):
  """NumPy port of detectron2's select_proposals_with_visible_keypoints as a mask `[B, S]`:
  some keypoint of the matched gt has v >= 1 and x1 <= x <= x2, y1 <= y <= y2."""
  kps = np.take_along_axis(gt_keypoints, matched_gt[:, :, None, None], axis=1)  # [B, S, K, 3]
  x, y, v = kps[..., 0], kps[..., 1], kps[..., 2]
  r = rois[:, :, None, :]
  inside = (x >= r[..., 0]) & (x <= r[..., 2]) & (y >= r[..., 1]) & (y <= r[..., 3])
  return np.any(inside & (v >= 1), axis=-1)


def _case(seed):
  rng = np.random.default_rng(seed)
  x1y1 = rng.uniform(0, 40, (B, S, 2))
  wh = rng.uniform(4, 50, (B, S, 2))
  rois = np.concatenate([x1y1, x1y1 + wh], -1).astype(np.float32)
  matched = rng.integers(0, M, (B, S)).astype(np.int32)
  gt = np.zeros((B, M, K, 3), np.float32)
  gt[..., :2] = rng.uniform(-10, 100, (B, M, K, 2))
  gt[..., 2] = rng.choice([0, 1, 2], (B, M, K))
  # Some keypoints exactly on a RoI's right/bottom edge (kept by both: the last heatmap cell).
  gt[0, matched[0, 0], 0, :2] = rois[0, 0, 2:]
  gt[0, matched[0, 0], 0, 2] = 2
  fg = rng.random((B, S)) < 0.8
  fg[:, 0] = True
  return rois, matched, gt, fg


def _loss_and_grad(normaliser, rois, matched, gt, fg):
  cfg = ml_collections.FrozenConfigDict({'conv_dim': 8, 'num_convs': 1, 'resolution': 56,
                                         'num_keypoints': (0, K), 'loss_normalizer': normaliser})
  head = keypoint_head.KeypointHead(head=cfg, pooler_size=POOL, max_box_size=128)
  params = head.init(jax.random.key(0), C, jnp.float32,
                     method=keypoint_head.KeypointHead.init_params)['params']
  feats = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, POOL, POOL, C)), jnp.float32)
  fg = jnp.asarray(fg)
  sample = heads.RoISample(jnp.asarray(rois), jnp.where(fg, 1, 0).astype(jnp.int32),
                           jnp.zeros((B, S, 4)), jnp.asarray(matched), fg, fg, S)
  batch = {'gt_keypoints': jnp.asarray(gt)}

  def loss(params, feats):
    out = head.apply({'params': params}, lambda boxes, size: feats, sample, batch,
                     method=keypoint_head.KeypointHead.loss)
    return out['loss_keypoint'], out['num_keypoint_targets']

  (value, count), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, feats)
  return float(value), float(count), jax.device_get(grads)


@pytest.mark.parametrize('normaliser', ['visible', 'fixed'])
def test_filter_changes_neither_loss_nor_gradient(normaliser):
  dropped = 0
  for seed in range(6):
    rois, matched, gt, fg = _case(seed)
    keep = fg & detectron2_filter(rois, gt, matched)
    dropped += int((fg & ~keep).sum())
    value, count, grads = _loss_and_grad(normaliser, rois, matched, gt, fg)
    f_value, f_count, f_grads = _loss_and_grad(normaliser, rois, matched, gt, keep)
    assert value > 0 and count > 0
    assert f_count == count
    np.testing.assert_allclose(f_value, value, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(f_grads), jax.tree_util.tree_leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert dropped >= 6  # the filter removes real foreground RoIs in these cases


def test_a_dropped_roi_would_matter_if_its_keypoints_counted():
  """The no-op rests on the targets: the same RoI matched instead to a gt whose keypoints lie
  inside it (so that the filter keeps it) changes the loss, i.e. the comparison above can
  fail."""
  rois, matched, gt, fg = _case(0)
  drop = fg & ~detectron2_filter(rois, gt, matched)
  b, s = map(int, np.argwhere(drop)[0])
  extra = np.zeros((B, 1, K, 3), np.float32)
  extra[b, 0, :, :2] = (rois[b, s, :2] + rois[b, s, 2:]) / 2
  extra[b, 0, :, 2] = 2
  gt_more = np.concatenate([gt, extra], axis=1)
  rematched = matched.copy()
  rematched[b, s] = M
  assert detectron2_filter(rois, gt_more, rematched)[b, s]
  before = _loss_and_grad('visible', rois, matched, gt_more, fg)[:2]
  after = _loss_and_grad('visible', rois, rematched, gt_more, fg)[:2]
  assert after[1] == before[1] + K / B and after[0] != before[0]
