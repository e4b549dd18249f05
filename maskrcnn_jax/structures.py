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
    gt_keypoints float32 [B, M, K, 3]  only with model.keypoint_on: (x, y, v) per keypoint,
                                       padded-input pixels, v the COCO visibility (0 = not
                                       labelled, then all zero); K = max of
                                       model.keypoint_head.num_keypoints, zeros past the
                                       instance's class's own count and in padded slots
"""

import math
import numbers
from typing import Any, Sequence

import ml_collections

from maskrcnn_jax import backends
from maskrcnn_jax.ops import masks as mask_ops

# torchvision's ImageNet statistics in 0..255 pixel units (RGB): the default normalisation and
# that of converted torchvision weights.
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

ROI_OPS = ('align', 'pool', 'warp')
WARP_REDUCES = ('max', 'avg')  # ops/roi_warp.py
BACKBONE_DEPTHS = (18, 34, 50, 101, 'tiny')
DTYPES = ('float32', 'bfloat16')
DATA_SOURCES = ('coco', 'shapes', 'shapes_keypoints', 'tfds')
BACKBONE_NORMS = ('frozen_bn', 'none')
MASK_PASTES = mask_ops.PASTE_MODES  # model.test.mask_paste
RPN_RANKS = ('probability', 'logit')  # model.rpn.rank_by
KEYPOINT_SCORES = ('logit', 'detectron2')  # model.test.keypoint_score
SIZE_DIVISIBILITY = 32  # the coarsest backbone stride before P6; buckets must be multiples


class ConfigError(ValueError):
  """A config field holds an invalid value; the message names the field."""


def _fail(field: str, value: Any, why: str) -> None:
  raise ConfigError(f'config.{field} = {value!r}: {why}')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the model and input depend on, and the range of every numeric field
  (`NUMERIC_RANGES`); raises ConfigError naming the field."""
  _validate_numbers(config)
  m = config.model
  if config.dtype not in DTYPES:
    _fail('dtype', config.dtype, f'expected one of {DTYPES}')
  if m.roi_op not in ROI_OPS:
    _fail('model.roi_op', m.roi_op, f'expected one of {ROI_OPS}')
  if int(m.roi.sampling_ratio) != m.roi.sampling_ratio or m.roi.sampling_ratio < 0:
    _fail('model.roi.sampling_ratio', m.roi.sampling_ratio,
          'must be an int >= 1 (a fixed sample grid) or 0 (adaptive, ceil(RoI side / output '
          'size) per RoI, capped at model.roi.max_sampling_ratio)')
  if m.roi_op == 'warp' and m.roi.sampling_ratio < 1:
    _fail('model.roi.sampling_ratio', m.roi.sampling_ratio,
          "must be >= 1 with model.roi_op='warp' (samples per quantised bin and axis)")
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
  pool_level = m.roi.get('pool_level', 0)
  if pool_level != 0 and not m.fpn.min_level <= pool_level <= m.fpn.max_level:
    _fail('model.roi.pool_level', pool_level,
          f'must be 0 (FPN level assignment) or a level in {m.fpn.min_level}..{m.fpn.max_level}')
  if m.roi.get('warp_reduce', 'max') not in WARP_REDUCES:
    _fail('model.roi.warp_reduce', m.roi.warp_reduce, f'expected one of {WARP_REDUCES}')
  if m.get('keypoint_on', False):
    _validate_keypoints(m)
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
    if m[group].bg_iou_thresh > m[group].fg_iou_thresh:
      _fail(f'model.{group}.bg_iou_thresh', m[group].bg_iou_thresh,
            f'must be <= model.{group}.fg_iou_thresh ({m[group].fg_iou_thresh})')
  if m.backbone.norm not in BACKBONE_NORMS:
    _fail('model.backbone.norm', m.backbone.norm, f'expected one of {BACKBONE_NORMS}')
  if m.rpn.get('rank_by', 'probability') not in RPN_RANKS:
    _fail('model.rpn.rank_by', m.rpn.rank_by, f'expected one of {RPN_RANKS}')
  if m.test.get('mask_paste', 'torchvision') not in MASK_PASTES:
    _fail('model.test.mask_paste', m.test.mask_paste, f'expected one of {MASK_PASTES}')
  _validate_input(config.input)
  _validate_execution(config.execution)


