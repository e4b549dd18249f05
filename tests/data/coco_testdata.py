"""Helpers of the data tests: small COCO-format folders with known annotations."""
import json

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def write_coco(root, images, annotations, categories=None, json_name='instances.json',
               image_dir='images'):
  """Writes random RGB PNGs for `images` ({'id', 'height', 'width'}) plus the JSON.

  Returns (json_path, image_dir_path). Each image gets file_name '<id>.png' unless given.
  """
  root.mkdir(parents=True, exist_ok=True)
  (root / image_dir).mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  entries = []
  for img in images:
    entry = dict(img)
    entry.setdefault('file_name', f'{img["id"]}.png')
    if not entry.pop('skip_file', False):
      pixels = rng.integers(0, 256, (img['height'], img['width'], 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / image_dir / entry['file_name'])
    entries.append(entry)
  categories = categories or [{'id': 3, 'name': 'a'}, {'id': 7, 'name': 'b'},
                              {'id': 12, 'name': 'c'}]
  path = root / json_name
  path.write_text(json.dumps({'images': entries, 'annotations': annotations,
                              'categories': categories}))
  return str(path), str(root / image_dir)


def rect_polygon(x1, y1, x2, y2):
  return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def ann(ann_id, image_id, category_id, bbox, segmentation=None, iscrowd=0):
  x, y, w, h = bbox
  if segmentation is None:
    segmentation = rect_polygon(x, y, x + w, y + h)
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': list(bbox),
          'area': float(w * h), 'iscrowd': iscrowd, 'segmentation': segmentation}


def rle_of(mask, compressed=True):
  """COCO RLE of a uint8 [H, W] mask, compressed (string counts) or uncompressed (list)."""
  if compressed:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': list(rle['size']), 'counts': rle['counts'].decode('ascii')}
  flat = mask.astype(np.uint8).flatten(order='F')
  counts, cur, run = [], 0, 0
  for v in flat:
    if v != cur:
      counts.append(run)
      cur, run = v, 0
    run += 1
  counts.append(run)
  return {'size': list(mask.shape), 'counts': counts}


def write_mixed_coco(root):
  """Three rectangular images of different sizes with polygon, RLE, uncompressed RLE and crowd
  annotations, plus one image without annotations."""
  h, w = 30, 40
  m1 = np.zeros((h, w), np.uint8)
  m1[5:20, 10:30] = 1
  m1[8:12, 15:18] = 0  # a hole: only expressible as RLE
  m2 = np.zeros((50, 30), np.uint8)
  m2[10:40, 3:20] = 1
  images = [{'id': 1, 'height': h, 'width': w}, {'id': 2, 'height': 50, 'width': 30},
            {'id': 5, 'height': 36, 'width': 60}, {'id': 9, 'height': 20, 'width': 20}]
  anns = [
      ann(10, 1, 3, [2.5, 3, 10, 12]),
      ann(11, 1, 7, [10, 5, 20, 15], rle_of(m1)),
      ann(12, 2, 12, [3, 10, 17, 30], rle_of(m2, compressed=False)),
      ann(13, 2, 3, [0, 0, 30, 8], rle_of(np.pad(np.ones((8, 30), np.uint8), ((0, 42), (0, 0)))),
          iscrowd=1),
      ann(14, 5, 7, [5, 6, 53, 24], [[5, 6, 45, 6, 25, 26], [50, 20, 58, 20, 58, 30, 50, 30]]),
      ann(15, 5, 12, [30, 2, 20, 30]),
  ]
  return write_coco(root, images, anns)
