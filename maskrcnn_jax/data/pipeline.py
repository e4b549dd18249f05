"""The input pipeline: records -> resized, flipped, normalised, bucket-padded batches (grain).

Training batches follow `maskrcnn_jax/structures.py` exactly. How they are formed:

* A batch PLAN is computed from image sizes alone (the JSON's height/width), before any pixel
  is decoded: for epoch e a generator seeded by (config.seed, e) shuffles all training records
  and draws, per image, a shortest-side size from `input.train_min_sizes` and a horizontal flip
  (probability `input.hflip_prob`). The resized size (torchvision rule, `max_size` cap) picks the
  smallest configured bucket that holds it (structures.choose_bucket). Walking the shuffled order,
  images go into a per-bucket buffer and a GLOBAL batch is emitted whenever a buffer holds
  `input.batch_size` images, so every batch is homogeneous in bucket; what is left in the buffers
  at the end of an epoch is carried into the next epoch's buffers (nothing is dropped). Batch k
  of the infinite stream is epoch e's batch j, found from cached per-epoch counts.
* Every host computes the same plan, so all hosts agree on each step's bucket, and host p
  decodes only its slice [p*b, (p+1)*b) of each global batch (b = batch_size / process_count).
* Loading a batch is a grain `MapDataset` map over batch indices; `input.num_workers > 0` runs it
  in that many spawned worker processes (grain mp_prefetch, order preserved), 0 in this process
  with a one-thread prefetch of `input.prefetch` batches.
* The iterator state is `{'next_batch': k, ...}` (JSON); restoring it rebuilds the pipeline at
  batch k, so a resumed run sees the same next batch whatever the worker count.

Per image: decode -> normalise -> resize (bilinear, torchvision) -> flip -> pad to the bucket
(`transforms.prepare_image`, shared with the Predictor);
boxes scaled/flipped alike; instances padded to `input.max_instances` with `gt_valid`; masks are
decoded as pycocotools annToMask, nearest-resized as torchvision does, flipped, then cropped to
their gt box at S = `input.gt_mask_size` (transforms.crop_and_resize_masks, uint8 0/1), all in
one gather so full-size resized masks are never built.

Keypoints (`model.keypoint_on`): records are read with their keypoints; each instance's follow
the resize (torchvision `resize_keypoints`) and the flip (x' = W - x, then the permutation of
its class's flip map, so a left wrist becomes the right one), v == 0 keypoints are all zeros,
and the batch gains `gt_keypoints` float32 [M, K_max, 3] (K_max of
`model.keypoint_head.num_keypoints`). At start-up the dataset's per-label keypoint counts must
equal the config's, images with fewer than `data.min_keypoints_per_image` labelled keypoints
leave the training set, and a training set without a single labelled keypoint inside its
instance's box is refused (`check_keypoints_in_boxes`).
"""

import collections
import dataclasses
import logging
import threading
from typing import Any, Iterator, Optional, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import shapes
from maskrcnn_jax.data import shapes_keypoints
from maskrcnn_jax.data import transforms

log = logging.getLogger(__name__)

SHAPES_SEED = 0  # the synthetic dataset is fixed; config.seed only changes the training order
STATE_VERSION = 1
PLAN_LENGTH = 2**62  # the training stream is infinite; grain needs a length
_EPOCH_CACHE = 4
BATCH_KEYS = ('images', 'image_size', 'gt_boxes', 'gt_labels', 'gt_masks', 'gt_crowd',
              'gt_valid')
KEYPOINT_BATCH_KEYS = ('gt_keypoints',)  # batches carry them only with model.keypoint_on
PERSON_NUM_KEYPOINTS = 17  # COCO person; a set of this size may use COCO's OKS sigmas


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The keys of a training batch under `config`: BATCH_KEYS, plus KEYPOINT_BATCH_KEYS with
  `model.keypoint_on`."""
  return BATCH_KEYS + (KEYPOINT_BATCH_KEYS if keypoints_on(config) else ())


# -------------------------------------------------------------------------------- keypoints
def _fail(field: str, value: Any, why: str) -> None:
  raise structures.ConfigError(f'config.{field} = {value!r}: {why}')


def check_built(config: ml_collections.ConfigDict, splits: Sequence[str]) -> None:
  """data.source='tfds': the dataset is built with the configured splits (read from its
  metadata only, so this is cheap; run at start-up after `structures.validate_data`). Raises
  ConfigError naming the field."""
  d = config.data
  if d.source != 'tfds':
    return
  # Imported here: tensorflow-datasets is needed only by this source.
  from maskrcnn_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  data_dir = d.get('tfds_data_dir') or None
  for field in ('tfds_name',) + tuple(f'tfds_{split}_split' for split in splits):
    try:
      tfds_builder.check_built(d.tfds_name, [] if field == 'tfds_name' else [d[field]], data_dir)
    except tfds_builder.TfdsNotFoundError as e:
      _fail(f'data.{field}', d[field], f'{e} (config.data.tfds_data_dir = {data_dir!r})')


def keypoints_on(config: ml_collections.ConfigDict) -> bool:
  """`model.keypoint_on`, False for configs that predate the field."""
  return bool(config.model.get('keypoint_on', False))


def config_num_keypoints(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`model.keypoint_head.num_keypoints`: K_c per label, index 0 (background) 0; raises
  ConfigError naming the field when it is missing or not one count per label."""
  field = 'model.keypoint_head.num_keypoints'
  head = config.model.get('keypoint_head')
  counts = head.get('num_keypoints') if head is not None else None
  if counts is None:
    _fail(field, None, 'must be set with model.keypoint_on')
  counts = tuple(counts)
  if (len(counts) != config.model.num_classes
      or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in counts)
      or counts[0] != 0):
    _fail(field, counts, f'needs one count >= 0 per label ({config.model.num_classes} '
          'with background first, which has 0)')
  return counts


