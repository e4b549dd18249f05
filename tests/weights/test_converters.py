"""Converters: strict key checks, class-count handling, detectron2/Caffe2 layouts, checkpoints.

Everything here runs on the golden tiny torchvision model (tests/weights/golden), without torch.
"""

import functools
import logging
import pickle
import re

import jax
import numpy as np
import pytest

from configs import detectron2_maskrcnn_r50_fpn
from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import weights
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.weights import core

from tests.weights.golden_files import GOLDEN_PTH

NUM_CLASSES = 5  # of the golden model
CLASS_SPECIFIC = ('params/roi_heads/box_predictor/bbox_pred/bias',
                  'params/roi_heads/box_predictor/bbox_pred/kernel',
                  'params/roi_heads/box_predictor/cls_score/bias',
                  'params/roi_heads/box_predictor/cls_score/kernel',
                  'params/roi_heads/mask_predictor/mask_fcn_logits/bias',
                  'params/roi_heads/mask_predictor/mask_fcn_logits/kernel')


def _flat(variables):
  return {core.path_str(p): v for p, v in core.flatten(variables).items()}


def _with_classes(config, num_classes):
  config = config.copy_and_resolve_references()
  config.model.num_classes = num_classes
  return config


@pytest.fixture(scope='module')
def tv_variables(tiny_config):
  del tiny_config
  from configs import torchvision_maskrcnn_r50_fpn
  from maskrcnn_jax.weights import safe_io
  sd = safe_io.find_state_dict(safe_io.load_torch(str(GOLDEN_PTH), use_torch=False), 'golden')
  return _flat(weights.from_torchvision(sd, torchvision_maskrcnn_r50_fpn.get_config('tiny')))


# ------------------------------------------------------------------------------ torchvision


def test_layouts_of_converted_torchvision_tensors(tv_state_dict, tv_variables):
  sd = tv_state_dict
  np.testing.assert_array_equal(  # conv OIHW -> HWIO
      tv_variables['params/backbone/body/layer2/0/conv2/kernel'],
      np.transpose(sd['backbone.body.layer2.0.conv2.weight'], (2, 3, 1, 0)))
  np.testing.assert_array_equal(  # Linear W.T, fc6 rows in torchvision's (C, H, W) order
      tv_variables['params/roi_heads/box_head/fc6/kernel'], sd['roi_heads.box_head.fc6.weight'].T)
  np.testing.assert_array_equal(  # ConvTranspose2d [in, out, kh, kw] -> [kh, kw, out, in]
      tv_variables['params/roi_heads/mask_predictor/conv5_mask/kernel'],
      np.transpose(sd['roi_heads.mask_predictor.conv5_mask.weight'], (2, 3, 1, 0)))
  np.testing.assert_array_equal(tv_variables['constants/backbone/body/bn1/running_var'],
                                sd['backbone.body.bn1.running_var'])
  assert all(v.dtype == np.float32 for v in tv_variables.values())
  # Every torchvision tensor is used exactly once.
  assert len(tv_variables) == len(sd)


