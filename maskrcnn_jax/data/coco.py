"""COCO-format instance datasets: an images folder plus an `instances_*.json`, read to records.

A record is one image with its annotations in the ORIGINAL image frame:

    image_id       int
    file_name      str      absolute path of the image file
    (image         uint8 [H, W, 3]  optional: already decoded pixels, used instead of the file)
    height, width  int      as declared in the JSON (checked again when the image is decoded)
    boxes          float32 [N, 4]  xyxy, original-image pixels, clipped to the image
    labels         int32   [N]     contiguous labels 1..K (0 is background)
    crowd          bool    [N]     iscrowd annotations (ignore regions)
    areas          float32 [N]     COCO `area`
    ann_ids        int64   [N]
    segmentations  list of N raw COCO segmentations (polygon lists or RLE dicts), validated

Masks are decoded lazily with `decode_masks(record)`, exactly as pycocotools' `annToMask`.
Problems in the input are either a `CocoFormatError`/`ImageDecodeError` naming the file, image
or annotation, or an annotation/image skipped and counted in `CocoDataset.stats` (and logged).
"""

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

MIN_BOX_SIDE = 1.0  # boxes narrower or shorter than one pixel are degenerate and dropped
MIN_POLYGON_COORDS = 6  # a polygon needs at least three (x, y) points
MAX_LOGGED_EXAMPLES = 5  # how many offending ids/files a warning lists
UINT16_TO_UINT8 = 257.0  # 65535 / 255: maps 16-bit intensities onto 0..255


class CocoFormatError(ValueError):
  """The annotation file is not a COCO instances file; the message names the file."""


class ImageDecodeError(OSError):
  """An image file is missing, unreadable, corrupt or of unexpected size; names the file."""