def _validate_keypoints(m: ml_collections.ConfigDict) -> None:
  k = m.keypoint_head
  counts = tuple(k.num_keypoints)
  if len(counts) != m.num_classes or counts[0] != 0 or max(counts, default=0) < 1 or \
      min(counts) < 0:
    _fail('model.keypoint_head.num_keypoints', counts,
          f'needs one count per label ({m.num_classes}: background first, 0), at least one > 0')
  if k.resolution != 4 * m.roi.keypoint_output_size:
    _fail('model.keypoint_head.resolution', k.resolution,
          'must be 4 x model.roi.keypoint_output_size (a 2x deconv, then 2x bilinear)')
  if k.loss_normalizer not in ('visible', 'fixed'):
    _fail('model.keypoint_head.loss_normalizer', k.loss_normalizer,
          "expected 'visible' or 'fixed'")
  if m.test.get('keypoint_score', 'logit') not in KEYPOINT_SCORES:
    _fail('model.test.keypoint_score', m.test.keypoint_score, f'expected one of {KEYPOINT_SCORES}')


def _validate_execution(e: ml_collections.ConfigDict) -> None:
  if e.backend not in backends.BACKENDS:
    _fail('execution.backend', e.backend, f'expected one of {backends.BACKENDS}')
  if int(e.mask_loss_chunk) < 0:
    _fail('execution.mask_loss_chunk', e.mask_loss_chunk,
          'must be >= 0 (0: the mask head runs on every foreground slot)')


