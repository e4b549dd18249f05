"""data.source='tfds': train and evaluate from a built shapes TFDS dataset. Its records, training
batches, ground truth and metrics equal the COCO-JSON path's on the same images; planning
decodes no image; a missing dataset or split is one error naming the config field."""
import json
import pickle

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from pycocotools import mask as mask_utils  # noqa: E402

from configs import maskrcnn_r50_fpn  # noqa: E402
from maskrcnn_jax import evaluate  # noqa: E402
from maskrcnn_jax import structures  # noqa: E402
from maskrcnn_jax import train  # noqa: E402
from maskrcnn_jax.data import coco  # noqa: E402
from maskrcnn_jax.data import pipeline  # noqa: E402
from maskrcnn_jax.data import shapes  # noqa: E402
from maskrcnn_jax.data import tfds_builder  # noqa: E402
from maskrcnn_jax.evaluation import coco_eval  # noqa: E402
from tests.data.coco_testdata import ann, rle_of, write_coco  # noqa: E402

RECORD_KEYS = ('boxes', 'labels', 'crowd', 'areas', 'ann_ids', 'has_mask')


def _tfds_config(config, data_dir, name='coco_instances/shapes'):
  config = config.copy_and_resolve_references()
  config.data.source = 'tfds'
  config.data.tfds_name = name
  config.data.tfds_data_dir = str(data_dir)
  return config


@pytest.fixture(scope='module')
def configs(tmp_path_factory):
  """(JSON config, TFDS config) of the same images: the tiny config's shapes (16 train, 8 val)
  read from their COCO JSONs, and built as the TFDS dataset coco_instances/shapes."""
  base = tmp_path_factory.mktemp('tfds_source')
  json_config = maskrcnn_r50_fpn.get_config('tiny')
  d = json_config.data
  d.root = str(base / 'shapes')
  root = shapes.ensure_shapes_dataset(d.root, d.shapes_num_train, d.shapes_num_val,
                                      d.shapes_size, pipeline.SHAPES_SEED)
  tfds_builder.build('shapes', root, str(base / 'tfds'))
  return json_config, _tfds_config(json_config, base / 'tfds')


def _assert_same_records(want, have):
  assert [r['image_id'] for r in have] == [r['image_id'] for r in want]
  for w, h in zip(want, have):
    assert (h['height'], h['width']) == (w['height'], w['width'])
    for key in RECORD_KEYS:
      np.testing.assert_array_equal(h[key], w[key], err_msg=key)
      assert h[key].dtype == w[key].dtype, key
    np.testing.assert_array_equal(coco.decode_masks(h), coco.decode_masks(w))


def test_records_and_batches_equal_the_json_path_and_planning_decodes_nothing(
    configs, monkeypatch):
  # No read-ahead thread: every decode counted below is one that was asked for.
  json_config, tfds_config = (c.copy_and_resolve_references() for c in configs)
  json_config.input.prefetch = tfds_config.input.prefetch = 0
  decodes = []
  decode = coco.decode_image_bytes
  monkeypatch.setattr(coco, 'decode_image_bytes',
                      lambda *args, **kwargs: decodes.append(args[1]) or decode(*args, **kwargs))
  json_ds = pipeline.load_dataset_records(json_config, 'train')
  tfds_ds = pipeline.load_dataset_records(tfds_config, 'train')
  assert isinstance(tfds_ds, tfds_builder.TfdsDataset)
  assert tfds_ds.label_map == json_ds.label_map
  _assert_same_records(json_ds.records, tfds_ds.records)

  json_it = pipeline.make_train_iterator(json_config)
  tfds_it = pipeline.make_train_iterator(tfds_config)
  plans = [[(b, i.tolist(), s.tolist(), f.tolist()) for b, i, s, f in
            (it.plan[k] for k in range(12))] for it in (json_it, tfds_it)]
  assert plans[0] == plans[1]
  assert decodes == []  # the plan (three epochs of it) came from the stored sizes alone
  batch_size = json_config.input.batch_size
  for _ in range(2):
    want, have = next(json_it), next(tfds_it)
    assert sorted(have) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(have[key], want[key], err_msg=key)
  assert len(decodes) == 2 * batch_size
  json_it.close()
  tfds_it.close()

  reader = pickle.loads(pickle.dumps(tfds_ds.records[3]['image_reader']))  # as grain workers get it
  np.testing.assert_array_equal(reader(), coco.record_image(json_ds.records[3]))


def _noisy_results(records, label_map, seed=0):
  """Detections near the ground truth of `records`: jittered boxes and masks, some with the
  wrong class, random scores, so the metrics are far from 0 and 1."""
  rng = np.random.default_rng(seed)
  l2c = label_map.label_to_category_id()
  results = []
  for r in records:
    for box, label, mask in zip(r['boxes'], r['labels'], coco.decode_masks(r)):
      x1, y1, x2, y2 = (float(v) + rng.normal(0, 2.0) for v in box)
      label = int(label) if rng.random() < 0.8 else int(rng.integers(1, len(l2c) + 1))
      shifted = np.roll(mask, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
      rle = mask_utils.encode(np.asfortranarray(shifted))
      results.append({'image_id': r['image_id'], 'category_id': l2c[label],
                      'score': float(rng.random()), 'bbox': [x1, y1, x2 - x1, y2 - y1],
                      'segmentation': {'size': rle['size'],
                                       'counts': rle['counts'].decode('ascii')}})
  return results


def _assert_same_ground_truth(json_gt, tfds_gt):
  """Images, categories and every annotation's ids, box, area, crowd flag and mask agree."""
  keys = ('id', 'file_name', 'height', 'width')
  assert tfds_gt['images'] == sorted(({k: im[k] for k in keys} for im in json_gt['images']),
                                     key=lambda im: im['id'])
  assert tfds_gt['categories'] == json_gt['categories']
  by_image = lambda gt: {im['id']: im for im in gt['images']}
  sizes = by_image(json_gt)
  want = {a['id']: a for a in json_gt['annotations']}
  assert [a['id'] for a in tfds_gt['annotations']] == sorted(
      want, key=lambda i: (want[i]['image_id'], json_gt['annotations'].index(want[i])))
  for have in tfds_gt['annotations']:
    w = want[have['id']]
    for key in ('image_id', 'category_id', 'bbox', 'area', 'iscrowd'):
      assert have[key] == w[key], (have['id'], key)
    assert ('segmentation' in have) == ('segmentation' in w)
    if 'segmentation' in w:
      img = sizes[w['image_id']]
      np.testing.assert_array_equal(
          mask_utils.decode(have['segmentation']),
          mask_utils.decode(coco.segmentation_to_rle(w['segmentation'], img['height'],
                                                     img['width'])))


def test_ground_truth_from_records_equals_the_json_and_scores_alike(configs):
  json_config, tfds_config = configs
  json_ds = pipeline.load_dataset_records(json_config, 'val')
  tfds_ds = pipeline.load_dataset_records(tfds_config, 'val')
  json_gt, tfds_gt = json_ds.gt_dict(), tfds_ds.gt_dict()
  _assert_same_ground_truth(json_gt, tfds_gt)
  results = _noisy_results(json_ds.records, json_ds.label_map)
  want = coco_eval.coco_evaluate(json_gt, results)
  have = coco_eval.coco_evaluate(tfds_gt, results)
  assert 0.2 < want['bbox/AP50'] < 0.95 and 0.1 < want['segm/AP'] < 0.9, want
  np.testing.assert_equal(have, want)  # every stat, NaNs in the same places


def test_messy_json_is_normalised_alike(tmp_path):
  """Duplicate and missing ids, missing iscrowd/area, box-only, crowd uncompressed RLE, an
  unknown category, a degenerate box, a too-short polygon part and a JSON size that is not the
  file's: the TFDS records, ground truth and image errors are those of the JSON reader."""
  crowd = np.zeros((40, 50), np.uint8)
  crowd[25:40, 0:30] = 1
  no_crowd_flag = ann(8, 2, 7, [4, 4, 20, 20])
  del no_crowd_flag['iscrowd'], no_crowd_flag['area']
  box_only = ann(9, 2, 3, [30, 10, 12, 25])
  del box_only['segmentation']
  short_part = ann(10, 1, 3, [2, 20, 10, 10])
  short_part['segmentation'].append([1, 1, 2, 2])
  missing_id = ann(None, 2, 7, [1, 1, 6, 6])
  del missing_id['id']
  anns = [ann(5, 1, 3, [2, 2, 10, 12]), ann(5, 1, 7, [20, 5, 15, 20]),  # duplicate id
          ann(6, 1, 3, [0, 0, 0.5, 8]),  # degenerate: not a training instance, still gt
          ann(7, 1, 99, [5, 5, 5, 5]),  # unknown category
          no_crowd_flag, box_only, short_part, missing_id,
          ann(11, 3, 12, [0, 25, 30, 15], segmentation=rle_of(crowd, compressed=False),
              iscrowd=1)]
  images = [{'id': 1, 'height': 40, 'width': 50}, {'id': 2, 'height': 40, 'width': 50},
            {'id': 3, 'height': 40, 'width': 50}]
  json_path, root = write_coco(tmp_path / 'messy', images, anns, json_name='instances_val.json',
                               image_dir='.')
  # Image 3's JSON says 40x50, its file is 40x48.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(f'{root}/3.png')
  tfds_builder.build('shapes', root, str(tmp_path / 'tfds'))
  want = coco.load_coco(json_path, root, require_masks=False)
  have = tfds_builder.load_tfds('coco_instances/shapes', 'validation', str(tmp_path / 'tfds'),
                                require_masks=False)
  _assert_same_records(want.records, have.records)
  _assert_same_ground_truth(want.gt_dict(), have.gt_dict())
  results = _noisy_results(want.records, want.label_map, seed=1)
  np.testing.assert_equal(coco_eval.coco_evaluate(have.gt_dict(), results, iou_types=('bbox',)),
                          coco_eval.coco_evaluate(want.gt_dict(), results, iou_types=('bbox',)))
  with pytest.raises(coco.ImageDecodeError, match=r"coco_instances/shapes split 'validation' "
                     r'record \d \(3.png\): decoded size 40x48 differs'):
    coco.record_image(have.records[2])
  assert coco.verify_images(have.records) == [str(e) for e in _errors(have.records)]
  with pytest.raises(coco.CocoFormatError, match='1 annotations have no segmentation'):
    tfds_builder.load_tfds('coco_instances/shapes', 'validation', str(tmp_path / 'tfds'))


def _errors(records):
  out = []
  for r in records:
    try:
      coco.record_image(r)
    except coco.ImageDecodeError as e:
      out.append(e)
  return out


def test_missing_dataset_or_split_is_one_error_naming_the_field(configs, tmp_path):
  _, tfds_config = configs
  pipeline.check_built(tfds_config, ('train', 'val'))  # the built one passes
  empty = _tfds_config(tfds_config, tmp_path / 'nothing_here')
  with pytest.raises(structures.ConfigError, match=r"(?s)config.data.tfds_name = "
                     r"'coco_instances/shapes': TFDS dataset 'coco_instances/shapes' is not "
                     r'built in .*nothing_here.*python -m maskrcnn_jax.data.build_tfds'):
    pipeline.check_built(empty, ('train',))
  unknown = _tfds_config(tfds_config, tfds_config.data.tfds_data_dir, name='no_such_dataset')
  with pytest.raises(structures.ConfigError, match=r"config.data.tfds_name = 'no_such_dataset': "
                     r"TFDS dataset 'no_such_dataset' not found"):
    pipeline.check_built(unknown, ('val',))
  no_split = tfds_config.copy_and_resolve_references()
  no_split.data.tfds_val_split = 'test'
  with pytest.raises(structures.ConfigError, match=r"config.data.tfds_val_split = 'test': TFDS "
                     r"dataset 'coco_instances/shapes' has no split 'test' \(it has \['train', "
                     r"'validation'\]\)"):
    pipeline.check_built(no_split, ('train', 'val'))
  with pytest.raises(tfds_builder.TfdsNotFoundError, match=r"config.data.tfds_val_split = "
                     r"'test'.*has no split 'test'"):
    pipeline.load_dataset_records(no_split, 'val')
  unset = tfds_config.copy_and_resolve_references()
  unset.data.tfds_train_split = ''
  with pytest.raises(structures.ConfigError, match="config.data.tfds_train_split = '': must be "
                     "set for data.source='tfds'"):
    structures.validate_data(unset, ('train',))


def test_train_and_evaluate_from_tfds_give_the_json_metrics(configs, tmp_path):
  """A few training steps read from TFDS, evaluated at the end from TFDS; the same checkpoint
  evaluated from the COCO JSONs (`maskrcnn-jax evaluate`'s function) gives the same metrics."""
  json_config, tfds_config = (c.copy_and_resolve_references() for c in configs)
  for config in (json_config, tfds_config):
    config.input.batch_size = config.optim.base_batch_size = 4  # over the 4 virtual devices
    config.run.num_eval_pictures = 0
  tfds_config.run.eval_at_end = True
  trained = train.train_and_evaluate(tfds_config, str(tmp_path / 'run'), num_steps=2)
  assert trained['step'] == 2 and np.isfinite(trained['loss'])
  from_json = evaluate.evaluate_checkpoint(json_config, str(tmp_path / 'eval_json'),
                                           str(tmp_path / 'run'))
  assert 'bbox/AP' in from_json and 'segm/AP' in from_json
  np.testing.assert_equal({k: trained[k] for k in from_json}, from_json)
  detections = [json.loads((tmp_path / d / 'eval' / evaluate.RESULTS_FILE).read_text())
                for d in ('run', 'eval_json')]
  assert detections[0] and detections[0] == detections[1]  # the very same detections
