"""Synthetic 'shapes' instance-segmentation dataset, written as a real COCO-format folder.

    root/train/000000.png ...   root/instances_train.json
    root/val/000000.png ...     root/instances_val.json
    root/shapes_meta.json       the generation parameters (ensure_shapes_dataset checks them)

Each image has 1-6 coloured shapes (circle, square, triangle, star) of varied size, rotation and
colour on a textured, noisy background; later shapes occlude earlier ones and the annotation is
the VISIBLE mask after occlusion. Fully visible shapes are annotated as polygons, occluded ones as
compressed RLE. Shapes are rasterised with pycocotools from the very polygons written, so a
polygon annotation decodes to exactly the painted pixels. Deterministic for a seed: image i of a
split depends only on (seed, split, i), and the JSON and PNG bytes are reproducible.
"""

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import transforms

log = logging.getLogger(__name__)

CLASSES = ('circle', 'square', 'triangle', 'star')
# Class hue in degrees; colours jitter around it, so colour helps but does not decide the class.
CLASS_HUES = (0.0, 120.0, 225.0, 50.0)
HUE_JITTER = 20.0
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MIN_RADIUS, MAX_RADIUS = 0.08, 0.2  # circumradius as a fraction of the image side
MIN_VISIBLE_FRACTION = 0.4  # an occluded shape keeps at least this much of its own area
MIN_VISIBLE_PIXELS = 12
PLACEMENT_TRIES = 10
CIRCLE_VERTICES = 48
STAR_POINTS, STAR_INNER = 5, 0.45
OBJECT_NOISE_STD = 6.0  # per-pixel texture of objects, 0..255 units
BACKGROUND_NOISE_STD = 10.0
BACKGROUND_GRID = 4  # low-frequency background texture: a 4x4 random grid resized bilinearly
COORD_DECIMALS = 2
SPLITS = {'train': 0, 'val': 1}
META_FILE = 'shapes_meta.json'


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
  """h in degrees, s and v in [0, 1] -> float RGB in 0..255."""
  h = (h % 360.0) / 60.0
  c = v * s
  x = c * (1 - abs(h % 2 - 1))
  rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
  return (np.array(rgb) + (v - c)) * 255.0


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
  """Vertices [P, 2] (x, y) of a shape with circumradius r centred at (cx, cy)."""
  if CLASSES[cls] == 'circle':
    t = np.arange(CIRCLE_VERTICES) * 2 * np.pi / CIRCLE_VERTICES
    radii = np.full_like(t, r)
  elif CLASSES[cls] == 'square':
    t = angle + np.arange(4) * np.pi / 2
    radii = np.full_like(t, r)
  elif CLASSES[cls] == 'triangle':
    t = angle + np.arange(3) * 2 * np.pi / 3
    radii = np.full_like(t, r)
  else:  # star
    t = angle + np.arange(2 * STAR_POINTS) * np.pi / STAR_POINTS
    radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, r, r * STAR_INNER)
  pts = np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=-1)
  return np.round(pts, COORD_DECIMALS)


def _rasterise(poly: np.ndarray, size: int) -> np.ndarray:
  rle = mask_utils.frPyObjects([poly.reshape(-1).tolist()], size, size)
  return mask_utils.decode(mask_utils.merge(rle)).astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.6))
  grid = rng.normal(0.0, 25.0, (BACKGROUND_GRID, BACKGROUND_GRID, 3))
  texture = transforms.resize_image(grid, size, size)
  noise = rng.normal(0.0, BACKGROUND_NOISE_STD, (size, size, 3))
  return base + texture + noise


def _all_visible_enough(full_masks) -> bool:
  """Whether every shape, painted in order, keeps enough of its area visible."""
  occluder = np.zeros_like(full_masks[0])
  for m in reversed(full_masks):
    if (m & ~occluder).sum() < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * m.sum()):
      return False
    occluder |= m
  return True


