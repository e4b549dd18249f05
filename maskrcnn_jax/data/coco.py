"""COCO-format instance datasets: an images folder plus an `instances_*.json`, read to records.

A record is one image with its annotations in the ORIGINAL image frame:

    image_id       int
    file_name      str      absolute path of the image file (a TFDS record: the stored name)
    (image         uint8 [H, W, 3]  optional: already decoded pixels, used instead of the file)
    (image_reader  optional: a picklable callable returning the pixels, used instead of the file
                   (TFDS records, `tfds_builder.TfdsImage`); `record_image` reads any of the three)
    height, width  int      as declared in the JSON (checked again when the image is decoded)
    boxes          float32 [N, 4]  xyxy, original-image pixels, clipped to the image
    labels         int32   [N]     contiguous labels 1..K (0 is background)
    crowd          bool    [N]     iscrowd annotations (ignore regions)
    areas          float32 [N]     COCO `area` (from the mask, or the box, where the file has none)
    ann_ids        int64   [N]     unique: the ids of `CocoDataset.gt_dict()`'s annotations
    segmentations  list of N raw COCO segmentations (polygon lists or RLE dicts), validated;
                   None for a box-only annotation (only with `load_coco(require_masks=False)`)
    has_mask       bool    [N]     the annotation has a segmentation
    (only with `load_coco(with_keypoints=True)`:)
    keypoints      float32 [N, K, 3]  (x, y, v) per keypoint of the annotation's category, in
                   ORIGINAL image pixels as the file gives them plus `keypoint_offset` on the
                   labelled ones (0 by default, torchvision's convention; detectron2 adds 0.5);
                   K = the largest set of the label map, zeros past the category's own K_c and
                   for categories without a set
    num_keypoints  int32   [N]     labelled keypoints (v > 0), COCO's `num_keypoints`

Keypoint sets are per category (`categories[i]['keypoints']`, names, and `skeleton`, 1-based
index pairs, the COCO convention); the label map carries them per label (`LabelMap`).

Masks are decoded lazily with `decode_masks(record)`, exactly as pycocotools' `annToMask`.
Problems in the input are either a `CocoFormatError`/`ImageDecodeError` naming the file, image
or annotation, or an annotation/image skipped, or a field normalised, and counted in
`CocoDataset.stats` (and logged). Images are decoded in their displayed orientation (EXIF).
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps
from pycocotools import mask as mask_utils

log = logging.getLogger(__name__)

MIN_BOX_SIDE = 1.0  # boxes narrower or shorter than one pixel are degenerate and dropped
MIN_POLYGON_COORDS = 6  # a polygon needs at least three (x, y) points
MAX_LOGGED_EXAMPLES = 5  # how many offending ids/files a warning lists
UINT16_TO_UINT8 = 257.0  # 65535 / 255: maps 16-bit intensities onto 0..255
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the stored pixels are turned for display
MAX_LISTED_ERRORS = 50  # how many bad images an up-front verification error lists
KEYPOINT_VISIBILITIES = (0, 1, 2)  # COCO: 0 not labelled, 1 labelled but hidden, 2 visible
# Normalisations that are routine for some datasets: logged at INFO, not as warnings.
_INFO_REASONS = ('annotation_box_only_kept', 'keypoints_missing_set_0')


class CocoFormatError(ValueError):
  """The annotation file is not a COCO instances file; the message names the file."""


class ImageDecodeError(OSError):
  """An image file is missing, unreadable, corrupt or of unexpected size; names the file."""


# ------------------------------------------------------------------------------ label maps
KeypointSet = tuple[tuple[str, ...], tuple[tuple[int, int], ...]]  # (names, 0-based skeleton)
_SIDES = (('left_', 'right_'), ('right_', 'left_'))


def flip_map_from_names(names: Sequence[str]) -> tuple[int, ...]:
  """The mirror of each keypoint under a horizontal flip, derived from its name.

  Entry k is the index of keypoint k's mirror: `left_<part>` <-> `right_<part>`, and itself for
  a name without a side (`nose`, `apex`) or whose other side is not in the set. Applied to a
  flipped instance as `flipped[k] = keypoints[flip_map[k]]` (torchvision's
  `_flip_coco_person_keypoints` does this with COCO's fixed person list).
  """
  index = {n: k for k, n in enumerate(names)}
  out = []
  for k, name in enumerate(names):
    mirror = k
    for side, other in _SIDES:
      if name.startswith(side) and other + name[len(side):] in index:
        mirror = index[other + name[len(side):]]
    out.append(mirror)
  return tuple(out)


def category_keypoint_sets(categories: Sequence[dict[str, Any]], where: str
                           ) -> dict[int, KeypointSet]:
  """{category id: (keypoint names, 0-based skeleton pairs)} of the categories that declare a
  keypoint set (a non-empty `keypoints` list; `skeleton` optional, 1-based as COCO writes it).

  Raises:
    CocoFormatError: names that are not a list of distinct strings, or a skeleton that is not a
      list of index pairs within 1..K_c; the message starts with `where` and names the category.
  """
  sets = {}
  for i, cat in enumerate(categories):
    names = cat.get('keypoints')
    if not names:
      continue
    what = f'{where}: categories[{i}] (id {cat["id"]}, {cat.get("name", "")!r})'
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise CocoFormatError(f'{what}: "keypoints" must be a list of keypoint names')
    if len(set(names)) != len(names):
      raise CocoFormatError(f'{what}: "keypoints" repeats a name ({names})')
    skeleton = cat.get('skeleton') or []
    pairs = []
    for pair in skeleton if isinstance(skeleton, list) else [skeleton]:
      ends = [_integer(v) for v in pair] if isinstance(pair, list) else [None]
      if len(ends) != 2 or any(e is None or not 1 <= e <= len(names) for e in ends):
        raise CocoFormatError(f'{what}: "skeleton" entry {pair!r} is not a pair of 1-based '
                              f'keypoint indices in 1..{len(names)}')
      pairs.append((ends[0] - 1, ends[1] - 1))
    sets[_integer(cat['id'])] = (tuple(names), tuple(pairs))
  return sets


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Contiguous labels 1..K <-> COCO category ids. `category_ids[i]` is the id of label i + 1.

  The keypoint fields are indexed like `names` (entry i is label i + 1) and are either all
  empty (no keypoint information: datasets read without keypoints) or hold one entry per label:
  `keypoint_names[i]` the label's keypoint names (() when it has no set), `keypoint_skeleton[i]`
  0-based index pairs, `keypoint_flip_map[i]` the mirror of each keypoint
  (`flip_map_from_names`, or the config's `data.keypoint_flip_map`).
  """
  category_ids: tuple[int, ...]
  names: tuple[str, ...]
  keypoint_names: tuple[tuple[str, ...], ...] = ()
  keypoint_skeleton: tuple[tuple[tuple[int, int], ...], ...] = ()
  keypoint_flip_map: tuple[tuple[int, ...], ...] = ()

  @property
  def num_classes(self) -> int:
    """K + 1: the classes plus background (config.model.num_classes)."""
    return len(self.category_ids) + 1

  @property
  def has_keypoints(self) -> bool:
    """Whether the map carries keypoint sets (possibly all empty)."""
    return bool(self.keypoint_names)

  @property
  def num_keypoints(self) -> tuple[int, ...]:
    """K_c per label, index 0 = background = 0 (the layout of
    `config.model.keypoint_head.num_keypoints`)."""
    if not self.has_keypoints:
      return (0,) * self.num_classes
    return (0,) + tuple(len(n) for n in self.keypoint_names)

  def with_keypoint_sets(self, sets: dict[int, KeypointSet]) -> 'LabelMap':
    """This map with each label's keypoint set taken from `sets` ({category id: (names,
    skeleton)}; a category not in it has none) and the flip maps derived from the names."""
    names = tuple(sets.get(c, ((), ()))[0] for c in self.category_ids)
    skeleton = tuple(sets.get(c, ((), ()))[1] for c in self.category_ids)
    for label_names in names:
      lonely = [n for n, m in zip(label_names, flip_map_from_names(label_names))
                if n.startswith(('left_', 'right_')) and label_names[m] == n]
      if lonely:
        log.warning('keypoints %s have no mirror of the other side in their set %s; a flip '
                    'keeps them in place', lonely, label_names)
    return dataclasses.replace(self, keypoint_names=names, keypoint_skeleton=skeleton,
                               keypoint_flip_map=tuple(flip_map_from_names(n) for n in names))

  def with_flip_maps(self, flip_maps: Sequence[Sequence[int]]) -> 'LabelMap':
    """This map with `flip_maps` (one permutation per label 1..K) as its keypoint flip maps."""
    return dataclasses.replace(self, keypoint_flip_map=tuple(tuple(int(k) for k in f)
                                                             for f in flip_maps))

  def label_of(self) -> dict[int, int]:
    """{category_id: label}."""
    return {cid: i + 1 for i, cid in enumerate(self.category_ids)}

  def label_to_category_id(self) -> dict[int, int]:
    """{label: category_id} (what the evaluator needs)."""
    return {i + 1: cid for i, cid in enumerate(self.category_ids)}

  def meta(self) -> dict[str, Any]:
    """Checkpoint metadata: {'label_to_category_id': {label: id}, 'class_names': [K names]},
    plus, when the map has keypoint sets, K-entry lists indexed like `class_names` (label
    i + 1 at i): 'keypoint_names' (lists of str, [] for none), 'keypoint_skeleton' (0-based
    [a, b] pairs) and 'keypoint_flip_map' (permutations), which the Predictor and the pictures
    read."""
    meta = {'label_to_category_id': self.label_to_category_id(), 'class_names': list(self.names)}
    if self.has_keypoints:
      meta.update(self._keypoint_json())
    return meta

  def _keypoint_json(self) -> dict[str, Any]:
    return {'keypoint_names': [list(n) for n in self.keypoint_names],
            'keypoint_skeleton': [[list(p) for p in s] for s in self.keypoint_skeleton],
            'keypoint_flip_map': [list(f) for f in self.keypoint_flip_map]}

  def to_json(self) -> dict[str, Any]:
    out = {'category_ids': list(self.category_ids), 'names': list(self.names)}
    if self.has_keypoints:
      out.update(self._keypoint_json())
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'LabelMap':
    """Inverse of `to_json`; also reads `meta()` output's keypoint fields (absent: none)."""
    return cls(tuple(int(c) for c in d['category_ids']), tuple(str(n) for n in d['names']),
               tuple(tuple(str(n) for n in names) for names in d.get('keypoint_names', ())),
               tuple(tuple((int(a), int(b)) for a, b in s)
                     for s in d.get('keypoint_skeleton', ())),
               tuple(tuple(int(k) for k in f) for f in d.get('keypoint_flip_map', ())))

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
  """Records of one split plus its label map and the counts of loading it.

  `stats` is {reason: count} of every annotation or image skipped and every field normalised.
  `json_signature` is (size, mtime_ns) of `json_path` when it was read (None: not from a file).
  `with_keypoints`: the records carry keypoints and `gt_dict()` normalises them.
  """
  records: list[dict[str, Any]]
  label_map: LabelMap
  json_path: str
  image_dir: str
  stats: dict[str, int] = dataclasses.field(default_factory=dict)
  json_signature: Optional[tuple[int, int]] = None
  with_keypoints: bool = False

  def gt_dict(self) -> dict[str, Any]:
    """The split's ground truth as a normalised COCO instances dict: evaluation must use it.

    pycocotools reading `json_path` itself sees the file's faults: it indexes annotations by
    id, so duplicate ids keep only the last one (perfect detections then score below AP 1), and
    a missing `id`, `iscrowd` or `area` raises inside COCOeval. This dict is the file's content
    with load_coco's fixes: unique annotation ids (the records' `ann_ids`), `iscrowd` 0 and
    `area` from the mask (or the box) where missing, polygon parts pycocotools would misread
    dropped, and without the annotations it cannot evaluate (unknown image, malformed box,
    unreadable segmentation). Every image and category of the file is kept, and so are the
    annotations the records leave out for training reasons only (degenerate boxes, categories
    outside the label map, the instance cap), so metrics stay those of the file's ground truth.
    Categories keep their `keypoints`/`skeleton`; with keypoints, each annotation of a category
    with a set has `keypoints` (3 K_c numbers; zeros where the file's were unusable) and
    `num_keypoints` (their v > 0 count), what pycocotools' keypoint evaluation reads.

    The file is read again rather than kept in memory (a training split's JSON is large); each
    call returns a fresh dict (COCOeval writes into the ground truth it is given).

    Raises:
      CocoFormatError: `json_path` changed since it was loaded.
    """
    if self.json_signature is not None and _file_signature(self.json_path) != self.json_signature:
      raise CocoFormatError(f'{self.json_path}: changed since it was loaded; load it again '
                            'before evaluating against it')
    data = read_instances_json(self.json_path)
    sizes = category_keypoint_sizes(data, self.json_path) if self.with_keypoints else None
    _, anns = normalise_annotations(data, self.json_path, lambda reason, what: None, sizes)
    gt = dict(data)
    gt['annotations'] = [a.to_gt() for a in anns]
    return gt

  def gt_coco(self):
    """`gt_dict()` as an indexed pycocotools COCO (what `evaluation.coco_evaluate` accepts)."""
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    coco_gt = COCO()
    coco_gt.dataset = self.gt_dict()
    coco_gt.createIndex()
    return coco_gt


def _file_signature(path: str) -> Optional[tuple[int, int]]:
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_size, st.st_mtime_ns


def read_instances_json(json_path: str) -> dict[str, Any]:
  """The parsed COCO instances file, checked for the lists and keys every reader needs.

  Raises:
    CocoFormatError: missing, not JSON, or not COCO instances; the message names the file.
  """
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


def _integer(value) -> Optional[int]:
  """`value` as an int when it is an integral JSON number (not a bool), else None."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  if isinstance(value, float) and not (math.isfinite(value) and value == int(value)):
    return None
  return int(value)


def _rle_string_counts(text: str) -> Optional[list[int]]:
  """Run lengths of a compressed COCO RLE string, or None when it is malformed.

  pycocotools' string format: each run length is a signed variable-length integer of 5-bit
  groups, one character each (value + 48), bit 0x20 meaning "more groups follow" and bit 0x10
  of the last group the sign; from the third on, a run is stored as its difference to the run
  two before. Decoded here in Python because pycocotools' decoder does not check the runs: runs
  past h*w write beyond its mask buffer, and a negative run wraps to ~4e9.
  """
  counts, pos, n = [], 0, len(text)
  while pos < n:
    value, shift, more = 0, 0, True
    while more:
      if pos >= n:
        return None
      c = ord(text[pos]) - 48
      if not 0 <= c < 64:
        return None
      value |= (c & 0x1f) << shift
      more = bool(c & 0x20)
      pos += 1
      shift += 5
      if not more and c & 0x10:
        value -= 1 << shift  # sign-extend
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def _rle_problem(segm: dict[str, Any], height: int, width: int) -> Optional[str]:
  """Why an RLE segmentation is unusable on a height x width image (a stats reason), or None.

  Uncompressed (list counts): non-negative integers summing to height * width. Compressed
  (string counts): decodable, with non-negative runs summing to height * width. Either way
  `size` must be [height, width].
  """
  size = segm['size']
  if not isinstance(size, (list, tuple)) or len(size) != 2 or None in map(_integer, size):
    return 'rle_invalid_dropped'
  if [_integer(v) for v in size] != [height, width]:
    return 'rle_size_mismatch_dropped'
  counts = segm['counts']
  if isinstance(counts, bytes):
    try:
      counts = counts.decode('ascii')
    except UnicodeDecodeError:
      return 'rle_invalid_dropped'
  if isinstance(counts, str):
    runs = _rle_string_counts(counts)
  elif isinstance(counts, list):
    runs = [_integer(v) for v in counts]
  else:
    return 'rle_invalid_dropped'
  if runs is None or None in runs or any(v < 0 for v in runs) or sum(runs) != height * width:
    return 'rle_invalid_dropped'
  return None


def _clean_segmentation(segm, height: int, width: int, note):
  """Returns a usable segmentation or None; `note(reason)` counts each part or RLE dropped.

  Polygon parts that are not finite numbers, or shorter than three points, are dropped (the
  rest is kept); an RLE is kept only when `_rle_problem` finds nothing wrong with it.
  """
  if isinstance(segm, list):
    parts = []
    for part in segm:
      if not isinstance(part, list) or not _finite_numbers(part):
        note('polygon_part_nonfinite_dropped')
      elif len(part) < MIN_POLYGON_COORDS or len(part) % 2:
        # pycocotools would misread a 4-number polygon as a box, so reject short ones here.
        note('polygon_part_too_short_dropped')
      else:
        parts.append([float(v) for v in part])
    return parts or None
  if isinstance(segm, dict) and 'counts' in segm and 'size' in segm:
    problem = _rle_problem(segm, height, width)
    if problem:
      note(problem)
      return None
    return segm
  return None


@dataclasses.dataclass(slots=True)
class _Annotation:
  """One annotation after `normalise_annotations` (its raw dict plus the normalised fields)."""
  raw: dict[str, Any]
  what: Any  # how messages name it: the file's id, or 'annotations[i]' where it has none
  id: int
  image_id: int
  iscrowd: int
  area: float
  segmentation: Any  # the cleaned polygons or RLE; None for a box-only annotation
  # The cleaned flat [x, y, v] * K_c list (K_c of its category, [] without a set); None when
  # keypoints are not read.
  keypoints: Optional[list[float]] = None

  def to_gt(self) -> dict[str, Any]:
    """The normalised COCO dict, as CocoDataset.gt_dict() lists it (built only when asked:
    load_coco does not copy a large training file's annotations)."""
    gt = dict(self.raw, id=self.id, image_id=self.image_id, iscrowd=self.iscrowd,
              area=self.area)
    if self.segmentation is None:
      gt.pop('segmentation', None)
    else:
      gt['segmentation'] = self.segmentation
    if self.keypoints is not None:
      gt.pop('keypoints', None)
      gt.pop('num_keypoints', None)
      if self.keypoints:
        gt['keypoints'] = list(self.keypoints)
        gt['num_keypoints'] = sum(v > 0 for v in self.keypoints[2::3])
    return gt


def category_keypoint_sizes(data: dict[str, Any], json_path: str) -> dict[int, int]:
  """{category id: K_c} of every category of the file (0 without a keypoint set)."""
  sets = category_keypoint_sets(data['categories'], json_path)
  return {_integer(c['id']): len(sets.get(_integer(c['id']), ((), ()))[0])
          for c in data['categories']}


def _clean_keypoints(raw, size: int, note) -> list[float]:
  """An annotation's keypoints as a flat [x, y, v] * size list of floats; zeros when the file's
  are unusable, `note(reason)` counting why (the annotation itself is kept).

  Unusable: a length other than 3 * size (the category's set), non-finite numbers, a
  visibility outside COCO's {0, 1, 2}, or keypoints on a category without a set (size 0).
  """
  zeros = [0.0] * (3 * size)
  if raw is None or (isinstance(raw, list) and not raw):
    if size:
      note('keypoints_missing_set_0')
    return zeros
  if not size:
    note('keypoints_without_category_set_dropped')
    return zeros
  if not isinstance(raw, list) or len(raw) != 3 * size:
    note('keypoints_bad_length_dropped')
    return zeros
  if not _finite_numbers(raw):
    note('keypoints_nonfinite_dropped')
    return zeros
  if any(v not in KEYPOINT_VISIBILITIES for v in raw[2::3]):
    note('keypoints_bad_visibility_dropped')
    return zeros
  return [float(v) for v in raw]


def normalise_annotations(data: dict[str, Any], json_path: str, skip,
                          keypoint_sizes: Optional[dict[int, int]] = None
                          ) -> tuple[dict[int, dict[str, Any]], list[_Annotation]]:
  """The file's images by id, and its annotations that pycocotools can evaluate, normalised.

  Shared by load_coco, CocoDataset.gt_dict() and the TFDS builder, and deterministic, so all
  give every annotation the same id. `skip(reason, what)` is told of every change and drop:

  * id: the first annotation of an id keeps it; later ones with that id
    ('annotation_id_duplicate_renumbered') and ones without an integer id
    ('annotation_id_missing_assigned') get fresh ids above the file's largest, in file order.
  * iscrowd missing or not 0/1: 0 ('annotation_iscrowd_missing_set_0').
  * area missing or not finite: pycocotools' area of the mask, or w * h of the box for a
    box-only annotation ('annotation_area_missing_computed').
  * segmentation absent, null or [] (detectron2's test): box-only, segmentation None.
  * dropped: unknown image, malformed or non-finite bbox, or a segmentation of which nothing
    usable is left (see _clean_segmentation).
  * keypoints, only when `keypoint_sizes` ({category id: K_c}) is given: cleaned by
    `_clean_keypoints` (unusable ones become zeros, the annotation stays).
  """
  images = {}
  for img in data['images']:
    image_id = int(img['id'])
    if image_id in images:
      raise CocoFormatError(f'{json_path}: duplicate image id {image_id}')
    images[image_id] = img
  raw = data['annotations']
  given = [_integer(a.get('id')) if isinstance(a, dict) else None for a in raw]
  next_id = max((i for i in given if i is not None), default=0) + 1
  used, out = set(), []
  for k, (ann, ann_id) in enumerate(zip(raw, given)):
    if not isinstance(ann, dict):
      skip('annotation_not_an_object', f'annotations[{k}]')
      continue
    what = ann['id'] if 'id' in ann else f'annotations[{k}]'
    if ann_id is None or ann_id in used:
      skip('annotation_id_missing_assigned' if ann_id is None
           else 'annotation_id_duplicate_renumbered', what)
      ann_id, next_id = next_id, next_id + 1
    used.add(ann_id)
    image_id = _integer(ann.get('image_id'))
    if image_id not in images:
      skip('annotation_unknown_image', what)
      continue
    img = images[image_id]
    h, w = int(img['height']), int(img['width'])
    bbox = ann.get('bbox')
    if not isinstance(bbox, list) or len(bbox) != 4 or not _finite_numbers(bbox):
      skip('annotation_bad_bbox', what)  # NaN/inf or malformed
      continue
    raw_segm = ann.get('segmentation')
    if raw_segm is None or (isinstance(raw_segm, list) and not raw_segm):
      segm = None
    else:
      segm = _clean_segmentation(raw_segm, h, w, lambda reason: skip(reason, what))
      if segm is None:
        skip('annotation_empty_segmentation', what)
        continue
    crowd = ann.get('iscrowd')
    if not isinstance(crowd, (int, float)) or crowd not in (0, 1):
      skip('annotation_iscrowd_missing_set_0', what)
      crowd = 0
    area = ann.get('area')
    if not _finite_numbers([area]):
      skip('annotation_area_missing_computed', what)
      area = (float(bbox[2]) * float(bbox[3]) if segm is None else
              float(mask_utils.area(segmentation_to_rle(segm, h, w))))
    keypoints = None
    if keypoint_sizes is not None:
      size = keypoint_sizes.get(_integer(ann.get('category_id')), 0)
      keypoints = _clean_keypoints(ann.get('keypoints'), size, lambda reason: skip(reason, what))
    out.append(_Annotation(ann, what, ann_id, image_id, int(crowd), float(area), segm,
                           keypoints))
  return images, out


def load_coco(json_path: str, image_dir: str, *, label_map: Optional[LabelMap] = None,
              max_instances: Optional[int] = None, check_files: bool = True,
              require_masks: bool = True, with_keypoints: bool = False,
              keypoint_offset: float = 0.0) -> CocoDataset:
  """Reads a COCO instances JSON into records (see the module docstring).

  Annotation fields are normalised as `normalise_annotations` says (unique ids, iscrowd, area;
  counted in `stats`); evaluate against `CocoDataset.gt_dict()`, which carries the same fixes.

  Args:
    json_path: the instances JSON.
    image_dir: folder that `file_name`s are relative to.
    label_map: use this category-id <-> label map (e.g. the training split's) instead of the
      file's categories; annotations of other categories are skipped.
    max_instances: keep at most this many annotations per image: non-crowd before crowd, then the
      largest `area` first (the images capped are counted and logged).
    check_files: skip (count, log) images whose file does not exist.
    require_masks: every kept annotation must have a segmentation (Mask R-CNN training). False
      keeps box-only annotations: their `segmentations` entry is None, `has_mask` False, and
      `decode_masks` gives them an empty mask.
    with_keypoints: read the categories' keypoint sets into the label map (a given `label_map`
      gets them from this file's categories) and each annotation's keypoints into the records
      (`keypoints`, `num_keypoints`); unusable keypoints become zeros, counted in `stats`
      ('keypoints_bad_length_dropped', '..._nonfinite_...', '..._bad_visibility_...',
      'keypoints_without_category_set_dropped'), with annotation ids in the log.
    keypoint_offset: added to x and y of every labelled (v > 0) keypoint of the records
      (`config.data.keypoint_offset`; detectron2's 0.5 turns COCO's integer pixel indices into
      pixel centres). `gt_dict()` keeps the file's values: evaluation subtracts the offset from
      the predictions instead (`evaluation.coco_eval.detections_to_coco_results`).
  Raises:
    CocoFormatError: the file is not JSON or not COCO instances, or masks are required and some
      annotations are box-only (the message gives their count and the way to train boxes only),
      or a category's keypoint set is malformed or differs from the one `label_map` carries.
  """
  data = read_instances_json(json_path)
  signature = _file_signature(json_path)
  if label_map is None:
    label_map = LabelMap.from_categories(data['categories'])
  keypoint_sizes = None
  if with_keypoints:
    keypoint_sizes = category_keypoint_sizes(data, json_path)
    label_map = with_file_keypoint_sets(label_map, data, json_path)
  label_of = label_map.label_of()
  counts = collections.Counter()
  examples = collections.defaultdict(list)

  def skip(reason: str, what) -> None:
    counts[reason] += 1
    if len(examples[reason]) < MAX_LOGGED_EXAMPLES:
      examples[reason].append(what)

  images, anns = normalise_annotations(data, json_path, skip, keypoint_sizes)
  per_image = collections.defaultdict(list)
  box_only = []
  for a in anns:
    category = _integer(a.raw.get('category_id'))
    if category not in label_of:
      skip('annotation_unknown_category', a.what)
      continue
    img = images[a.image_id]
    h, w = int(img['height']), int(img['width'])
    x, y, bw, bh = (float(v) for v in a.raw['bbox'])
    box = [x, y, x + bw, y + bh]
    clipped = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h),
               min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
    if clipped != box and bw > 0 and bh > 0:
      skip('box_clipped_to_image', a.what)  # counted, the annotation is kept (torchvision clamps)
    if clipped[2] - clipped[0] < MIN_BOX_SIDE or clipped[3] - clipped[1] < MIN_BOX_SIDE:
      skip('annotation_degenerate_box', a.what)
      continue
    if a.segmentation is None:
      if require_masks:
        box_only.append(a.what)
        continue
      skip('annotation_box_only_kept', a.what)
    per_image[a.image_id].append((a.id, clipped, label_of[category], bool(a.iscrowd), a.area,
                                  a.segmentation, a.keypoints))
  if box_only:
    raise CocoFormatError(
        f'{json_path}: {len(box_only)} of {len(data["annotations"])} annotations have no '
        f'segmentation (box-only, e.g. ids {box_only[:MAX_LOGGED_EXAMPLES]}) but masks are '
        'required. To train boxes only, pass --config.model.mask_on=False '
        '(load_coco(..., require_masks=False)); otherwise add their masks or remove them '
        'from the file')

  max_keypoints = max(label_map.num_keypoints)
  records = []
  for image_id, img in images.items():
    path = os.path.join(image_dir, img['file_name'])
    if check_files and not os.path.isfile(path):
      skip('image_file_missing', path)
      continue
    anns_of = per_image.get(image_id, [])
    if max_instances is not None and len(anns_of) > max_instances:
      skip('image_instances_capped', image_id)
      order = sorted(range(len(anns_of)), key=lambda i: (anns_of[i][3], -anns_of[i][4], i))
      keep = sorted(order[:max_instances])
      anns_of = [anns_of[i] for i in keep]
    records.append({
        'image_id': image_id,
        'file_name': path,
        'height': int(img['height']),
        'width': int(img['width']),
        'boxes': np.array([a[1] for a in anns_of], np.float32).reshape(-1, 4),
        'labels': np.array([a[2] for a in anns_of], np.int32),
        'crowd': np.array([a[3] for a in anns_of], bool),
        'areas': np.array([a[4] for a in anns_of], np.float32),
        'ann_ids': np.array([a[0] for a in anns_of], np.int64),
        'segmentations': [a[5] for a in anns_of],
        'has_mask': np.array([a[5] is not None for a in anns_of], bool),
    })
    if with_keypoints:
      keypoints = np.zeros((len(anns_of), max_keypoints, 3), np.float32)
      for k, a in enumerate(anns_of):
        keypoints[k, :len(a[6]) // 3] = np.reshape(a[6], (-1, 3))
      if keypoint_offset:
        labelled = keypoints[..., 2] > 0
        keypoints[..., :2] += np.where(labelled, np.float32(keypoint_offset), 0)[..., None]
      records[-1]['keypoints'] = keypoints
      records[-1]['num_keypoints'] = (keypoints[..., 2] > 0).sum(-1).astype(np.int32)
  records.sort(key=lambda r: r['image_id'])
  for reason, n in sorted(counts.items()):
    level = logging.INFO if reason in _INFO_REASONS else logging.WARNING
    log.log(level, '%s: %s: %d (e.g. %s)', json_path, reason, n, examples.get(reason, []))
  log.info('%s: %d images, %d annotations kept, %d categories', json_path, len(records),
           sum(len(r['labels']) for r in records), len(label_map.category_ids))
  return CocoDataset(records, label_map, json_path, image_dir, dict(counts), signature,
                     with_keypoints)


def with_file_keypoint_sets(label_map: LabelMap, data: dict[str, Any], json_path: str
                            ) -> LabelMap:
  """`label_map` with the keypoint sets of the file's categories; a map that already carries
  sets (a checkpoint's) must agree with the file on every label's names."""
  sets = category_keypoint_sets(data['categories'], json_path)
  merged = label_map.with_keypoint_sets(sets)
  if label_map.has_keypoints:
    for label, (mine, theirs) in enumerate(zip(label_map.keypoint_names, merged.keypoint_names),
                                           start=1):
      if tuple(mine) != tuple(theirs):
        raise CocoFormatError(
            f'{json_path}: category {label_map.category_ids[label - 1]} (label {label}) '
            f'declares keypoints {list(theirs)} but the label map (e.g. a checkpoint\'s) has '
            f'{list(mine)}')
    # Keep the given map's flip maps (they may come from data.keypoint_flip_map).
    merged = merged.with_flip_maps(label_map.keypoint_flip_map)
  return merged


# --------------------------------------------------------------------------- masks, images
def segmentation_to_rle(segm, height: int, width: int) -> dict[str, Any]:
  """One annotation's segmentation as a compressed RLE (pycocotools COCO.annToRLE)."""
  if isinstance(segm, list):
    return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
  if isinstance(segm['counts'], list):
    return mask_utils.frPyObjects(segm, height, width)
  return segm


def decode_masks(record: dict[str, Any]) -> np.ndarray:
  """uint8 [N, height, width] 0/1 masks of a record, equal to pycocotools annToMask.

  A box-only annotation (segmentation None) gets an all-zero mask.
  """
  h, w = record['height'], record['width']
  segms = record['segmentations']
  masks = np.zeros((len(segms), h, w), np.uint8)
  present = [k for k, s in enumerate(segms) if s is not None]
  if present:
    rles = [segmentation_to_rle(segms[k], h, w) for k in present]
    masks[present] = np.moveaxis(mask_utils.decode(rles), -1, 0)
  return masks


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


def _exif_orientation(image: Image.Image) -> int:
  """The EXIF Orientation of an opened image: 1 (as stored) or 2..8 (flipped and/or turned)."""
  orientation = image.getexif().get(EXIF_ORIENTATION, 1)
  return orientation if orientation in range(2, 9) else 1


def load_image(path: str, expected_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, 3] RGB, in its displayed orientation.

  Cameras store pixels as the sensor read them plus an EXIF Orientation saying how to turn them
  for display; COCO-format annotations are drawn on the displayed image, so the orientation is
  applied (as detectron2's reader does) for training, evaluation and prediction alike.

  Raises:
    ImageDecodeError: missing, unreadable, truncated or corrupt file, or a size different from
      `expected_hw` (the JSON's height/width); the message names the file, and says when the
      JSON's size is that of the raw pixels before the EXIF orientation.
  """
  return _decode_image(path, path, expected_hw)


def decode_image_bytes(data: bytes, name: str, expected_hw: Optional[tuple[int, int]] = None
                       ) -> np.ndarray:
  """`load_image` of an encoded file's bytes (e.g. stored in a TFDS record); `name` says in
  errors where the bytes came from. The same decoder as for files, so the pixels are equal."""
  return _decode_image(io.BytesIO(data), name, expected_hw)


def _decode_image(source, path: str, expected_hw: Optional[tuple[int, int]]) -> np.ndarray:
  """load_image's body: `source` is a path or a binary file object, `path` names it."""
  try:
    with Image.open(source) as im:
      im.load()
      raw_hw = (im.height, im.width)
      orientation = _exif_orientation(im)
      arr = to_rgb_uint8(ImageOps.exif_transpose(im) if orientation != 1 else im)
  except FileNotFoundError as e:
    raise ImageDecodeError(f'{path}: image file not found') from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(f'{path}: cannot decode image ({e})') from e
  if expected_hw is not None and tuple(arr.shape[:2]) != tuple(expected_hw):
    message = (f'{path}: decoded size {arr.shape[0]}x{arr.shape[1]} differs from the annotation '
               f'file\'s {expected_hw[0]}x{expected_hw[1]}')
    if orientation != 1 and raw_hw == tuple(expected_hw):
      message += (f': its EXIF Orientation={orientation} turns the stored {raw_hw[0]}x'
                  f'{raw_hw[1]} pixels for display, and the display orientation is used (COCO '
                  'annotations follow it), but the JSON gives the stored size. If its boxes '
                  'were drawn on the stored pixels, remove the EXIF Orientation tag from the '
                  'file; otherwise correct the JSON\'s height/width')
    raise ImageDecodeError(message)
  return arr


def record_image(record: dict[str, Any]) -> np.ndarray:
  """The record's pixels: its decoded 'image' when present, else its 'image_reader' called (a
  TFDS record's lazy reader, `tfds_builder.TfdsImage`), else the file decoded.

  Raises:
    ImageDecodeError: naming the file (or the stored record) that cannot be used.
  """
  image = record.get('image')
  if image is not None:
    return np.asarray(image, np.uint8)
  reader = record.get('image_reader')
  if reader is not None:
    return reader()
  return load_image(record['file_name'], (record['height'], record['width']))


def verify_images(records: Sequence[dict[str, Any]], num_threads: Optional[int] = None
                  ) -> list[str]:
  """Decodes every image; returns the error messages in record order (empty when all are fine).

  Slow (every file is decoded), so threads share the work: PIL decodes outside the GIL.
  """
  def check(r) -> Optional[str]:
    try:
      record_image(r)
    except ImageDecodeError as e:
      return str(e)
    return None

  threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return [e for e in pool.map(check, records) if e is not None]
