"""Synthetic 'shapes_keypoints' dataset: stick figures and shapes with per-class keypoint sets,
written as a real COCO-format folder (`data.source='shapes_keypoints'`).

    root/train/000000.png ...   root/instances_train.json
    root/val/000000.png ...     root/instances_val.json
    root/shapes_keypoints_meta.json   the generation parameters (ensure_dataset checks them)

Categories (ids 1..4, so labels 1..4 and `model.num_classes = 5`):

* `person`: a stick figure (thick limbs, a torso, a head disk) carrying COCO's 17 person keypoint
  names in COCO's order and COCO's skeleton, so its flip map is COCO's left/right swap. Figures
  face the viewer: the person's LEFT side is the viewer's right when the figure stands upright,
  exactly as in COCO's annotations of people facing the camera. Poses vary (arm, elbow, leg
  and knee angles, shoulder and hip widths, head size and tilt), and so do scale, position and
  the body's tilt (at most TILT radians, so "upright" stays well defined).
* `triangle`: an isosceles triangle with a narrow apex (APEX_ANGLE), keypoints `apex`,
  `left_base`, `right_base`. They are defined in the triangle's own frame, apex up: `apex` is
  the vertex between the two equal sides, opposite the base (the shortest side); `left_base` is
  the base vertex on the viewer's left. Because the apex is unique, any rotation keeps the
  identities defined: in image coordinates (y down) (left_base - apex) x (right_base - apex) < 0
  for every rotation. A mirror image reverses that orientation, which the names repair: a
  horizontal flip swaps left_base and right_base (their flip map), restoring the sign.
* `circle`, `square`: no keypoints (so per-class sets, and classes without one, are exercised).

Later objects occlude earlier ones; segmentations are the VISIBLE masks (compressed RLE).
Keypoint visibility follows COCO: v = 0 (with x = y = 0) for a keypoint outside the image, v = 1
when the pixel holding it is covered by a later object, v = 2 otherwise. Coordinates are in
pixels with integer pixel corners (pixel (r, c) covers [c, c + 1) x [r, r + 1)), the boxes'
frame; masks are rasterised at pixel centres. Each box holds the visible mask and every visible
(v = 2) keypoint, so that a triangle's sharp vertex, which the pixel grid may cut off, still
lies in its box (the keypoint head trains only on keypoints inside the box); hidden (v = 1)
keypoints may lie outside it, as in COCO.

Deterministic for a seed: image i of a split depends only on (seed, split, i), and the JSON and
PNG bytes are reproducible. 128x128 images by default.
"""

import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn_jax.data import shapes

log = logging.getLogger(__name__)

# The shapes dataset's drawing helpers, shared so that both datasets look alike.
_background = shapes._background  # pylint: disable=protected-access
_hsv_to_rgb = shapes._hsv_to_rgb  # pylint: disable=protected-access
_shape_polygon = shapes._polygon  # pylint: disable=protected-access
_all_visible_enough = shapes._all_visible_enough  # pylint: disable=protected-access

CLASSES = ('person', 'triangle', 'circle', 'square')
CLASS_PROBS = (0.4, 0.3, 0.15, 0.15)  # persons and triangles carry the keypoints
CLASS_HUES = (30.0, 225.0, 0.0, 120.0)
HUE_JITTER = 20.0
DEFAULT_SIZE = 128
MIN_OBJECTS, MAX_OBJECTS = 1, 4
PLACEMENT_TRIES = 10
MIN_FULL_PIXELS = 40  # an object's in-frame area before occlusion
MIN_PERSON_KEYPOINTS_IN_FRAME = 8
META_FILE = 'shapes_keypoints_meta.json'
COORD_DECIMALS = 2
OBJECT_NOISE_STD = 6.0

# COCO's person keypoints and skeleton (1-based pairs), as in person_keypoints_*.json.
PERSON_KEYPOINTS = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder', 'right_shoulder',
    'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
TRIANGLE_KEYPOINTS = ('apex', 'left_base', 'right_base')
TRIANGLE_SKELETON = ((1, 2), (1, 3), (2, 3))
KEYPOINT_SETS = {'person': (PERSON_KEYPOINTS, PERSON_SKELETON),
                 'triangle': (TRIANGLE_KEYPOINTS, TRIANGLE_SKELETON)}

# Person proportions in units of the torso length T (neck to pelvis), body frame: x to the
# person's left (the viewer's right), y down, torso centre at the origin.
PERSON_TORSO = (0.1, 0.2)  # T as a fraction of the image side
TILT = 0.4  # radians; the body's rotation away from upright
LIMB_WIDTH = (0.18, 0.24)  # x T, at least MIN_LIMB_WIDTH pixels
MIN_LIMB_WIDTH = 2.5
# Triangles: apex angle (radians) and height as a fraction of the image side.
APEX_ANGLE = (0.55, 0.85)  # 32 to 49 degrees: clearly narrower than the base angles
TRIANGLE_HEIGHT = (0.2, 0.4)
SHAPE_RADIUS = (0.08, 0.2)  # circles and squares: circumradius as a fraction of the side


