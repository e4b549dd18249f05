"""A TFDS builder for COCO-format instance data with masks, and an adapter to plain records.

TFDS's registered `coco/2017` carries boxes but no instance masks, so this builder reads the
official COCO files from a manual directory (or the synthetic shapes folder) and stores, per
image, the encoded image bytes as found on disk plus every instance's box, labels, crowd flag,
area, compressed-RLE mask and (COCO persons) keypoints. Build it as ArrayRecord and read it with
`tfds.data_source`; neither needs TensorFlow (tensorflow-datasets>=4.9.4, array-record, pillow):

    import tensorflow_datasets as tfds
    from maskrcnn_jax.data import tfds_builder  # registers 'coco_instances'
    builder = tfds_builder.CocoInstances(config='coco2017', data_dir=DATA_DIR,
                                         file_format='array_record')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=COCO_ROOT))
    records = tfds_builder.records_from_tfds('coco_instances/coco2017', 'validation', DATA_DIR)

`records_from_tfds` gives the records of `data/coco.py` (see `example_to_record`).

Stored features (`objects` holds one entry per COCO annotation, crowd regions included):

    image             encoded bytes of the original file (JPEG for COCO, PNG for shapes),
                      decoded to uint8 [H, W, 3]
    image/id          int64     COCO image id
    image/filename    str       the JSON's file_name
    image/height      int64     from the JSON
    image/width       int64
    objects/id        int64     COCO annotation id
    objects/bbox      float32 [4]  xyxy in absolute pixels of the original image (COCO's
                      x, y, x + w, y + h). Not tfds.features.BBoxFeature: that one is
                      normalised yxyx, and the repo's convention is xyxy pixels.
    objects/label     int64     contiguous 1..K in sorted category-id order (0 = background)
    objects/category_id int64   the COCO category id
    objects/is_crowd  bool
    objects/area      float32   COCO's annotation area (mask area, in pixels)
    objects/mask      bytes     COCO compressed RLE `counts` of the instance mask at [H, W]
                      (polygons and uncompressed RLEs are converted with pycocotools)
    objects/keypoints float32 [17, 3]  (x, y, visibility) for COCO persons; zeros where the
                      split has no keypoint file or the instance has none ('coco2017' only)

The categories (id, name, label) are saved in the dataset's metadata (`builder.info.metadata`).
"""

import collections.abc
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from maskrcnn_jax.data import coco

logger = logging.getLogger(__name__)

NUM_KEYPOINTS = 17  # COCO person keypoints
TFDS_NAME = 'coco_instances'


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """Where one split lives, relative to the manual directory; images are at
  `image_dir/file_name` with the JSON's file names."""
  instances_json: str
  image_dir: str
  keypoints_json: Optional[str] = None


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """A folder layout: split name -> files. Missing splits are skipped when building."""
  splits: Mapping[str, SplitFiles] = dataclasses.field(default_factory=dict)
  has_keypoints: bool = False


COCO2017 = CocoInstancesConfig(
    name='coco2017',
    description='COCO 2017 instances (+ person keypoints) from the official files.',
    splits={
        'train': SplitFiles('annotations/instances_train2017.json', 'train2017',
                            'annotations/person_keypoints_train2017.json'),
        'validation': SplitFiles('annotations/instances_val2017.json', 'val2017',
                                 'annotations/person_keypoints_val2017.json'),
    },
    has_keypoints=True)

# The layout written by maskrcnn_jax/data/shapes.py; its file names already start with
# 'train/' or 'val/', so images resolve against the root.
SHAPES = CocoInstancesConfig(
    name='shapes',
    description='The synthetic shapes dataset (COCO format).',
    splits={
        'train': SplitFiles('instances_train.json', ''),
        'validation': SplitFiles('instances_val.json', ''),
    })


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
  """Compressed RLE (bytes counts) of a COCO polygon list, uncompressed or compressed RLE."""
  if isinstance(segmentation, list):
    if not segmentation:  # no outline given: an empty mask
      return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order='F'))[0]
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  if isinstance(segmentation.get('counts'), list):
    return mask_utils.frPyObjects(segmentation, height, width)
  counts = segmentation['counts']
  return {'size': list(segmentation['size']),
          'counts': counts.encode('ascii') if isinstance(counts, str) else counts}


