"""The keypoint head inside the detector: one trace per size bucket with keypoints on, garbage in
padded ground-truth slots changes nothing, and its loss term is part of the train step."""


import jax
import numpy as np
import pytest

from maskrcnn_jax import train
from maskrcnn_jax.modeling import mask_rcnn

import synthetic


def _config():
  from configs import shapes_keypoints  # pylint: disable=g-import-not-at-top
  c = shapes_keypoints.get_config('tiny')
  c.input.buckets = ((64, 96), (96, 64))
  return c


def _batch(config, seed, bucket):
  b = synthetic.synthetic_batch(config, 2, seed=seed, bucket=bucket)
  rng = np.random.default_rng(seed)
  k = max(config.model.keypoint_head.num_keypoints)
  boxes = b['gt_boxes']
  frac = rng.uniform(0.1, 0.9, boxes.shape[:2] + (k, 2)).astype(np.float32)
  kps = np.zeros(boxes.shape[:2] + (k, 3), np.float32)
  kps[..., :2] = boxes[:, :, None, :2] + frac * (boxes[:, :, None, 2:] - boxes[:, :, None, :2])
  kps[..., 2] = 2
  kps[~b['gt_valid']] = 0
  b['gt_labels'] = np.where(b['gt_valid'], 1, 0).astype(np.int32)  # persons: 17 keypoints
  b['gt_keypoints'] = kps
  return b


@pytest.mark.slow
def test_one_trace_per_bucket_and_padding_garbage_changes_nothing():
  config = _config()
  model = mask_rcnn.build_model(config)
  mesh = train.make_mesh(jax.devices()[:1])
  state, _, optimizer = train.init_state(config, model, mesh, (64, 96))
  traces = []

  def step(s, b):
    traces.append(1)
    return train.train_step(s, b, model=model, optimizer=optimizer)

  jitted = jax.jit(step)
  clean = _batch(config, 1, (64, 96))
  _, m1 = jitted(state, clean)
  assert float(m1['loss_keypoint']) > 0 and float(m1['num_keypoint_targets']) > 0
  # Garbage in every padded ground-truth slot (gt_valid False): same loss, same update.
  dirty = {k: np.array(v) for k, v in clean.items()}
  pad = ~dirty['gt_valid']
  dirty['gt_keypoints'][pad] = np.float32(1e9)
  dirty['gt_keypoints'][pad, :, 2] = 2
  dirty['gt_boxes'][pad] = np.float32(np.nan)
  dirty['gt_labels'][pad] = 3
  s2, m2 = jitted(state, dirty)
  s1, _ = jitted(state, clean)
  for key in ('loss', 'loss_keypoint', 'loss_mask', 'loss_classifier'):
    np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  jitted(state, _batch(config, 2, (64, 96)))
  assert len(traces) == 1  # new data, same bucket: no new trace
  jitted(state, _batch(config, 3, (96, 64)))
  assert len(traces) == 2  # a second bucket: one more