def _rot(angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s], [s, c]])


def _person(rng: np.random.Generator, size: int):
  """A random pose: (keypoints [17, 2] image pixels, parts) where parts lists ('capsule', p, q,
  width), ('disk', centre, radius) and ('polygon', vertices [P, 2]) in image pixels."""
  u = rng.uniform
  t = u(*PERSON_TORSO) * size
  sw, hw = u(0.28, 0.38), u(0.16, 0.24)  # half shoulder and hip widths
  r_head, neck = u(0.22, 0.3), u(0.08, 0.15)
  head_tilt = u(-0.3, 0.3)
  k = {}
  k['left_shoulder'], k['right_shoulder'] = np.array([sw, -0.5]), np.array([-sw, -0.5])
  k['left_hip'], k['right_hip'] = np.array([hw, 0.5]), np.array([-hw, 0.5])
  neck_base = np.array([0.0, -0.5])
  head = neck_base + _rot(head_tilt) @ np.array([0.0, -neck - r_head])
  face = _rot(head_tilt)
  k['nose'] = head + face @ np.array([0.0, 0.2 * r_head])
  for side, sign in (('left', 1.0), ('right', -1.0)):
    k[f'{side}_eye'] = head + face @ np.array([sign * 0.4 * r_head, -0.15 * r_head])
    k[f'{side}_ear'] = head + face @ np.array([sign * 0.75 * r_head, 0.05 * r_head])
    # Angles from straight down, positive away from the body (towards this side).
    upper, bend = u(-0.2, 2.6), u(-1.0, 1.2)
    thigh, knee = u(-0.1, 0.6), u(-0.6, 0.4)

    def direction(a, sign=sign):
      return np.array([sign * np.sin(a), np.cos(a)])

    k[f'{side}_elbow'] = k[f'{side}_shoulder'] + u(0.4, 0.5) * direction(upper)
    k[f'{side}_wrist'] = k[f'{side}_elbow'] + u(0.35, 0.45) * direction(upper + bend)
    k[f'{side}_knee'] = k[f'{side}_hip'] + u(0.5, 0.6) * direction(thigh)
    k[f'{side}_ankle'] = k[f'{side}_knee'] + u(0.45, 0.55) * direction(thigh + knee)
  tilt = u(-TILT, TILT)
  centre = np.array([u(0.05, 0.95), u(0.2, 0.8)]) * size

  def to_image(p):
    return centre + t * (_rot(tilt) @ np.asarray(p))

  kps = np.stack([to_image(k[n]) for n in PERSON_KEYPOINTS])
  width = max(MIN_LIMB_WIDTH, u(*LIMB_WIDTH) * t)
  at = {n: kps[i] for i, n in enumerate(PERSON_KEYPOINTS)}
  parts = [('polygon', np.stack([at['left_shoulder'], at['left_hip'], at['right_hip'],
                                 at['right_shoulder']])),
           ('capsule', to_image(neck_base), to_image(head), width),
           ('disk', to_image(head), r_head * t)]
  for side in ('left', 'right'):
    parts += [('capsule', at[f'{side}_shoulder'], at[f'{side}_elbow'], width * 0.9),
              ('capsule', at[f'{side}_elbow'], at[f'{side}_wrist'], width * 0.9),
              ('capsule', at[f'{side}_hip'], at[f'{side}_knee'], width * 1.1),
              ('capsule', at[f'{side}_knee'], at[f'{side}_ankle'], width * 1.1),
              ('capsule', at[f'{side}_shoulder'], at[f'{side}_hip'], width)]
  parts.append(('capsule', at['left_shoulder'], at['right_shoulder'], width))
  return kps, parts


def _triangle(rng: np.random.Generator, size: int):
  """(vertices [3, 2] = apex, left_base, right_base in image pixels, parts)."""
  height = rng.uniform(*TRIANGLE_HEIGHT) * size
  half_base = height * np.tan(rng.uniform(*APEX_ANGLE) / 2)
  # Own frame, apex up, centroid at the origin; left_base on the viewer's left.
  own = np.array([[0.0, -2 * height / 3], [-half_base, height / 3], [half_base, height / 3]])
  centre = rng.uniform(0.1, 0.9, 2) * size
  vertices = centre + own @ _rot(rng.uniform(0, 2 * np.pi)).T
  return vertices, [('polygon', vertices)]


