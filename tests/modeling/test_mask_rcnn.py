"""MaskRCNN end to end: torchvision parameter count and names, golden outputs and losses.

The golden file (tests/modeling/golden/make_golden.py, run once with torch) holds torchvision's
Mask R-CNN at the tiny config's sizes with random weights, its inference intermediates and
detections on one padded image, and its training losses with deterministic samplers.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import maskrcnn_r50_fpn
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import mask_rcnn
from tests.modeling import helpers

GOLDEN_DIR = pathlib.Path(__file__).with_name('golden')
TORCHVISION_MASKRCNN_R50_PARAMS = 44_401_393  # sum(p.numel()) of maskrcnn_resnet50_fpn
# torchvision FrozenBatchNorm2d buffers (weight, bias, running_mean, running_var) of ResNet-50.
TORCHVISION_R50_FROZEN_BN = 4 * 26_560


def _shapes(config):
  return jax.eval_shape(functools.partial(mask_rcnn.init_variables, config), jax.random.key(0))


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN_DIR / 'tiny_maskrcnn.npz') as f:
    return dict(f)


@pytest.fixture(scope='module')
def golden_variables(tiny_config, golden):
  state_dict = {k[3:]: v for k, v in golden.items() if k.startswith('sd/')}
  return helpers.variables_from_torchvision(state_dict, _shapes(tiny_config))


@pytest.fixture(scope='module')
def golden_inputs(golden):
  images = jnp.asarray(golden['image'].transpose(0, 2, 3, 1))
  return images, jnp.asarray(golden['content_hw'], jnp.int32)[None]


@pytest.fixture(scope='module')
def golden_run(tiny_config, golden_variables, golden_inputs):
  model = mask_rcnn.build_model(tiny_config)
  apply = jax.jit(functools.partial(model.apply, mutable=['intermediates']))
  out, state = apply(golden_variables, *golden_inputs)
  return jax.device_get(out), jax.device_get(state['intermediates'])


# ---------------------------------------------------------------------------- structure


def test_r50_param_count_equals_torchvision():
  shapes = _shapes(maskrcnn_r50_fpn.get_config())
  assert mask_rcnn.count_params(shapes['params']) == TORCHVISION_MASKRCNN_R50_PARAMS
  assert mask_rcnn.count_params(shapes['constants']) == TORCHVISION_R50_FROZEN_BN
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))


def test_r50_names_map_one_to_one_onto_torchvision_state_dict():
  expected = json.loads((GOLDEN_DIR / 'maskrcnn_resnet50_fpn_keys.json').read_text())
  shapes = _shapes(maskrcnn_r50_fpn.get_config())
  seen = {}
  for collection, tree in shapes.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      key = helpers._torch_name(collection, path)  # pylint: disable=protected-access
      torch_shape = tuple(expected[key])
      if path[-1] == 'kernel':
        torch_shape = (torch_shape[::-1] if len(torch_shape) == 2 else
                       tuple(torch_shape[i] for i in (2, 3, 1, 0)))
      assert leaf.shape == torch_shape, key
      seen[key] = path
  assert set(seen) == set(expected)


def test_mask_off_is_faster_rcnn(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.model.mask_on = False
  shapes = _shapes(cfg)
  assert set(shapes['params']['roi_heads']) == {'box_head', 'box_predictor'}
  model = mask_rcnn.build_model(cfg)
  out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 64, 96, 3)),
                       jnp.zeros((2, 2), jnp.int32))
  assert set(out) == {'boxes', 'scores', 'labels', 'valid'}
  full = _shapes(maskrcnn_r50_fpn.get_config())
  mask_params = mask_rcnn.count_params(full['params']['roi_heads']['mask_head']) + \
      mask_rcnn.count_params(full['params']['roi_heads']['mask_predictor'])
  cfg = maskrcnn_r50_fpn.get_config()
  cfg.model.mask_on = False
  assert mask_rcnn.count_params(_shapes(cfg)['params']) == \
      TORCHVISION_MASKRCNN_R50_PARAMS - mask_params


def test_output_shapes_and_dtypes(tiny_config):
  model = mask_rcnn.build_model(tiny_config)
  out = jax.eval_shape(model.apply, _shapes(tiny_config), jnp.zeros((3, 96, 64, 3)),
                       jnp.zeros((3, 2), jnp.int32))
  d = tiny_config.model.test.detections_per_img
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      'boxes': ((3, d, 4), jnp.float32), 'scores': ((3, d), jnp.float32),
      'labels': ((3, d), jnp.int32), 'valid': ((3, d), jnp.bool_),
      'masks': ((3, d, 28, 28), jnp.float32)}


# ---------------------------------------------------------------------------- golden: inference


def test_golden_features_and_rpn(golden, golden_run):
  _, inter = golden_run
  for i, feat in enumerate(inter['features']):
    ref = golden[f'feat{i}'].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(feat, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  num_anchors = 3
  for i in range(5):
    ref_obj = golden[f'objectness{i}'].transpose(0, 2, 3, 1).reshape(1, -1)
    n, _, h, w = golden[f'rpn_deltas{i}'].shape
    ref_deltas = golden[f'rpn_deltas{i}'].reshape(n, num_anchors, 4, h, w)
    ref_deltas = ref_deltas.transpose(0, 3, 4, 1, 2).reshape(n, -1, 4)
    np.testing.assert_allclose(inter['objectness'][i], ref_obj, atol=1e-4)
    np.testing.assert_allclose(inter['rpn_deltas'][i], ref_deltas, atol=1e-4)


def test_golden_proposals(golden, golden_run):
  _, inter = golden_run
  ref = golden['proposals']
  valid = inter['proposal_valid'][0]
  assert valid.sum() == len(ref)
  assert valid[:len(ref)].all()  # valid proposals come first, by descending score
  np.testing.assert_allclose(inter['proposals'][0, :len(ref)], ref, atol=1e-3)
  assert np.all(np.diff(inter['proposal_scores'][0, :len(ref)]) <= 0)


def test_golden_detections(golden, golden_run):
  out, _ = golden_run
  n = len(golden['det_scores'])
  assert out['valid'][0].sum() == n and out['valid'][0, :n].all()
  np.testing.assert_array_equal(out['labels'][0, :n], golden['det_labels'])
  np.testing.assert_allclose(out['scores'][0, :n], golden['det_scores'], atol=1e-5)
  np.testing.assert_allclose(out['boxes'][0, :n], golden['det_boxes'], atol=1e-3)
  np.testing.assert_allclose(out['masks'][0, :n], golden['det_masks'][:, 0], atol=1e-5)
  # Boxes stay inside the content (60 x 90), not the padded 64 x 96 input.
  assert out['boxes'][0, :, 2].max() <= 90 and out['boxes'][0, :, 3].max() <= 60


# ---------------------------------------------------------------------------- golden: training


def _golden_batch(config, golden, garbage: bool):
  """The golden image and ground truth as a structures.py batch (M = max_instances)."""
  m = config.input.max_instances
  boxes = golden['gt_boxes']
  n = len(boxes)
  gt_boxes = np.zeros((1, m, 4), np.float32)
  gt_boxes[0, :n] = boxes
  gt_labels = np.zeros((1, m), np.int32)
  gt_labels[0, :n] = golden['gt_labels']
  size = config.input.gt_mask_size
  gt_masks = np.zeros((1, m, size, size), np.uint8)
  gt_masks[0, :n] = transforms.crop_and_resize_masks(golden['gt_masks_full'], boxes, size)
  if garbage:  # padded slots may hold anything
    gt_boxes[0, n:] = np.nan
    gt_labels[0, n:] = 77
    gt_masks[0, n:] = 1
  return {
      'images': jnp.asarray(golden['image'].transpose(0, 2, 3, 1)),
      'image_size': jnp.asarray(golden['content_hw'], jnp.int32)[None],
      'gt_boxes': jnp.asarray(gt_boxes), 'gt_labels': jnp.asarray(gt_labels),
      'gt_masks': jnp.asarray(gt_masks), 'gt_crowd': jnp.zeros((1, m), bool),
      'gt_valid': jnp.asarray(np.arange(m)[None] < n)}


def test_losses_match_torchvision_and_have_gradients(tiny_config, golden, golden_variables):
  # The golden's deterministic samplers: every candidate sampled (see make_golden.py).
  cfg = tiny_config.copy_and_resolve_references()
  cfg.model.rpn.batch_size_per_image = 4096
  cfg.model.rpn.positive_fraction = 1.0
  cfg.model.roi.batch_size_per_image = 128
  cfg.model.roi.positive_fraction = 1.0
  model = mask_rcnn.build_model(cfg)
  batch = _golden_batch(cfg, golden, garbage=True)

  def loss_fn(params):
    variables = {'params': params, 'constants': golden_variables['constants']}
    return model.apply(variables, batch, jax.random.key(0), method=mask_rcnn.MaskRCNN.losses)

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      golden_variables['params'])
  for name in ('loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg'):
    np.testing.assert_allclose(metrics[name], golden[f'loss/{name}'], rtol=2e-4, err_msg=name)
  # Mask targets come from gt masks pre-cropped to their boxes and binarised (structures.py),
  # torchvision resamples full masks into soft targets: equal up to edge pixels.
  np.testing.assert_allclose(metrics['loss_mask'], golden['loss/loss_mask'], rtol=5e-3)
  expected_total = sum(float(golden[f'loss/{k}']) for k in (
      'loss_objectness', 'loss_rpn_box_reg', 'loss_classifier', 'loss_box_reg', 'loss_mask'))
  np.testing.assert_allclose(total, expected_total, rtol=1e-3)

  norms = jax.tree_util.tree_map(lambda g: float(jnp.abs(g).sum()), grads)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(leaf)).all()
  flat = traverse_util.flatten_dict(norms)
  for path, norm in flat.items():
    assert norm > 0, path  # every parameter (nothing frozen in the tiny config) gets gradient


def test_chunked_mask_loss_equals_all_slots(tiny_config, golden, golden_variables):
  """mask_head.loss_chunk visits only the chunks holding foreground RoIs: same loss and
  gradients as running the head on every slot, for images with different foreground counts."""
  one = _golden_batch(tiny_config, golden, garbage=True)
  batch = {k: jnp.concatenate([v, v]) for k, v in one.items()}
  batch['gt_valid'] = batch['gt_valid'].at[1, 1:].set(False)  # image 2: one instance
  results = {}
  for chunk in (0, 2, 3):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.mask_head.loss_chunk = chunk
    # Many foreground RoIs (the golden weights' proposals seldom overlap the gt by 0.5), so
    # several chunks are visited, and a different count per image.
    cfg.model.roi.positive_fraction = 1.0
    cfg.model.roi.fg_iou_thresh = cfg.model.roi.bg_iou_thresh = 0.05
    model = mask_rcnn.build_model(cfg)

    def loss_fn(params, model=model):
      variables = {'params': params, 'constants': golden_variables['constants']}
      return model.apply(variables, batch, jax.random.key(0), method=mask_rcnn.MaskRCNN.losses)

    results[chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        golden_variables['params'])
  (_, ref_metrics), ref_grads = results[0]
  assert float(ref_metrics['loss_mask']) > 0.1
  assert 6 < float(ref_metrics['num_roi_foreground']) < 32  # several chunks, the last partial
  for chunk in (2, 3):
    (_, metrics), grads = results[chunk]
    np.testing.assert_allclose(metrics['loss_mask'], ref_metrics['loss_mask'], rtol=1e-5)
    flat, ref_flat = (traverse_util.flatten_dict(g) for g in (grads, ref_grads))
    for path, ref in ref_flat.items():
      np.testing.assert_allclose(flat[path], ref, rtol=1e-4, atol=1e-6, err_msg=str(path))
    assert float(jnp.abs(flat[('roi_heads', 'mask_head', 'mask_fcn1', 'kernel')]).sum()) > 0


def test_bfloat16_runs_close_to_float32_with_f32_params(tiny_config, golden, golden_variables,
                                                          golden_inputs):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.dtype = 'bfloat16'
  model = mask_rcnn.build_model(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(_shapes(cfg)))
  out, state = jax.jit(functools.partial(model.apply, mutable=['intermediates']))(
      golden_variables, *golden_inputs)
  assert all(v.dtype == golden_dtype for v, golden_dtype in (
      (out['boxes'], jnp.float32), (out['scores'], jnp.float32), (out['masks'], jnp.float32)))
  for i, feat in enumerate(state['intermediates']['features']):
    assert feat.dtype == jnp.bfloat16
    ref = golden[f'feat{i}'].transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(feat, np.float32) - ref).max() < 0.05 * np.abs(ref).max()
  # The best detections survive bf16 rounding (their scores are >= 0.017 apart).
  np.testing.assert_array_equal(out['labels'][0, :4], golden['det_labels'][:4])
  np.testing.assert_allclose(out['scores'][0, :4], golden['det_scores'][:4], atol=0.01)
  assert np.isfinite(np.asarray(out['masks'])).all()
