"""Tests of data/shapes_keypoints.py: determinism, COCO validity, visibility, keypoint identities
(the triangle's apex and sides, the person's left and right), through the pipeline's flip too."""
import os

import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import shapes
from maskrcnn_jax.data import shapes_keypoints as sk
from synthetic import read_tree

PERSON, TRIANGLE = 1, 2  # labels
NAMES = sk.PERSON_KEYPOINTS


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('skp') / 'data')
  sk.write_dataset(root, 40, 4, 96, seed=0)
  return root


def _cross(kps):
  """(left_base - apex) x (right_base - apex) in image coordinates (y down)."""
  (ax, ay), (lx, ly), (rx, ry) = kps[0, :2], kps[1, :2], kps[2, :2]
  return (lx - ax) * (ry - ay) - (ly - ay) * (rx - ax)


def test_same_seed_gives_identical_bytes(tmp_path):
  sk.write_dataset(str(tmp_path / 'a'), 3, 2, 64, seed=3)
  sk.write_dataset(str(tmp_path / 'b'), 3, 2, 64, seed=3)
  sk.write_dataset(str(tmp_path / 'c'), 3, 2, 64, seed=4)
  a, b, c = (read_tree(tmp_path / x) for x in 'abc')
  assert len(a) == 3 + 2 + 3 and a == b
  assert a['train/000000.png'] != c['train/000000.png']
  sk.write_dataset(str(tmp_path / 'd'), 2, 1, 64, seed=3)
  assert read_tree(tmp_path / 'd')['train/000001.png'] == a['train/000001.png']