def _per_label_field(config, field: str, counts: Sequence[int], what: str, check
                     ) -> tuple[tuple, ...]:
  """A per-label tuple field of `config.data` (empty: () for every label), checked entry by
  entry: an entry is () or holds K_c values of which `check(entry, k_c)` returns a complaint or
  None. Raises ConfigError naming `data.<field>`."""
  value = tuple(config.data.get(field, ()) or ())
  if not value:
    return ((),) * len(counts)
  if len(value) != len(counts):
    _fail(f'data.{field}', value, f'needs one entry per label ({len(counts)}, '
          f'background first), each () or {what}')
  out = []
  for label, (entry, k_c) in enumerate(zip(value, counts)):
    entry = tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)
    if entry and (len(entry) != k_c or check(entry, k_c)):
      why = check(entry, k_c) if len(entry) == k_c else f'has {len(entry)} values'
      _fail(f'data.{field}', value, f'entry {label} {entry} {why}; label {label} has {k_c} '
            f'keypoints, so it needs () or {what} of length {k_c}')
    out.append(entry)
  return tuple(out)


def _flip_map_problem(entry, k_c) -> Optional[str]:
  if sorted(entry) != list(range(k_c)):
    return 'is not a permutation of 0..K_c-1'
  if any(entry[entry[k]] != k for k in range(k_c)):
    return 'is not its own inverse (flipping twice must give the keypoints back)'
  return None


def keypoint_flip_maps(config: ml_collections.ConfigDict, label_map: coco.LabelMap
                       ) -> coco.LabelMap:
  """`label_map` with `data.keypoint_flip_map` applied.

  The field's format: () (the default) keeps the maps derived from the keypoint names
  (`coco.flip_map_from_names`: left_* <-> right_*); otherwise one entry per label, background
  first (the layout of `model.keypoint_head.num_keypoints`), each () to keep that label's
  derived map or a permutation of 0..K_c-1 giving each keypoint's mirror, its own inverse, e.g.
  ((), (0, 2, 1)) for a class whose keypoints are (apex, left, right).
  """
  counts = label_map.num_keypoints + (0,) * (config.model.num_classes - label_map.num_classes)
  override = _per_label_field(config, 'keypoint_flip_map', counts,
                              'a permutation (its own inverse)', _flip_map_problem)
  maps = [o if o else derived for o, derived in zip(override[1:], label_map.keypoint_flip_map)]
  return label_map.with_flip_maps(maps)


def _sigmas_problem(entry, k_c) -> Optional[str]:
  del k_c
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
             and np.isfinite(v) for v in entry):
    return 'holds a value that is not a positive finite number'
  return None


def keypoint_oks_sigmas(config: ml_collections.ConfigDict, num_keypoints: Sequence[int]
                        ) -> tuple[tuple[float, ...], ...]:
  """`data.keypoint_oks_sigmas` checked against the per-label counts `num_keypoints` (index 0
  background): one tuple per label, () where the label has no keypoints or takes COCO's person
  sigmas (allowed only for a 17-keypoint set). Raises ConfigError naming the field.

  The field's format: () (the default: every set is COCO's 17 person keypoints), or one entry
  per label, background first, each () or K_c positive OKS sigmas (pycocotools'
  `kpt_oks_sigmas` of that category).
  """
  sigmas = _per_label_field(config, 'keypoint_oks_sigmas', num_keypoints,
                            'K_c positive OKS sigmas', _sigmas_problem)
  for label, (entry, k_c) in enumerate(zip(sigmas, num_keypoints)):
    if k_c and not entry and k_c != PERSON_NUM_KEYPOINTS:
      _fail('data.keypoint_oks_sigmas', tuple(config.data.get('keypoint_oks_sigmas', ())),
            f'label {label} has {k_c} keypoints; COCO\'s sigmas fit only a '
            f'{PERSON_NUM_KEYPOINTS}-keypoint set, so give its {k_c} sigmas')
  return tuple(tuple(float(v) for v in e) for e in sigmas)