def _plain_shape(cls: str, rng: np.random.Generator, size: int):
  r = rng.uniform(*SHAPE_RADIUS) * size
  cx, cy = rng.uniform(r * 0.7, size - r * 0.7, 2)
  index = shapes.CLASSES.index(cls)
  return None, [('polygon', _shape_polygon(index, cx, cy, r, rng.uniform(0, 2 * np.pi)))]


def _rasterise(parts, size: int) -> np.ndarray:
  """bool [size, size]: the pixels whose centre lies in any part."""
  mask = np.zeros((size, size), bool)
  centres = np.arange(size) + 0.5
  for part in parts:
    kind = part[0]
    if kind == 'polygon':
      pts = part[1]
      lo, hi = pts.min(0) - 1, pts.max(0) + 1
    elif kind == 'capsule':
      lo, hi = np.minimum(part[1], part[2]) - part[3], np.maximum(part[1], part[2]) + part[3]
    else:
      lo, hi = part[1] - part[2] - 1, part[1] + part[2] + 1
    c0, r0 = np.clip(np.floor(lo).astype(int), 0, size)
    c1, r1 = np.clip(np.ceil(hi).astype(int) + 1, 0, size)
    if c0 >= c1 or r0 >= r1:
      continue
    x = centres[None, c0:c1]
    y = centres[r0:r1, None]
    if kind == 'polygon':
      inside = _in_convex(pts, x, y)
    elif kind == 'capsule':
      p, q, width = part[1], part[2], part[3]
      d = q - p
      s = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
      inside = (x - p[0] - s * d[0]) ** 2 + (y - p[1] - s * d[1]) ** 2 <= (width / 2) ** 2
    else:
      inside = (x - part[1][0]) ** 2 + (y - part[1][1]) ** 2 <= part[2] ** 2
    mask[r0:r1, c0:c1] |= inside
  return mask