def _load_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation with masks as compressed RLE."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [COCO2017, SHAPES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  coco2017: put the official files under the manual dir:
    annotations/instances_{train,val}2017.json, annotations/person_keypoints_{train,val}2017.json,
    train2017/*.jpg, val2017/*.jpg
  shapes: point the manual dir at the folder written by maskrcnn_jax.data.shapes
    (instances_train.json, instances_val.json, train/, val/).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    objects = {
        'id': np.int64,
        'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
        'label': np.int64,
        'category_id': np.int64,
        'is_crowd': np.bool_,
        'area': np.float32,
        'mask': tfds.features.Tensor(shape=(), dtype=np.object_),
    }
    if self.builder_config.has_keypoints:
      objects['keypoints'] = tfds.features.Tensor(shape=(NUM_KEYPOINTS, 3), dtype=np.float32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'image/id': np.int64,
            'image/filename': tfds.features.Text(),
            'image/height': np.int64,
            'image/width': np.int64,
            'objects': tfds.features.Sequence(objects),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage='https://cocodataset.org',
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    generators, categories = {}, None
    for split, files in self.builder_config.splits.items():
      instances_path = os.path.join(root, files.instances_json)
      if not os.path.exists(instances_path):
        logger.warning('Skipping split %r: %s does not exist', split, instances_path)
        continue
      instances = _load_json(instances_path)
      split_categories = sorted(instances['categories'], key=lambda c: c['id'])
      if categories is None:
        categories = split_categories
      elif [c['id'] for c in categories] != [c['id'] for c in split_categories]:
        raise ValueError(f'{instances_path} lists other categories than the first split')
      keypoints = None
      if self.builder_config.has_keypoints and files.keypoints_json:
        keypoints_path = os.path.join(root, files.keypoints_json)
        if os.path.exists(keypoints_path):
          keypoints = _keypoints_by_annotation(_load_json(keypoints_path))
      generators[split] = self._generate_examples(instances, os.path.join(root, files.image_dir),
                                                  keypoints)
    if not generators:
      raise FileNotFoundError(f'none of the splits of config {self.builder_config.name!r} was '
                              f'found under {root}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    self.info.metadata['categories'] = [
        {'id': int(c['id']), 'name': c.get('name', str(c['id'])), 'label': label}
        for label, c in enumerate(categories, start=1)]
    return generators

  def _generate_examples(self, instances: dict, image_dir: str,
                         keypoints: Optional[Mapping[int, np.ndarray]]):
    category_to_label = {c['id']: label for label, c in enumerate(
        sorted(instances['categories'], key=lambda c: c['id']), start=1)}
    by_image = {}
    for ann in instances['annotations']:
      by_image.setdefault(ann['image_id'], []).append(ann)
    for image in instances['images']:
      h, w = int(image['height']), int(image['width'])
      objects = []
      for ann in by_image.get(image['id'], []):
        x, y, bw, bh = (float(v) for v in ann['bbox'])
        obj = {
            'id': int(ann['id']),
            'bbox': np.array([x, y, x + bw, y + bh], np.float32),
            'label': category_to_label[ann['category_id']],
            'category_id': int(ann['category_id']),
            'is_crowd': bool(ann.get('iscrowd', 0)),
            'area': float(ann.get('area', bw * bh)),
            'mask': segmentation_to_rle(ann.get('segmentation', []), h, w)['counts'],
        }
        if self.builder_config.has_keypoints:
          obj['keypoints'] = _keypoints_of(ann, keypoints)
        objects.append(obj)
      yield int(image['id']), {
          # A path: TFDS stores the file's bytes as they are (no re-encoding, no TensorFlow).
          'image': os.path.join(image_dir, image['file_name']),
          'image/id': int(image['id']),
          'image/filename': image['file_name'],
          'image/height': h,
          'image/width': w,
          'objects': objects,
      }


def _keypoints_by_annotation(person_keypoints: dict) -> dict[int, np.ndarray]:
  out = {}
  for ann in person_keypoints['annotations']:
    if ann.get('keypoints'):
      out[int(ann['id'])] = np.asarray(ann['keypoints'], np.float32).reshape(NUM_KEYPOINTS, 3)
  return out


def _keypoints_of(ann: dict, keypoints: Optional[Mapping[int, np.ndarray]]) -> np.ndarray:
  if keypoints is not None and int(ann['id']) in keypoints:
    return keypoints[int(ann['id'])]
  if ann.get('keypoints'):
    return np.asarray(ann['keypoints'], np.float32).reshape(NUM_KEYPOINTS, 3)
  return np.zeros((NUM_KEYPOINTS, 3), np.float32)


# ------------------------------------------------------------------------------------ records


def example_to_record(example: Mapping[str, Any], label_map: coco.LabelMap,
                      max_instances: Optional[int] = None) -> dict[str, Any]:
  """One decoded `tfds.data_source` item as a `data/coco.py` record (numpy only).

  The record has the keys and frames of `coco.load_coco`'s records, with three differences:
  `file_name` is the stored name (no file lies behind it), the decoded image comes along, and
  `segmentations` are always compressed RLEs (`coco.decode_masks(record)` reads them as is):

    image_id, file_name, height, width
    image          uint8   [H, W, 3]  the decoded image
    boxes          float32 [N, 4]  xyxy, original-image pixels, clipped to the image
    labels         int32   [N]     1..K from `label_map`
    crowd          bool    [N]
    areas          float32 [N]     COCO `area`
    ann_ids        int64   [N]
    segmentations  N dicts {'size': [H, W], 'counts': bytes}
    category_ids   int32   [N]
    keypoints      float32 [N, 17, 3]  only for configs that store keypoints

  As in `coco.load_coco`, instances of categories outside `label_map` and instances whose
  clipped box is thinner than `coco.MIN_BOX_SIDE` are dropped, as are instances with an empty
  mask, and `max_instances` keeps non-crowd before crowd, then the largest areas.
  """
  objects = example['objects']
  height, width = int(example['image/height']), int(example['image/width'])
  image = np.asarray(example['image'])
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:  # grey JPEGs decode to one channel with some decoders
    image = np.repeat(image, 3, axis=-1)
  if image.shape[:2] != (height, width):
    raise ValueError(f'image {example["image/id"]}: decoded size {image.shape[:2]} differs from '
                     f'the stored {(height, width)}')

  label_of = label_map.label_of()
  category_ids = np.asarray(objects['category_id'], np.int64).reshape(-1)
  boxes = np.asarray(objects['bbox'], np.float32).reshape(-1, 4)
  boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
  areas = np.asarray(objects['area'], np.float32).reshape(-1)
  crowd = np.asarray(objects['is_crowd'], bool).reshape(-1)
  rles = [{'size': [height, width], 'counts': c if isinstance(c, bytes) else str(c).encode()}
          for c in np.asarray(objects['mask'], object).reshape(-1)]
  keep = [i for i in range(len(category_ids))
          if int(category_ids[i]) in label_of
          and boxes[i, 2] - boxes[i, 0] >= coco.MIN_BOX_SIDE
          and boxes[i, 3] - boxes[i, 1] >= coco.MIN_BOX_SIDE
          and mask_utils.area(rles[i]) > 0]
  if max_instances is not None and len(keep) > max_instances:
    keep = sorted(sorted(keep, key=lambda i: (crowd[i], -areas[i], i))[:max_instances])
  keep = np.array(keep, np.int64)
  filename = example['image/filename']
  record = {
      'image_id': int(example['image/id']),
      'file_name': filename.decode() if isinstance(filename, bytes) else str(filename),
      'height': height,
      'width': width,
      'image': image.astype(np.uint8, copy=False),
      'boxes': boxes[keep].reshape(-1, 4),
      'labels': np.array([label_of[int(c)] for c in category_ids[keep]], np.int32),
      'crowd': crowd[keep],
      'areas': areas[keep],
      'ann_ids': np.asarray(objects['id'], np.int64).reshape(-1)[keep],
      'segmentations': [rles[i] for i in keep],
      'category_ids': category_ids[keep].astype(np.int32),
  }
  if 'keypoints' in objects:
    keypoints = np.asarray(objects['keypoints'], np.float32).reshape(-1, NUM_KEYPOINTS, 3)
    record['keypoints'] = keypoints[keep]
  return record


class TfdsRecords(collections.abc.Sequence):
  """A lazy, random-access sequence of records over a `tfds.data_source` (grain-compatible)."""

  def __init__(self, source: Sequence[Mapping[str, Any]], label_map: coco.LabelMap,
               max_instances: Optional[int] = None):
    self.source = source
    self.label_map = label_map
    self.max_instances = max_instances

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(index)
    return example_to_record(self.source[index % len(self)], self.label_map, self.max_instances)


def stored_label_map(builder: tfds.core.DatasetBuilder) -> coco.LabelMap:
  """The dataset's categories (saved in its metadata at build time) as a LabelMap."""
  categories = builder.info.metadata.get('categories')
  if not categories:
    raise ValueError(f'{builder.name}: no categories in the dataset metadata; rebuild it')
  return coco.LabelMap.from_categories(categories)


def records_from_tfds(name: str, split: str, data_dir: Optional[str] = None, *,
                      label_map: Optional[coco.LabelMap] = None,
                      max_instances: Optional[int] = None) -> TfdsRecords:
  """Records of a built `coco_instances` split, read through `tfds.data_source` (ArrayRecord).

  Args:
    name: 'coco_instances/coco2017' or 'coco_instances/shapes' (optionally ':VERSION').
    split: 'train' or 'validation' (any TFDS split expression).
    data_dir: where the dataset was built.
    label_map: category ids -> labels; default: the dataset's own categories in ascending id
      order (what `coco.load_coco` derives from the JSON). Pass the training split's map, e.g.
      the one saved with a checkpoint, to read other data in the same label space.
    max_instances: as in `coco.load_coco`.

  Returns:
    A lazy sequence of `example_to_record` dicts; its `.label_map` is the map used.
  """
  if label_map is None:
    label_map = stored_label_map(tfds.builder(name, data_dir=data_dir))
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return TfdsRecords(source, label_map, max_instances)