def test_missing_unexpected_and_misshaped_tensors_are_listed_by_name(tv_state_dict,
                                                                       tv_tiny_config):
  sd = tv_state_dict
  del sd['rpn.head.conv.0.0.weight']
  del sd['roi_heads.box_head.fc7.bias']
  sd['roi_heads.extra.weight'] = np.zeros(3, np.float32)
  sd['backbone.body.layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(weights.WeightsMismatchError) as e:
    weights.from_torchvision(sd, tv_tiny_config)
  message = str(e.value)
  for name in ('rpn.head.conv.0.0.weight (for params/rpn/head/conv/kernel)',
               'roi_heads.box_head.fc7.bias', 'roi_heads.extra.weight',
               'backbone.body.layer5.0.conv1.weight'):
    assert name in message
  assert '2 tensors missing' in message and '2 source tensors not used' in message


def test_shape_mismatches_are_listed_by_name(tv_state_dict, tv_tiny_config):
  sd = tv_state_dict
  sd['roi_heads.box_head.fc6.weight'] = np.zeros((32, 10), np.float32)
  sd['backbone.fpn.layer_blocks.1.0.bias'] = np.zeros(7, np.float32)
  with pytest.raises(weights.WeightsMismatchError, match='2 shape mismatches') as e:
    weights.from_torchvision(sd, tv_tiny_config)
  assert 'roi_heads.box_head.fc6.weight -> params/roi_heads/box_head/fc6/kernel' in str(e.value)
  assert 'backbone.fpn.layer_blocks.1.0.bias' in str(e.value)


def test_legacy_torchvision_names_are_accepted(tv_state_dict, tv_tiny_config, tv_variables):
  legacy = {}
  for k, v in tv_state_dict.items():
    k = re.sub(r'^rpn\.head\.conv\.0\.0\.', 'rpn.head.conv.', k)
    k = re.sub(r'^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.', r'backbone.fpn.\1_blocks.\2.', k)
    k = re.sub(r'^roi_heads\.mask_head\.(\d)\.0\.',
               lambda m: f'roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.', k)
    legacy[k] = v
  assert 'rpn.head.conv.weight' in legacy and 'roi_heads.mask_head.mask_fcn2.bias' in legacy
  legacy['backbone.body.bn1.num_batches_tracked'] = np.array(0)  # a BatchNorm2d counter: ignored
  got = _flat(weights.from_torchvision(legacy, tv_tiny_config))
  assert got.keys() == tv_variables.keys()
  for k, v in got.items():
    np.testing.assert_array_equal(v, tv_variables[k], err_msg=k)


def test_class_count_mismatch_raises_unless_allowed(tv_state_dict, tv_tiny_config, tv_variables,
                                                    caplog):
  config = _with_classes(tv_tiny_config, 3)
  with pytest.raises(weights.ClassCountMismatchError,
                     match=r'5 classes .*num_classes = 3; pass allow_class_mismatch=True') as e:
    weights.from_torchvision(tv_state_dict, config)
  for name in CLASS_SPECIFIC:
    assert name in str(e.value)

  key = jax.random.key(7)
  with caplog.at_level(logging.WARNING):
    got = _flat(weights.from_torchvision(tv_state_dict, config, allow_class_mismatch=True,
                                         key=key))
  assert 're-initialised the class-specific layers' in caplog.text
  for name in CLASS_SPECIFIC:
    assert name in caplog.text
  # Valid variables for the new config: same tree and shapes as the model's own init ...
  fresh = _flat(mask_rcnn.init_variables(config, key))
  assert got.keys() == fresh.keys()
  for k in got:
    assert got[k].shape == fresh[k].shape, k
  # ... with the class-specific layers from that init and everything else converted.
  for k in got:
    expected = fresh[k] if k in CLASS_SPECIFIC else tv_variables[k]
    np.testing.assert_array_equal(got[k], expected, err_msg=k)
  assert got['params/roi_heads/box_predictor/bbox_pred/kernel'].shape == (32, 12)


# ------------------------------------------------------------------------------ detectron2

# Hand-written torchvision -> detectron2 names of the tiny model (detectron2's own module names).
_TV_TO_D2 = (
    (r'backbone\.body\.conv1\.weight', 'backbone.bottom_up.stem.conv1.weight'),
    (r'backbone\.body\.bn1\.(\w+)', r'backbone.bottom_up.stem.conv1.norm.\1'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}'),
    (r'backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)',
     lambda m: f'backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}'),
    (r'backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)',
     lambda m: f'backbone.fpn_output{int(m[1]) + 2}.{m[2]}'),
    (r'rpn\.head\.conv\.0\.0\.(\w+)', r'proposal_generator.rpn_head.conv.\1'),
    (r'rpn\.head\.cls_logits\.(\w+)', r'proposal_generator.rpn_head.objectness_logits.\1'),
    (r'rpn\.head\.bbox_pred\.(\w+)', r'proposal_generator.rpn_head.anchor_deltas.\1'),
    (r'roi_heads\.box_head\.fc6\.(\w+)', r'roi_heads.box_head.fc1.\1'),
    (r'roi_heads\.box_head\.fc7\.(\w+)', r'roi_heads.box_head.fc2.\1'),
    (r'roi_heads\.box_predictor\.(\w+)\.(\w+)', r'roi_heads.box_predictor.\1.\2'),
    (r'roi_heads\.mask_head\.(\d)\.0\.(\w+)',
     lambda m: f'roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}'),
    (r'roi_heads\.mask_predictor\.conv5_mask\.(\w+)', r'roi_heads.mask_head.deconv.\1'),
    (r'roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)', r'roi_heads.mask_head.predictor.\1'),
)


def _to_detectron2(tv_sd):
  """The golden model in detectron2's layout: background last / absent in the predictors."""
  out = {}
  for k, v in tv_sd.items():
    for pattern, repl in _TV_TO_D2:
      if re.fullmatch(pattern, k):
        name = re.sub(pattern, repl, k)
        break
    else:
      raise AssertionError(f'no detectron2 name for {k}')
    if name.startswith('roi_heads.box_predictor.cls_score'):
      v = np.concatenate([v[1:], v[:1]])  # background last
    elif name.startswith('roi_heads.box_predictor.bbox_pred'):
      v = v[4:]  # no background deltas
    elif name.startswith('roi_heads.mask_head.predictor'):
      v = v[1:]  # no background mask
    out[name] = v
  return out


def test_detectron2_layout_equals_torchvision_layout(tv_state_dict, tv_tiny_config, tv_variables):
  d2_sd = _to_detectron2(tv_state_dict)
  assert d2_sd['roi_heads.box_predictor.cls_score.weight'].shape[0] == NUM_CLASSES
  assert d2_sd['roi_heads.box_predictor.bbox_pred.weight'].shape[0] == 4 * (NUM_CLASSES - 1)
  got = _flat(weights.from_detectron2(d2_sd, tv_tiny_config))
  assert got.keys() == tv_variables.keys()
  for k, v in got.items():
    expected = tv_variables[k]
    if 'bbox_pred' in k and 'box_predictor' in k:  # background deltas: zeros (never read)
      expected = expected.copy()
      expected[..., :4] = 0.0
    if 'mask_fcn_logits' in k:
      expected = expected.copy()
      expected[..., :1] = 0.0
    np.testing.assert_array_equal(v, expected, err_msg=k)


def test_detectron2_class_agnostic_heads_are_tiled(tv_state_dict, tv_tiny_config):
  d2_sd = _to_detectron2(tv_state_dict)
  w = d2_sd['roi_heads.box_predictor.bbox_pred.weight'][:4]
  d2_sd['roi_heads.box_predictor.bbox_pred.weight'] = w
  bias = d2_sd['roi_heads.box_predictor.bbox_pred.bias']
  d2_sd['roi_heads.box_predictor.bbox_pred.bias'] = bias[:4]
  got = _flat(weights.from_detectron2(d2_sd, tv_tiny_config))
  kernel = got['params/roi_heads/box_predictor/bbox_pred/kernel']
  assert kernel.shape == (32, 4 * NUM_CLASSES)
  for c in range(NUM_CLASSES):
    np.testing.assert_array_equal(kernel[:, 4 * c:4 * c + 4], w.T)


def test_detectron2_missing_and_class_mismatch(tv_state_dict, tv_tiny_config):
  d2_sd = _to_detectron2(tv_state_dict)
  d2_sd['pixel_mean'] = np.zeros((3, 1, 1), np.float32)  # a known buffer: ignored
  del d2_sd['backbone.bottom_up.res3.0.shortcut.norm.running_var']
  with pytest.raises(weights.WeightsMismatchError,
                     match=r'res3\.0\.shortcut\.norm\.running_var \(for '
                           r'constants/backbone/body/layer2/0/downsample/1/running_var\)'):
    weights.from_detectron2(d2_sd, tv_tiny_config)
  d2_sd = _to_detectron2(tv_state_dict)
  with pytest.raises(weights.ClassCountMismatchError, match='5 classes'):
    weights.from_detectron2(d2_sd, _with_classes(tv_tiny_config, 81))


def test_detectron2_model_zoo_pickle_is_read_safely_and_converted(tmp_path, tv_state_dict,
                                                                   tv_tiny_config, tv_variables):
  """A model-zoo style `{'model': ..., '__author__': ...}` pickle through convert_variables."""
  path = tmp_path / 'model_final_tiny.pkl'
  d2_sd = _to_detectron2(tv_state_dict)
  with open(path, 'wb') as f:
    pickle.dump({'model': d2_sd, '__author__': 'Detectron2 Model Zoo'}, f)
  variables, meta = weights.convert_variables('detectron2', str(path), tv_tiny_config)
  got = _flat(variables)
  np.testing.assert_array_equal(got['params/roi_heads/box_head/fc6/kernel'],
                                tv_variables['params/roi_heads/box_head/fc6/kernel'])
  assert meta['input_normalization']['channel_order'] == 'BGR'
  assert meta['source'] == f'detectron2:{path}'
  c2_path = tmp_path / 'R-50.pkl'
  with open(c2_path, 'wb') as f:
    pickle.dump({'blobs': _to_caffe2(tv_state_dict, 1e-5)}, f, protocol=2)
  with pytest.raises(weights.WeightsMismatchError, match='pretrained_backbone'):
    weights.convert_variables('detectron2', str(c2_path), tv_tiny_config)


# ------------------------------------------------------------------------------ backbones


def _fold_bn(sd, prefix, eps):
  w, b = sd[prefix + '.weight'], sd[prefix + '.bias']
  mean, var = sd[prefix + '.running_mean'], sd[prefix + '.running_var']
  scale = w.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
  return scale.astype(np.float32), (b - mean * scale).astype(np.float32)


def _to_caffe2(tv_sd, eps):
  """The golden body as an MSRA/Caffe2 `R-50.pkl`-style dict (folded BN, c2 names)."""
  out = {'conv1_w': tv_sd['backbone.body.conv1.weight']}
  out['res_conv1_bn_s'], out['res_conv1_bn_b'] = _fold_bn(tv_sd, 'backbone.body.bn1', eps)
  for stage in range(1, 5):
    tv, c2 = f'backbone.body.layer{stage}.0', f'res{stage + 1}_0'
    for j, branch in enumerate('abc', 1):
      out[f'{c2}_branch2{branch}_w'] = tv_sd[f'{tv}.conv{j}.weight']
      out[f'{c2}_branch2{branch}_bn_s'], out[f'{c2}_branch2{branch}_bn_b'] = _fold_bn(
          tv_sd, f'{tv}.bn{j}', eps)
    out[f'{c2}_branch1_w'] = tv_sd[f'{tv}.downsample.0.weight']
    out[f'{c2}_branch1_bn_s'], out[f'{c2}_branch1_bn_b'] = _fold_bn(tv_sd, f'{tv}.downsample.1',
                                                                  eps)
  out['fc1000_w'] = np.zeros((10, 256), np.float32)  # the ImageNet classifier: ignored
  out['fc1000_b'] = np.zeros(10, np.float32)
  out['res2_0_branch2a_w_momentum'] = np.zeros(1, np.float32)  # optimiser state: ignored
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


@pytest.fixture(scope='module')
def fresh_tiny():
  from configs import torchvision_maskrcnn_r50_fpn
  config = torchvision_maskrcnn_r50_fpn.get_config('tiny')
  return mask_rcnn.init_variables(config, jax.random.key(1))


def _stem(flat, x, eps):
  """conv1 + frozen BN of a flat variables dict on NHWC `x` (float64 numpy via jax)."""
  y = jax.lax.conv_general_dilated(
      x, flat['params/backbone/body/conv1/kernel'], (2, 2), ((3, 3), (3, 3)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  bn = {k: flat[f'constants/backbone/body/bn1/{k}'] for k in
        ('weight', 'bias', 'running_mean', 'running_var')}
  scale = bn['weight'] / np.sqrt(bn['running_var'] + eps)
  return np.asarray(y * scale + bn['bias'] - bn['running_mean'] * scale)


def test_caffe2_backbone_pickle_loads_folded_and_adapts_the_stem(tmp_path, tv_state_dict,
                                                                 fresh_tiny, caplog):
  config = detectron2_maskrcnn_r50_fpn.get_config('tiny')  # BGR, Caffe statistics
  eps = float(config.model.backbone.bn_eps)
  path = tmp_path / 'R-tiny.pkl'
  with open(path, 'wb') as f:  # protocol 2, as the Python-2-era MSRA files
    pickle.dump({'blobs': _to_caffe2(tv_state_dict, eps)}, f, protocol=2)
  params, constants = weights.load_pretrained_backbone(
      str(path), fresh_tiny['params'], fresh_tiny['constants'], config)
  flat = _flat({'params': params, 'constants': constants})
  tv = {k: v.astype(np.float32) for k, v in tv_state_dict.items()}
  # Folded BN: same affine transform, running statistics at (0, 1 - eps).
  for ours, theirs in (('bn1', 'bn1'), ('layer3/0/bn2', 'layer3.0.bn2'),
                       ('layer4/0/downsample/1', 'layer4.0.downsample.1')):
    c = {k: flat[f'constants/backbone/body/{ours}/{k}'] for k in
         ('weight', 'bias', 'running_mean', 'running_var')}
    np.testing.assert_array_equal(c['running_mean'], 0.0)
    scale = c['weight'] / np.sqrt(c['running_var'] + eps)
    ref_scale, ref_shift = _fold_bn(tv, f'backbone.body.{theirs}', eps)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    np.testing.assert_allclose(c['bias'] - c['running_mean'] * scale, ref_shift, rtol=1e-6,
                               atol=1e-7)
  np.testing.assert_array_equal(flat['params/backbone/body/layer1/0/conv3/kernel'],
                                np.transpose(tv['backbone.body.layer1.0.conv3.weight'],
                                             (2, 3, 1, 0)))
  # Everything outside the body keeps its initialisation.
  fresh = _flat(fresh_tiny)
  np.testing.assert_array_equal(flat['params/rpn/head/conv/kernel'],
                                fresh['params/rpn/head/conv/kernel'])

  # The same file under an RGB / ImageNet-statistics config: the stem is adapted.
  rgb_config = mask_rcnn_config_tiny()
  with caplog.at_level(logging.WARNING):
    rgb_params, rgb_constants = weights.load_pretrained_backbone(
        str(path), fresh_tiny['params'], fresh_tiny['constants'], rgb_config)
  assert 'adapted the stem conv' in caplog.text
  rgb_flat = _flat({'params': rgb_params, 'constants': rgb_constants})
  pixels = np.random.default_rng(0).uniform(0, 255, (1, 32, 48, 3)).astype(np.float32)
  i = rgb_config.input
  x_rgb = (pixels - np.asarray(i.pixel_mean, np.float32)) / np.asarray(i.pixel_std, np.float32)
  x_bgr = pixels[..., ::-1] - np.asarray(config.input.pixel_mean, np.float32)
  y_bgr = _stem(flat, x_bgr, eps)
  y_rgb = _stem(rgb_flat, x_rgb, eps)
  # Exact up to float rounding, borders included: the Caffe BGR mean is the ImageNet RGB mean
  # reversed, so zero padding means the same pixel in both normalisations.
  np.testing.assert_allclose(y_rgb, y_bgr, rtol=1e-4, atol=1e-5 * np.abs(y_bgr).max())


def mask_rcnn_config_tiny():
  from configs import maskrcnn_r50_fpn
  return maskrcnn_r50_fpn.get_config('tiny')


def test_backbone_from_torchvision_classifier_state_dict(tmp_path, tv_state_dict, fresh_tiny):
  body = {k[len('backbone.body.'):]: v for k, v in tv_state_dict.items()
          if k.startswith('backbone.body.')}
  body['fc.weight'] = np.zeros((10, 256), np.float16)  # the classifier: ignored
  body['fc.bias'] = np.zeros(10, np.float16)
  path = tmp_path / 'resnet.npz'
  np.savez(path, **body)
  params, constants = weights.load_pretrained_backbone(
      str(path), fresh_tiny['params'], fresh_tiny['constants'], mask_rcnn_config_tiny())
  flat = _flat({'params': params, 'constants': constants})
  np.testing.assert_array_equal(flat['constants/backbone/body/layer2/0/bn3/running_mean'],
                                body['layer2.0.bn3.running_mean'].astype(np.float32))
  del body['layer2.0.bn3.running_mean']
  body['layer2.0.bn4.weight'] = np.zeros(3, np.float16)
  np.savez(path, **body)
  with pytest.raises(weights.WeightsMismatchError,
                     match=r'layer2\.0\.bn3\.running_mean.*layer2\.0\.bn4\.weight'):
    weights.load_pretrained_backbone(str(path), fresh_tiny['params'], fresh_tiny['constants'],
                                     mask_rcnn_config_tiny())


# ------------------------------------------------------------------------------ checkpoints


def test_convert_file_writes_a_checkpoint_for_a_new_class_count(tmp_path, tv_tiny_config,
                                                                tv_variables, fresh_tiny):
  """The fine-tuning path: a 5-class model converted for a 3-class config, written, read back
  by `checkpoint.restore_variables` (as train's init_checkpoint and predict do), and usable as a
  pretrained backbone."""
  config = _with_classes(tv_tiny_config, 3)
  out = str(tmp_path / 'converted')
  with pytest.raises(weights.ClassCountMismatchError):
    weights.convert_file('torchvision', str(GOLDEN_PTH), out, config)
  meta = weights.convert_file('torchvision', str(GOLDEN_PTH), out, config,
                              allow_class_mismatch=True)
  assert meta['class_names'] == ['class_1', 'class_2']  # K names for labels 1..K
  abstract = jax.eval_shape(functools.partial(mask_rcnn.init_variables, config),
                            jax.random.key(0))
  restored, read_meta = ckpt.restore_variables(out, abstract, config)
  assert read_meta['source'].startswith('torchvision:')
  assert read_meta['input_normalization']['channel_order'] == 'RGB'
  restored = _flat(restored)
  assert restored.keys() == tv_variables.keys()
  for k, v in restored.items():
    if k not in CLASS_SPECIFIC:
      np.testing.assert_array_equal(np.asarray(v), tv_variables[k], err_msg=k)
  assert restored['params/roi_heads/box_predictor/cls_score/kernel'].shape == (32, 3)
  with pytest.raises(ckpt.CheckpointError, match='already holds a checkpoint'):
    weights.convert_file('torchvision', str(GOLDEN_PTH), out, config, allow_class_mismatch=True)

  params, constants = weights.load_pretrained_backbone(out, fresh_tiny['params'],
                                                       fresh_tiny['constants'], config)
  flat = _flat({'params': params, 'constants': constants})
  for k, v in flat.items():
    expected = tv_variables[k] if k.split('/')[1:3] == ['backbone', 'body'] else \
        _flat(fresh_tiny)[k]
    np.testing.assert_array_equal(np.asarray(v), np.asarray(expected), err_msg=k)


def test_coco_label_spaces():
  from maskrcnn_jax.weights import coco_categories as cc
  tv_map, tv_names = cc.torchvision_label_space()
  d2_map, d2_names = cc.detectron2_label_space()
  assert len(tv_names) == 91 and len(d2_names) == 81 and len(cc.COCO_CATEGORIES) == 80
  assert tv_names[1] == 'person' and tv_names[12] == 'N/A' and tv_names[90] == 'toothbrush'
  assert d2_map[1] == 1 and d2_map[12] == 13 and d2_map[80] == 90
  assert d2_names[80] == 'toothbrush' and all(tv_names[d2_map[l]] == d2_names[l] for l in d2_map)
