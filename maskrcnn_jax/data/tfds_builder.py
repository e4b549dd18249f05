"""A TFDS builder for COCO-format instance data with masks, and the reader of `data.source='tfds'`.

TFDS's registered `coco/2017` carries boxes but no instance masks, so this builder reads the
official COCO files from a manual directory (or the synthetic shapes folder) and stores, per
image, the encoded image bytes as found on disk plus every instance's box, labels, crowd flag,
area, compressed-RLE mask and (COCO persons) keypoints. It is built as ArrayRecord and read with
`tfds.data_source`; neither needs TensorFlow (tensorflow-datasets>=4.9.4, array-record, pillow).
Build it with (docs/tfds.md has the COCO 2017 walk-through):

    python -m maskrcnn_jax.data.build_tfds --config=coco2017 --manual_dir=COCO_ROOT \\
        --data_dir=DATA_DIR

and train or evaluate from it with `--config.data.source=tfds
--config.data.tfds_name=coco_instances/coco2017 --config.data.tfds_data_dir=DATA_DIR`.
`load_tfds` reads a split into the records of `data/coco.py` (a `coco.CocoDataset`), so the
input pipeline and the evaluator work on it unchanged.

The annotations are normalised at build time by `coco.normalise_annotations`, the code the JSON
reader uses (unique ids, iscrowd and area filled, unusable polygons and RLEs dropped), and the
file's own box and area are kept in float64, so the ground truth rebuilt from the records
(`TfdsDataset.gt_dict()`) scores predictions exactly as the JSON's normalised ground truth does.

Stored features (`objects` holds one entry per usable COCO annotation, crowd regions included):

    image             the original file's bytes as they are (JPEG for COCO, PNG for shapes);
                      read back undecoded and decoded by `coco.decode_image_bytes` (PIL, EXIF
                      orientation), the decoder of the JSON path, so the pixels are equal
    image/id          int64     COCO image id
    image/filename    str       the JSON's file_name
    image/height      int64     from the JSON: batch planning reads these, never the pixels
    image/width       int64
    objects/id        int64     COCO annotation id (unique after normalisation)
    objects/bbox      float64 [4]  the file's COCO box x, y, w, h in original-image pixels, as
                      is: records convert it to xyxy exactly as `coco.load_coco` does. Not
                      tfds.features.BBoxFeature: that one is normalised yxyx float32.
    objects/label     int64     contiguous 1..K in sorted category-id order (0 = background)
    objects/category_id int64   the COCO category id
    objects/is_crowd  bool
    objects/area      float64   COCO's annotation area (filled from the mask where missing)
    objects/has_mask  bool      False for a box-only annotation (no segmentation in the file)
    objects/mask      bytes     COCO compressed RLE `counts` of the instance mask at [H, W]
                      (polygons and uncompressed RLEs are converted with pycocotools; b'' when
                      box-only)
    objects/keypoints float32 [17, 3]  (x, y, visibility) for COCO persons, cleaned as the JSON
                      reader cleans them; zeros where the split has no keypoint file or the
                      instance's category has no keypoint set ('coco2017' only)

The categories (the file's category dicts, with the keypoint file's `keypoints`/`skeleton` where
it has them, plus their `label`) are saved in the dataset's metadata (`builder.info.metadata`).
"""

import dataclasses
import functools
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
READ_CHUNK = 256  # examples fetched per data-source call while a split is read


class TfdsNotFoundError(FileNotFoundError):
  """The named TFDS dataset, or its split, is not built in the data directory; names both."""


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


