"""Conventions shared by every stage, and start-up validation of a config.

Conventions (stated once, used everywhere):

* Images are NHWC float32, already normalised by `config.input.pixel_mean/std`, in the channel
  order `config.input.channel_order`, zero-padded at the bottom/right to a size bucket.
* Boxes are `xyxy` float32 in absolute pixels of the resized, padded model input. Pixel corners
  are integer coordinates: a 1-pixel box is `[0, 0, 1, 1]` (torchvision, detectron2). COCO
  `xywh` is converted only in `maskrcnn_jax/data`; boxes go back to original-image pixels only in
  the Predictor and the evaluator.
* Every variable-length set (ground truth, proposals, sampled RoIs, detections) has a static
  maximum from the config and a boolean `valid` array (`True` = real). Padded slots may hold
  garbage; nothing downstream may depend on it.
* Labels: 0 is background, 1..K are classes; `config.model.num_classes == K + 1`.
* Shapes come from the config alone; the padded image size (a bucket) is the only thing that may
  trigger a new compile.
* Randomness comes from explicit `jax.random` keys; `config.seed` decides a run.

Batches (the dict the input pipeline yields and `train_step` consumes), B images, M = max_instances:

    images      float32 [B, H, W, 3]   normalised, padded
    image_size  int32   [B, 2]         (height, width) of the resized content inside the padding
    gt_boxes    float32 [B, M, 4]      xyxy, padded-input pixels
    gt_labels   int32   [B, M]         1..K
    gt_masks    uint8   [B, M, S, S]   each mask cropped to its gt box and resized to S=gt_mask_size
    gt_crowd    bool    [B, M]         crowd regions (never positives)
    gt_valid    bool    [B, M]
"""

from typing import Any, Sequence

import ml_collections

# torchvision's ImageNet statistics in 0..255 pixel units (RGB): the default normalisation and
# that of converted torchvision weights.
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

ROI_OPS = ('align', 'pool')
BACKBONE_DEPTHS = (18, 34, 50, 101, 'tiny')
DTYPES = ('float32', 'bfloat16')
DATA_SOURCES = ('coco', 'shapes')
SIZE_DIVISIBILITY = 32  # the coarsest backbone stride before P6; buckets must be multiples


class ConfigError(ValueError):
  """A config field holds an invalid value; the message names the field."""


