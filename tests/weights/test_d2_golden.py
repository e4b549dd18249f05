"""Golden test: detectron2's tiny Mask R-CNN (tests/weights/golden) converted and run here.

The detectron2-format `.pkl` is read with the restricted unpickler, converted by
`weights.from_detectron2` for `configs/detectron2_maskrcnn_r50_fpn.get_config('tiny')`, and our
model's FPN features, RPN proposals, detections (boxes, scores, labels, 28x28 masks) and pasted
full-resolution masks on a two-image padded batch are compared with what detectron2 computed
(make_d2_golden.py). No torch or detectron2 is needed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import weights
from maskrcnn_jax.modeling import box_head
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.weights import safe_io

from tests.weights.golden_files import GOLDEN

D2_PKL = GOLDEN / 'd2_tiny_maskrcnn.pkl'
D2_NPZ = GOLDEN / 'd2_tiny_golden.npz'


@pytest.fixture(scope='module')
def config():
  from configs import detectron2_maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  return detectron2_maskrcnn_r50_fpn.get_config('tiny')


def test_tiny_config_still_has_the_golden_models_sizes(config):
  """make_d2_golden.py hard-codes these (it runs without this package)."""
  m = config.model
  assert (m.backbone.depth, m.backbone.width, m.fpn.channels, m.box_head.fc_dim,
          m.mask_head.conv_dim, m.mask_head.num_convs, m.num_classes) == ('tiny', 8, 16, 32, 16,
                                                                          2, 5)
  assert tuple(m.anchors.sizes) == (8, 16, 32, 64, 128) and m.roi.canonical_scale == 56
  assert (m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test, m.test.detections_per_img) == (
      100, 50, 10)
  # detectron2 semantics of the preset (what the golden model was built with).
  assert (m.roi.aligned, m.roi.sampling_ratio, m.roi.max_sampling_ratio, m.anchors.round_base,
          m.anchors.offset, m.rpn.rank_by) == (True, 0, 4, False, 0.0, 'logit')
  assert m.backbone.stride_in_1x1 and m.test.mask_paste == 'detectron2'
  assert tuple(config.input.buckets[0]) == (64, 96)


def _run(model, variables, images, image_size):
  det, state = model.apply(variables, images, image_size, mutable=['intermediates'])
  inter = state['intermediates']
  return inter['features'], inter['proposals'], inter['proposal_valid'], det


@pytest.fixture(scope='module')
def outputs(config):
  golden = dict(np.load(D2_NPZ))
  state_dict = safe_io.load_state_dict(str(D2_PKL))  # {'model': {...}} unwrapped
  assert all(v.dtype == np.float16 for v in state_dict.values())
  variables = weights.from_detectron2(state_dict, config, source=str(D2_PKL))
  model = mask_rcnn.build_model(config)
  run = jax.jit(functools.partial(_run, model))
  out = run(variables, jnp.asarray(golden['images'], jnp.float32),
            jnp.asarray(golden['image_size']))
  return golden, model, jax.device_get(out)


def test_fpn_features_match(outputs):
  golden, _, (feats, _, _, _) = outputs
  assert len(feats) == 5
  for level, f in enumerate(feats):
    ref = golden[f'feature{level}']
    assert f.shape == ref.shape
    np.testing.assert_allclose(f, ref, rtol=0, atol=1e-5 * np.abs(ref).max(),
                               err_msg=f'P{level + 2}')


@pytest.mark.parametrize('image', [0, 1])
def test_rpn_proposals_match(outputs, image):
  golden, _, (_, proposals, valid, _) = outputs
  ref = golden[f'proposals{image}']
  ours = proposals[image][valid[image]]
  assert len(ours) == len(ref) == 50
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)  # same order (descending score)


@pytest.mark.parametrize('image', [0, 1])
def test_detections_match(outputs, image):
  golden, _, (_, _, _, det) = outputs
  valid = det['valid'][image]
  n = len(golden[f'scores{image}'])
  assert n == 10 and valid.sum() == n
  np.testing.assert_array_equal(det['labels'][image][valid], golden[f'labels{image}'])
  np.testing.assert_allclose(det['scores'][image][valid], golden[f'scores{image}'], atol=2e-5)
  np.testing.assert_allclose(det['boxes'][image][valid], golden[f'boxes{image}'], atol=5e-3)
  # The golden masks are float16 (rounding <= 2.5e-4 of a probability).
  masks = golden[f'masks{image}'].astype(np.float32)
  np.testing.assert_allclose(det['masks'][image][valid], masks, atol=2e-3)


def _unpack(packed, width):
  return np.unpackbits(packed, axis=-1)[..., :width].astype(bool)


@pytest.mark.parametrize('image', [0, 1])
def test_paste_of_detectron2_masks_is_detectron2s(outputs, image):
  """Our paste of detectron2's own masks and boxes: its `paste_masks_in_image`, pixel for pixel
  (but for probabilities within float error of 0.5)."""
  golden = outputs[0]
  h, w = golden['image_size'][image]
  masks = golden[f'masks{image}'].astype(np.float32)
  boxes = golden[f'boxes{image}']
  ref = _unpack(golden[f'pasted{image}'], w)
  probs = np.asarray(mask_ops.paste_masks_detectron2(masks, boxes, int(h), int(w)))
  ours = np.asarray(mask_ops.paste_and_threshold(masks, boxes, int(h), int(w), 0.5,
                                                 'detectron2'))
  np.testing.assert_array_equal(ours, probs >= 0.5)
  differ = ours != ref
  assert np.all(np.abs(probs[differ] - 0.5) < 1e-5), np.abs(probs[differ] - 0.5).max()
  assert differ.mean() < 1e-4
  assert ref.any(axis=(1, 2)).all()  # every detection's mask is non-empty: the test means it


def _mask_iou(a, b):
  union = np.logical_or(a, b).sum((1, 2))
  return np.where(union > 0, np.logical_and(a, b).sum((1, 2)) / np.maximum(union, 1), 1.0)


def model_config_drops_empty() -> bool:
  from configs import detectron2_maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  return bool(detectron2_maskrcnn_r50_fpn.get_config('tiny').model.test.drop_empty_boxes)


@pytest.mark.parametrize('image', [0, 1])
def test_postprocess_matches_detector_postprocess(outputs, image):
  """Our box rescale and `MaskHead.postprocess` (the Predictor's and the evaluator's path, here
  with `mask_paste='detectron2'` from the preset) against detectron2's `detector_postprocess` to
  an original size other than the input (one upscale, one downscale)."""
  golden, model, (_, _, _, det) = outputs
  hw = tuple(int(s) for s in golden['image_size'][image])
  original = tuple(int(s) for s in golden['original_size'][image])
  boxes = box_head.boxes_to_original(det['boxes'][image], original, hw)
  valid = det['valid'][image]
  # detector_postprocess clips and drops detections whose box is then empty: the preset's
  # model.test.drop_empty_boxes, which the Predictor applies with clip_and_drop_empty.
  kept = golden[f'original_kept{image}']
  assert valid.sum() == len(kept)
  assert model_config_drops_empty()
  clipped, keep = box_head.clip_and_drop_empty(boxes, valid, original)
  np.testing.assert_array_equal(keep[valid], kept)
  np.testing.assert_allclose(clipped[keep], golden[f'original_boxes{image}'], atol=5e-3)
  assert model.heads['mask'].mask_paste == 'detectron2'
  det = {**det, 'valid': np.array(det['valid'], copy=True)}
  det['valid'][image] = keep
  out = model.heads['mask'].postprocess(det, image, clipped, original, hw)
  ref = _unpack(golden[f'original_pasted{image}'], original[1])
  assert out['masks'].shape == (int(kept.sum()),) + original and out['masks'].dtype == bool
  # Our masks come from our 28x28 probabilities (within ~2e-4 of detectron2's): a pixel may flip
  # where a probability is that close to 0.5 (none do in these files).
  iou = _mask_iou(out['masks'], ref)
  assert iou.min() >= 0.99 and (out['masks'] != ref).mean() < 1e-4, iou
  # The torchvision paste of the same detections is far off (mean IoU ~0.35 on these small
  # boxes), so this test catches the head ignoring its `mask_paste` field.
  tv = np.asarray(mask_ops.paste_and_threshold(det['masks'][image], clipped, *original, 0.5,
                                               'torchvision'))[keep]
  assert _mask_iou(tv, ref).mean() < 0.9
