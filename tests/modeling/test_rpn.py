"""RPN proposal generation against a NumPy port of torchvision's filter_proposals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import rpn
from tests.modeling import helpers

PADDED_HW = (64, 96)
PRE_NMS, POST_NMS, NMS_THRESH, MIN_SIZE = 100, 50, 0.7, 1e-3


@pytest.fixture(scope='module')
def anchors(tiny_config):
  return rpn.anchors_for(tiny_config, PADDED_HW)


def _case(anchors, seed):
  rng = np.random.default_rng(seed)
  objectness = [(2 * rng.normal(size=len(a))).astype(np.float32) for a in anchors]
  deltas = [(0.3 * rng.normal(size=(len(a), 4))).astype(np.float32) for a in anchors]
  return objectness, deltas


def _reference(objectness, deltas, anchors, image_hw):
  boxes, scores, levels = [], [], []
  for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
    top = np.argsort(-o, kind='stable')[:min(PRE_NMS, len(o))]
    b = helpers.np_decode(d[top], a[top], (1.0, 1.0, 1.0, 1.0))
    boxes.append(b)
    scores.append(1 / (1 + np.exp(-o[top].astype(np.float64))))
    levels.append(np.full(len(top), level))
  boxes, scores, levels = map(np.concatenate, (boxes, scores, levels))
  h, w = image_hw
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
  keep = (boxes[:, 2] - boxes[:, 0] >= MIN_SIZE) & (boxes[:, 3] - boxes[:, 1] >= MIN_SIZE)
  idx = np.flatnonzero(keep)
  kept = helpers.np_greedy_nms(boxes[idx], scores[idx], NMS_THRESH, levels[idx])[:POST_NMS]
  return boxes[idx[kept]], scores[idx[kept]]


@pytest.mark.parametrize('seed,image_hw', [(0, (60, 90)), (1, (64, 40))])
def test_matches_reference(anchors, seed, image_hw):
  objectness, deltas = _case(anchors, seed)
  fn = jax.jit(functools.partial(
      rpn.generate_proposals, anchors=anchors, pre_nms_topk=PRE_NMS, post_nms_topk=POST_NMS,
      nms_thresh=NMS_THRESH, min_size=MIN_SIZE))
  boxes, scores, valid = fn(objectness, deltas, image_size=jnp.array(image_hw))
  ref_boxes, ref_scores = _reference(objectness, deltas, anchors, image_hw)
  n = len(ref_scores)
  assert boxes.shape == (POST_NMS, 4) and valid.dtype == jnp.bool_
  np.testing.assert_array_equal(valid, np.arange(POST_NMS) < n)
  np.testing.assert_allclose(boxes[:n], ref_boxes, atol=1e-4)
  np.testing.assert_allclose(scores[:n], ref_scores, rtol=1e-5)


def test_anchor_count_and_head_layout(tiny_config):
  anchors = rpn.anchors_for(tiny_config, PADDED_HW)
  assert [len(a) for a in anchors] == [16 * 24 * 3, 8 * 12 * 3, 4 * 6 * 3, 2 * 3 * 3, 1 * 2 * 3]
  head = rpn.RPNHead(num_anchors=3, channels=16)
  feats = [jnp.zeros((2, h, w, 16)) for h, w in ((16, 24), (8, 12), (4, 6), (2, 3), (1, 2))]
  (obj, deltas), _ = jax.eval_shape(lambda: head.init_with_output(jax.random.key(0), feats))
  assert [o.shape for o in obj] == [(2, len(a)) for a in anchors]
  assert [d.shape for d in deltas] == [(2, len(a), 4) for a in anchors]


def _saturated_case(anchors):
  """Logits of 15..30 on every level: their float32 sigmoids are all 1.0 or nearly."""
  rng = np.random.default_rng(7)
  objectness = [rng.uniform(15, 30, len(a)).astype(np.float32) for a in anchors]
  deltas = [(0.3 * rng.normal(size=(len(a), 4))).astype(np.float32) for a in anchors]
  return objectness, deltas


@pytest.mark.parametrize('rank_by', ['probability', 'logit'])
def test_rank_by_probability_or_logit_where_sigmoids_tie(anchors, rank_by):
  """torchvision's order (float32 probability, ties to the lower level) vs detectron2's (logit):
  they differ only where sigmoids tie, and there each follows its own rule."""
  objectness, deltas = _saturated_case(anchors)
  fn = jax.jit(functools.partial(
      rpn.generate_proposals, anchors=anchors, pre_nms_topk=PRE_NMS, post_nms_topk=POST_NMS,
      nms_thresh=NMS_THRESH, min_size=MIN_SIZE, rank_by=rank_by))
  boxes, scores, valid = fn(objectness, deltas, image_size=jnp.array(PADDED_HW))
  # The reference: NumPy NMS on the key each codebase sorts by (stable, so ties keep the
  # level-then-logit order of the concatenated per-level top-k).
  cand, keys, levels = [], [], []
  for level, (o, d, a) in enumerate(zip(objectness, deltas, anchors)):
    top = np.argsort(-o, kind='stable')[:min(PRE_NMS, len(o))]
    cand.append(helpers.np_decode(d[top], a[top], (1.0, 1.0, 1.0, 1.0)))
    sig = np.asarray(jax.nn.sigmoid(jnp.asarray(o[top])))  # float32, as torchvision's
    keys.append(o[top].astype(np.float64) if rank_by == 'logit' else sig.astype(np.float64))
    levels.append(np.full(len(top), level))
  cand, keys, levels = map(np.concatenate, (cand, keys, levels))
  h, w = PADDED_HW
  cand[:, 0::2] = np.clip(cand[:, 0::2], 0, w)
  cand[:, 1::2] = np.clip(cand[:, 1::2], 0, h)
  keep = (cand[:, 2] - cand[:, 0] >= MIN_SIZE) & (cand[:, 3] - cand[:, 1] >= MIN_SIZE)
  idx = np.flatnonzero(keep)
  kept = helpers.np_greedy_nms(cand[idx], keys[idx], NMS_THRESH, levels[idx])[:POST_NMS]
  n = len(kept)
  assert int(valid.sum()) == n
  np.testing.assert_allclose(boxes[:n], cand[idx[kept]], atol=1e-4)
  if rank_by == 'logit':  # probabilities come out in the logit's (non-increasing) order
    assert np.all(np.diff(np.asarray(scores[:n])) <= 0)


def test_the_two_rankings_differ_on_saturated_logits(anchors):
  objectness, deltas = _saturated_case(anchors)
  out = {}
  for rank_by in ('probability', 'logit'):
    out[rank_by] = np.asarray(rpn.generate_proposals(
        objectness, deltas, anchors, jnp.array(PADDED_HW), pre_nms_topk=PRE_NMS,
        post_nms_topk=POST_NMS, nms_thresh=NMS_THRESH, min_size=MIN_SIZE, rank_by=rank_by)[0])
  assert not np.allclose(out['probability'], out['logit'])