# The range of every numeric field, checked at start-up so that a bad value stops the run naming
# the field, instead of failing later (inside grain, as a ZeroDivisionError, as a NaN loss hours
# in, or by "evaluating" untrained weights). Each entry is (field, kind, interval): kind 'int' or
# 'float' for one value, 'ints' or 'floats' for a sequence whose every element must lie in the
# interval; an interval is written with brackets, 'inf' unbounded. Floats must be finite. Fields
# with a rule of their own (num_classes, freeze_at, FPN/RoI levels, IoU thresholds, min/max
# size, max_instances, head resolutions, mask_loss_chunk) are checked by validate_config and its
# helpers.
NUMERIC_RANGES = (
    ('seed', 'int', '[0, inf)'),
    # ---- model
    ('model.backbone.width', 'int', '[1, inf)'),
    ('model.backbone.bn_eps', 'float', '(0, inf)'),
    ('model.fpn.channels', 'int', '[1, inf)'),
    ('model.anchors.sizes', 'floats', '(0, inf)'),
    ('model.anchors.offset', 'float', '[0, 1)'),  # in units of the stride
    ('model.rpn.pre_nms_topk_train', 'int', '[1, inf)'),
    ('model.rpn.pre_nms_topk_test', 'int', '[1, inf)'),
    ('model.rpn.post_nms_topk_train', 'int', '[1, inf)'),
    ('model.rpn.post_nms_topk_test', 'int', '[1, inf)'),
    ('model.rpn.min_size', 'float', '[0, inf)'),
    ('model.rpn.score_thresh', 'float', '[0, 1]'),
    ('model.rpn.batch_size_per_image', 'int', '[1, inf)'),
    ('model.rpn.smooth_l1_beta', 'float', '[0, inf)'),  # 0 is plain L1
    ('model.rpn.bbox_reg_weights', 'floats', '(0, inf)'),  # deltas are divided by them
    ('model.roi.box_output_size', 'int', '[1, inf)'),
    ('model.roi.mask_output_size', 'int', '[1, inf)'),
    ('model.roi.canonical_level', 'int', '[1, inf)'),
    ('model.roi.canonical_scale', 'float', '(0, inf)'),
    ('model.roi.batch_size_per_image', 'int', '[1, inf)'),
    ('model.roi.bbox_reg_weights', 'floats', '(0, inf)'),
    ('model.roi.smooth_l1_beta', 'float', '[0, inf)'),
    ('model.roi.crowd_ioa_thresh', 'float', '[0, 1]'),
    ('model.box_head.fc_dim', 'int', '[1, inf)'),
    ('model.box_head.num_fc', 'int', '[1, inf)'),  # the box predictor reads an fc's output
    ('model.mask_head.conv_dim', 'int', '[1, inf)'),
    ('model.mask_head.num_convs', 'int', '[0, inf)'),
    ('model.roi.keypoint_output_size', 'int', '[1, inf)'),
    ('model.roi.pool_level', 'int', '[0, inf)'),  # and 0 or an FPN level (validate_config)
    ('model.roi.max_sampling_ratio', 'int', '[1, 16]'),  # sampling_ratio=0's cap
    ('model.keypoint_head.conv_dim', 'int', '[1, inf)'),
    ('model.keypoint_head.num_convs', 'int', '[0, inf)'),
    ('model.keypoint_head.num_keypoints', 'ints', '[0, inf)'),
    ('model.test.score_thresh', 'float', '[0, 1]'),
    ('model.test.detections_per_img', 'int', '[1, inf)'),
    ('model.test.min_box_size', 'float', '[0, inf)'),
    ('model.test.mask_thresh', 'float', '[0, 1]'),
    # ---- input
    ('input.train_min_sizes', 'ints', '[1, inf)'),
    ('input.gt_mask_size', 'int', '[1, inf)'),
    ('input.hflip_prob', 'float', '[0, 1]'),
    ('input.batch_size', 'int', '[1, inf)'),
    ('input.num_workers', 'int', '[0, inf)'),  # 0: load in the training process
    ('input.prefetch', 'int', '[0, inf)'),
    # ---- data
    ('data.shapes_num_train', 'int', '[1, inf)'),
    ('data.shapes_num_val', 'int', '[1, inf)'),
    ('data.shapes_size', 'int', f'[{SIZE_DIVISIBILITY}, inf)'),  # one cell of the coarsest stride
    ('data.max_bad_images', 'int', '[0, inf)'),
    ('data.min_keypoints_per_image', 'int', '[0, inf)'),  # 0: off
    ('data.min_keypoints_per_image', 'int', '[0, inf)'),  # 0: no filter
    ('data.keypoint_offset', 'float', '[0, 1)'),  # 0 (torchvision) or 0.5 (detectron2)
    # ---- optim
    ('optim.base_lr', 'float', '(0, inf)'),
    ('optim.base_batch_size', 'int', '[1, inf)'),
    ('optim.momentum', 'float', '[0, 1)'),
    ('optim.weight_decay', 'float', '[0, inf)'),
    ('optim.warmup_steps', 'int', '[0, inf)'),
    ('optim.warmup_factor', 'float', '[0, 1]'),
    ('optim.num_steps', 'int', '[1, inf)'),  # 0 would "evaluate" the initial weights
    ('optim.decay_steps', 'ints', '[1, inf)'),
    ('optim.decay_factor', 'float', '(0, 1]'),
    ('optim.grad_clip_norm', 'float', '[0, inf)'),  # 0 disables clipping
    # ---- run
    ('run.log_every', 'int', '[1, inf)'),
    ('run.eval_every', 'int', '[0, inf)'),  # 0: no periodic evaluation
    ('run.checkpoint_every', 'int', '[0, inf)'),  # 0: only at the end (and on SIGTERM)
    ('run.keep_checkpoints', 'int', '[1, inf)'),  # orbax deletes every checkpoint at 0
    ('run.num_eval_pictures', 'int', '[0, inf)'),
    ('run.num_processes', 'int', '[0, inf)'),  # 0: from the environment or the cluster
    ('run.process_id', 'int', '[-1, inf)'),  # -1: from the environment or the cluster
    ('run.distributed_timeout_s', 'int', '[1, inf)'),
)


def _parse_interval(text: str) -> tuple[float, bool, float, bool]:
  """'[0, 1)' -> (0.0, True, 1.0, False): low, low included, high, high included."""
  low, high = text[1:-1].split(',')
  return float(low), text[0] == '[', float(high), text[-1] == ']'


