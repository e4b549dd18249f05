"""Predictor: one compile per bucket, original-pixel boxes, pasted masks, batching."""

import functools

import jax
import numpy as np
import pytest

import maskrcnn_jax
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import masks as mask_ops
from tests.modeling import helpers


@pytest.fixture(scope='module')
def variables(tiny_config):
  """The golden torchvision weights: scores spread enough for stable detections."""
  with np.load('tests/modeling/golden/tiny_maskrcnn.npz') as f:
    state_dict = {k[3:]: f[k] for k in f.files if k.startswith('sd/')}
  shapes = jax.eval_shape(functools.partial(mask_rcnn.init_variables, tiny_config),
                          jax.random.key(0))
  return helpers.variables_from_torchvision(state_dict, shapes)


def _image(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_one_trace_per_bucket_and_original_frame(tiny_config, variables):
  predictor = maskrcnn_jax.Predictor(tiny_config, variables)
  wide = _image(120, 180, 0)  # resized to 64 x 96: bucket (64, 96)
  result = predictor(wide)
  assert predictor.trace_count == 1
  predictor([_image(60, 90, 1), wide])  # same bucket
  assert predictor.trace_count == 1
  tall = predictor(_image(150, 100, 2))  # resized to 96 x 64: bucket (96, 64)
  assert predictor.trace_count == 2
  assert tall['masks'].shape[1:] == (150, 100)

  # Against the model run by hand on the preprocessed image.
  x, resized, bucket = predictor.preprocess(wide)
  assert resized == (64, 96) and bucket == (64, 96)
  det = predictor.detect(x[None], np.array([resized], np.int32))
  assert predictor.trace_count == 2  # the same compiled program
  valid = det['valid'][0]
  n = int(valid.sum())
  assert n > 0 and set(result) == {'boxes', 'scores', 'labels', 'masks'}
  scale = np.array([180 / 96, 120 / 64] * 2, np.float32)
  np.testing.assert_allclose(result['boxes'], det['boxes'][0][valid] * scale, rtol=1e-6)
  np.testing.assert_allclose(result['scores'], det['scores'][0][valid])
  np.testing.assert_array_equal(result['labels'], det['labels'][0][valid])
  assert result['masks'].dtype == np.bool_ and result['masks'].shape == (n, 120, 180)
  # Pasting into a rounded-up canvas and cropping equals pasting at the exact size.
  exact = mask_ops.paste_masks(det['masks'][0][valid], result['boxes'], 120, 180)
  np.testing.assert_array_equal(result['masks'], np.asarray(exact) > 0.5)
  assert result['masks'].any()


def test_batched_equals_one_by_one(tiny_config, variables):
  images = [_image(64, 96, 3), _image(128, 192, 4), _image(60, 90, 5)]
  single = predictor_lib.Predictor(tiny_config, variables)
  batched = predictor_lib.Predictor(tiny_config, variables, batch_size=2)
  for a, b in zip([single(im) for im in images], batched(images)):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-4, err_msg=k)
  assert batched.trace_count == 1


def test_preprocess_matches_torchvision_transform_order(tiny_config, variables):
  predictor = predictor_lib.Predictor(tiny_config, variables)
  image = _image(30, 40, 6)
  x, resized, bucket = predictor.preprocess(image)
  assert resized == (64, 85) and bucket == (64, 96)  # scale min(64/30, 96/40) = 2.133
  i = tiny_config.input
  ref = transforms.resize_image(transforms.normalize(image, i.pixel_mean, i.pixel_std), 64, 85)
  np.testing.assert_allclose(x[:64, :85], ref, rtol=1e-6)
  assert not np.any(x[:, 85:]) and not np.any(x[64:])