def _with_keypoint_file(instances: dict, person_keypoints: Optional[dict]) -> dict:
  """The instances dict with the keypoint file's category sets and annotation keypoints (matched
  by id, as COCO numbers them alike), so one normalisation pass cleans both."""
  if person_keypoints is None:
    return instances
  sets = {c['id']: c for c in person_keypoints.get('categories', []) if c.get('keypoints')}
  by_id = {a['id']: a['keypoints'] for a in person_keypoints.get('annotations', [])
           if isinstance(a, dict) and 'id' in a and a.get('keypoints')}
  categories = [dict(c, keypoints=sets[c['id']]['keypoints'],
                     skeleton=sets[c['id']].get('skeleton', [])) if c['id'] in sets else c
                for c in instances['categories']]
  annotations = [dict(a, keypoints=by_id[a['id']])
                 if isinstance(a, dict) and a.get('id') in by_id else a
                 for a in instances['annotations']]
  return dict(instances, categories=categories, annotations=annotations)


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation with masks as compressed RLE."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Annotations normalised as the JSON reader does; the file\'s xywh box and area '
               'in float64; has_mask; full category dicts in the metadata.',
  }
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
        'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float64),
        'label': np.int64,
        'category_id': np.int64,
        'is_crowd': np.bool_,
        'area': np.float64,
        'has_mask': np.bool_,
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
      keypoints = None
      if self.builder_config.has_keypoints and files.keypoints_json:
        keypoints_path = os.path.join(root, files.keypoints_json)
        if os.path.exists(keypoints_path):
          keypoints = _load_json(keypoints_path)
      data = _with_keypoint_file(coco.read_instances_json(instances_path), keypoints)
      split_categories = sorted(data['categories'], key=lambda c: c['id'])
      if categories is None:
        categories = split_categories
      elif [c['id'] for c in categories] != [c['id'] for c in split_categories]:
        raise ValueError(f'{instances_path} lists other categories than the first split')
      generators[split] = self._generate_examples(data, instances_path,
                                                  os.path.join(root, files.image_dir))
    if not generators:
      raise FileNotFoundError(f'none of the splits of config {self.builder_config.name!r} was '
                              f'found under {root}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    self.info.metadata['categories'] = [dict(c, label=label)
                                        for label, c in enumerate(categories, start=1)]
    return generators

  def _generate_examples(self, data: dict, json_path: str, image_dir: str):
    category_to_label = {c['id']: label for label, c in enumerate(
        sorted(data['categories'], key=lambda c: c['id']), start=1)}
    sizes = (coco.category_keypoint_sizes(data, json_path)
             if self.builder_config.has_keypoints else None)
    if sizes and max(sizes.values()) > NUM_KEYPOINTS:
      raise ValueError(f'{json_path}: a category has more than {NUM_KEYPOINTS} keypoints')
    images, anns = coco.normalise_annotations(data, json_path, lambda reason, what: None, sizes)
    by_image = {}
    for a in anns:
      by_image.setdefault(a.image_id, []).append(a)
    for image_id, image in images.items():
      h, w = int(image['height']), int(image['width'])
      objects = []
      for a in by_image.get(image_id, []):
        obj = {
            'id': a.id,
            'bbox': np.array([float(v) for v in a.raw['bbox']], np.float64),
            'label': category_to_label.get(a.raw.get('category_id'), 0),
            'category_id': int(a.raw.get('category_id', 0)),
            'is_crowd': bool(a.iscrowd),
            'area': a.area,
            'has_mask': a.segmentation is not None,
            'mask': (b'' if a.segmentation is None else
                     segmentation_to_rle(a.segmentation, h, w)['counts']),
        }
        if self.builder_config.has_keypoints:
          keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
          flat = np.asarray(a.keypoints or [], np.float32).reshape(-1, 3)
          keypoints[:len(flat)] = flat
          obj['keypoints'] = keypoints
        objects.append(obj)
      yield image_id, {
          # A path: TFDS stores the file's bytes as they are (no re-encoding, no TensorFlow).
          'image': os.path.join(image_dir, image['file_name']),
          'image/id': image_id,
          'image/filename': image['file_name'],
          'image/height': h,
          'image/width': w,
          'objects': objects,
      }


