"""Config validation names the bad field; bucket choice."""
import pytest

from configs import detectron2_maskrcnn_r50_fpn, maskrcnn_r50_fpn, shapes
from configs import torchvision_maskrcnn_r50_fpn
from maskrcnn_jax import structures


@pytest.mark.parametrize('get', [maskrcnn_r50_fpn.get_config, shapes.get_config,
                                 torchvision_maskrcnn_r50_fpn.get_config,
                                 detectron2_maskrcnn_r50_fpn.get_config])
@pytest.mark.parametrize('mode', ['', 'tiny'])
def test_shipped_configs_validate(get, mode):
  structures.validate_config(get(mode))


def _set(config, field, value):
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize('field,value,message', [
    ('model.roi_op', 'bilinear', 'config.model.roi_op'),
    ('model.roi.sampling_ratio', -1, 'config.model.roi.sampling_ratio'),
    ('model.roi.max_sampling_ratio', 0, 'config.model.roi.max_sampling_ratio'),
    ('model.rpn.rank_by', 'score', 'config.model.rpn.rank_by'),
    ('model.anchors.sizes', (32, 64, 128), 'config.model.anchors.sizes'),
    ('input.buckets', ((800, 1333),), 'config.input.buckets'),
    ('dtype', 'float16', 'config.dtype'),
    ('model.backbone.depth', 152, 'config.model.backbone.depth'),
    ('model.rpn.nms_thresh', 1.5, 'config.model.rpn.nms_thresh'),
    ('model.roi.box_loss', 'huber', 'config.model.roi.box_loss'),
])
def test_invalid_values_name_the_field(field, value, message):
  config = maskrcnn_r50_fpn.get_config()
  _set(config, field, value)
  with pytest.raises(structures.ConfigError, match=message.replace('.', r'\.')):
    structures.validate_config(config)


NAN, INF = float('nan'), float('inf')


@pytest.mark.parametrize('field,value', [
    ('seed', -1),
    ('model.backbone.width', 0),
    ('model.backbone.bn_eps', 0.0),
    ('model.backbone.norm', 'batch_norm'),
    ('model.fpn.channels', 0),
    ('model.anchors.sizes', (32, 64, 0, 256, 512)),
    ('model.anchors.offset', 1.0),
    ('model.rpn.pre_nms_topk_train', 0),
    ('model.rpn.pre_nms_topk_test', -5),
    ('model.rpn.post_nms_topk_train', 0),
    ('model.rpn.post_nms_topk_test', 0),
    ('model.rpn.min_size', -1.0),
    ('model.rpn.score_thresh', 1.5),
    ('model.rpn.batch_size_per_image', 0),
    ('model.rpn.smooth_l1_beta', -0.1),
    ('model.rpn.bbox_reg_weights', (1.0, 1.0, 0.0, 1.0)),
    ('model.rpn.bbox_reg_weights', (1.0, 1.0, 1.0)),
    ('model.rpn.bg_iou_thresh', 0.8),  # above rpn.fg_iou_thresh = 0.7
    ('model.roi.box_output_size', 0),
    ('model.roi.mask_output_size', 0),
    ('model.roi.canonical_level', 0),
    ('model.roi.canonical_scale', 0),
    ('model.roi.batch_size_per_image', 0),
    ('model.roi.bbox_reg_weights', (10.0, 10.0, 5.0, -5.0)),
    ('model.roi.smooth_l1_beta', NAN),
    ('model.roi.crowd_ioa_thresh', 1.1),
    ('model.box_head.fc_dim', 0),
    ('model.box_head.num_fc', 0),
    ('model.mask_head.conv_dim', 0),
    ('model.mask_head.num_convs', -1),
    ('model.roi.keypoint_output_size', 0),
    ('model.keypoint_head.conv_dim', 0),
    ('model.keypoint_head.num_convs', -1),
    ('model.keypoint_head.num_keypoints', (0, -17)),
    ('model.test.score_thresh', -0.1),
    ('model.test.detections_per_img', 0),
    ('model.test.min_box_size', -1.0),
    ('model.test.mask_thresh', 2.0),
    ('input.train_min_sizes', ()),
    ('input.train_min_sizes', (800, 0)),
    ('input.gt_mask_size', 0),
    ('input.hflip_prob', 1.5),
    ('input.batch_size', 0),
    ('input.batch_size', -2),
    ('input.num_workers', -1),
    ('input.prefetch', -1),
    ('data.shapes_num_train', 0),
    ('data.shapes_num_val', 0),
    ('data.shapes_size', 16),
    ('data.max_bad_images', -1),
    ('data.min_keypoints_per_image', -1),
    ('optim.base_lr', -0.02),
    ('optim.base_lr', 0.0),
    ('optim.base_lr', NAN),
    ('optim.base_lr', INF),
    ('optim.base_batch_size', 0),
    ('optim.momentum', 1.0),
    ('optim.momentum', -0.1),
    ('optim.weight_decay', -1e-4),
    ('optim.warmup_steps', -1),
    ('optim.warmup_factor', 1.5),
    ('optim.num_steps', 0),
    ('optim.decay_steps', (80_000, 60_000)),
    ('optim.decay_steps', (60_000, 60_000)),  # one dict key: one decay instead of two
    ('optim.decay_steps', (0,)),
    ('optim.decay_factor', 0.0),
    ('optim.grad_clip_norm', -1.0),
    ('run.log_every', 0),
    ('run.eval_every', -1),
    ('run.checkpoint_every', -1),
    ('run.keep_checkpoints', 0),
    ('run.keep_checkpoints', -1),
    ('run.num_eval_pictures', -1),
])
def test_out_of_range_numbers_name_the_field(field, value):
  config = maskrcnn_r50_fpn.get_config()
  _set(config, field, value)
  with pytest.raises(structures.ConfigError) as info:
    structures.validate_config(config)
  assert str(info.value).startswith(f'config.{field} = '), str(info.value)


