"""Keypoints on the data side: reading per-class sets, every bad keypoint input counted, flip
maps, the pipeline's resize and flip against NumPy, and the start-up checks of a keypoint run.

Every dataset is built on the fly in tmp_path (tests/data/coco_testdata.py).
"""
import json
import logging

import ml_collections
import numpy as np
import pytest

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import transforms as T
from tests.data.coco_testdata import ann, write_coco

# Two keypoint sets of different sizes and one class without: labels 1 (hands, 2 keypoints),
# 2 (tri, 3), 3 (blob, none), so K_max = 3 and per-class padding is exercised.
CATEGORIES = [
    {'id': 4, 'name': 'hands', 'keypoints': ['left_hand', 'right_hand'], 'skeleton': [[1, 2]]},
    {'id': 6, 'name': 'tri', 'keypoints': ['apex', 'left_base', 'right_base'],
     'skeleton': [[1, 2], [1, 3], [2, 3]]},
    {'id': 9, 'name': 'blob'},
]
NUM_KEYPOINTS = (0, 2, 3, 0)
OKS_SIGMAS = ((), (0.05, 0.05), (0.05, 0.06, 0.06), ())  # neither set has COCO's 17
COCO_PERSON_NAMES = (
    'nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder', 'right_shoulder',
    'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist', 'left_hip', 'right_hip',
    'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
# torchvision references/detection/transforms.py _flip_coco_person_keypoints.
TORCHVISION_PERSON_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def _kp_ann(ann_id, image_id, category_id, bbox, keypoints, **extra):
  a = ann(ann_id, image_id, category_id, bbox)
  if keypoints is not None:
    a['keypoints'] = keypoints
  a.update(extra)
  return a


def _write(tmp_path, annotations, images=None, categories=None):
  images = images or [{'id': 1, 'height': 40, 'width': 60}, {'id': 2, 'height': 30, 'width': 50}]
  return write_coco(tmp_path, images, annotations, categories or CATEGORIES)


def _good_annotations():
  return [
      _kp_ann(1, 1, 4, [10, 5, 30, 20], [12.5, 8.0, 2, 35.25, 20.0, 1]),
      _kp_ann(2, 1, 6, [5, 10, 20, 25], [15.0, 11.0, 2, 6.0, 30.0, 2, 0, 0, 0]),
      _kp_ann(3, 1, 9, [40, 2, 15, 30], None),
      _kp_ann(4, 2, 6, [3, 3, 40, 20], [20.0, 4.0, 2, 5.0, 20.0, 0, 41.0, 21.0, 2]),
  ]


def _config(num_keypoints=NUM_KEYPOINTS, **data):
  if num_keypoints == NUM_KEYPOINTS:
    data.setdefault('keypoint_oks_sigmas', OKS_SIGMAS)
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.num_classes = len(num_keypoints)
  c.model.keypoint_on = True
  if 'keypoint_head' not in c.model:
    c.model.keypoint_head = ml_collections.ConfigDict()
  c.model.keypoint_head.num_keypoints = tuple(num_keypoints)
  c.input.prefetch = 0
  c.input.train_min_sizes = (64,)
  for k, v in data.items():
    c.data[k] = v
  return c


# ------------------------------------------------------------------------------- reading
def test_records_carry_per_class_keypoint_sets(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  assert ds.stats == {}
  lm = ds.label_map
  assert lm.keypoint_names == (('left_hand', 'right_hand'), ('apex', 'left_base', 'right_base'),
                               ())
  assert lm.keypoint_skeleton == (((0, 1),), ((0, 1), (0, 2), (1, 2)), ())
  assert lm.keypoint_flip_map == ((1, 0), (0, 2, 1), ())
  assert lm.num_keypoints == NUM_KEYPOINTS
  first, second = ds.records
  assert first['keypoints'].shape == (3, 3, 3) and first['keypoints'].dtype == np.float32
  np.testing.assert_array_equal(first['keypoints'][0], [[12.5, 8, 2], [35.25, 20, 1], [0, 0, 0]])
  np.testing.assert_array_equal(first['keypoints'][1], [[15, 11, 2], [6, 30, 2], [0, 0, 0]])
  np.testing.assert_array_equal(first['keypoints'][2], 0)  # blob: no set
  assert first['num_keypoints'].tolist() == [2, 2, 0]
  assert second['num_keypoints'].tolist() == [2]
  # Without keypoints the records and the label map are as before.
  plain = coco.load_coco(path, image_dir)
  assert 'keypoints' not in plain.records[0] and not plain.label_map.has_keypoints
  assert plain.label_map.meta() == {'label_to_category_id': {1: 4, 2: 6, 3: 9},
                                    'class_names': ['hands', 'tri', 'blob']}


def test_meta_and_label_map_json_keep_the_sets(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  lm = coco.load_coco(path, image_dir, with_keypoints=True).label_map
  meta = json.loads(json.dumps(lm.meta()))  # what a checkpoint stores
  assert meta['keypoint_names'] == [['left_hand', 'right_hand'],
                                    ['apex', 'left_base', 'right_base'], []]
  assert meta['keypoint_skeleton'] == [[[0, 1]], [[0, 1], [0, 2], [1, 2]], []]
  assert meta['keypoint_flip_map'] == [[1, 0], [0, 2, 1], []]
  coco.save_label_map(str(tmp_path / 'labels.json'), lm)
  assert coco.load_label_map(str(tmp_path / 'labels.json')) == lm


def test_gt_dict_keeps_keypoints_for_pycocotools(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  gt = coco.load_coco(path, image_dir, with_keypoints=True).gt_dict()
  cats = {c['id']: c for c in gt['categories']}
  assert cats[6]['keypoints'] == ['apex', 'left_base', 'right_base']
  assert cats[6]['skeleton'] == [[1, 2], [1, 3], [2, 3]]
  anns = {a['id']: a for a in gt['annotations']}
  assert anns[2]['keypoints'] == [15.0, 11.0, 2, 6.0, 30.0, 2, 0, 0, 0]
  assert anns[2]['num_keypoints'] == 2 and anns[4]['num_keypoints'] == 2
  assert 'keypoints' not in anns[3]


@pytest.mark.parametrize('keypoints, reason', [
    ([1.0, 2.0, 2], 'keypoints_bad_length_dropped'),  # 1 triplet for a 2-keypoint set
    ([1.0, 2.0, 2, 3.0, 4.0, 2, 5.0, 6.0, 2], 'keypoints_bad_length_dropped'),
    ([1.0, float('nan'), 2, 3.0, 4.0, 2], 'keypoints_nonfinite_dropped'),
    ([1.0, 2.0, 2, float('inf'), 4.0, 2], 'keypoints_nonfinite_dropped'),
    ([1.0, 2.0, 3, 3.0, 4.0, 2], 'keypoints_bad_visibility_dropped'),
    ([1.0, 2.0, -1, 3.0, 4.0, 2], 'keypoints_bad_visibility_dropped'),
    ([1.0, 2.0, 1.5, 3.0, 4.0, 2], 'keypoints_bad_visibility_dropped'),
    ('12 8 2 35 20 1', 'keypoints_bad_length_dropped'),
])
def test_bad_keypoints_are_counted_and_named(tmp_path, caplog, keypoints, reason):
  anns = _good_annotations() + [_kp_ann(77, 2, 4, [1, 1, 10, 10], keypoints)]
  path, image_dir = _write(tmp_path, anns)
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco(path, image_dir, with_keypoints=True)
  assert ds.stats == {reason: 1}
  assert any(reason in r.message and '77' in r.message for r in caplog.records)
  record = ds.records[1]
  k = list(record['ann_ids']).index(77)
  np.testing.assert_array_equal(record['keypoints'][k], 0)  # the instance stays, keypoints not
  assert record['num_keypoints'][k] == 0
  gt = {a['id']: a for a in ds.gt_dict()['annotations']}
  assert gt[77]['num_keypoints'] == 0 and gt[77]['keypoints'] == [0.0] * 6


def test_keypoints_on_a_category_without_a_set_are_counted(tmp_path, caplog):
  anns = _good_annotations() + [_kp_ann(78, 2, 9, [1, 1, 10, 10], [3.0, 3.0, 2])]
  path, image_dir = _write(tmp_path, anns)
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco(path, image_dir, with_keypoints=True)
  assert ds.stats == {'keypoints_without_category_set_dropped': 1}
  assert any('78' in r.message for r in caplog.records)
  assert 'keypoints' not in {a['id']: a for a in ds.gt_dict()['annotations']}[78]


def test_missing_keypoints_of_a_set_category_are_zeros(tmp_path):
  anns = _good_annotations() + [_kp_ann(79, 2, 6, [1, 1, 10, 10], None)]
  path, image_dir = _write(tmp_path, anns)
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  assert ds.stats == {'keypoints_missing_set_0': 1}
  assert {a['id']: a for a in ds.gt_dict()['annotations']}[79]['num_keypoints'] == 0


@pytest.mark.parametrize('category, match', [
    ({'id': 4, 'name': 'hands', 'keypoints': 'left_hand'}, 'list of keypoint names'),
    ({'id': 4, 'name': 'hands', 'keypoints': ['a', 'a']}, 'repeats'),
    ({'id': 4, 'name': 'hands', 'keypoints': ['a', 'b'], 'skeleton': [[1, 3]]}, r'1\.\.2'),
    ({'id': 4, 'name': 'hands', 'keypoints': ['a', 'b'], 'skeleton': [[0, 1]]}, 'skeleton'),
])
def test_malformed_keypoint_sets_name_the_category(tmp_path, category, match):
  path, image_dir = _write(tmp_path, [], categories=[category])
  with pytest.raises(coco.CocoFormatError, match=match) as e:
    coco.load_coco(path, image_dir, with_keypoints=True)
  assert 'categories[0] (id 4' in str(e.value)
  coco.load_coco(path, image_dir)  # without keypoints the sets are not read


def _sets(lm):
  return {c: (n, s) for c, n, s in zip(lm.category_ids, lm.keypoint_names, lm.keypoint_skeleton)}


def test_a_label_map_with_other_sets_is_refused(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  lm = coco.load_coco(path, image_dir, with_keypoints=True).label_map
  other = lm.with_keypoint_sets({4: (('a', 'b'), ()), 6: _sets(lm)[6]})
  with pytest.raises(coco.CocoFormatError, match="declares keypoints"):
    coco.load_coco(path, image_dir, label_map=other, with_keypoints=True)
  # A map without sets (an older checkpoint's) takes this file's.
  bare = coco.LabelMap(lm.category_ids, lm.names)
  assert coco.load_coco(path, image_dir, label_map=bare, with_keypoints=True).label_map == lm


# ------------------------------------------------------------------------------ flip maps
def test_flip_map_from_names_is_torchvisions_for_coco_persons():
  assert list(coco.flip_map_from_names(COCO_PERSON_NAMES)) == TORCHVISION_PERSON_FLIP
  assert coco.flip_map_from_names(('apex', 'left_base', 'right_base')) == (0, 2, 1)
  assert coco.flip_map_from_names(('left_x', 'nose')) == (0, 1)  # no mirror: stays
  assert coco.flip_map_from_names(()) == ()


def test_flip_map_override(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  lm = coco.load_coco(path, image_dir, with_keypoints=True).label_map
  config = _config(keypoint_flip_map=((), (), (1, 0, 2), ()))
  assert pipeline.keypoint_flip_maps(config, lm).keypoint_flip_map == ((1, 0), (1, 0, 2), ())
  assert pipeline.keypoint_flip_maps(_config(), lm) == lm
  for bad, match in [(((), (0, 1)), 'one entry per label'),
                     (((), (), (1, 2, 0), ()), 'not its own inverse'),
                     (((), (), (0, 0, 1), ()), 'not a permutation'),
                     (((), (0,), (), ()), 'has 1 values')]:
    with pytest.raises(structures.ConfigError, match=r'config\.data\.keypoint_flip_map.*' + match):
      pipeline.keypoint_flip_maps(_config(keypoint_flip_map=bad), lm)


# ------------------------------------------------------------------------------ pipeline
def _reference_keypoints(record, min_size, flip, config, flip_maps):
  """gt_keypoints of one image computed with NumPy only, torchvision's way."""
  h, w = record['height'], record['width']
  nh, nw = T.resize_shape(h, w, min_size, config.input.max_size)
  k_max = max(config.model.keypoint_head.num_keypoints)
  out = np.zeros((config.input.max_instances, k_max, 3), np.float32)
  for n, (kps, label) in enumerate(zip(record['keypoints'], record['labels'])):
    kps = kps.astype(np.float32).copy()
    kps[:, 0] *= np.float32(nw) / np.float32(w)
    kps[:, 1] *= np.float32(nh) / np.float32(h)
    if flip:
      perm = list(flip_maps[label - 1]) + list(range(len(flip_maps[label - 1]), k_max))
      kps = kps[perm]
      kps[:, 0] = nw - kps[:, 0]
    kps[kps[:, 2] == 0] = 0
    out[n, :len(kps)] = kps
  return out


@pytest.mark.parametrize('flip', [False, True])
def test_pipeline_keypoints_follow_resize_and_flip(tmp_path, flip):
  path, image_dir = _write(tmp_path, _good_annotations())
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  config = _config()
  lm = pipeline.check_keypoint_config(config, ds.label_map)
  spec = pipeline._InputSpec.from_config(config, lm)
  for record in ds.records:
    out = pipeline.process_train_example(record, 64, flip, spec)
    want = _reference_keypoints(record, 64, flip, config, lm.keypoint_flip_map)
    assert out['gt_keypoints'].dtype == np.float32 and out['gt_keypoints'].shape == want.shape
    np.testing.assert_allclose(out['gt_keypoints'], want, rtol=1e-6, atol=1e-5)
  record = ds.records[0]
  plain = pipeline.process_train_example(record, 64, False, spec)['gt_keypoints']
  flipped = pipeline.process_train_example(record, 64, True, spec)['gt_keypoints']
  nw = T.resize_shape(40, 60, 64, config.input.max_size)[1]
  # Left and right swap: the flipped right hand is the mirrored left hand.
  np.testing.assert_allclose(flipped[0, 1, :2], [nw - plain[0, 0, 0], plain[0, 0, 1]], rtol=1e-6)
  np.testing.assert_allclose(flipped[1, 2, :2], [nw - plain[1, 1, 0], plain[1, 1, 1]], rtol=1e-6)
  np.testing.assert_array_equal(flipped[1, 0, 2], plain[1, 0, 2])  # the apex stays the apex
  # The boxes flip with them: keypoints inside a box stay inside.
  boxes = pipeline.process_train_example(record, 64, True, spec)['gt_boxes']
  on = flipped[..., 2] > 0
  assert ((flipped[..., 0] >= boxes[:, None, 0]) | ~on).all()
  assert ((flipped[..., 0] <= boxes[:, None, 2]) | ~on).all()


def test_flipping_twice_is_the_identity():
  rng = np.random.default_rng(0)
  kps = np.concatenate([rng.uniform(0, 50, (6, 17, 2)), rng.integers(1, 3, (6, 17, 1))], -1)
  kps[0, 3] = 0
  index = np.tile(np.array(TORCHVISION_PERSON_FLIP), (6, 1))
  once = T.hflip_keypoints(kps, 50, index)
  np.testing.assert_allclose(T.hflip_keypoints(once, 50, index), kps.astype(np.float32),
                             atol=1e-5)
  np.testing.assert_allclose(once[:, 1, 0], 50 - kps[:, 2, 0].astype(np.float32), atol=1e-5)


def test_unlabelled_keypoints_are_zero_after_flip():
  kps = np.array([[[5.0, 6.0, 0.0], [7.0, 8.0, 2.0]]])
  out = T.hflip_keypoints(kps, 20, [1, 0])
  np.testing.assert_array_equal(out, [[[13.0, 8.0, 2.0], [0, 0, 0]]])
  np.testing.assert_array_equal(T.resize_keypoints(kps, 10, 20, 20, 40)[0, 1], [14, 16, 2])


def test_train_iterator_yields_gt_keypoints(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  config = _config()
  config.input.hflip_prob = 0.5
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  it = pipeline.make_train_iterator(config, dataset=ds)
  batch = next(it)
  assert set(batch) == set(pipeline.batch_keys(config)) == set(pipeline.BATCH_KEYS) | {
      'gt_keypoints'}
  assert batch['gt_keypoints'].shape == (2, config.input.max_instances, 3, 3)
  assert it.meta['keypoint_flip_map'] == [[1, 0], [0, 2, 1], []]
  it.close()
  assert pipeline.batch_keys(maskrcnn_r50_fpn.get_config('tiny')) == pipeline.BATCH_KEYS


def test_config_counts_must_match_the_categories(tmp_path):
  path, image_dir = _write(tmp_path, _good_annotations())
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  with pytest.raises(structures.ConfigError,
                     match=r'model\.keypoint_head\.num_keypoints.*declare \(0, 2, 3, 0\)'):
    pipeline.make_train_iterator(_config((0, 17, 3, 0)), dataset=ds)
  short = _config()
  short.model.keypoint_head.num_keypoints = (0, 2, 3)  # one label short of num_classes = 4
  with pytest.raises(structures.ConfigError, match='one count >= 0 per label'):
    pipeline.make_train_iterator(short, dataset=ds)
  with pytest.raises(ValueError, match='label map has none'):
    pipeline.make_train_iterator(_config(), dataset=coco.load_coco(path, image_dir))


def test_oks_sigmas_config(tmp_path):
  counts = (0, 17, 3, 0)
  assert pipeline.keypoint_oks_sigmas(_config(counts, keypoint_oks_sigmas=((), (), (
      0.1, 0.2, 0.3), ())), counts)[2] == (0.1, 0.2, 0.3)
  with pytest.raises(structures.ConfigError,
                     match=r'config\.data\.keypoint_oks_sigmas.*label 2 has 3 keypoints'):
    pipeline.keypoint_oks_sigmas(_config(counts), counts)
  with pytest.raises(structures.ConfigError, match='positive finite'):
    pipeline.keypoint_oks_sigmas(_config(counts, keypoint_oks_sigmas=((), (), (
        0.1, -0.2, 0.3), ())), counts)


# ------------------------------------------------------------------ start-up data checks
def test_min_keypoints_filter_drops_and_logs(tmp_path, caplog):
  path, image_dir = _write(tmp_path, _good_annotations())
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  assert [pipeline.count_labelled_keypoints(r) for r in ds.records] == [4, 2]
  with caplog.at_level(logging.INFO):
    it = pipeline.make_train_iterator(_config(min_keypoints_per_image=3), dataset=ds)
  assert it.get_state()['num_records'] == 1
  assert any('drops 1 of 2 images' in r.message for r in caplog.records)
  assert pipeline.make_train_iterator(_config(), dataset=ds).get_state()['num_records'] == 2
  with pytest.raises(ValueError, match='min_keypoints_per_image = 5'):
    pipeline.make_train_iterator(_config(min_keypoints_per_image=5), dataset=ds)


def test_min_keypoints_is_a_checked_field():
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.data.min_keypoints_per_image = -1
  with pytest.raises(structures.ConfigError, match='min_keypoints_per_image'):
    structures.validate_config(c)


def test_no_keypoint_inside_its_box_stops_the_run(tmp_path):
  # Keypoints written in another frame (here: 100 px to the right): none lands in its box.
  anns = [_kp_ann(1, 1, 4, [10, 5, 30, 20], [112.5, 8.0, 2, 135.0, 20.0, 2]),
          _kp_ann(2, 2, 6, [3, 3, 40, 20], [120.0, 4.0, 2, 105.0, 20.0, 1, 141.0, 21.0, 2])]
  path, image_dir = _write(tmp_path, anns)
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  with pytest.raises(ValueError, match=r'none of its 5 labelled keypoints inside.*issue 2125'):
    pipeline.make_train_iterator(_config(), dataset=ds)
  unlabelled = [_kp_ann(1, 1, 4, [10, 5, 30, 20], [0, 0, 0, 0, 0, 0])]
  path, image_dir = _write(tmp_path / 'u', unlabelled)
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  with pytest.raises(ValueError, match=r'no labelled keypoint \(v > 0\)'):
    pipeline.make_train_iterator(_config(), dataset=ds)


def test_some_keypoints_outside_their_box_are_logged(tmp_path, caplog):
  path, image_dir = _write(tmp_path, _good_annotations())
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  with caplog.at_level(logging.WARNING):
    fraction = pipeline.check_keypoints_in_boxes(ds.records)
  assert fraction == 1.0 and not caplog.records  # every labelled keypoint is in its box
  anns = _good_annotations() + [_kp_ann(5, 2, 4, [1, 1, 10, 10], [20.0, 2.0, 2, 5.0, 5.0, 2])]
  path, image_dir = _write(tmp_path / 'b', anns)
  ds = coco.load_coco(path, image_dir, with_keypoints=True)
  with caplog.at_level(logging.WARNING):
    assert pipeline.check_keypoints_in_boxes(ds.records) == pytest.approx(7 / 8)
  assert any('1 of 8 labelled training keypoints (12.5%)' in r.message for r in caplog.records)
