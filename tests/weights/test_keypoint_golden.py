"""Keypoint R-CNN against torchvision: its tiny Keypoint R-CNN (tests/weights/golden, made by
make_keypoint_golden.py) converted and run here, torchvision's `keypointrcnn_loss` on a
committed case, and the R50 parameter count of `keypointrcnn_resnet50_fpn`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import weights
from maskrcnn_jax.modeling import keypoint_head
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import keypoints as kp_ops
from maskrcnn_jax.weights import safe_io

from tests.weights.golden_files import KEYPOINT_NPZ, KEYPOINT_PTH

# sum(p.numel()) of torchvision 0.28 keypointrcnn_resnet50_fpn(weights=None,
# weights_backbone=None), whose untrained backbone has trainable BatchNorm2d (weight, bias).
TORCHVISION_KEYPOINTRCNN_R50_PARAMS = 59_190_378


def _config():
  from configs import torchvision_keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  c = torchvision_keypointrcnn_r50_fpn.get_config('tiny')
  c.model.num_classes = 2  # make_keypoint_golden.py: background + one class with 3 keypoints
  c.model.keypoint_head.num_keypoints = (0, 3)
  return c


@pytest.fixture(scope='module')
def outputs():
  config = _config()
  sd = safe_io.find_state_dict(safe_io.load_torch(str(KEYPOINT_PTH), use_torch=False),
                               str(KEYPOINT_PTH))
  variables = weights.from_torchvision(sd, config)
  model = mask_rcnn.build_model(config)
  golden = dict(np.load(KEYPOINT_NPZ))
  det = jax.jit(model.apply)(variables, jnp.asarray(golden['images'], jnp.float32),
                             jnp.asarray(golden['image_size']))
  return golden, jax.device_get(det)


@pytest.mark.parametrize('image', [0, 1])
def test_detections_and_keypoints_match_torchvision(outputs, image):
  golden, det = outputs
  valid = det['valid'][image]
  n = len(golden[f'scores{image}'])
  assert n == 10 and valid.sum() == n
  np.testing.assert_array_equal(det['labels'][image][valid], golden[f'labels{image}'])
  np.testing.assert_allclose(det['scores'][image][valid], golden[f'scores{image}'], atol=2e-5)
  np.testing.assert_allclose(det['boxes'][image][valid], golden[f'boxes{image}'], atol=5e-3)
  # The images are not resized, so the padded-input frame is torchvision's output frame.
  kps = det['keypoints'][image][valid]
  ref = golden[f'keypoints{image}']
  assert kps.shape == ref.shape == (10, 3, 3) and det['keypoint_valid'][image][valid].all()
  within = np.all(np.abs(kps[..., :2] - ref[..., :2]) <= 1.0, axis=-1)
  assert within.mean() == 1.0, within
  np.testing.assert_allclose(kps[..., :2], ref[..., :2], atol=2e-2)
  np.testing.assert_allclose(det['keypoint_scores'][image][valid],
                             golden[f'keypoint_scores{image}'], atol=1e-3)


def test_loss_equals_torchvision_keypointrcnn_loss():
  golden = dict(np.load(KEYPOINT_NPZ))
  logits, rois, gt = golden['loss/logits'], golden['loss/rois'], golden['loss/gt']
  target, valid = kp_ops.keypoints_to_heatmap(gt, rois, logits.shape[-1])
  total, count = kp_ops.heatmap_ce_sum(logits.reshape(*logits.shape[:2], -1), target, valid)
  assert 0 < float(count) < valid.size  # some targets are invalid (outside, invisible)
  np.testing.assert_allclose(float(total / count), golden['loss/value'], rtol=1e-5)


def test_no_valid_target_gives_exactly_zero_loss_and_gradient():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 16)), jnp.float32)
  target = jnp.zeros((4, 3), jnp.int32)
  valid = jnp.zeros((4, 3), bool)

  def loss(x):
    total, count = kp_ops.heatmap_ce_sum(x.at[0].set(jnp.nan), target, valid)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

  value, grad = jax.value_and_grad(loss)(logits)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_r50_parameter_count_is_torchvisions():
  from configs import torchvision_keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  config = torchvision_keypointrcnn_r50_fpn.get_config()
  shapes = jax.eval_shape(functools.partial(mask_rcnn.init_variables, config),
                          jax.random.key(0))
  bn_affine = sum(int(np.prod(v.shape)) for path, v in
                  jax.tree_util.tree_leaves_with_path(shapes['constants'])
                  if path[-1].key in ('weight', 'bias'))
  assert mask_rcnn.count_params(shapes['params']) + bn_affine == \
      TORCHVISION_KEYPOINTRCNN_R50_PARAMS
  kp = shapes['params']['roi_heads']
  assert kp['keypoint_predictor']['kps_score_lowres']['kernel'].shape == (4, 4, 17, 512)
  assert len(kp['keypoint_head']) == 8


def test_per_class_sets_read_only_their_own_channels():
  """Labels 1 and 3 have 2 and 3 keypoints side by side in 5 channels: a RoI of label 3 reads
  channels 2..4 and never 0..1, whatever those hold."""
  channel, valid = keypoint_head.channel_table((0, 2, 0, 3))
  np.testing.assert_array_equal(valid, [[0, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]])
  np.testing.assert_array_equal(channel[3], [2, 3, 4])
  np.testing.assert_array_equal(channel[1][:2], [0, 1])
  head = keypoint_head.KeypointHead(
      head=_tiny_head_config((0, 2, 0, 3)), pooler_size=14, max_box_size=64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 14, 8)), jnp.float32)
  variables = head.init(jax.random.key(0), 8, jnp.float32,
                        method=keypoint_head.KeypointHead.init_params)

  def maps_of(params, labels):
    return head.apply({'params': params}, x, jnp.asarray(labels))[0]

  params = variables['params']
  base = maps_of(params, [3, 1])
  # Scrambling label 1's channels (0, 1) of the predictor leaves label 3's heatmaps unchanged.
  p2 = jax.tree_util.tree_map(lambda v: v, params)
  kernel = p2['keypoint_predictor']['kps_score_lowres']['kernel']
  p2['keypoint_predictor']['kps_score_lowres']['kernel'] = kernel.at[:, :, :2].set(7.0)
  other = maps_of(p2, [3, 1])
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(base[0]))
  assert not np.allclose(np.asarray(other[1, :2]), np.asarray(base[1, :2]))


def _tiny_head_config(counts):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.FrozenConfigDict({'conv_dim': 8, 'num_convs': 1, 'resolution': 56,
                                          'num_keypoints': tuple(counts),
                                          'loss_normalizer': 'visible'})