def make_image(seed: int, split: str, index: int, size: int):
  """One image: (uint8 [size, size, 3] RGB, list of (class index, visible mask, polygon|None))."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  img = _background(rng, size)
  num = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  shapes = []  # (cls, full mask, polygon)
  for _ in range(num):
    for _ in range(PLACEMENT_TRIES):
      cls = int(rng.integers(len(CLASSES)))
      r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size
      cx, cy = rng.uniform(r * 0.7, size - r * 0.7, 2)
      poly = _polygon(cls, cx, cy, r, rng.uniform(0, 2 * np.pi))
      full = _rasterise(poly, size)
      if full.sum() < MIN_VISIBLE_PIXELS / MIN_VISIBLE_FRACTION:
        continue
      candidate = shapes + [(cls, full, poly)]
      if _all_visible_enough([m for _, m, _ in candidate]):
        shapes = candidate
        break
  objects = []
  occluder = np.zeros((size, size), bool)
  visible = [None] * len(shapes)
  for i in range(len(shapes) - 1, -1, -1):
    visible[i] = shapes[i][1] & ~occluder
    occluder |= shapes[i][1]
  texture = rng.normal(0.0, OBJECT_NOISE_STD, (size, size, 3))  # shared by all objects
  for i, (cls, full, poly) in enumerate(shapes):
    hue = CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    colour = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    img = np.where(full[..., None], colour + texture, img)
    fully_visible = bool((visible[i] == full).all())
    objects.append((cls, visible[i], poly if fully_visible else None))
  return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray, poly) -> dict[str, Any]:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  bbox = [float(v) for v in mask_utils.toBbox(rle)]
  if poly is not None:
    segmentation = [[float(v) for v in poly.reshape(-1)]]
  else:
    segmentation = {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}
  return {'id': ann_id, 'image_id': image_id, 'category_id': cls + 1, 'bbox': bbox,
          'area': float(mask_utils.area(rle)), 'iscrowd': 0, 'segmentation': segmentation}


def _write_split(out_dir: str, split: str, num: int, size: int, seed: int) -> None:
  os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  images, annotations = [], []
  for i in range(num):
    img, objects = make_image(seed, split, i, size)
    file_name = f'{split}/{i:06d}.png'
    Image.fromarray(img).save(os.path.join(out_dir, file_name), format='PNG')
    image_id = i + 1
    images.append({'id': image_id, 'file_name': file_name, 'height': size, 'width': size})
    for cls, mask, poly in objects:
      annotations.append(_annotation(len(annotations) + 1, image_id, cls, mask, poly))
  data = {
      'info': {'description': f'synthetic shapes, seed {seed}, size {size}'},
      'images': images,
      'annotations': annotations,
      'categories': [{'id': i + 1, 'name': n, 'supercategory': 'shape'}
                     for i, n in enumerate(CLASSES)],
  }
  with open(os.path.join(out_dir, f'instances_{split}.json'), 'w') as f:
    json.dump(data, f)


def write_shapes_dataset(out_dir: str, num_train: int, num_val: int, size: int,
                         seed: int = 0) -> None:
  """Writes the COCO-format shapes folder (see the module docstring) into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  _write_split(out_dir, 'train', num_train, size, seed)
  _write_split(out_dir, 'val', num_val, size, seed)
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(_meta(num_train, num_val, size, seed), f)


def _meta(num_train: int, num_val: int, size: int, seed: int) -> dict[str, Any]:
  return {'num_train': int(num_train), 'num_val': int(num_val), 'size': int(size),
          'seed': int(seed), 'classes': list(CLASSES), 'version': 1}


def ensure_shapes_dataset(root: str, num_train: int, num_val: int, size: int,
                          seed: int = 0) -> str:
  """Generates the dataset at root if it is missing; never deletes or overwrites one.

  An existing shapes dataset generated with other parameters is used as it is (with a warning
  that says how to regenerate it). A non-empty folder that holds no dataset, or another
  synthetic dataset (shapes_keypoints), is an error.
  Generation goes to a temporary sibling folder that is renamed into place, so concurrent
  callers never see a half-written dataset. Returns root.
  """
  return ensure_generated(
      root, META_FILE, _meta(num_train, num_val, size, seed),
      lambda out: write_shapes_dataset(out, num_train, num_val, size, seed),
      accept_unmarked=True)


# The meta files of the synthetic datasets; a folder holding one belongs to that generator.
GENERATED_META_FILES = (META_FILE, 'shapes_keypoints_meta.json')


def ensure_generated(root: str, meta_file: str, meta: dict[str, Any], write, *,
                     accept_unmarked: bool) -> str:
  """Runs `write(folder)` to generate a synthetic dataset at root unless root holds it already
  (see ensure_shapes_dataset); `meta` is what `write` stores in `meta_file`.

  `accept_unmarked`: a folder with an instances_train.json but no meta file is used as it is
  (the shapes dataset's historical behaviour); otherwise it is an error.
  """
  meta_path = os.path.join(root, meta_file)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      found = json.load(f)
    if found != meta:
      log.warning('using the existing %s dataset at %s (generated with %s); the config asks '
                  'for %s: delete the folder to regenerate it', meta_file.rsplit('_meta', 1)[0],
                  root, found, meta)
    return root
  for other in GENERATED_META_FILES:
    if other != meta_file and os.path.exists(os.path.join(root, other)):
      raise FileExistsError(f'{root} holds another synthetic dataset ({other}); choose another '
                            'config.data.root for this one')
  if os.path.exists(os.path.join(root, 'instances_train.json')):
    if accept_unmarked:
      return root
    raise FileExistsError(f'{root} holds a dataset that was not generated here (no '
                          f'{meta_file}); choose another config.data.root')
  if os.path.isdir(root) and os.listdir(root):
    raise FileExistsError(f'{root} is not empty and holds no generated dataset; choose another '
                          'config.data.root')
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.shapes-tmp-', dir=parent)
  try:
    write(tmp)
    if os.path.exists(meta_path):  # another process may have finished first
      with open(meta_path) as f:
        if json.load(f) == meta:
          return root
    if os.path.isdir(root):
      os.rmdir(root)  # empty (checked above)
    os.rename(tmp, root)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def main(argv=None) -> None:
  """CLI: python -m maskrcnn_jax.data.shapes OUT_DIR [NUM_TRAIN NUM_VAL SIZE SEED]."""
  import sys  # pylint: disable=g-import-not-at-top
  args = sys.argv[1:] if argv is None else argv
  if not args:
    raise SystemExit(main.__doc__)
  defaults = [1000, 100, 256, 0]
  nums = [int(a) for a in args[1:]] + defaults[len(args) - 1:]
  write_shapes_dataset(args[0], *nums)


if __name__ == '__main__':
  main()