def _in_convex(pts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Points (x, y) (broadcast) inside the convex polygon `pts` [P, 2], either winding."""
  signs = []
  for i in range(len(pts)):
    a, b = pts[i], pts[(i + 1) % len(pts)]
    signs.append((b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0]))
  signs = np.stack(np.broadcast_arrays(*signs))
  return (signs >= 0).all(0) | (signs <= 0).all(0)


def _draw_object(cls: str, rng: np.random.Generator, size: int):
  if cls == 'person':
    return _person(rng, size)
  if cls == 'triangle':
    return _triangle(rng, size)
  return _plain_shape(cls, rng, size)


def _in_frame(kps: np.ndarray, size: int) -> np.ndarray:
  return (kps >= 0).all(-1) & (kps < size).all(-1)


def make_image(seed: int, split: str, index: int, size: int = DEFAULT_SIZE):
  """One image: (uint8 [size, size, 3] RGB, objects), each object (class index, visible mask
  bool [size, size], keypoints float64 [K_c, 3] (x, y, v) or None for a class without a set)."""
  rng = np.random.default_rng([seed, shapes.SPLITS[split], index])
  img = _background(rng, size)
  num = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
  placed = []  # (class index, full in-frame mask, keypoints [K, 2] or None)
  for _ in range(num):
    for _ in range(PLACEMENT_TRIES):
      cls = int(rng.choice(len(CLASSES), p=CLASS_PROBS))
      kps, parts = _draw_object(CLASSES[cls], rng, size)
      full = _rasterise(parts, size)
      if full.sum() < MIN_FULL_PIXELS:
        continue
      if kps is not None:
        kps = np.round(kps, COORD_DECIMALS)
        if CLASSES[cls] == 'person' and _in_frame(kps, size).sum() < MIN_PERSON_KEYPOINTS_IN_FRAME:
          continue
      candidate = placed + [(cls, full, kps)]
      if _all_visible_enough([m for _, m, _ in candidate]):
        placed = candidate
        break
  objects = []
  texture = rng.normal(0.0, OBJECT_NOISE_STD, (size, size, 3))
  for cls, full, _ in placed:  # painted in order: later objects occlude earlier ones
    hue = CLASS_HUES[cls] + rng.uniform(-HUE_JITTER, HUE_JITTER)
    colour = _hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    img = np.where(full[..., None], colour + texture, img)
  for i, (cls, full, kps) in enumerate(placed):
    later = np.zeros((size, size), bool)
    for _, m, _ in placed[i + 1:]:
      later |= m
    keypoints = None
    if kps is not None:
      keypoints = np.zeros((len(kps), 3))
      inside = _in_frame(kps, size)
      cols = np.clip(np.floor(kps[:, 0]).astype(int), 0, size - 1)
      rows = np.clip(np.floor(kps[:, 1]).astype(int), 0, size - 1)
      hidden = later[rows, cols]
      keypoints[inside, :2] = kps[inside]
      keypoints[inside, 2] = np.where(hidden[inside], 1, 2)
    objects.append((cls, full & ~later, keypoints))
  return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray, keypoints
                ) -> dict[str, Any]:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
  x1, y1, x2, y2 = x, y, x + w, y + h
  ann = {'id': ann_id, 'image_id': image_id, 'category_id': cls + 1,
         'area': float(mask_utils.area(rle)), 'iscrowd': 0,
         'segmentation': {'size': [int(s) for s in rle['size']],
                          'counts': rle['counts'].decode('ascii')}}
  if keypoints is not None:
    seen = keypoints[keypoints[:, 2] == 2]
    if len(seen):  # the box holds the visible keypoints too (module docstring)
      x1, y1 = min(x1, float(seen[:, 0].min())), min(y1, float(seen[:, 1].min()))
      x2, y2 = max(x2, float(seen[:, 0].max())), max(y2, float(seen[:, 1].max()))
    ann['keypoints'] = [v for x_, y_, v_ in keypoints.tolist() for v in (x_, y_, int(v_))]
    ann['num_keypoints'] = int((keypoints[:, 2] > 0).sum())
  ann['bbox'] = [round(x1, COORD_DECIMALS), round(y1, COORD_DECIMALS),
                 round(x2 - x1, COORD_DECIMALS), round(y2 - y1, COORD_DECIMALS)]
  return ann


def categories() -> list[dict[str, Any]]:
  """The COCO categories, with `keypoints` and `skeleton` for the classes that have a set."""
  out = []
  for i, name in enumerate(CLASSES):
    cat = {'id': i + 1, 'name': name, 'supercategory': 'shape'}
    if name in KEYPOINT_SETS:
      names, skeleton = KEYPOINT_SETS[name]
      cat['keypoints'] = list(names)
      cat['skeleton'] = [list(p) for p in skeleton]
    out.append(cat)
  return out


def _write_split(out_dir: str, split: str, num: int, size: int, seed: int) -> None:
  os.makedirs(os.path.join(out_dir, split), exist_ok=True)
  images, annotations = [], []
  for i in range(num):
    img, objects = make_image(seed, split, i, size)
    file_name = f'{split}/{i:06d}.png'
    Image.fromarray(img).save(os.path.join(out_dir, file_name), format='PNG')
    image_id = i + 1
    images.append({'id': image_id, 'file_name': file_name, 'height': size, 'width': size})
    for cls, mask, keypoints in objects:
      annotations.append(_annotation(len(annotations) + 1, image_id, cls, mask, keypoints))
  data = {'info': {'description': f'synthetic shapes with keypoints, seed {seed}, size {size}'},
          'images': images, 'annotations': annotations, 'categories': categories()}
  with open(os.path.join(out_dir, f'instances_{split}.json'), 'w') as f:
    json.dump(data, f)


def _meta(num_train: int, num_val: int, size: int, seed: int) -> dict[str, Any]:
  return {'num_train': int(num_train), 'num_val': int(num_val), 'size': int(size),
          'seed': int(seed), 'classes': list(CLASSES), 'version': 1}


def write_dataset(out_dir: str, num_train: int, num_val: int, size: int = DEFAULT_SIZE,
                  seed: int = 0) -> None:
  """Writes the COCO-format folder (see the module docstring) into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  _write_split(out_dir, 'train', num_train, size, seed)
  _write_split(out_dir, 'val', num_val, size, seed)
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(_meta(num_train, num_val, size, seed), f)


def ensure_dataset(root: str, num_train: int, num_val: int, size: int = DEFAULT_SIZE,
                   seed: int = 0) -> str:
  """Generates the dataset at root if it is missing (as shapes.ensure_shapes_dataset: never
  overwritten, written to a temporary folder renamed into place); a folder holding any other
  dataset is an error. Returns root."""
  return shapes.ensure_generated(
      root, META_FILE, _meta(num_train, num_val, size, seed),
      lambda out: write_dataset(out, num_train, num_val, size, seed), accept_unmarked=False)


def main(argv=None) -> None:
  """CLI: python -m maskrcnn_jax.data.shapes_keypoints OUT_DIR [NUM_TRAIN NUM_VAL SIZE SEED]."""
  import sys  # pylint: disable=g-import-not-at-top
  args = sys.argv[1:] if argv is None else argv
  if not args:
    raise SystemExit(main.__doc__)
  defaults = [2000, 100, DEFAULT_SIZE, 0]
  nums = [int(a) for a in args[1:]] + defaults[len(args) - 1:]
  write_dataset(args[0], *nums)


if __name__ == '__main__':
  main()