def test_categories_and_sets(generated):
  ds = coco.load_coco(os.path.join(generated, 'instances_train.json'), generated,
                      with_keypoints=True)
  assert ds.stats == {}  # nothing the reader has to fix or drop
  lm = ds.label_map
  assert lm.names == sk.CLASSES
  assert lm.keypoint_names == (NAMES, sk.TRIANGLE_KEYPOINTS, (), ())
  assert lm.num_keypoints == (0, 17, 3, 0, 0)
  assert lm.keypoint_flip_map[0] == (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
  assert lm.keypoint_flip_map[1] == (0, 2, 1)
  assert len(lm.keypoint_skeleton[0]) == 19 and (15, 13) in lm.keypoint_skeleton[0]
  labels = np.concatenate([r['labels'] for r in ds.records])
  assert set(labels.tolist()) == {1, 2, 3, 4}


def test_masks_visibility_and_boxes(generated):
  ds = coco.load_coco(os.path.join(generated, 'instances_train.json'), generated,
                      with_keypoints=True)
  ref = COCO(os.path.join(generated, 'instances_train.json'))
  size = 96
  seen = {0: 0, 1: 0, 2: 0}
  for r in ds.records:
    masks = coco.decode_masks(r)
    assert masks.sum((1, 2)).min() > 0 and masks.sum(0).max() == 1  # visible masks are disjoint
    for n, (kps, label, box) in enumerate(zip(r['keypoints'], r['labels'], r['boxes'])):
      k_c = (0, 17, 3, 0, 0)[label]
      assert not kps[k_c:].any()
      kps = kps[:k_c]
      v = kps[:, 2]
      for value in (0, 1, 2):
        seen[value] += int((v == value).sum())
      assert not kps[v == 0].any()  # outside the image: all zeros
      on = kps[v > 0]
      assert ((on[:, :2] >= 0) & (on[:, :2] < size)).all()
      cols, rows = np.floor(on[:, 0]).astype(int), np.floor(on[:, 1]).astype(int)
      # Later annotations' visible masks cover exactly what later objects cover.
      later = masks[n + 1:].any(0)
      np.testing.assert_array_equal(later[rows, cols], on[:, 2] == 1)
      vis = kps[v == 2]
      assert ((vis[:, 0] >= box[0]) & (vis[:, 0] <= box[2]) & (vis[:, 1] >= box[1])
              & (vis[:, 1] <= box[3])).all()
      if label == PERSON:  # joints (shoulders..ankles) lie on the figure's own visible mask
        joints = (kps[:, 2] == 2) & (np.arange(17) >= 5)
        c, rr = np.floor(kps[joints, 0]).astype(int), np.floor(kps[joints, 1]).astype(int)
        assert masks[n][rr, c].all()
    for a in ref.loadAnns(ref.getAnnIds(imgIds=[r['image_id']])):
      if 'keypoints' in a:
        assert a['num_keypoints'] == sum(v > 0 for v in a['keypoints'][2::3])
  assert min(seen.values()) > 0  # every visibility occurs


def _identities_hold(records_or_batch):
  """Counts checked: triangles (apex between the equal sides, base shortest, orientation) and
  persons (left shoulder and hip on the viewer's right of the right ones)."""
  triangles = persons = 0
  for kps, label in records_or_batch:
    if label == TRIANGLE and (kps[:3, 2] > 0).all():
      a, l, r = kps[0, :2], kps[1, :2], kps[2, :2]
      sides = np.linalg.norm(l - a), np.linalg.norm(r - a), np.linalg.norm(r - l)
      assert sides[0] == pytest.approx(sides[1], rel=1e-2, abs=0.05)
      assert sides[2] < min(sides[:2])  # the apex is the vertex opposite the (short) base
      assert _cross(kps) < 0
      triangles += 1
    if label == PERSON:
      for left, right in (('left_shoulder', 'right_shoulder'), ('left_hip', 'right_hip')):
        i, j = NAMES.index(left), NAMES.index(right)
        if kps[i, 2] > 0 and kps[j, 2] > 0:
          assert kps[i, 0] > kps[j, 0]
          persons += 1
  return triangles, persons


def test_identities(generated):
  ds = coco.load_coco(os.path.join(generated, 'instances_train.json'), generated,
                      with_keypoints=True)
  pairs = [(k, l) for r in ds.records for k, l in zip(r['keypoints'], r['labels'])]
  triangles, persons = _identities_hold(pairs)
  assert triangles >= 5 and persons >= 5


def test_identities_survive_the_pipeline_flip(generated):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.keypoint_on = True
  if 'keypoint_head' not in c.model:
    c.model.keypoint_head = ml_collections.ConfigDict()
  c.model.keypoint_head.num_keypoints = (0, 17, 3, 0, 0)
  c.data.keypoint_oks_sigmas = ((), (), (0.05, 0.05, 0.05), (), ())
  c.input.hflip_prob = 1.0
  c.input.prefetch = 0
  c.input.buckets = ((96, 96),)
  c.input.min_size = c.input.max_size = 96
  c.input.train_min_sizes = (96,)
  c.input.max_instances = sk.MAX_OBJECTS
  ds = coco.load_coco(os.path.join(generated, 'instances_train.json'), generated,
                      with_keypoints=True)
  it = pipeline.make_train_iterator(c, dataset=ds)
  pairs = []
  for _ in range(10):
    batch = next(it)
    for b in range(len(batch['gt_labels'])):
      valid = batch['gt_valid'][b]
      pairs += list(zip(batch['gt_keypoints'][b][valid], batch['gt_labels'][b][valid]))
  it.close()
  triangles, persons = _identities_hold(pairs)
  assert triangles >= 3 and persons >= 3


def test_ensure_generates_once_and_keeps_kinds_apart(tmp_path):
  root = str(tmp_path / 'kp')
  assert sk.ensure_dataset(root, 2, 1, 64) == root
  before = read_tree(root)
  sk.ensure_dataset(root, 2, 1, 64)
  assert read_tree(root) == before
  with pytest.raises(FileExistsError, match='another synthetic dataset'):
    shapes.ensure_shapes_dataset(root, 2, 1, 64)
  plain = str(tmp_path / 'plain')
  shapes.ensure_shapes_dataset(plain, 2, 1, 64)
  with pytest.raises(FileExistsError, match='another synthetic dataset'):
    sk.ensure_dataset(plain, 2, 1, 64)


def test_load_dataset_records_source(tmp_path):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.data.source = 'shapes_keypoints'
  c.data.root = str(tmp_path / 'kp')
  c.model.keypoint_on = True
  ds = pipeline.load_dataset_records(c, 'val')
  assert len(ds.records) == c.data.shapes_num_val and 'keypoints' in ds.records[0]
  assert ds.records[0]['keypoints'].shape[1:] == (17, 3)
  structures.validate_data(c, ('train', 'val'))  # an accepted data.source
