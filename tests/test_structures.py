"""Config validation names the bad field; bucket choice."""
import pytest

from configs import maskrcnn_r50_fpn, shapes
from maskrcnn_jax import structures


@pytest.mark.parametrize('get', [maskrcnn_r50_fpn.get_config, shapes.get_config])
@pytest.mark.parametrize('mode', ['', 'tiny'])
def test_shipped_configs_validate(get, mode):
  structures.validate_config(get(mode))


@pytest.mark.parametrize('field,value,message', [
    ('model.roi_op', 'bilinear', 'config.model.roi_op'),
    ('model.roi.sampling_ratio', 0, 'config.model.roi.sampling_ratio'),
    ('model.anchors.sizes', (32, 64, 128), 'config.model.anchors.sizes'),
    ('input.buckets', ((800, 1333),), 'config.input.buckets'),
    ('dtype', 'float16', 'config.dtype'),
    ('model.backbone.depth', 152, 'config.model.backbone.depth'),
    ('model.rpn.nms_thresh', 1.5, 'config.model.rpn.nms_thresh'),
    ('model.roi.box_loss', 'huber', 'config.model.roi.box_loss'),
])
def test_invalid_values_name_the_field(field, value, message):
  config = maskrcnn_r50_fpn.get_config()
  node = config
  *parents, leaf = field.split('.')
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(structures.ConfigError, match=message.replace('.', r'\.')):
    structures.validate_config(config)


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
