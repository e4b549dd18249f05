"""Tests of data/shapes.py: determinism, COCO validity, occlusion-aware masks."""
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from maskrcnn_jax.data import coco
from maskrcnn_jax.data import shapes
from synthetic import read_tree


def test_same_seed_gives_identical_bytes(tmp_path):
  shapes.write_shapes_dataset(str(tmp_path / 'a'), 4, 2, 48, seed=3)
  shapes.write_shapes_dataset(str(tmp_path / 'b'), 4, 2, 48, seed=3)
  shapes.write_shapes_dataset(str(tmp_path / 'c'), 4, 2, 48, seed=4)
  a, b, c = (read_tree(tmp_path / x) for x in 'abc')
  assert len(a) == 4 + 2 + 3  # PNGs, two JSONs, the meta file
  assert a == b
  assert a['train/000000.png'] != c['train/000000.png']
  # Image i depends on (seed, split, i) only, not on how many images were asked for.
  shapes.write_shapes_dataset(str(tmp_path / 'd'), 2, 1, 48, seed=3)
  assert read_tree(tmp_path / 'd')['train/000001.png'] == a['train/000001.png']


def test_annotations_are_the_visible_masks(tmp_path):
  size = 64
  root = str(tmp_path / 's')
  shapes.write_shapes_dataset(root, 12, 1, size, seed=0)
  path = os.path.join(root, 'instances_train.json')
  ref = COCO(path)
  assert [c['name'] for c in ref.loadCats(ref.getCatIds())] == list(shapes.CLASSES)
  ds = coco.load_coco(path, root)
  assert len(ds.records) == 12 and ds.stats == {}
  kinds = set()
  for r in ds.records:
    n = len(r['labels'])
    assert shapes.MIN_OBJECTS <= n <= shapes.MAX_OBJECTS
    masks = coco.decode_masks(r)
    assert masks.sum(0).max() == 1  # visible masks never overlap
    for k in range(n):
      ys, xs = np.nonzero(masks[k])
      assert len(ys) >= shapes.MIN_VISIBLE_PIXELS
      np.testing.assert_array_equal(r['boxes'][k], [xs.min(), ys.min(), xs.max() + 1,
                                                    ys.max() + 1])
      assert r['areas'][k] == len(ys)
      kinds.add(type(r['segmentations'][k]).__name__)
  assert kinds == {'list', 'dict'}  # polygons for whole shapes, RLE for occluded ones


def test_occlusion_and_pixels_match_masks():
  size = 64
  img, objects = shapes.make_image(0, 'train', 5, size)
  again, _ = shapes.make_image(0, 'train', 5, size)
  np.testing.assert_array_equal(img, again)
  assert img.dtype == np.uint8 and img.shape == (size, size, 3)
  union = np.zeros((size, size), bool)
  for cls, vis, poly in objects:
    assert 0 <= cls < len(shapes.CLASSES)
    assert not (union & vis).any()
    union |= vis
    if poly is not None:  # a fully visible shape: its polygon spans >= ~10% of the side
      span = poly.max(0) - poly.min(0)
      assert span.max() >= 0.1 * size
  # Object pixels are saturated colours, the background is greyish: saturation separates them.
  sat = img.max(-1).astype(int) - img.min(-1)
  assert np.median(sat[union]) > 2 * np.median(sat[~union])


def test_ensure_generates_once(tmp_path):
  root = str(tmp_path / 'shapes')
  assert shapes.ensure_shapes_dataset(root, 2, 1, 32) == root
  meta = os.path.join(root, shapes.META_FILE)
  first = os.stat(os.path.join(root, 'train', '000000.png')).st_mtime_ns
  shapes.ensure_shapes_dataset(root, 2, 1, 32)
  assert os.stat(os.path.join(root, 'train', '000000.png')).st_mtime_ns == first
  shapes.ensure_shapes_dataset(root, 3, 1, 32)  # other parameters: kept as it is, never deleted
  assert not os.path.exists(os.path.join(root, 'train', '000002.png')) and os.path.exists(meta)
  assert os.stat(os.path.join(root, 'train', '000000.png')).st_mtime_ns == first
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.shapes-tmp')]
  other = tmp_path / 'not_a_dataset'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='not_a_dataset'):
    shapes.ensure_shapes_dataset(str(other), 2, 1, 32)
  assert (other / 'notes.txt').read_text() == 'mine'