def _fail(field: str, value: Any, why: str) -> None:
  raise ConfigError(f'config.{field} = {value!r}: {why}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the model and input depend on; raises ConfigError naming the field."""
  m = config.model
  if config.dtype not in DTYPES:
    _fail('dtype', config.dtype, f'expected one of {DTYPES}')
  if m.roi_op not in ROI_OPS:
    _fail('model.roi_op', m.roi_op, f'expected one of {ROI_OPS}')
  if int(m.roi.sampling_ratio) < 1:
    _fail('model.roi.sampling_ratio', m.roi.sampling_ratio,
          'must be >= 1 (a static sample grid; adaptive sampling (0) is approximated by '
          'choosing a fixed ratio)')
  if m.num_classes < 2:
    _fail('model.num_classes', m.num_classes, 'must count background plus at least one class')
  if m.backbone.depth not in BACKBONE_DEPTHS:
    _fail('model.backbone.depth', m.backbone.depth, f'expected one of {BACKBONE_DEPTHS}')
  if not 0 <= m.backbone.freeze_at <= 5:
    _fail('model.backbone.freeze_at', m.backbone.freeze_at, 'must be in [0, 5]')
  if (m.fpn.min_level, m.fpn.max_level) != (2, 6):
    _fail('model.fpn.min_level/max_level', (m.fpn.min_level, m.fpn.max_level),
          'only P2..P6 is implemented')
  num_levels = m.fpn.max_level - m.fpn.min_level + 1
  if len(m.anchors.sizes) != num_levels:
    _fail('model.anchors.sizes', tuple(m.anchors.sizes),
          f'needs one size per FPN level P{m.fpn.min_level}..P{m.fpn.max_level} '
          f'({num_levels} sizes)')
  if not m.anchors.aspect_ratios or any(r <= 0 for r in m.anchors.aspect_ratios):
    _fail('model.anchors.aspect_ratios', tuple(m.anchors.aspect_ratios), 'must be positive')
  if not (m.fpn.min_level <= m.roi.min_level <= m.roi.max_level < m.fpn.max_level + 1):
    _fail('model.roi.min_level/max_level', (m.roi.min_level, m.roi.max_level),
          'must lie within the FPN levels')
  if m.mask_head.resolution != 2 * m.roi.mask_output_size:
    _fail('model.mask_head.resolution', m.mask_head.resolution,
          'must be 2 x model.roi.mask_output_size (one 2x deconv)')
  for name in ('rpn.fg_iou_thresh', 'rpn.bg_iou_thresh', 'roi.fg_iou_thresh',
               'roi.bg_iou_thresh', 'rpn.nms_thresh', 'test.nms_thresh',
               'rpn.positive_fraction', 'roi.positive_fraction'):
    group, key = name.split('.')
    value = m[group][key]
    if not 0.0 <= value <= 1.0:
      _fail(f'model.{name}', value, 'must be in [0, 1]')
  for group in ('rpn', 'roi'):
    if m[group].box_loss not in ('smooth_l1', 'l1'):
      _fail(f'model.{group}.box_loss', m[group].box_loss, "expected 'smooth_l1' or 'l1'")
  _validate_input(config.input)
  _validate_execution(config.execution)


def _validate_execution(e: ml_collections.ConfigDict) -> None:
  from maskrcnn_jax import backends  # pylint: disable=g-import-not-at-top
  if e.backend not in backends.BACKENDS:
    _fail('execution.backend', e.backend, f'expected one of {backends.BACKENDS}')
  if int(e.mask_loss_chunk) < 0:
    _fail('execution.mask_loss_chunk', e.mask_loss_chunk,
          'must be >= 0 (0: the mask head runs on every foreground slot)')


def validate_data(config: ml_collections.ConfigDict, splits: Sequence[str]) -> None:
  """Checks that `config.data` names the files of `splits` ('train', 'val'); raises
  ConfigError naming the missing field (at start-up, before anything is built)."""
  d = config.data
  if d.source not in DATA_SOURCES:
    _fail('data.source', d.source, f'expected one of {DATA_SOURCES}')
  if d.source != 'coco':
    return
  for split in splits:
    for field in (f'{split}_json', f'{split}_images'):
      if not d[field]:
        _fail(f'data.{field}', d[field],
              "must be set for data.source='coco' (for example "
              f"--config.data.{field}=PATH); the built-in synthetic data is "
              "--config=configs/shapes.py")


def _validate_input(i: ml_collections.ConfigDict) -> None:
  if i.channel_order not in ('RGB', 'BGR'):
    _fail('input.channel_order', i.channel_order, "expected 'RGB' or 'BGR'")
  if len(i.pixel_mean) != 3 or len(i.pixel_std) != 3 or min(i.pixel_std) <= 0:
    _fail('input.pixel_mean/pixel_std', (i.pixel_mean, i.pixel_std),
          'need three values each and positive std')
  if not i.buckets:
    _fail('input.buckets', i.buckets, 'needs at least one (height, width) bucket')
  for b in i.buckets:
    if len(b) != 2 or any(int(s) <= 0 or int(s) % SIZE_DIVISIBILITY for s in b):
      _fail('input.buckets', tuple(map(tuple, i.buckets)),
            f'bucket {tuple(b)} must be a positive (height, width) divisible by '
            f'{SIZE_DIVISIBILITY}')
  if i.min_size <= 0 or i.max_size < i.min_size:
    _fail('input.min_size/max_size', (i.min_size, i.max_size), 'need 0 < min_size <= max_size')
  if i.max_instances < 1:
    _fail('input.max_instances', i.max_instances, 'must be >= 1')


def choose_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest-area bucket (h, w) that holds an image of `height x width`.

  Raises ValueError if none fits (the config's buckets must cover `min_size/max_size`).
  """
  fitting = [tuple(map(int, b)) for b in buckets if b[0] >= height and b[1] >= width]
  if not fitting:
    raise ValueError(f'no size bucket in {tuple(map(tuple, buckets))} holds a {height}x{width} '
                     'image; add one to config.input.buckets')
  return min(fitting, key=lambda b: (b[0] * b[1], b))
