"""Golden test: torchvision's tiny Mask R-CNN (tests/weights/golden) converted and run here.

The .pth is read with the torch-free reader, converted by `weights.from_torchvision`, and our
model's FPN features, RPN proposals and final detections (boxes, scores, labels, 28x28 masks) on
a two-image padded batch are compared with what torchvision computed (make_golden.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import weights
from maskrcnn_jax.modeling import mask_rcnn

from tests.weights.golden_files import GOLDEN_NPZ


def test_tiny_config_still_has_the_golden_models_sizes(tv_tiny_config):
  """make_golden.py hard-codes these (it must run without this package)."""
  m = tv_tiny_config.model
  assert (m.backbone.depth, m.backbone.width, m.fpn.channels, m.box_head.fc_dim,
          m.mask_head.conv_dim, m.mask_head.num_convs, m.num_classes) == ('tiny', 8, 16, 32, 16,
                                                                          2, 5)
  assert tuple(m.anchors.sizes) == (8, 16, 32, 64, 128) and m.roi.canonical_scale == 56
  assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test, m.test.detections_per_img) == (
      100, 50, 10)
  assert (m.roi.aligned, m.roi.sampling_ratio, m.anchors.round_base) == (False, 2, True)


def _run(model, variables, images, image_size):
  """Features, proposals and detections: `MaskRCNN.__call__` with its sown intermediates."""
  det, state = model.apply(variables, images, image_size, mutable=['intermediates'])
  inter = state['intermediates']
  return inter['features'], inter['proposals'], inter['proposal_valid'], det


@pytest.fixture(scope='module')
def outputs(_tv_state_dict, tv_tiny_config):
  golden = dict(np.load(GOLDEN_NPZ))
  variables = weights.from_torchvision(_tv_state_dict, tv_tiny_config)
  model = mask_rcnn.build_model(tv_tiny_config)
  run = jax.jit(functools.partial(_run, model))
  out = run(variables, jnp.asarray(golden['images'], jnp.float32),
            jnp.asarray(golden['image_size']))
  return golden, jax.device_get(out)


def test_fpn_features_match(outputs):
  golden, (feats, _, _, _) = outputs
  assert len(feats) == 5
  for level, f in enumerate(feats):
    ref = golden[f'feature{level}']
    assert f.shape == ref.shape
    # float32 convolutions summed in different orders: relative error ~1e-6 of the range.
    np.testing.assert_allclose(f, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                               err_msg=f'P{level + 2}')


@pytest.mark.parametrize('image', [0, 1])
def test_rpn_proposals_match(outputs, image):
  golden, (_, proposals, valid, _) = outputs
  ref = golden[f'proposals{image}']
  ours = proposals[image][valid[image]]
  assert len(ours) == len(ref) == 50
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)  # same order (descending score)


@pytest.mark.parametrize('image', [0, 1])
def test_detections_match(outputs, image):
  golden, (_, _, _, det) = outputs
  valid = det['valid'][image]
  n = len(golden[f'scores{image}'])
  assert n == 10 and valid.sum() == n
  np.testing.assert_array_equal(det['labels'][image][valid], golden[f'labels{image}'])
  np.testing.assert_allclose(det['scores'][image][valid], golden[f'scores{image}'], atol=2e-5)
  np.testing.assert_allclose(det['boxes'][image][valid], golden[f'boxes{image}'], atol=5e-3)
  np.testing.assert_allclose(det['masks'][image][valid], golden[f'masks{image}'], atol=2e-3)
  # Thresholded masks agree almost pixel for pixel.
  agree = (det['masks'][image][valid] > 0.5) == (golden[f'masks{image}'] > 0.5)
  assert agree.mean() > 0.999