# ------------------------------------------------------------------------------------ reading
def _undecoded_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source` of a split whose images come back as their stored bytes."""
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                          decoders={'image': tfds.decode.SkipDecoding()})


@functools.lru_cache(maxsize=8)
def _image_source(name: str, split: str, data_dir: Optional[str], pid: int):
  """One open source per process (`pid` keys it: a forked child opens its own files)."""
  del pid
  return _undecoded_source(name, split, data_dir)


@dataclasses.dataclass(frozen=True)
class TfdsImage:
  """The lazy image of one TFDS record (a record's `image_reader`): reads the stored bytes and
  decodes them only when called, so planning batches from the records decodes nothing. Small
  and picklable: grain workers open the dataset themselves."""
  name: str
  split: str
  data_dir: Optional[str]
  index: int  # position in the split's data source
  file_name: str
  height: int
  width: int

  def __call__(self) -> np.ndarray:
    """uint8 [height, width, 3], as `coco.load_image` decodes the original file.

    Raises:
      coco.ImageDecodeError: the bytes do not decode, or not to the stored size.
    """
    example = _image_source(self.name, self.split, self.data_dir, os.getpid())[self.index]
    where = f'{self.name} split {self.split!r} record {self.index} ({self.file_name})'
    return coco.decode_image_bytes(example['image'], where, (self.height, self.width))


@dataclasses.dataclass
class TfdsDataset(coco.CocoDataset):
  """A `coco.CocoDataset` read from a built TFDS split (`load_tfds`).

  `records` are `coco.load_coco`'s records with a lazy `image_reader` instead of a file, in
  image-id order as load_coco sorts them, so the training plan and the evaluation order equal
  the JSON path's. `gt_dict()` rebuilds the ground truth from the stored annotations.
  """
  tfds_name: str = ''
  tfds_split: str = ''
  tfds_data_dir: Optional[str] = None
  categories: list = dataclasses.field(default_factory=list)  # the stored category dicts

  def gt_dict(self) -> dict[str, Any]:
    """The split's ground truth as a COCO instances dict: every stored annotation (those the
    records leave out for training reasons too), with the file's ids, xywh boxes, areas and
    crowd flags, masks as compressed RLE (`segmentation` absent for box-only ones) and, with
    keypoints, `keypoints`/`num_keypoints` for categories with a set. Equal, as pycocotools
    scores it, to `coco.load_coco(...).gt_dict()` of the JSON the dataset was built from.

    The split is read again rather than kept in memory (as the JSON path reads its file
    again); each call returns a fresh dict (COCOeval writes into its ground truth).
    """
    sizes = ({c['id']: len(c.get('keypoints') or []) for c in self.categories}
             if self.with_keypoints else {})
    images, annotations = [], []
    for _, image, objects in _read_split(self.tfds_name, self.tfds_split, self.tfds_data_dir):
      images.append(image)
      h, w = image['height'], image['width']
      for k in range(len(objects['id'])):
        category = int(objects['category_id'][k])
        ann = {'id': int(objects['id'][k]), 'image_id': image['id'], 'category_id': category,
               'bbox': [float(v) for v in objects['bbox'][k]],
               'area': float(objects['area'][k]), 'iscrowd': int(objects['is_crowd'][k])}
        if objects['has_mask'][k]:
          ann['segmentation'] = {'size': [h, w], 'counts': objects['mask'][k].decode('ascii')}
        if sizes.get(category):
          keypoints = np.asarray(objects['keypoints'][k][:sizes[category]], np.float64)
          ann['keypoints'] = [float(v) for v in keypoints.reshape(-1)]
          ann['num_keypoints'] = int((keypoints[:, 2] > 0).sum())
        annotations.append(ann)
    return {'images': images, 'annotations': annotations,
            'categories': [dict(c) for c in self.categories]}


def _read_split(name: str, split: str, data_dir: Optional[str]
                ) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
  """(index in the data source, COCO image dict, stored objects) of every image of a split, in
  image-id order; the images stay encoded and are dropped."""
  source = _undecoded_source(name, split, data_dir)
  items = []
  for start in range(0, len(source), READ_CHUNK):
    examples = source.__getitems__(list(range(start, min(start + READ_CHUNK, len(source)))))
    for index, example in enumerate(examples, start=start):
      filename = example['image/filename']
      image = {'id': int(example['image/id']),
               'file_name': filename.decode() if isinstance(filename, bytes) else str(filename),
               'height': int(example['image/height']), 'width': int(example['image/width'])}
      objects = dict(example['objects'])
      objects['mask'] = [bytes(m) for m in np.asarray(objects['mask'], object).reshape(-1)]
      items.append((index, image, objects))
  return sorted(items, key=lambda item: item[1]['id'])


def _open_builder(name: str, data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  where = data_dir or 'the default TFDS data dir'
  hint = ('build it with: python -m maskrcnn_jax.data.build_tfds --config=CONFIG '
          f'--manual_dir=FOLDER --data_dir={data_dir or "DATA_DIR"} (docs/tfds.md)')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names and versions
    raise TfdsNotFoundError(f'TFDS dataset {name!r} not found in {where} ({e}); {hint}') from e
  if not builder.is_prepared():
    raise TfdsNotFoundError(f'TFDS dataset {name!r} is not built in {where}; {hint}')
  return builder


def _check_split(builder: tfds.core.DatasetBuilder, name: str, split: str) -> None:
  available = sorted(builder.info.splits)
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise TfdsNotFoundError(f'TFDS dataset {name!r} has no split {split!r} (it has '
                            f'{available})') from e


def check_built(name: str, splits: Sequence[str], data_dir: Optional[str] = None) -> None:
  """Raises TfdsNotFoundError unless dataset `name` is built in `data_dir` with every split of
  `splits` (reads the dataset's metadata only)."""
  builder = _open_builder(name, data_dir)
  for split in splits:
    _check_split(builder, name, split)


def stored_categories(builder: tfds.core.DatasetBuilder) -> list[dict[str, Any]]:
  """The dataset's category dicts (saved in its metadata at build time), without `label`."""
  categories = builder.info.metadata.get('categories')
  if not categories:
    raise ValueError(f'{builder.name}: no categories in the dataset metadata; rebuild it')
  return [{k: v for k, v in c.items() if k != 'label'} for c in categories]


def stored_label_map(builder: tfds.core.DatasetBuilder) -> coco.LabelMap:
  """The dataset's categories as a LabelMap (ascending id: `coco.load_coco`'s mapping)."""
  return coco.LabelMap.from_categories(stored_categories(builder))


def _record(image: dict[str, Any], objects: Mapping[str, np.ndarray], reader: TfdsImage,
            label_of: Mapping[int, int], max_instances: Optional[int],
            max_keypoints: Optional[int], keypoint_offset: float = 0.0
            ) -> tuple[dict[str, Any], list[int]]:
  """One image's record as `coco.load_coco` builds it (same drops, clipping and cap), and the
  annotation ids it leaves out for lack of a mask."""
  h, w = image['height'], image['width']
  kept, box_only = [], []
  for k in range(len(objects['id'])):
    if int(objects['category_id'][k]) not in label_of:
      continue
    x, y, bw, bh = (float(v) for v in objects['bbox'][k])
    # load_coco's clipping and degenerate-box rule, in the same float64 arithmetic.
    clipped = [min(max(x, 0.0), w), min(max(y, 0.0), h),
               min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)]
    if clipped[2] - clipped[0] < coco.MIN_BOX_SIDE or clipped[3] - clipped[1] < coco.MIN_BOX_SIDE:
      continue
    if not objects['has_mask'][k]:
      box_only.append(int(objects['id'][k]))
    kept.append((k, clipped))
  if max_instances is not None and len(kept) > max_instances:
    order = sorted(range(len(kept)), key=lambda i: (bool(objects['is_crowd'][kept[i][0]]),
                                                     -float(objects['area'][kept[i][0]]), i))
    kept = [kept[i] for i in sorted(order[:max_instances])]
  index = [k for k, _ in kept]
  record = {
      'image_id': image['id'],
      'file_name': image['file_name'],
      'height': h,
      'width': w,
      'image_reader': reader,
      'boxes': np.array([b for _, b in kept], np.float32).reshape(-1, 4),
      'labels': np.array([label_of[int(objects['category_id'][k])] for k in index], np.int32),
      'crowd': np.array([bool(objects['is_crowd'][k]) for k in index], bool),
      'areas': np.array([float(objects['area'][k]) for k in index], np.float32),
      'ann_ids': np.array([int(objects['id'][k]) for k in index], np.int64),
      'segmentations': [{'size': [h, w], 'counts': objects['mask'][k]}
                        if objects['has_mask'][k] else None for k in index],
      'has_mask': np.array([bool(objects['has_mask'][k]) for k in index], bool),
  }
  if max_keypoints is not None:  # [N, K, 3], K the map's largest set, as load_coco pads them
    keypoints = np.zeros((len(index), max_keypoints, 3), np.float32)
    if 'keypoints' in objects and index and max_keypoints:
      stored = np.asarray(objects['keypoints'], np.float32)[index]
      keypoints[:, :min(max_keypoints, NUM_KEYPOINTS)] = stored[:, :max_keypoints]
    if keypoint_offset:  # as load_coco: labelled keypoints only
      labelled = keypoints[..., 2] > 0
      keypoints[..., :2] += np.where(labelled, np.float32(keypoint_offset), 0)[..., None]
    record['keypoints'] = keypoints
    record['num_keypoints'] = (keypoints[..., 2] > 0).sum(-1).astype(np.int32)
  return record, box_only


def load_tfds(name: str, split: str, data_dir: Optional[str] = None, *,
              label_map: Optional[coco.LabelMap] = None,
              max_instances: Optional[int] = None, require_masks: bool = True,
              with_keypoints: bool = False, keypoint_offset: float = 0.0) -> TfdsDataset:
  """Reads a built `coco_instances` split into `coco.load_coco`'s records (see `TfdsDataset`).

  The split is read once, with its images left encoded: the records keep each image's stored
  size and a lazy `image_reader`; the pixels are decoded only when a record's image is asked
  for (`coco.record_image`), so batch planning decodes nothing.

  Args:
    name: 'coco_instances/coco2017' or 'coco_instances/shapes' (optionally ':VERSION').
    split: 'train', 'validation' or any TFDS split expression ('train[:1000]').
    data_dir: where the dataset was built (None: TFDS's default, $TFDS_DATA_DIR).
    label_map, max_instances, require_masks, with_keypoints, keypoint_offset: as in
      `coco.load_coco` (the default map is the stored categories' in ascending id order, as
      load_coco derives it; with keypoints the categories' stored sets join the map; the
      offset moves the records' keypoints, `gt_dict()` keeps the stored ones).

  Raises:
    TfdsNotFoundError: the dataset is not built in `data_dir`, or has no split `split`.
    coco.CocoFormatError: masks are required and some annotations are box-only.
  """
  builder = _open_builder(name, data_dir)
  _check_split(builder, name, split)
  categories = stored_categories(builder)
  where = f'{name} split {split!r}'
  if label_map is None:
    label_map = coco.LabelMap.from_categories(categories)
  max_keypoints = None
  if with_keypoints:
    label_map = coco.with_file_keypoint_sets(label_map, {'categories': categories}, where)
    max_keypoints = max(label_map.num_keypoints)
  label_of = label_map.label_of()
  records, box_only = [], []
  for index, image, objects in _read_split(name, split, data_dir):
    reader = TfdsImage(name, split, data_dir, index, image['file_name'], image['height'],
                       image['width'])
    record, missing = _record(image, objects, reader, label_of, max_instances, max_keypoints,
                              keypoint_offset)
    records.append(record)
    box_only += missing
  if require_masks and box_only:
    raise coco.CocoFormatError(
        f'{where}: {len(box_only)} annotations have no segmentation (box-only, e.g. ids '
        f'{box_only[:coco.MAX_LOGGED_EXAMPLES]}) but masks are required. To train boxes only, '
        'pass --config.model.mask_on=False')
  logger.info('%s: %d images, %d annotations kept, %d categories', where, len(records),
              sum(len(r['labels']) for r in records), len(label_map.category_ids))
  return TfdsDataset(records, label_map, json_path=f'tfds:{name}[{split}]',
                     image_dir=data_dir or '', with_keypoints=with_keypoints, tfds_name=name,
                     tfds_split=split, tfds_data_dir=data_dir, categories=categories)


# ------------------------------------------------------------------------------------ building
def build(config: str, manual_dir: str, data_dir: Optional[str] = None
          ) -> tfds.core.DatasetBuilder:
  """Builds `coco_instances/<config>` from the COCO-format folder `manual_dir` as ArrayRecord
  files under `data_dir` (None: TFDS's default); returns the builder."""
  builder = CocoInstances(config=config, data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder

