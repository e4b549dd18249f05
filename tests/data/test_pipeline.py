"""Tests of data/pipeline.py: exact masks/boxes, flips, buckets, determinism, resume, workers."""
import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.data import transforms as T

# The mixed_coco images (30x40, 50x30, 36x60) resize into the tiny config's three buckets.
TRAIN_MIN_SIZES = (48, 64)


def _config(**input_overrides):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.input.train_min_sizes = TRAIN_MIN_SIZES
  c.input.prefetch = 0
  for k, v in input_overrides.items():
    c.input[k] = v
  return c


def _expected(ref: COCO, record, min_size, flip, config):
  """The structures.py fields of one image, computed from pycocotools and transforms only."""
  h, w = record['height'], record['width']
  nh, nw = T.resize_shape(h, w, min_size, config.input.max_size)
  anns = [ref.anns[int(a)] for a in record['ann_ids']]
  boxes = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                     a['bbox'][1] + a['bbox'][3]] for a in anns], np.float32).reshape(-1, 4)
  boxes = T.resize_boxes(boxes, h, w, nh, nw)
  masks = T.resize_masks(np.stack([ref.annToMask(a) for a in anns]), nh, nw)
  image = T.resize_image(coco.load_image(record['file_name']), nh, nw)
  if flip:
    image, boxes, masks = T.hflip(image, boxes, masks)
  crops = T.crop_and_resize_masks(masks, boxes, config.input.gt_mask_size)
  return image, boxes, crops, masks, (nh, nw)


def test_batches_equal_annToMask_after_the_same_resize_and_flip(mixed_coco):
  path, image_dir = mixed_coco
  config = _config(batch_size=1, hflip_prob=0.5)
  ds = coco.load_coco(path, image_dir)
  ref = COCO(path)
  it = pipeline.make_train_iterator(config, dataset=ds)
  records = [r for r in ds.records if r['labels'].size]
  seen_flips = set()
  for k in range(8):
    batch = next(it)
    assert set(batch) == set(pipeline.BATCH_KEYS)
    bucket, idx, min_sizes, flips = it.plan[k]
    record = records[idx[0]]
    seen_flips.add(bool(flips[0]))
    image, boxes, crops, _, (nh, nw) = _expected(ref, record, int(min_sizes[0]), flips[0], config)
    n = len(boxes)
    np.testing.assert_array_equal(batch['image_size'][0], [nh, nw])
    assert batch['images'].shape[1:3] == config.input.buckets[bucket]
    np.testing.assert_allclose(batch['gt_boxes'][0, :n], boxes, rtol=1e-6)
    np.testing.assert_array_equal(batch['gt_masks'][0, :n], crops)
    assert crops.sum() > 0
    np.testing.assert_array_equal(batch['gt_labels'][0, :n], record['labels'])
    np.testing.assert_array_equal(batch['gt_crowd'][0, :n], record['crowd'])
    assert batch['gt_valid'][0].tolist() == [True] * n + [False] * (8 - n)
    assert not batch['gt_masks'][0, n:].any() and not batch['gt_boxes'][0, n:].any()
    want = T.normalize(image, config.input.pixel_mean, config.input.pixel_std)
    np.testing.assert_allclose(batch['images'][0, :nh, :nw], want, atol=1e-4)
    assert not batch['images'][0, nh:].any() and not batch['images'][0, :, nw:].any()
    assert batch['gt_masks'].dtype == np.uint8 and batch['gt_masks'].shape[-1] == 28
  assert seen_flips == {True, False}


def test_flip_keeps_boxes_and_masks_together(mixed_coco):
  path, image_dir = mixed_coco
  config = _config()
  spec = pipeline._InputSpec.from_config(config)
  ds = coco.load_coco(path, image_dir)
  ref = COCO(path)
  record = next(r for r in ds.records if r['image_id'] == 5)  # two polygons, one of two parts
  plain = pipeline.process_train_example(record, 64, False, spec)
  flipped = pipeline.process_train_example(record, 64, True, spec)
  nh, nw = plain['image_size']
  np.testing.assert_allclose(flipped['gt_boxes'][:2, [0, 2]], nw - plain['gt_boxes'][:2, [2, 0]])
  np.testing.assert_array_equal(flipped['gt_boxes'][:2, [1, 3]], plain['gt_boxes'][:2, [1, 3]])
  np.testing.assert_array_equal(flipped['images'][:nh, :nw], plain['images'][:nh, :nw][:, ::-1])
  # The flipped full-size masks lie inside the flipped boxes.
  _, boxes, crops, masks, _ = _expected(ref, record, 64, True, config)
  np.testing.assert_array_equal(flipped['gt_masks'][:2], crops)
  for k in range(2):
    ys, xs = np.nonzero(masks[k])
    x1, y1, x2, y2 = flipped['gt_boxes'][k]
    # Nearest resizing moves mask edges by up to a pixel.
    assert x1 - 1 <= xs.min() and xs.max() + 1 <= x2 + 1
    assert y1 - 1 <= ys.min() and ys.max() + 1 <= y2 + 1
  # Crops of the flipped image mirror the unflipped crops (up to threshold ties).
  agree = (flipped['gt_masks'][:2] == plain['gt_masks'][:2, :, ::-1]).mean()
  assert agree > 0.97


def test_batches_are_homogeneous_in_bucket_and_skip_empty(mixed_coco):
  ds = coco.load_coco(*mixed_coco)
  config = _config(batch_size=2)
  it = pipeline.make_train_iterator(config, dataset=ds)
  used = set()
  for k in range(12):
    batch = next(it)
    bucket, idx, _, _ = it.plan[k]
    used.add(bucket)
    for hw in batch['image_size']:
      assert structures.choose_bucket(*hw, config.input.buckets) == batch['images'].shape[1:3]
  assert len(used) >= 2
  assert it.get_state()['num_records'] == 3  # image 9 has no instance and is skipped
  config.input.skip_empty_train = False
  assert pipeline.make_train_iterator(config, dataset=ds).get_state()['num_records'] == 4


def test_plan_is_deterministic_for_the_seed_and_carries_leftovers():
  rng = np.random.default_rng(0)
  hs, ws = rng.integers(20, 80, 50), rng.integers(20, 80, 50)
  kw = dict(batch_size=4, train_min_sizes=(48, 64), max_size=96,
            buckets=((64, 96), (96, 64), (96, 96)), hflip_prob=0.5)
  a, b = pipeline.TrainPlan(hs, ws, seed=1, **kw), pipeline.TrainPlan(hs, ws, seed=1, **kw)
  c = pipeline.TrainPlan(hs, ws, seed=2, **kw)
  for k in (40, 0, 5):  # any access order
    for x, y in zip(a[k], b[k]):
      np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(a[k][1], c[k][1]) for k in range(3))
  for e in range(3):
    buckets, idx, min_sizes, _ = a._epoch(e)
    carried_in = sum(len(v) for v in a._carry[e].values())
    carried_out = sum(len(v) for v in a._carry[e + 1].values())
    assert idx.size + carried_out == 50 + carried_in  # every image used once per epoch
    assert carried_out < 3 * 4  # less than one batch per bucket waits
    for b_, row, sizes in zip(buckets, idx, min_sizes):
      for i, s in zip(row, sizes):
        hw = T.resize_shape(int(hs[i]), int(ws[i]), int(s), 96)
        assert structures.choose_bucket(*hw, kw['buckets']) == kw['buckets'][b_]
  n0 = len(a._epoch(0)[0])
  assert a.locate(n0 + 1) == (1, 1)
  # Two images of different buckets still make batches of 2 via the carry.
  tiny = pipeline.TrainPlan(np.array([30, 60]), np.array([60, 30]), seed=0, **dict(kw,
                                                                                    batch_size=2))
  assert {tiny[k][0] for k in range(6)} == {0, 1}


def _same(x, y):
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])


def test_iterator_resumes_to_the_same_next_batch(mixed_coco):
  ds = coco.load_coco(*mixed_coco)
  config = _config(batch_size=2)
  it = pipeline.make_train_iterator(config, dataset=ds)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state['next_batch'] == 3
  expected = [next(it) for _ in range(2)]
  resumed = pipeline.make_train_iterator(config, dataset=ds)
  resumed.set_state(state)
  _same(next(resumed), expected[0])
  _same(next(resumed), expected[1])
  it.set_state(state)  # rewinding a running iterator works too
  _same(next(it), expected[0])
  other = _config(batch_size=2)
  other.seed = 5
  with pytest.raises(ValueError, match='seed'):
    pipeline.make_train_iterator(other, dataset=ds).set_state(state)


def test_worker_processes_give_the_same_batches(mixed_coco):
  ds = coco.load_coco(*mixed_coco)
  inline = pipeline.make_train_iterator(_config(batch_size=2, prefetch=2), dataset=ds)
  workers = pipeline.make_train_iterator(_config(batch_size=2, num_workers=2), dataset=ds)
  try:
    want = [next(inline) for _ in range(4)]
    for w in want[:3]:
      _same(next(workers), w)
    state = workers.get_state()
    workers.set_state(state)
    _same(next(workers), want[3])
  finally:
    workers.close()
    inline.close()


def test_hosts_split_each_global_batch(mixed_coco):
  ds = coco.load_coco(*mixed_coco)
  config = _config(batch_size=2)
  whole = pipeline.make_train_iterator(config, dataset=ds)
  records = whole._loader.records
  spec = pipeline._InputSpec.from_config(config)
  hosts = [pipeline._TrainBatchLoader(records, spec, host, 1) for host in (0, 1)]
  for k in range(3):
    batch = next(whole)
    parts = [h(whole.plan[k]) for h in hosts]
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])


def test_instances_over_the_cap_keep_the_largest(mixed_coco):
  ds = coco.load_coco(*mixed_coco)
  record = next(r for r in ds.records if r['image_id'] == 1)  # areas 120 and 300
  spec = pipeline._InputSpec.from_config(_config(max_instances=1))
  out = pipeline.process_train_example(record, 64, False, spec)
  assert out['gt_valid'].tolist() == [True] and out['gt_labels'].tolist() == [2]


def test_predictor_and_pipeline_share_one_preprocessing(mixed_coco):
  """The Predictor's input of an image is the training pipeline's without the flip, bit for bit
  (one definition: transforms.prepare_image), and flipping mirrors only the content."""
  import jax  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  ds = coco.load_coco(*mixed_coco)
  config = _config()
  spec = pipeline._InputSpec.from_config(config)
  variables = mask_rcnn.init_variables(config, jax.random.key(0))
  predictor = predictor_lib.Predictor(config, variables)
  for record in ds.records:
    image = coco.record_image(record)
    ours, hw = pipeline.preprocess_image(image, config.input.min_size, False, spec)
    theirs, hw2, bucket = predictor.preprocess(image)
    np.testing.assert_array_equal(ours, theirs)
    assert hw == hw2 and bucket == ours.shape[:2]
    flipped, _ = pipeline.preprocess_image(image, config.input.min_size, True, spec)
    np.testing.assert_array_equal(flipped[:hw[0], :hw[1]], ours[:hw[0], :hw[1]][:, ::-1])


def test_load_dataset_records_generates_shapes(tmp_path):
  config = _config()
  config.data.root = str(tmp_path / 'shapes')
  train = pipeline.load_dataset_records(config, 'train')
  val = pipeline.load_dataset_records(config, 'val')
  assert len(train.records) == config.data.shapes_num_train
  assert len(val.records) == config.data.shapes_num_val
  assert train.label_map.num_classes == config.model.num_classes == 5
  assert max(len(r['labels']) for r in train.records) <= config.input.max_instances
  it = pipeline.make_train_iterator(config)
  batch = next(it)
  assert batch['images'].shape == (2, 64, 64, 3)
  assert it.meta['label_to_category_id'] == {1: 1, 2: 2, 3: 3, 4: 4}
  config.data.source = 'coco'
  with pytest.raises(ValueError, match='train_json'):
    pipeline.load_dataset_records(config, 'train')


def test_detectron2_resize_reaches_planning_and_preprocessing():
  """input.resize='detectron2': the plan buckets and the image path use its rounded sizes."""
  config = maskrcnn_r50_fpn.get_config()
  config.input.resize = 'detectron2'
  config.input.buckets = ((800, 1216), (800, 1344))
  spec = pipeline._InputSpec.from_config(config)  # pylint: disable=protected-access
  image = np.random.default_rng(0).integers(0, 256, (300, 451, 3)).astype(np.uint8)
  x, hw = pipeline.preprocess_image(image, 800, False, spec)
  assert hw == (800, 1203) and x.shape == (800, 1216, 3)  # torchvision floors to 1202
  plan_tv = pipeline.TrainPlan(np.array([300]), np.array([451]), seed=0, batch_size=1,
                               train_min_sizes=(800,), max_size=1333,
                               buckets=((800, 1202), (800, 1344)), hflip_prob=0.0)
  plan_d2 = pipeline.TrainPlan(np.array([300]), np.array([451]), seed=0, batch_size=1,
                               train_min_sizes=(800,), max_size=1333,
                               buckets=((800, 1202), (800, 1344)), hflip_prob=0.0,
                               resize='detectron2')
  assert (plan_tv.bucket_of[0][0], plan_d2.bucket_of[0][0]) == (0, 1)
