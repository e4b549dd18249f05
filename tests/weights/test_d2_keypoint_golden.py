"""Keypoint R-CNN against detectron2: its tiny Keypoint R-CNN (tests/weights/golden, made by
make_d2_keypoint_golden.py) converted by `weights.from_detectron2` and run here with
configs/detectron2_keypointrcnn_r50_fpn.py's tiny mode (adaptive sampling ratio, detectron2's
keypoint scores), its `keypoint_rcnn_loss` after its visible-keypoint proposal filter, the R50
parameter count and the preset's detectron2 values. No torch or detectron2 is needed."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import structures
from maskrcnn_jax import weights
from maskrcnn_jax.data import coco
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import keypoints as kp_ops
from maskrcnn_jax.ops import sampling
from maskrcnn_jax.weights import core
from maskrcnn_jax.weights import safe_io

from tests.weights.golden_files import GOLDEN

D2_KP_PKL = GOLDEN / 'd2_tiny_keypointrcnn.pkl'
D2_KP_NPZ = GOLDEN / 'd2_tiny_keypoint_golden.npz'
# sum(p.numel() for p in model.parameters()) of detectron2's keypoint_rcnn_R_50_FPN_1x built
# from its model-zoo config (FrozenBN statistics and affine terms are buffers, not parameters).
DETECTRON2_KEYPOINTRCNN_R50_PARAMS = 59_133_158
# Ours adds the zero background row of bbox_pred (4 x 1024 weights + 4 biases), never read.
BACKGROUND_BOX_ROW = 4 * 1024 + 4
# detectron2 data/datasets/builtin_meta.py COCO_PERSON_KEYPOINT_NAMES / _FLIP_MAP.
COCO_PERSON_NAMES = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder', 'right_shoulder',
    'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
DETECTRON2_FLIP_PAIRS = tuple((f'left_{p}', f'right_{p}') for p in (
    'eye', 'ear', 'shoulder', 'elbow', 'wrist', 'hip', 'knee', 'ankle'))


def _config(score: str = 'detectron2'):
  from configs import detectron2_keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  c = detectron2_keypointrcnn_r50_fpn.get_config('tiny')
  c.model.num_classes = 2  # make_d2_keypoint_golden.py: one class (person-like), 3 keypoints
  c.model.keypoint_head.num_keypoints = (0, 3)
  c.model.test.keypoint_score = score
  return c


def test_tiny_config_still_has_the_golden_models_sizes():
  """make_d2_keypoint_golden.py hard-codes these (it runs without this package)."""
  c = _config()
  m = c.model
  assert (m.backbone.depth, m.backbone.width, m.fpn.channels, m.box_head.fc_dim,
          m.keypoint_head.conv_dim, m.keypoint_head.num_convs) == ('tiny', 8, 16, 32, 16, 2)
  assert tuple(m.anchors.sizes) == (8, 16, 32, 64, 128) and m.roi.canonical_scale == 56
  assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test, m.test.detections_per_img) == (
      100, 50, 10)
  assert (m.roi.aligned, m.roi.sampling_ratio, m.roi.max_sampling_ratio) == (True, 0, 4)
  assert m.keypoint_on and not m.mask_on and m.roi.keypoint_output_size == 14
  assert tuple(c.input.buckets[0]) == (64, 96)


@pytest.fixture(scope='module')
def outputs():
  golden = dict(np.load(D2_KP_NPZ))
  state_dict = safe_io.load_state_dict(str(D2_KP_PKL))
  assert all(v.dtype == np.float16 for v in state_dict.values())
  # The golden grid never exceeded the cap: our capped adaptive ratio is exact for it.
  assert int(golden['max_grid']) <= _config().model.roi.max_sampling_ratio
  images = jnp.asarray(golden['images'], jnp.float32)
  sizes = jnp.asarray(golden['image_size'])
  out = {}
  for score in ('detectron2', 'logit'):
    config = _config(score)
    variables = weights.from_detectron2(state_dict, config, source=str(D2_KP_PKL))
    model = mask_rcnn.build_model(config)
    out[score] = (model, jax.device_get(jax.jit(model.apply)(variables, images, sizes)))
  return golden, out


@pytest.mark.parametrize('image', [0, 1])
def test_detections_and_keypoints_match_detectron2(outputs, image):
  golden, out = outputs
  det = out['detectron2'][1]
  valid = det['valid'][image]
  n = len(golden[f'scores{image}'])
  assert n == 10 and valid.sum() == n
  np.testing.assert_array_equal(det['labels'][image][valid], golden[f'labels{image}'])
  np.testing.assert_allclose(det['scores'][image][valid], golden[f'scores{image}'], atol=2e-5)
  np.testing.assert_allclose(det['boxes'][image][valid], golden[f'boxes{image}'], atol=5e-3)
  kps = det['keypoints'][image][valid]
  ref = golden[f'keypoints{image}']
  assert kps.shape == ref.shape == (10, 3, 3) and det['keypoint_valid'][image][valid].all()
  np.testing.assert_allclose(kps[..., :2], ref[..., :2], atol=2e-2)
  # detectron2's softmax-normalised scores (~3e-3 here), with model.test.keypoint_score.
  np.testing.assert_allclose(det['keypoint_scores'][image][valid], ref[..., 2], rtol=2e-3,
                             atol=1e-6)


@pytest.mark.parametrize('image', [0, 1])
def test_logit_scores_are_the_heatmap_logits_at_the_same_keypoints(outputs, image):
  """keypoint_score='logit' scores the same keypoints by the heatmap logit (torchvision's
  score, heatmaps_to_keypoints' third column); 'detectron2' is exp(logit) over the heatmap's sum
  of exp, so the two differ in value, not in the keypoints."""
  golden, out = outputs
  soft, logit = out['detectron2'][1], out['logit'][1]
  valid = logit['valid'][image]
  np.testing.assert_array_equal(logit['keypoints'][image], soft['keypoints'][image])
  np.testing.assert_allclose(logit['keypoint_scores'][image][valid],
                             golden[f'keypoint_logits{image}'], atol=1e-3)
  assert np.all(np.abs(logit['keypoint_scores'][image][valid] -
                       soft['keypoint_scores'][image][valid]) > 0.1)


@pytest.mark.parametrize('image', [0, 1])
def test_postprocess_matches_detector_postprocess(outputs, image):
  golden, out = outputs
  model, det = out['detectron2']
  hw = tuple(int(s) for s in golden['image_size'][image])
  original = tuple(int(s) for s in golden['original_size'][image])
  got = model.heads['keypoint'].postprocess(det, image, None, original, hw)
  ref = golden[f'original_keypoints{image}']
  np.testing.assert_allclose(got['keypoints'][..., :2], ref[..., :2], atol=3e-2)
  np.testing.assert_allclose(got['keypoint_scores'], ref[..., 2], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize('normaliser', ['visible', 'fixed'])
def test_loss_without_the_proposal_filter_equals_detectron2s_with_it(normaliser):
  """detectron2 trains the keypoint head only on the foreground proposals that hold a visible
  keypoint (`select_proposals_with_visible_keypoints`, which dropped RoIs 2 and 5 here). Our
  loss over all 7 RoIs, unfiltered, equals its loss over the kept ones with either
  normaliser: a dropped RoI has no valid target, and the 'fixed' denominator (images x
  keypoints x 512 x 0.25) does not count RoIs."""
  golden = dict(np.load(D2_KP_NPZ))
  logits = golden['loss/logits'].astype(np.float32)
  target, valid = kp_ops.keypoints_to_heatmap(golden['loss/gt'], golden['loss/rois'],
                                              logits.shape[-1])
  assert not np.asarray(valid)[~golden['loss/kept']].any()
  assert (~golden['loss/kept']).sum() == 2
  total, count = kp_ops.heatmap_ce_sum(logits.reshape(*logits.shape[:2], -1), target, valid)
  assert 0 < float(count) < valid.size
  if normaliser == 'visible':
    ours = total / count
  else:  # KeypointHead.loss: images x K x foreground slots
    ours = total / (2 * logits.shape[1] * sampling.max_positives(512, 0.25))
  np.testing.assert_allclose(float(ours), golden[f'loss/{normaliser}'], rtol=1e-5)


def test_r50_parameter_count_is_detectron2s():
  from configs import detectron2_keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  config = detectron2_keypointrcnn_r50_fpn.get_config()
  shapes = jax.eval_shape(functools.partial(mask_rcnn.init_variables, config),
                          jax.random.key(0))
  assert mask_rcnn.count_params(shapes['params']) == (DETECTRON2_KEYPOINTRCNN_R50_PARAMS +
                                                      BACKGROUND_BOX_ROW)
  roi = shapes['params']['roi_heads']
  assert roi['keypoint_predictor']['kps_score_lowres']['kernel'].shape == (4, 4, 17, 512)
  assert len(roi['keypoint_head']) == 8 and 'mask_head' not in roi


def test_converter_names_every_keypoint_tensor():
  """A missing detectron2 keypoint tensor is refused by name."""
  config = _config()
  state_dict = dict(safe_io.load_state_dict(str(D2_KP_PKL)))
  del state_dict['roi_heads.keypoint_head.score_lowres.bias']
  with pytest.raises(core.WeightsMismatchError,
                     match='roi_heads.keypoint_head.score_lowres.bias'):
    weights.from_detectron2(state_dict, config)


def test_preset_has_detectron2_keypoint_rcnn_values():
  """Base-Keypoint-RCNN-FPN.yaml and detectron2's config defaults (ROI_KEYPOINT_HEAD)."""
  from configs import detectron2_keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  c = detectron2_keypointrcnn_r50_fpn.get_config()
  structures.validate_config(c)
  m = c.model
  assert m.num_classes == 2 and tuple(m.keypoint_head.num_keypoints) == (0, 17)
  assert (m.keypoint_head.conv_dim, m.keypoint_head.num_convs) == (512, 8)
  assert (m.roi.keypoint_output_size, m.roi.aligned, m.roi.sampling_ratio) == (14, True, 0)
  assert m.keypoint_head.loss_normalizer == 'visible' and m.test.keypoint_score == 'detectron2'
  assert (m.roi.box_loss, m.roi.smooth_l1_beta, m.rpn.box_loss) == ('smooth_l1', 0.5, 'l1')
  assert m.rpn.post_nms_topk_train == 1500 and c.data.min_keypoints_per_image == 1
  assert c.data.keypoint_offset == 0.5 and c.input.channel_order == 'BGR'
  assert c.input.resize == 'detectron2'
  # Flips: the map derived from COCO's names is detectron2's COCO_PERSON_KEYPOINT_FLIP_MAP.
  assert tuple(c.data.keypoint_flip_map) == ()
  derived = coco.flip_map_from_names(COCO_PERSON_NAMES)
  index = {n: i for i, n in enumerate(COCO_PERSON_NAMES)}
  expected = list(range(17))
  for a, b in DETECTRON2_FLIP_PAIRS:
    expected[index[a]], expected[index[b]] = index[b], index[a]
  assert list(derived) == expected
