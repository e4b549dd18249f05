"""The box head: layers and flatten order, and its detections against a NumPy port of
torchvision's postprocess_detections."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import box_head
from tests.modeling import helpers

NUM_PROPOSALS, NUM_CLASSES, DETECTIONS = 30, 4, 10
IMAGE_HW = (60, 90)  # content size; proposals may stick out of it (clipping is tested)
SCORE_THRESH, NMS_THRESH, MIN_SIZE = 0.05, 0.5, 1e-2
WEIGHTS = (10.0, 10.0, 5.0, 5.0)

_post = jax.jit(functools.partial(
    box_head.postprocess_detections, score_thresh=SCORE_THRESH, nms_thresh=NMS_THRESH,
    detections_per_img=DETECTIONS, min_box_size=MIN_SIZE, bbox_reg_weights=WEIGHTS))


def _case(seed):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(-5, 80, size=(NUM_PROPOSALS, 2))
  wh = rng.uniform(2, 40, size=(NUM_PROPOSALS, 2))
  proposals = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  logits = (2.0 * rng.normal(size=(NUM_PROPOSALS, NUM_CLASSES))).astype(np.float32)
  deltas = (0.5 * rng.normal(size=(NUM_PROPOSALS, 4 * NUM_CLASSES))).astype(np.float32)
  valid = rng.uniform(size=NUM_PROPOSALS) < 0.8
  return logits, deltas, proposals, valid


def _reference(logits, deltas, proposals, valid):
  """torchvision RoIHeads.postprocess_detections for one image, float64, plain loops."""
  logits = logits.astype(np.float64)
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  scores = e / e.sum(axis=1, keepdims=True)
  boxes = helpers.np_decode(deltas.reshape(NUM_PROPOSALS, NUM_CLASSES, 4), proposals[:, None],
                            WEIGHTS)
  h, w = IMAGE_HW
  boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0, w)
  boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0, h)
  cand_boxes, cand_scores, cand_labels = [], [], []
  for p in np.flatnonzero(valid):
    for k in range(1, NUM_CLASSES):
      b = boxes[p, k]
      if scores[p, k] > SCORE_THRESH and b[2] - b[0] >= MIN_SIZE and b[3] - b[1] >= MIN_SIZE:
        cand_boxes.append(b)
        cand_scores.append(scores[p, k])
        cand_labels.append(k)
  keep = helpers.np_greedy_nms(cand_boxes, cand_scores, NMS_THRESH, cand_labels)[:DETECTIONS]
  return (np.array([cand_boxes[i] for i in keep]).reshape(-1, 4),
          np.array([cand_scores[i] for i in keep]), np.array([cand_labels[i] for i in keep]))


@pytest.mark.parametrize('seed', range(4))
def test_matches_reference(seed):
  logits, deltas, proposals, valid = _case(seed)
  out = _post(logits, deltas, proposals, valid, jnp.array(IMAGE_HW))
  boxes, scores, labels = _reference(logits, deltas, proposals, valid)
  n = len(scores)
  assert n > 0
  np.testing.assert_array_equal(out['valid'], np.arange(DETECTIONS) < n)
  np.testing.assert_allclose(out['boxes'][:n], boxes, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out['scores'][:n], scores, rtol=1e-5)
  np.testing.assert_array_equal(out['labels'][:n], labels)
  # Invalid slots hold zeros.
  assert not np.any(out['boxes'][n:]) and not np.any(out['scores'][n:])
  assert not np.any(out['labels'][n:])


def test_garbage_in_invalid_proposals_changes_nothing():
  logits, deltas, proposals, valid = _case(7)
  ref = _post(logits, deltas, proposals, valid, jnp.array(IMAGE_HW))
  bad = ~valid
  logits[bad] = np.array([np.nan, 1e30, -np.inf, np.inf])
  deltas[bad] = np.inf
  proposals[bad] = np.array([np.nan, -1e30, 1e30, np.nan])
  out = _post(logits, deltas, proposals, valid, jnp.array(IMAGE_HW))
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_head_shapes_and_flatten_order():
  head = box_head.TwoMLPHead(fc_dim=8, num_fc=2)
  x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
  params = jax.eval_shape(head.init, jax.random.key(0), x)['params']
  assert set(params) == {'fc6', 'fc7'} and params['fc6']['kernel'].shape == (36, 8)
  # fc6 sees the (C, H, W) flattening of torchvision: an identity fc6 returns x in that order.
  ident = {'params': {'fc6': {'kernel': jnp.eye(36, 8), 'bias': jnp.zeros(8)},
                      'fc7': {'kernel': jnp.eye(8), 'bias': jnp.zeros(8)}}}
  out = head.apply(ident, x)
  np.testing.assert_array_equal(out, np.asarray(x).transpose(0, 3, 1, 2).reshape(2, -1)[:, :8])
  predictor = box_head.FastRCNNPredictor(num_classes=5)
  (scores, deltas), _ = jax.eval_shape(
      lambda: predictor.init_with_output(jax.random.key(0), jnp.zeros((7, 8))))
  assert scores.shape == (7, 5) and deltas.shape == (7, 20)


def test_clip_and_drop_empty_is_detectron2s_detector_postprocess():
  boxes = np.array([[-3, 2, 50, 40],      # clipped at x = 0, kept
                    [10, 5, 10, 30],      # zero width: dropped
                    [120, 10, 130, 20],   # wholly right of the 100-px image: empty once clipped
                    [5, 5, 6, 6],         # 1 px, kept
                    [0, 0, 0, 0]], np.float32)  # an invalid slot stays invalid
  valid = np.array([True, True, True, True, False])
  clipped, keep = box_head.clip_and_drop_empty(boxes, valid, (60, 100))
  np.testing.assert_array_equal(keep, [True, False, False, True, False])
  np.testing.assert_array_equal(clipped[0], [0, 2, 50, 40])
  np.testing.assert_array_equal(clipped[2], [100, 10, 100, 20])