# ------------------------------------------------------------------------------ label maps
@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Contiguous labels 1..K <-> COCO category ids. `category_ids[i]` is the id of label i + 1."""
  category_ids: tuple[int, ...]
  names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    """K + 1: the classes plus background (config.model.num_classes)."""
    return len(self.category_ids) + 1

  def label_of(self) -> dict[int, int]:
    """{category_id: label}."""
    return {cid: i + 1 for i, cid in enumerate(self.category_ids)}

  def label_to_category_id(self) -> dict[int, int]:
    """{label: category_id} (what the evaluator needs)."""
    return {i + 1: cid for i, cid in enumerate(self.category_ids)}

  def meta(self) -> dict[str, Any]:
    """Checkpoint metadata: {'label_to_category_id': {label: id}, 'class_names': [K names]}."""
    return {'label_to_category_id': self.label_to_category_id(), 'class_names': list(self.names)}

  def to_json(self) -> dict[str, Any]:
    return {'category_ids': list(self.category_ids), 'names': list(self.names)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'LabelMap':
    return cls(tuple(int(c) for c in d['category_ids']), tuple(str(n) for n in d['names']))

  @classmethod
  def from_categories(cls, categories: Sequence[dict[str, Any]]) -> 'LabelMap':
    """Labels in ascending category-id order (torchvision/detectron2 contiguous mapping)."""
    cats = sorted(categories, key=lambda c: int(c['id']))
    return cls(tuple(int(c['id']) for c in cats), tuple(str(c.get('name', c['id'])) for c in cats))


def save_label_map(path: str, label_map: LabelMap) -> None:
  """Writes the label map as JSON (stored next to checkpoints)."""
  with open(path, 'w') as f:
    json.dump(label_map.to_json(), f, indent=1)


def load_label_map(path: str) -> LabelMap:
  with open(path) as f:
    return LabelMap.from_json(json.load(f))


# ----------------------------------------------------------------------------------- dataset
@dataclasses.dataclass
class CocoDataset:
  """Records of one split plus its label map and the skip counts of loading it."""
  records: list[dict[str, Any]]
  label_map: LabelMap
  json_path: str
  image_dir: str
  stats: dict[str, int] = dataclasses.field(default_factory=dict)


def _read_json(json_path: str) -> dict[str, Any]:
  try:
    with open(json_path) as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise CocoFormatError(f'{json_path}: annotation file not found') from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CocoFormatError(f'{json_path}: not valid JSON ({e})') from e
  if not isinstance(data, dict):
    raise CocoFormatError(f'{json_path}: not a COCO instances file (top level is '
                          f'{type(data).__name__}, expected an object)')
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(data.get(key), list):
      raise CocoFormatError(f'{json_path}: not a COCO instances file (missing list "{key}")')
  for i, cat in enumerate(data['categories']):
    if not isinstance(cat, dict) or 'id' not in cat:
      raise CocoFormatError(f'{json_path}: categories[{i}] has no "id"')
  for i, img in enumerate(data['images']):
    if not isinstance(img, dict) or any(k not in img for k in ('id', 'file_name', 'height',
                                                                'width')):
      raise CocoFormatError(f'{json_path}: images[{i}] needs id, file_name, height and width')
  return data


def _finite_numbers(values) -> bool:
  try:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values)
  except TypeError:
    return False


def _clean_segmentation(segm, height: int, width: int, counts: collections.Counter):
  """Returns a usable segmentation or None (reason counted)."""
  if isinstance(segm, list):
    parts = []
    for part in segm:
      if not isinstance(part, list) or not _finite_numbers(part):
        counts['polygon_part_nonfinite_dropped'] += 1
      elif len(part) < MIN_POLYGON_COORDS or len(part) % 2:
        # pycocotools would misread a 4-number polygon as a box, so reject short ones here.
        counts['polygon_part_too_short_dropped'] += 1
      else:
        parts.append([float(v) for v in part])
    return parts or None
  if isinstance(segm, dict) and 'counts' in segm and 'size' in segm:
    if [int(s) for s in segm['size']] != [height, width]:
      counts['rle_size_mismatch_dropped'] += 1
      return None
    return segm
  return None


def load_coco(json_path: str, image_dir: str, *, label_map: Optional[LabelMap] = None,
              max_instances: Optional[int] = None, check_files: bool = True) -> CocoDataset:
  """Reads a COCO instances JSON into records (see the module docstring).

  Args:
    json_path: the instances JSON.
    image_dir: folder that `file_name`s are relative to.
    label_map: use this category-id <-> label map (e.g. the training split's) instead of the
      file's categories; annotations of other categories are skipped.
    max_instances: keep at most this many annotations per image: non-crowd before crowd, then the
      largest `area` first (the images capped are counted and logged).
    check_files: skip (count, log) images whose file does not exist.
  Raises:
    CocoFormatError: the file is not JSON or not COCO instances.
  """
  data = _read_json(json_path)
  if label_map is None:
    label_map = LabelMap.from_categories(data['categories'])
  label_of = label_map.label_of()
  counts = collections.Counter()
  examples = collections.defaultdict(list)

  def skip(reason: str, what) -> None:
    counts[reason] += 1
    if len(examples[reason]) < MAX_LOGGED_EXAMPLES:
      examples[reason].append(what)

  images = {}
  for img in data['images']:
    image_id = int(img['id'])
    if image_id in images:
      raise CocoFormatError(f'{json_path}: duplicate image id {image_id}')
    images[image_id] = img
  per_image = collections.defaultdict(list)
  for ann in data['annotations']:
    ann_id = ann.get('id')
    image_id = ann.get('image_id')
    if image_id not in images:
      skip('annotation_unknown_image', ann_id)
      continue
    if ann.get('category_id') not in label_of:
      skip('annotation_unknown_category', ann_id)
      continue
    img = images[image_id]
    h, w = int(img['height']), int(img['width'])
    bbox = ann.get('bbox')
    if not isinstance(bbox, list) or len(bbox) != 4 or not _finite_numbers(bbox):
      skip('annotation_bad_bbox', ann_id)  # NaN/inf or malformed
      continue
    x, y, bw, bh = (float(v) for v in bbox)
    box = [x, y, x + bw, y + bh]
    clipped = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h),
               min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    if clipped != box and bw > 0 and bh > 0:
      skip('box_clipped_to_image', ann_id)  # counted, the annotation is kept (torchvision clamps)
    if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
      skip('annotation_degenerate_box', ann_id)
      continue
    segm = _clean_segmentation(ann.get('segmentation'), h, w, counts)
    if segm is None:
      skip('annotation_empty_segmentation', ann_id)
      continue
    area = ann.get('area', bw * bh)
    area = float(area) if _finite_numbers([area]) else bw * bh
    per_image[image_id].append((int(ann_id) if ann_id is not None else -1, clipped,
                                label_of[ann['category_id']], bool(ann.get('iscrowd', 0)), area,
                                segm))

  records = []
  for image_id, img in images.items():
    path = os.path.join(image_dir, img['file_name'])
    if check_files and not os.path.isfile(path):
      skip('image_file_missing', path)
      continue
    anns = per_image.get(image_id, [])
    if max_instances is not None and len(anns) > max_instances:
      skip('image_instances_capped', image_id)
      order = sorted(range(len(anns)), key=lambda i: (anns[i][3], -anns[i][4], i))
      keep = sorted(order[:max_instances])
      anns = [anns[i] for i in keep]
    records.append({
        'image_id': image_id,
        'file_name': path,
        'height': int(img['height']),
        'width': int(img['width']),
        'boxes': np.array([a[1] for a in anns], np.float32).reshape(-1, 4),
        'labels': np.array([a[2] for a in anns], np.int32),
        'crowd': np.array([a[3] for a in anns], bool),
        'areas': np.array([a[4] for a in anns], np.float32),
        'ann_ids': np.array([a[0] for a in anns], np.int64),
        'segmentations': [a[5] for a in anns],
    })
  records.sort(key=lambda r: r['image_id'])
  for reason, n in sorted(counts.items()):
    log.warning('%s: %s: %d (e.g. %s)', json_path, reason, n, examples.get(reason, []))
  log.info('%s: %d images, %d annotations kept, %d categories', json_path, len(records),
           sum(len(r['labels']) for r in records), len(label_map.category_ids))
  return CocoDataset(records, label_map, json_path, image_dir, dict(counts))


# --------------------------------------------------------------------------- masks, images
def segmentation_to_rle(segm, height: int, width: int) -> dict[str, Any]:
  """One annotation's segmentation as a compressed RLE (pycocotools COCO.annToRLE)."""
  if isinstance(segm, list):
    return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  if isinstance(segm['counts'], list):
    return mask_utils.frPyObjects(segm, height, width)
  return segm


def decode_masks(record: dict[str, Any]) -> np.ndarray:
  """uint8 [N, height, width] 0/1 masks of a record, equal to pycocotools annToMask."""
  h, w = record['height'], record['width']
  segms = record['segmentations']
  if not segms:
    return np.zeros((0, h, w), np.uint8)
  rles = [segmentation_to_rle(s, h, w) for s in segms]
  return np.ascontiguousarray(np.moveaxis(mask_utils.decode(rles), -1, 0))


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 [H, W, 3] RGB.

  Grayscale is replicated, alpha is dropped, palettes are expanded, and 16-bit (or 32-bit
  integer) intensities are scaled from 0..65535 to 0..255 rather than clipped.
  """
  mode = image.mode
  if mode.startswith('I'):  # 'I;16', 'I;16B', 'I': 16-bit grayscale PNGs and TIFFs
    arr = np.asarray(image).astype(np.float64)
    arr = np.clip(np.round(arr / UINT16_TO_UINT8), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode == 'F':
    arr = np.clip(np.round(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, np.uint8).copy()


def load_image(path: str, expected_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] RGB (EXIF orientation is ignored, as COCO does).

  Raises:
    ImageDecodeError: missing, unreadable, truncated or corrupt file, or a size different from
      `expected_hw` (the JSON's height/width); the message names the file.
  """
  try:
    with Image.open(path) as im:
      im.load()
      arr = to_rgb_uint8(im)
  except FileNotFoundError as e:
    raise ImageDecodeError(f'{path}: image file not found') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f'{path}: cannot decode image ({e})') from e
  if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
    raise ImageDecodeError(f'{path}: decoded size {arr.shape[0]}x{arr.shape[1]} differs from '
                           f'the annotation file\'s {expected_hw[0]}x{expected_hw[1]}')
  return arr


def record_image(record: dict[str, Any]) -> np.ndarray:
  """The record's pixels: its decoded 'image' when present, else the file decoded."""
  image = record.get('image')
  if image is not None:
    return np.asarray(image, np.uint8)
  return load_image(record['file_name'], (record['height'], record['width']))


def verify_images(records: Sequence[dict[str, Any]]) -> list[str]:
  """Decodes every image; returns the error messages (empty when all are fine). Slow."""
  errors = []
  for r in records:
    try:
      load_image(r['file_name'], (r['height'], r['width']))
    except ImageDecodeError as e:
      errors.append(str(e))
  return errors