def check_keypoint_config(config: ml_collections.ConfigDict, label_map: coco.LabelMap
                          ) -> coco.LabelMap:
  """The start-up checks of a keypoint run against its training label map; returns the map
  with `data.keypoint_flip_map` applied (what the pipeline flips with and checkpoints store).

  Raises ConfigError naming the field: the config's per-label keypoint counts differ from the
  categories' sets, or `data.keypoint_flip_map` / `data.keypoint_oks_sigmas` is malformed.
  """
  counts = config_num_keypoints(config)
  if not label_map.has_keypoints:
    raise ValueError('model.keypoint_on needs the keypoint sets of the dataset\'s categories, but '
                     'its label map has none (read it with load_coco(..., with_keypoints=True))')
  dataset = label_map.num_keypoints + (0,) * (len(counts) - label_map.num_classes)
  if dataset != counts:
    _fail('model.keypoint_head.num_keypoints', counts,
          f'the dataset\'s categories declare {dataset} keypoints per label (background '
          f'first; names {[list(n) for n in label_map.keypoint_names]})')
  keypoint_oks_sigmas(config, counts)
  return keypoint_flip_maps(config, label_map)


def count_labelled_keypoints(record: dict[str, Any]) -> int:
  """Labelled (v > 0) keypoints of a record, crowd instances included (as torchvision counts
  them in `_coco_remove_images_without_annotations`)."""
  return int((np.asarray(record['keypoints'])[..., 2] > 0).sum())


def filter_min_keypoints(records: Sequence[dict[str, Any]], min_keypoints: int
                         ) -> list[dict[str, Any]]:
  """The records with at least `min_keypoints` labelled keypoints (all when it is 0); logs how
  many were dropped. torchvision's references keep person images with >= 10
  (`coco_utils._coco_remove_images_without_annotations`), detectron2 with >= 1
  (`DATALOADER.MIN_KEYPOINTS_PER_IMAGE`)."""
  if min_keypoints <= 0:
    return list(records)
  kept = [r for r in records if count_labelled_keypoints(r) >= min_keypoints]
  if len(kept) < len(records):
    log.info('training drops %d of %d images with fewer than %d labelled keypoints '
             '(config.data.min_keypoints_per_image)', len(records) - len(kept), len(records),
             min_keypoints)
  if not kept:
    raise ValueError(f'no training image has config.data.min_keypoints_per_image = '
                     f'{min_keypoints} labelled keypoints (v > 0); lower it')
  return kept


def check_keypoints_in_boxes(records: Sequence[dict[str, Any]]) -> float:
  """The fraction of the labelled (v > 0) keypoints of non-crowd training instances that lie
  in their instance's box (x1 <= x <= x2, y1 <= y <= y2: the keypoints torchvision's
  `keypoints_to_heatmap` can train on); the rest are logged.

  Raises:
    ValueError: none does. torchvision's keypoint loss then silently becomes -0 and nothing is
      learnt (torchvision issue 2125), so the run stops at start-up instead.
  """
  labelled = inside = 0
  for r in records:
    kps = np.asarray(r['keypoints'], np.float32)[~np.asarray(r['crowd'], bool)]
    boxes = np.asarray(r['boxes'], np.float32)[~np.asarray(r['crowd'], bool)]
    if not kps.size:
      continue
    on = kps[..., 2] > 0
    x, y = kps[..., 0], kps[..., 1]
    within = ((x >= boxes[:, None, 0]) & (x <= boxes[:, None, 2]) & (y >= boxes[:, None, 1])
              & (y <= boxes[:, None, 3]))
    labelled += int(on.sum())
    inside += int((on & within).sum())
  if not inside:
    what = ('no labelled keypoint (v > 0)' if not labelled else
            f'none of its {labelled} labelled keypoints inside its instance\'s box')
    raise ValueError(
        f'model.keypoint_on: the training set ({len(records)} images) has {what}, so the keypoint '
        'loss would be 0 and nothing learnt (torchvision issue 2125). Check that the keypoints '
        'are in the same original-image pixels as the boxes, or train with '
        'model.keypoint_on=False')
  if inside < labelled:
    log.warning('%d of %d labelled training keypoints (%.1f%%) lie outside their instance\'s '
                'box and do not train the keypoint head', labelled - inside, labelled,
                100.0 * (labelled - inside) / labelled)
  return inside / labelled


# ---------------------------------------------------------------------------------- records
def load_dataset_records(config: ml_collections.ConfigDict, split: str, *,
                         label_map: Optional[coco.LabelMap] = None) -> coco.CocoDataset:
  """Records of a split ('train' | 'val') of `config.data.source` ('shapes' |
  'shapes_keypoints' | 'coco' | 'tfds').

  'shapes' and 'shapes_keypoints' generate their synthetic dataset at config.data.root if it is
  not there yet (config.data.shapes_num_train/num_val/size). 'coco' reads
  config.data.{train,val}_json and {train,val}_images. 'tfds' reads the split
  config.data.tfds_{train,val}_split of the built dataset config.data.tfds_name in
  config.data.tfds_data_dir (`tfds_builder.load_tfds`: the same records, images decoded only
  when loaded, ground truth rebuilt from the records). Training records are capped at
  input.max_instances per image. Box-only annotations are accepted only when model.mask_on is
  False (coco.load_coco require_masks); keypoints are read with model.keypoint_on.
  """
  if split not in ('train', 'val'):
    raise ValueError(f"split {split!r}: expected 'train' or 'val'")
  d = config.data
  max_instances = config.input.max_instances if split == 'train' else None
  if label_map is None and d.get('label_space', 'contiguous') == 'category_id':
    # torchvision's COCO models use the raw category id as the label (91 classes).
    label_map = coco.LabelMap(tuple(range(1, config.model.num_classes)),
                              tuple(f'category_{i}' for i in range(1, config.model.num_classes)))
  if d.source == 'tfds':
    ds = _load_tfds_records(config, split, label_map, max_instances)
    where = f'TFDS dataset {d.tfds_name!r}'
  else:
    json_path, image_dir = _json_and_images(config, split)
    ds = coco.load_coco(json_path, image_dir, label_map=label_map, max_instances=max_instances,
                        require_masks=bool(config.model.mask_on),
                        with_keypoints=keypoints_on(config),
                        keypoint_offset=float(d.get('keypoint_offset', 0.0)))
    where = json_path
  if ds.label_map.num_classes > config.model.num_classes:
    raise ValueError(f'{where} has {len(ds.label_map.category_ids)} categories but '
                     f'config.model.num_classes = {config.model.num_classes} (needs K + 1 = '
                     f'{ds.label_map.num_classes})')
  return ds


def _load_tfds_records(config: ml_collections.ConfigDict, split: str,
                       label_map: Optional[coco.LabelMap], max_instances: Optional[int]
                       ) -> coco.CocoDataset:
  """data.source='tfds': `tfds_builder.load_tfds` of the configured dataset and split; a
  missing dataset or split is one error naming the config fields."""
  d = config.data
  split_field = f'tfds_{split}_split'
  try:
    # Imported here: tensorflow-datasets is needed only by this source.
    from maskrcnn_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("config.data.source='tfds' needs tensorflow-datasets and array-record: "
                      "pip install -e '.[tfds]'") from e
  try:
    return tfds_builder.load_tfds(d.tfds_name, d[split_field], d.tfds_data_dir or None,
                                  label_map=label_map, max_instances=max_instances,
                                  require_masks=bool(config.model.mask_on),
                                  with_keypoints=keypoints_on(config),
                                  keypoint_offset=float(d.get('keypoint_offset', 0.0)))
  except tfds_builder.TfdsNotFoundError as e:
    raise tfds_builder.TfdsNotFoundError(
        f'config.data.tfds_name = {d.tfds_name!r}, config.data.{split_field} = '
        f'{d[split_field]!r}, config.data.tfds_data_dir = {d.tfds_data_dir!r}: {e}') from None


def _json_and_images(config: ml_collections.ConfigDict, split: str) -> tuple[str, str]:
  """The instances JSON and image folder of a JSON-backed source's split."""
  d = config.data
  if d.source == 'shapes':
    root = shapes.ensure_shapes_dataset(d.root, d.shapes_num_train, d.shapes_num_val,
                                        d.shapes_size, SHAPES_SEED)
    json_path, image_dir = f'{root}/instances_{split}.json', root
  elif d.source == 'shapes_keypoints':
    root = shapes_keypoints.ensure_dataset(d.root, d.shapes_num_train, d.shapes_num_val,
                                           d.shapes_size, SHAPES_SEED)
    json_path, image_dir = f'{root}/instances_{split}.json', root
  elif d.source == 'coco':
    json_path, image_dir = d[f'{split}_json'], d[f'{split}_images']
    if not json_path or not image_dir:
      raise ValueError(f'config.data.{split}_json and config.data.{split}_images must be set for '
                       "config.data.source='coco'")
  else:
    raise ValueError(f"config.data.source={d.source!r}: this reader handles 'shapes', "
                     "'shapes_keypoints', 'coco' and 'tfds'")
  return json_path, image_dir


def _has_training_instance(record: dict[str, Any]) -> bool:
  return bool((~record['crowd']).any())


# ----------------------------------------------------------------------------- per image
@dataclasses.dataclass(frozen=True)
class _InputSpec:
  """The config fields one image's preprocessing needs (small and picklable)."""
  max_size: int
  channel_order: str
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]
  buckets: tuple[tuple[int, int], ...]
  max_instances: int
  gt_mask_size: int
  num_keypoints: int = 0  # K_max of gt_keypoints; 0: keypoints off
  # Per label (index 0 background), the flip map padded with identity to num_keypoints.
  keypoint_flip: tuple[tuple[int, ...], ...] = ()
  resize: str = 'torchvision'  # input.resize: whose resize (transforms.RESIZES)

  @classmethod
  def from_config(cls, config, label_map: Optional[coco.LabelMap] = None):
    """With `model.keypoint_on`, `label_map` (the training map, `check_keypoint_config`'s
    result) gives the flip maps."""
    i = config.input
    num_keypoints, flips = 0, ()
    if keypoints_on(config):
      num_keypoints = max(config_num_keypoints(config))
      if label_map is None or not label_map.has_keypoints:
        raise ValueError('model.keypoint_on: the input pipeline needs the dataset\'s label map '
                         'with its keypoint sets (their flip maps)')
      maps = [()] + list(label_map.keypoint_flip_map)
      maps += [()] * (config.model.num_classes - len(maps))
      flips = tuple(tuple(m) + tuple(range(len(m), num_keypoints)) for m in maps)
    return cls(int(i.max_size), str(i.channel_order), tuple(map(float, i.pixel_mean)),
               tuple(map(float, i.pixel_std)), tuple(tuple(map(int, b)) for b in i.buckets),
               int(i.max_instances), int(i.gt_mask_size), num_keypoints, flips,
               resize=str(i.get('resize', 'torchvision')))


def preprocess_image(image: np.ndarray, min_size: int, flip: bool, spec: _InputSpec):
  """uint8 [h, w, 3] -> (float32 [Hb, Wb, 3] normalised padded image, (new_h, new_w)), by
  `transforms.prepare_image`, the Predictor's path too."""
  x, new_hw, _ = transforms.prepare_image(image, min_size, spec.max_size, spec.pixel_mean,
                                          spec.pixel_std, spec.channel_order, spec.buckets, flip,
                                          resize=spec.resize)
  return x, new_hw


def process_train_example(record: dict[str, Any], min_size: int, flip: bool,
                          spec: _InputSpec, image: Optional[np.ndarray] = None,
                          masks: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """One record -> the per-image fields of structures.py (no batch dimension), with
  `gt_keypoints` float32 [M, K_max, 3] when `spec.num_keypoints` (see the module docstring).

  Args:
    record: a coco.py record (with `keypoints` when keypoints are on).
    min_size: the drawn shortest-side size; flip: mirror left-right.
    image, masks: already decoded pixels/masks (decoded from the record when None).
  """
  h, w = record['height'], record['width']
  if image is None:
    image = coco.record_image(record)
  images, (new_h, new_w) = preprocess_image(image, min_size, flip, spec)
  boxes = transforms.resize_boxes(record['boxes'], h, w, new_h, new_w)
  cols = transforms.nearest_indices(w, new_w)
  if flip:
    boxes = transforms.hflip_boxes(boxes, new_w)
    cols = cols[::-1]
  num = len(record['labels'])
  keep = np.arange(num)
  if num > spec.max_instances:  # coco.load_coco caps training records already; be safe
    area = record['areas']
    keep = np.sort(np.lexsort((-area, record['crowd']))[:spec.max_instances])
    log.warning('image %s: %d instances, keeping the %d largest', record['image_id'], num,
                spec.max_instances)
  if masks is None:
    masks = coco.decode_masks(record)
  crops = transforms.crop_and_resize_masks(
      masks[keep], boxes[keep], spec.gt_mask_size,
      row_map=transforms.nearest_indices(h, new_h), col_map=cols)
  m, k = spec.max_instances, len(keep)
  out = {
      'images': images,
      'image_size': np.array([new_h, new_w], np.int32),
      'gt_boxes': np.zeros((m, 4), np.float32),
      'gt_labels': np.zeros((m,), np.int32),
      'gt_masks': np.zeros((m, spec.gt_mask_size, spec.gt_mask_size), np.uint8),
      'gt_crowd': np.zeros((m,), bool),
      'gt_valid': np.zeros((m,), bool),
  }
  out['gt_boxes'][:k] = boxes[keep]
  out['gt_labels'][:k] = record['labels'][keep]
  out['gt_masks'][:k] = crops
  out['gt_crowd'][:k] = record['crowd'][keep]
  out['gt_valid'][:k] = True
  if spec.num_keypoints:
    out['gt_keypoints'] = _keypoints_of(record, keep, flip, spec, (h, w), (new_h, new_w))
  return out


def _keypoints_of(record, keep, flip: bool, spec: _InputSpec, hw, new_hw) -> np.ndarray:
  """float32 [M, K_max, 3]: the kept instances' keypoints resized, flipped and zero-padded."""
  if 'keypoints' not in record:
    raise ValueError(f'image {record["image_id"]}: model.keypoint_on but its record has no '
                     'keypoints (load it with load_coco(..., with_keypoints=True))')
  kps = np.asarray(record['keypoints'], np.float32)[keep]
  if kps.shape[1] > spec.num_keypoints:
    raise ValueError(f'image {record["image_id"]}: {kps.shape[1]} keypoints per instance, more '
                     f'than model.keypoint_head.num_keypoints allows ({spec.num_keypoints})')
  kps = transforms.resize_keypoints(kps, *hw, *new_hw)
  padded = np.zeros((len(kps), spec.num_keypoints, 3), np.float32)
  padded[:, :kps.shape[1]] = kps
  if flip:
    index = np.asarray(spec.keypoint_flip, np.int64)[record['labels'][keep]]
    padded = transforms.hflip_keypoints(padded, new_hw[1], index)
  out = np.zeros((spec.max_instances, spec.num_keypoints, 3), np.float32)
  out[:len(kps)] = transforms.zero_unlabelled_keypoints(padded)
  return out


def stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ------------------------------------------------------------------------------ batch plan
class TrainPlan:
  """The bucket-homogeneous global batch plan of the training stream (module docstring).

  plan[k] = (bucket index, record indices int64 [B], min sizes int64 [B], flips bool [B]).
  Epoch e shuffles every record once; images left in a partly filled bucket buffer at the end of
  an epoch are carried, with their drawn augmentation, into epoch e + 1's buffers, so nothing is
  dropped (and a tiny dataset still forms batches). The plan depends only on the image sizes,
  the config and the seed; epochs are computed lazily, in order, and cached.
  """

  def __init__(self, heights: np.ndarray, widths: np.ndarray, *, seed: int, batch_size: int,
               train_min_sizes: Sequence[int], max_size: int,
               buckets: Sequence[Sequence[int]], hflip_prob: float,
               resize: str = 'torchvision'):
    self.heights = np.asarray(heights, np.int64)
    self.widths = np.asarray(widths, np.int64)
    if not len(self.heights):
      raise ValueError('no training images')
    self.seed = int(seed)
    self.batch_size = int(batch_size)
    self.min_sizes = np.asarray(train_min_sizes, np.int64)
    self.hflip_prob = float(hflip_prob)
    self.buckets = tuple(tuple(map(int, b)) for b in buckets)
    # Bucket of every (image, min-size choice): [N, len(train_min_sizes)].
    pairs, inverse = np.unique(np.stack([self.heights, self.widths], 1), axis=0,
                               return_inverse=True)
    table = np.array([[self.buckets.index(structures.choose_bucket(
        *transforms.resize_shape(int(h), int(w), int(s), max_size, resize), self.buckets))
                       for s in self.min_sizes] for h, w in pairs], np.int64)
    self.bucket_of = table.reshape(len(pairs), -1)[np.ravel(inverse)]
    self._epochs: collections.OrderedDict = collections.OrderedDict()
    self._counts: list[int] = []  # batches emitted by each computed epoch
    self._carry: list[dict] = [{}]  # carry-in of epoch e: {bucket: [(index, min_size, flip)]}
    self._lock = threading.RLock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_epochs'] = collections.OrderedDict()
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.RLock()

  def __len__(self) -> int:
    return PLAN_LENGTH

  def _compute(self, e: int):
    """Epoch e's batches and its carry-out (needs the carry-in of epoch e)."""
    n = len(self.heights)
    rng = np.random.default_rng([self.seed, e])
    order = rng.permutation(n)
    choice = rng.integers(len(self.min_sizes), size=n)
    flips = rng.random(n) < self.hflip_prob
    sizes = self.min_sizes[choice]
    bucket = self.bucket_of[order, choice[order]]
    pending = collections.defaultdict(list)
    for b, items in self._carry[e].items():
      pending[b] = list(items)
    batches, batch_buckets = [], []
    for i, b in zip(order.tolist(), bucket.tolist()):
      pending[b].append((i, int(sizes[i]), bool(flips[i])))
      if len(pending[b]) == self.batch_size:
        batches.append(pending.pop(b))
        batch_buckets.append(b)
    arr = np.array(batches, dtype=np.int64).reshape(-1, self.batch_size, 3)
    epoch = (np.array(batch_buckets, np.int64), arr[..., 0], arr[..., 1], arr[..., 2] > 0)
    return epoch, {b: items for b, items in pending.items() if items}

  def _epoch(self, e: int):
    with self._lock:
      if e in self._epochs:
        self._epochs.move_to_end(e)
        return self._epochs[e]
      while len(self._carry) <= e:  # carry-ins come from computing the epochs in order
        self._epoch(len(self._carry) - 1)
      epoch, carry_out = self._compute(e)
      if len(self._counts) == e:
        self._counts.append(len(epoch[0]))
        self._carry.append(carry_out)
      self._epochs[e] = epoch
      while len(self._epochs) > _EPOCH_CACHE:
        self._epochs.popitem(last=False)
      return epoch

  def locate(self, k: int) -> tuple[int, int]:
    """(epoch, batch within the epoch) of stream batch k."""
    if k < 0:
      raise IndexError(k)
    e, start = 0, 0
    while True:
      if e == len(self._counts):
        self._epoch(e)
      if k < start + self._counts[e]:
        return e, k - start
      start += self._counts[e]
      e += 1

  def __getitem__(self, k: int):
    e, j = self.locate(int(k))
    buckets, idx, min_sizes, flips = self._epoch(e)
    return int(buckets[j]), idx[j], min_sizes[j], flips[j]


class _TrainBatchLoader:
  """Loads host `host`'s slice of a planned global batch (runs inside grain workers).

  An image that cannot be used (coco.ImageDecodeError: missing, corrupt, truncated, or not the
  JSON's size) is skipped with a warning and replaced by the next record, in record order and
  cyclically, whose image lands in the same size bucket at the drawn min size, so the batch
  keeps its planned static shape (the replacement's own instances and the drawn augmentation
  are used). Bad files are remembered (`bad_files`, not decoded again) and counted; once more
  than `max_bad_images` distinct files are bad the loader raises an ImageDecodeError listing
  them. The count belongs to the loader PROCESS: with input.num_workers > 0 every grain worker
  holds its own copy, so up to num_workers x max_bad_images files may be skipped before one
  worker stops the run.
  """

  def __init__(self, records, spec: _InputSpec, host: int, per_host: int,
               max_bad_images: int = 10):
    self.records, self.spec, self.host, self.per_host = records, spec, host, per_host
    self.max_bad_images = int(max_bad_images)
    self.bad_files: dict[int, str] = {}  # record index -> why its image cannot be used

  def _bucket(self, i: int, min_size: int) -> tuple[int, int]:
    r = self.records[i]
    hw = transforms.resize_shape(r['height'], r['width'], min_size, self.spec.max_size,
                                 self.spec.resize)
    return structures.choose_bucket(*hw, self.spec.buckets)

  def _mark_bad(self, i: int, error: coco.ImageDecodeError) -> None:
    self.bad_files[i] = str(error)
    n = len(self.bad_files)
    if n > self.max_bad_images:
      listing = '\n  '.join(self.bad_files.values())
      raise coco.ImageDecodeError(
          f'{n} training images cannot be used, more than config.data.max_bad_images = '
          f'{self.max_bad_images} (counted per loader process):\n  {listing}\nFix or remove '
          'them; config.data.verify_images=True lists every bad image before training')
    log.warning('training image skipped and replaced by another of its size bucket (%d of at '
                'most %d in this loader process): %s', n, self.max_bad_images, error)

  def _example(self, i: int, min_size: int, flip: bool) -> dict[str, np.ndarray]:
    """Record i's example, or that of its replacement when its image is bad (class doc)."""
    bucket, n = None, len(self.records)
    for step in range(n):
      j = (i + step) % n
      if j in self.bad_files:
        continue
      if step:
        bucket = bucket or self._bucket(i, min_size)
        if self._bucket(j, min_size) != bucket:
          continue
      try:
        return process_train_example(self.records[j], min_size, flip, self.spec)
      except coco.ImageDecodeError as e:
        self._mark_bad(j, e)
    raise coco.ImageDecodeError(
        f'{self.records[i]["file_name"]}: cannot be used and no other training image of its '
        f'size bucket {self._bucket(i, min_size)} can replace it:\n  '
        + '\n  '.join(self.bad_files.values()))

  def __call__(self, planned) -> dict[str, np.ndarray]:
    bucket, idx, min_sizes, flips = planned
    lo, hi = self.host * self.per_host, (self.host + 1) * self.per_host
    examples = [self._example(int(i), int(s), bool(f))
                for i, s, f in zip(idx[lo:hi], min_sizes[lo:hi], flips[lo:hi])]
    batch = stack(examples)
    if batch['images'].shape[1:3] != self.spec.buckets[bucket]:
      raise AssertionError('planned and actual size buckets differ')
    return batch


# ------------------------------------------------------------------------------- iterators
def _process_info(per_host_batch_size: Optional[int], global_batch: int):
  import jax  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  per_host = per_host_batch_size or global_batch // count
  if per_host * count != global_batch:
    raise ValueError(f'config.input.batch_size = {global_batch} is not {count} hosts x '
                     f'{per_host} images')
  return index, count, per_host


def _to_iter(source, loader, start: int, config) -> Any:
  ds = grain.MapDataset.source(source)[start:].map(loader)
  workers, prefetch = int(config.input.num_workers), int(config.input.prefetch)
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker start-up reads absl flags; outside absl.app (tests, notebooks) use the
      # defaults rather than fail.
      flags.FLAGS.mark_as_parsed()
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
  else:
    threads = 1 if prefetch > 0 else 0
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=prefetch))
  return iter(it_ds)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Infinite iterator of this host's training batches, with JSON get_state()/set_state()."""

  def __init__(self, plan: TrainPlan, loader: _TrainBatchLoader, config, num_records: int,
               label_map: coco.LabelMap):
    self._plan, self._loader, self._config = plan, loader, config
    self._num_records = num_records
    self.label_map = label_map
    # Stored with checkpoints by train.py: {'label_to_category_id', 'class_names'}.
    self.meta = label_map.meta()
    self._next = 0
    self._it = None

  @property
  def plan(self) -> TrainPlan:
    return self._plan

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = _to_iter(self._plan, self._loader, self._next, self._config)
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """{'version', 'next_batch', 'seed', 'global_batch_size', 'num_records'}: plain ints."""
    return {'version': STATE_VERSION, 'next_batch': self._next, 'seed': self._plan.seed,
            'global_batch_size': self._plan.batch_size, 'num_records': self._num_records}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues at state['next_batch']; refuses a state of another seed/batch/dataset."""
    mine = self.get_state()
    for key in ('seed', 'global_batch_size', 'num_records'):
      if int(state[key]) != mine[key]:
        raise ValueError(f'input state has {key}={state[key]} but this pipeline has '
                         f'{mine[key]}')
    self.close()
    self._next = int(state['next_batch'])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def _verify_train_images(records: Sequence[dict[str, Any]]) -> None:
  """config.data.verify_images: decodes every training image now (slow; each host checks all
  of them) and raises an ImageDecodeError listing the bad ones before training starts."""
  log.info('verifying %d training images (config.data.verify_images)', len(records))
  errors = coco.verify_images(records)
  if errors:
    shown = errors[:coco.MAX_LISTED_ERRORS]
    more = len(errors) - len(shown)
    raise coco.ImageDecodeError(
        f'config.data.verify_images: {len(errors)} of {len(records)} training images cannot be '
        'used:\n  ' + '\n  '.join(shown) + (f'\n  ... and {more} more' if more else ''))


def make_train_iterator(config: ml_collections.ConfigDict, *,
                        per_host_batch_size: Optional[int] = None,
                        dataset: Optional[coco.CocoDataset] = None) -> TrainIterator:
  """This host's training batches (structures.py format, batch dim = per-host batch size).

  data.verify_images decodes every training image first and fails listing the bad ones; at run
  time up to data.max_bad_images bad images are skipped and replaced (see _TrainBatchLoader).
  With model.keypoint_on: `check_keypoint_config` (counts, flip maps, OKS sigmas; the iterator's
  `label_map`/`meta` carry the flip maps used), `filter_min_keypoints`
  (data.min_keypoints_per_image) and `check_keypoints_in_boxes`, before the plan is made.

  Args:
    config: the full config (input.*, data.*, seed).
    per_host_batch_size: defaults to input.batch_size / jax.process_count().
    dataset: records to use instead of load_dataset_records(config, 'train').
  """
  i = config.input
  host, _, per_host = _process_info(per_host_batch_size, int(i.batch_size))
  ds = dataset if dataset is not None else load_dataset_records(config, 'train')
  records, label_map = ds.records, ds.label_map
  if i.skip_empty_train:
    kept = [r for r in records if _has_training_instance(r)]
    if len(kept) < len(records):
      log.info('training skips %d images without non-crowd instances', len(records) - len(kept))
    records = kept
  min_keypoints = int(config.data.get('min_keypoints_per_image', 0))
  if keypoints_on(config):
    label_map = check_keypoint_config(config, label_map)
    records = filter_min_keypoints(records, min_keypoints)
    check_keypoints_in_boxes(records)
  elif min_keypoints:
    log.warning('config.data.min_keypoints_per_image = %d is ignored: model.keypoint_on is '
                'False', min_keypoints)
  plan = TrainPlan([r['height'] for r in records], [r['width'] for r in records],
                   seed=config.seed, batch_size=i.batch_size,
                   train_min_sizes=i.train_min_sizes, max_size=i.max_size, buckets=i.buckets,
                   hflip_prob=i.hflip_prob, resize=str(i.get('resize', 'torchvision')))
  if config.data.get('verify_images', False):
    _verify_train_images(records)
  loader = _TrainBatchLoader(records, _InputSpec.from_config(config, label_map), host, per_host,
                             max_bad_images=int(config.data.get('max_bad_images', 10)))
  return TrainIterator(plan, loader, config, len(records), label_map)
