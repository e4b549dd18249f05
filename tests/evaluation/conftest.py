"""A tiny COCO ground truth (3 images: polygon, RLE and crowd instances) and exact predictions."""

import json
import types

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

# Non-contiguous category ids on purpose: labels 1, 2 map to ids 3, 7.
CATEGORIES = [{'id': 3, 'name': 'square'}, {'id': 7, 'name': 'disc'}]
LABEL_TO_CATEGORY_ID = {1: 3, 2: 7}
IMAGES = [{'id': 11, 'file_name': 'a.png', 'height': 110, 'width': 120},
          {'id': 12, 'file_name': 'b.png', 'height': 80, 'width': 90},
          {'id': 13, 'file_name': 'c.png', 'height': 64, 'width': 64}]


def _rect(x1, y1, x2, y2):
  return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def _disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _uncompressed_rle(mask):
  """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
  flat = np.asarray(mask, np.uint8).flatten(order='F')
  counts, value, run = [], 0, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  return {'size': list(mask.shape), 'counts': counts}


def _compressed_rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle['counts'] = rle['counts'].decode('ascii')
  return rle


def _annotations():
  """(image_id, category_id, segmentation, iscrowd) for every instance."""
  square_b = np.zeros((80, 90), np.uint8)
  square_b[30:70, 40:85] = 1
  crowd_b = np.zeros((80, 90), np.uint8)
  crowd_b[0:20, 0:30] = 1
  return [
      (11, 3, _rect(5, 5, 110, 100), 0),  # large
      (11, 7, [[20, 20, 45, 20, 30, 45]], 0),  # small triangle
      (12, 7, [[10, 30, 20, 20, 35, 20, 45, 30, 45, 45, 35, 55, 20, 55, 10, 45]], 0),  # medium
      (12, 3, _uncompressed_rle(square_b), 0),  # medium, uncompressed RLE
      (12, 3, _uncompressed_rle(crowd_b), 1),  # crowd region
      (13, 3, _rect(2, 40, 20, 60), 0),  # small
      (13, 7, _compressed_rle(_disc(64, 64, 22, 30, 19)), 0),  # medium, compressed RLE
  ]


def _to_rle(segmentation, h, w):
  if isinstance(segmentation, list):
    return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
  if isinstance(segmentation['counts'], list):
    return mask_utils.frPyObjects(segmentation, h, w)
  return {'size': segmentation['size'], 'counts': segmentation['counts'].encode('ascii')}


@pytest.fixture
def tiny_coco(tmp_path):
  """The GT JSON path, its COCO, the label map, images and exact predictions per image id."""
  sizes = {im['id']: (im['height'], im['width']) for im in IMAGES}
  annotations = []
  predictions = {i: {'boxes': [], 'scores': [], 'labels': [], 'masks': []} for i in sizes}
  category_to_label = {c: l for l, c in LABEL_TO_CATEGORY_ID.items()}
  for ann_id, (image_id, cat, segm, crowd) in enumerate(_annotations(), start=1):
    h, w = sizes[image_id]
    rle = _to_rle(segm, h, w)
    x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
    annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': cat,
                        'segmentation': segm, 'area': float(mask_utils.area(rle)),
                        'bbox': [x, y, bw, bh], 'iscrowd': crowd})
    if crowd:
      continue
    p = predictions[image_id]
    p['boxes'].append([x, y, x + bw, y + bh])
    p['scores'].append(0.9 - 0.05 * ann_id)
    p['labels'].append(category_to_label[cat])
    p['masks'].append(mask_utils.decode(rle).astype(bool))
  for image_id, p in predictions.items():
    h, w = sizes[image_id]
    predictions[image_id] = {
        'boxes': np.array(p['boxes'], np.float32).reshape(-1, 4),
        'scores': np.array(p['scores'], np.float32),
        'labels': np.array(p['labels'], np.int32),
        'masks': np.array(p['masks'], bool).reshape(-1, h, w),
    }
  path = tmp_path / 'instances_val.json'
  path.write_text(json.dumps({'images': IMAGES, 'annotations': annotations,
                              'categories': CATEGORIES}))
  rng = np.random.default_rng(0)
  images = {i: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for i, (h, w) in sizes.items()}
  return types.SimpleNamespace(path=str(path), coco=COCO(str(path)), images=images,
                               label_to_category_id=dict(LABEL_TO_CATEGORY_ID),
                               predictions=predictions, annotations=annotations)