def _within(value: Any, kind: str, interval: str) -> bool:
  if isinstance(value, bool):  # a bool is an int to Python, never a count or a rate here
    return False
  if kind.startswith('int'):
    if not isinstance(value, numbers.Integral):
      return False
  elif not isinstance(value, numbers.Real) or not math.isfinite(value):
    return False
  low, low_in, high, high_in = _parse_interval(interval)
  # Written so that NaN fails every comparison.
  return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def _range_text(kind: str, interval: str) -> str:
  low, low_in, high, _ = _parse_interval(interval)
  what = 'an integer' if kind.startswith('int') else 'a finite number'
  if kind.endswith('s'):
    what = 'a sequence of ' + ('integers' if kind == 'ints' else 'finite numbers')
  if math.isinf(high):
    return f'must be {what} {">=" if low_in else ">"} {low:g}'
  return f'must be {what} in {interval}'


def _lookup(config: ml_collections.ConfigDict, field: str) -> tuple[bool, Any]:
  node = config
  for key in field.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      return False, None
    node = node[key]
  return True, node


def _validate_numbers(config: ml_collections.ConfigDict) -> None:
  """Checks `NUMERIC_RANGES` and the cross-field rules of the schedule and the sequences.

  A field a config does not have is skipped: an inference-only config may omit training
  sections, and the rules of the fields it has still hold."""
  for field, kind, interval in NUMERIC_RANGES:
    present, value = _lookup(config, field)
    if not present:
      continue
    if kind.endswith('s'):
      ok = (isinstance(value, (list, tuple))
            and all(_within(v, kind[:-1], interval) for v in value))
    else:
      ok = _within(value, kind, interval)
    if not ok:
      _fail(field, value, _range_text(kind, interval))
  for group in ('rpn', 'roi'):
    present, weights = _lookup(config, f'model.{group}.bbox_reg_weights')
    if present and len(weights) != 4:
      _fail(f'model.{group}.bbox_reg_weights', weights, 'needs 4 weights (x, y, w, h)')
  present, sizes = _lookup(config, 'input.train_min_sizes')
  if present and not sizes:
    _fail('input.train_min_sizes', sizes, 'needs at least one size (one is drawn per image)')
  present, decay = _lookup(config, 'optim.decay_steps')
  # Strictly increasing: a repeated step would be one dict key, so one decay instead of two.
  # A step past optim.num_steps is allowed (a short run of a longer schedule never reaches it).
  if present and any(b <= a for a, b in zip(decay, decay[1:])):
    _fail('optim.decay_steps', decay, 'must be strictly increasing')


def validate_data(config: ml_collections.ConfigDict, splits: Sequence[str]) -> None:
  """Checks that `config.data` names the files of `splits` ('train', 'val'); raises
  ConfigError naming the missing field (at start-up, before anything is built)."""
  d = config.data
  if d.source not in DATA_SOURCES:
    _fail('data.source', d.source, f'expected one of {DATA_SOURCES}')
  if d.source == 'tfds':
    if d.get('keypoint_offset', 0.0) and config.model.get('keypoint_on', False):
      _fail('data.keypoint_offset', d.keypoint_offset,
            "is applied when a COCO JSON is read; data.source='tfds' records do not get it yet "
            '(evaluation would still subtract it): use data.source=coco or keypoint_offset=0')
    _validate_tfds(d, splits)
  if d.source != 'coco':
    return
  for split in splits:
    for field in (f'{split}_json', f'{split}_images'):
      if not d[field]:
        _fail(f'data.{field}', d[field],
              "must be set for data.source='coco' (for example "
              f"--config.data.{field}=PATH); the built-in synthetic data is "
              "--config=configs/shapes.py")


def _validate_tfds(d: ml_collections.ConfigDict, splits: Sequence[str]) -> None:
  """data.source='tfds': the name and split fields are set."""
  for field in ('tfds_name',) + tuple(f'tfds_{split}_split' for split in splits):
    if not isinstance(d.get(field), str) or not d.get(field):
      _fail(f'data.{field}', d.get(field),
            "must be set for data.source='tfds' (see configs/maskrcnn_r50_fpn.py and "
            'docs/tfds.md)')
  # That the dataset is built is the data stage's check (`pipeline.check_built`).


def _validate_input(i: ml_collections.ConfigDict) -> None:
  if i.channel_order not in ('RGB', 'BGR'):
    _fail('input.channel_order', i.channel_order, "expected 'RGB' or 'BGR'")
  if i.get('resize', 'torchvision') not in ('torchvision', 'detectron2'):
    _fail('input.resize', i.resize, "expected 'torchvision' or 'detectron2'")
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