@pytest.mark.parametrize('field,value', [
    ('input.num_workers', 0), ('input.prefetch', 0), ('run.checkpoint_every', 0),
    ('run.eval_every', 0), ('run.num_eval_pictures', 0), ('optim.grad_clip_norm', 0.0),
    ('optim.warmup_steps', 0), ('optim.momentum', 0.0), ('optim.weight_decay', 0.0),
    ('optim.decay_steps', ()), ('optim.decay_steps', (200_000,)),  # past num_steps: never hit
    ('model.rpn.smooth_l1_beta', 0.0), ('model.mask_head.num_convs', 0),
    ('model.test.score_thresh', 0.0), ('run.keep_checkpoints', 1), ('data.max_bad_images', 0),
])
def test_boundary_values_are_accepted(field, value):
  config = maskrcnn_r50_fpn.get_config()
  _set(config, field, value)
  structures.validate_config(config)


def test_every_numeric_range_names_an_existing_field():
  config = maskrcnn_r50_fpn.get_config()
  for field, kind, _ in structures.NUMERIC_RANGES:
    node = config
    for key in field.split('.'):
      node = node[key]
    assert isinstance(node, (tuple, list)) == kind.endswith('s'), field


# Numeric fields validated by rules of their own in validate_config (not by NUMERIC_RANGES).
_OWN_RULES = {
    'model.num_classes', 'model.backbone.depth', 'model.backbone.freeze_at',
    'model.fpn.min_level', 'model.fpn.max_level', 'model.anchors.aspect_ratios',
    'model.rpn.nms_thresh', 'model.rpn.fg_iou_thresh', 'model.rpn.bg_iou_thresh',
    'model.rpn.positive_fraction', 'model.roi.sampling_ratio', 'model.roi.min_level',
    'model.roi.max_level', 'model.roi.fg_iou_thresh', 'model.roi.bg_iou_thresh',
    'model.roi.positive_fraction', 'model.mask_head.resolution', 'model.test.nms_thresh',
    'model.keypoint_head.resolution',
    'input.min_size', 'input.max_size', 'input.pixel_mean', 'input.pixel_std', 'input.buckets',
    'input.max_instances', 'execution.mask_loss_chunk',
    # per-label nested sequences, () or one entry per label, checked with the keypoint data
    'data.keypoint_flip_map', 'data.keypoint_oks_sigmas',
}


def _numeric_fields(tree, prefix=''):
  for key, value in tree.items():
    field = f'{prefix}{key}'
    if isinstance(value, dict):
      yield from _numeric_fields(value, field + '.')
    elif isinstance(value, (int, float, tuple, list)) and not isinstance(value, bool):
      yield field


def test_every_numeric_field_has_a_range():
  """A numeric field added to the base config without a range fails here."""
  ranged = {field for field, _, _ in structures.NUMERIC_RANGES}
  fields = set(_numeric_fields(maskrcnn_r50_fpn.get_config().to_dict()))
  assert fields - ranged - _OWN_RULES == set()


def test_unknown_mode_rejected():
  with pytest.raises(ValueError, match='unknown config mode'):
    maskrcnn_r50_fpn.get_config('huge')


def test_choose_bucket_smallest_fitting():
  buckets = ((800, 1344), (1344, 800), (800, 800))
  assert structures.choose_bucket(800, 600, buckets) == (800, 800)
  assert structures.choose_bucket(600, 1066, buckets) == (800, 1344)
  assert structures.choose_bucket(1333, 800, buckets) == (1344, 800)
  with pytest.raises(ValueError, match='no size bucket'):
    structures.choose_bucket(1400, 1400, buckets)
