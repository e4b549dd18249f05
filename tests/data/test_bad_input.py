"""Bad input to the data readers: each class of fault is an error naming it or a counted skip.

Every input is built on the fly in tmp_path: JSONs with duplicate or missing fields, box-only
datasets, EXIF-rotated JPEGs, malformed RLEs and corrupt image files.
"""
import contextlib
import io
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import maskrcnn_r50_fpn
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from tests.data.coco_testdata import ann, rle_of, write_coco


def _box_ann(ann_id, image_id, category_id, bbox):
  a = ann(ann_id, image_id, category_id, bbox)
  del a['segmentation']
  return a


def _perfect_results(ds, with_masks=True):
  """One score-1 detection exactly on every kept annotation of the records."""
  results = []
  l2c = ds.label_map.label_to_category_id()
  for r in ds.records:
    masks = coco.decode_masks(r)
    for box, label, mask in zip(r['boxes'], r['labels'], masks):
      x1, y1, x2, y2 = (float(v) for v in box)
      res = {'image_id': r['image_id'], 'category_id': l2c[int(label)], 'score': 1.0,
             'bbox': [x1, y1, x2 - x1, y2 - y1]}
      if with_masks:
        rle = mask_utils.encode(np.asfortranarray(mask))
        res['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
      results.append(res)
  return results


def _ap(coco_gt, results, iou_type):
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    if iou_type == 'bbox':
      results = [{k: v for k, v in r.items() if k != 'segmentation'} for r in results]
    dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, dt, iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[0]


def _quiet_coco(path):
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(path)


# ------------------------------------------------------------------ (1) duplicate annotation ids
def test_duplicate_annotation_ids_are_renumbered_and_gt_dict_scores_perfect_detections_1(
    tmp_path, caplog):
  images = [{'id': 1, 'height': 40, 'width': 50}, {'id': 2, 'height': 40, 'width': 50}]
  anns = [ann(5, 1, 3, [2, 2, 10, 12]), ann(5, 1, 3, [20, 5, 15, 20]),  # same id, same image
          ann(6, 2, 7, [4, 4, 20, 20]), ann(6, 2, 3, [30, 10, 12, 25]),
          ann(7, 2, 7, [5, 28, 30, 10]), ann(5, 2, 7, [1, 1, 6, 6])]
  path, image_dir = write_coco(tmp_path, images, anns)
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco(path, image_dir)
  assert ds.stats == {'annotation_id_duplicate_renumbered': 3}
  assert 'annotation_id_duplicate_renumbered: 3 (e.g. [5, 6, 5])' in caplog.text
  ids = np.concatenate([r['ann_ids'] for r in ds.records]).tolist()
  assert ids == [5, 8, 6, 9, 7, 10]  # first keeps its id, later ones get fresh ids above 7
  gt = ds.gt_dict()
  assert [a['id'] for a in gt['annotations']] == ids
  assert gt['images'] == json.loads(open(path).read())['images']
  results = _perfect_results(ds)
  for iou_type in ('bbox', 'segm'):
    assert _ap(ds.gt_coco(), results, iou_type) == pytest.approx(1.0)
    # Control: pycocotools on the raw file loses annotations to the duplicate ids.
    assert _ap(_quiet_coco(path), results, iou_type) < 0.95


def test_gt_dict_refuses_a_file_changed_since_loading(tmp_path):
  path, image_dir = write_coco(tmp_path, [{'id': 1, 'height': 10, 'width': 10}],
                               [ann(1, 1, 3, [1, 1, 5, 5])])
  ds = coco.load_coco(path, image_dir)
  assert len(ds.gt_dict()['annotations']) == 1
  data = json.loads(open(path).read())
  data['annotations'].append(ann(2, 1, 3, [2, 2, 5, 5]))
  with open(path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(coco.CocoFormatError, match='changed since it was loaded'):
    ds.gt_dict()


# ------------------------------------------------------------- (2) missing iscrowd, area, id
def test_missing_id_iscrowd_and_area_are_filled_so_pycocotools_can_evaluate(tmp_path, caplog):
  h, w = 30, 40
  mask = np.zeros((h, w), np.uint8)
  mask[4:20, 6:30] = 1
  mask[8:12, 10:14] = 0
  anns = [ann(10, 1, 3, [6, 4, 24, 16], rle_of(mask)), ann(11, 1, 7, [2, 22, 10, 6]),
          ann(12, 1, 12, [30, 2, 8, 8], rle_of(mask, compressed=False), iscrowd=1)]
  del anns[0]['area'], anns[0]['iscrowd']
  del anns[1]['id'], anns[1]['area']
  anns[2]['area'] = float('nan')
  path, image_dir = write_coco(tmp_path, [{'id': 1, 'height': h, 'width': w}], anns)
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco(path, image_dir)
  assert ds.stats == {'annotation_id_missing_assigned': 1, 'annotation_iscrowd_missing_set_0': 1,
                      'annotation_area_missing_computed': 3}
  assert "annotation_id_missing_assigned: 1 (e.g. ['annotations[1]'])" in caplog.text
  r = ds.records[0]
  assert r['ann_ids'].tolist() == [10, 13, 12]
  assert r['crowd'].tolist() == [False, False, True]
  # Areas as pycocotools computes them from the masks (the RLE hole is not counted).
  polygon = mask_utils.merge(mask_utils.frPyObjects([[2, 22, 12, 22, 12, 28, 2, 28]], h, w))
  want = [mask.sum(), mask_utils.area(polygon), mask.sum()]
  np.testing.assert_allclose(r['areas'], want)
  gt = ds.gt_dict()['annotations']
  assert [(a['id'], a['iscrowd'], a['area']) for a in gt] == [
      (10, 0, want[0]), (13, 0, want[1]), (12, 1, want[2])]
  with pytest.raises(KeyError):  # control: the raw file breaks pycocotools
    _quiet_coco(path)
  results = _perfect_results(ds)
  assert _ap(ds.gt_coco(), results, 'bbox') == pytest.approx(1.0)
  assert _ap(ds.gt_coco(), results, 'segm') == pytest.approx(1.0)


# ---------------------------------------------------------------------- (3) box-only datasets
def _box_only_coco(root):
  images = [{'id': i, 'height': 48, 'width': 64} for i in (1, 2, 3)]
  anns = [_box_ann(1, 1, 3, [4, 4, 20, 30]), _box_ann(2, 1, 7, [30, 10, 25, 20]),
          _box_ann(3, 2, 3, [10, 10, 40, 30]), _box_ann(4, 3, 7, [0, 0, 64, 48])]
  anns[2]['segmentation'] = []  # what box-only exporters often write
  anns[3]['segmentation'] = None
  return write_coco(root, images, anns)


def test_box_only_annotations_need_require_masks_false(tmp_path):
  path, image_dir = _box_only_coco(tmp_path)
  with pytest.raises(coco.CocoFormatError, match=r'instances\.json: 4 of 4 annotations have no '
                     r'segmentation .*mask_on=False'):
    coco.load_coco(path, image_dir)
  ds = coco.load_coco(path, image_dir, require_masks=False)
  assert ds.stats == {'annotation_box_only_kept': 4}
  r = ds.records[0]
  assert r['segmentations'] == [None, None] and r['has_mask'].tolist() == [False, False]
  np.testing.assert_allclose(r['areas'], [600, 500])
  masks = coco.decode_masks(r)
  assert masks.shape == (2, 48, 64) and not masks.any()
  assert all('segmentation' not in a for a in ds.gt_dict()['annotations'])
  assert _ap(ds.gt_coco(), _perfect_results(ds, with_masks=False), 'bbox') == pytest.approx(1.0)


def test_mixed_masks_and_boxes_decode_each_as_it_is(tmp_path):
  images = [{'id': 1, 'height': 20, 'width': 30}]
  anns = [ann(1, 1, 3, [2, 2, 8, 8]), _box_ann(2, 1, 3, [12, 4, 10, 10])]
  path, image_dir = write_coco(tmp_path, images, anns)
  r = coco.load_coco(path, image_dir, require_masks=False).records[0]
  assert r['has_mask'].tolist() == [True, False]
  masks = coco.decode_masks(r)
  assert masks[0].sum() == 64 and not masks[1].any()


def _tiny_coco_config(path, image_dir, mask_on):
  config = maskrcnn_r50_fpn.get_config('tiny')
  config.input.prefetch = 0
  config.model.mask_on = mask_on
  config.data.source = 'coco'
  config.data.train_json, config.data.train_images = path, image_dir
  return config


def test_box_only_dataset_trains_with_mask_on_false_and_fails_up_front_with_it_on(tmp_path):
  path, image_dir = _box_only_coco(tmp_path)
  config = _tiny_coco_config(path, image_dir, mask_on=False)
  ds = coco.load_coco(path, image_dir, require_masks=False)
  it = pipeline.make_train_iterator(config, dataset=ds)
  for _ in range(3):
    batch = next(it)
    assert batch['images'].shape == (2, 64, 96, 3)
    assert batch['gt_valid'].any() and not batch['gt_masks'].any()
    assert batch['gt_boxes'][batch['gt_valid']].min() >= 0
  assert it.get_state()['num_records'] == 3
  # load_dataset_records reads it the same way from the config ...
  assert next(pipeline.make_train_iterator(config))['gt_valid'].sum() >= 2
  # ... and refuses it, before any batch, when the model trains masks.
  with pytest.raises(coco.CocoFormatError, match='4 of 4 annotations have no segmentation.*'
                     '--config.model.mask_on=False'):
    pipeline.make_train_iterator(_tiny_coco_config(path, image_dir, mask_on=True))


# -------------------------------------------------------------------- (4) EXIF orientation
# np.rot90 turns of the displayed pixels that give the stored pixels, per EXIF Orientation.
STORED_TURNS = {3: 2, 6: 1, 8: -1}


def _exif_jpeg(path, display, orientation):
  """Saves `display` (uint8 [H, W, 3]) stored turned, with the EXIF orientation undoing it."""
  stored = Image.fromarray(np.ascontiguousarray(np.rot90(display, STORED_TURNS[orientation])))
  exif = stored.getexif()
  exif[coco.EXIF_ORIENTATION] = orientation
  stored.save(path, format='JPEG', quality=95, exif=exif)
  return stored.size  # (width, height) as stored


@pytest.mark.parametrize('orientation', sorted(STORED_TURNS))
def test_exif_orientation_is_applied_so_boxes_cover_their_object(tmp_path, orientation):
  h, w = 60, 40  # displayed: portrait
  display = np.zeros((h, w, 3), np.uint8)
  display[5:20, 22:36] = 255  # the object, in display coordinates
  (tmp_path / 'images').mkdir()
  _exif_jpeg(tmp_path / 'images' / 'phone.jpg', display, orientation)
  entry = {'id': 1, 'file_name': 'phone.jpg', 'height': h, 'width': w}
  data = {'images': [entry], 'annotations': [ann(1, 1, 3, [22, 5, 14, 15])],
          'categories': [{'id': 3, 'name': 'a'}]}
  (tmp_path / 'instances.json').write_text(json.dumps(data))
  ds = coco.load_coco(str(tmp_path / 'instances.json'), str(tmp_path / 'images'))
  record = ds.records[0]
  image = coco.record_image(record)
  assert image.shape == (h, w, 3)
  x1, y1, x2, y2 = record['boxes'][0].astype(int)
  inside = image[y1:y2, x1:x2]
  outside = image.copy()
  outside[y1:y2, x1:x2] = 0
  assert inside.mean() > 240 and outside.max() < 60
  # predict reads files through the same function.
  np.testing.assert_array_equal(coco.load_image(record['file_name']), image)


def test_exif_size_mismatch_names_the_file_and_the_orientation(tmp_path):
  display = np.zeros((60, 40, 3), np.uint8)
  path = tmp_path / 'phone.jpg'
  _exif_jpeg(path, display, 6)
  with pytest.raises(coco.ImageDecodeError, match=r'phone\.jpg: decoded size 60x40 differs from '
                     r"the annotation file's 40x60: its EXIF Orientation=6 .*stored 40x60"):
    coco.load_image(str(path), (40, 60))
  with pytest.raises(coco.ImageDecodeError, match='differs') as e:  # an unrelated wrong size
    coco.load_image(str(path), (50, 50))
  assert 'EXIF' not in str(e.value)


# ------------------------------------------------------------------------- (6) invalid RLEs
@pytest.mark.parametrize('seed', range(5))
def test_rle_string_decoder_agrees_with_pycocotools(seed):
  rng = np.random.default_rng(seed)
  mask = (rng.random((17, 23)) < rng.random()).astype(np.uint8)
  mask[rng.integers(17), :] = seed % 2  # long runs need several characters
  rle = mask_utils.encode(np.asfortranarray(mask))
  runs = coco._rle_string_counts(rle['counts'].decode('ascii'))
  assert runs == rle_of(mask, compressed=False)['counts']
  assert coco._rle_problem({'size': [17, 23], 'counts': rle['counts']}, 17, 23) is None


def test_invalid_rles_are_skipped_counted_and_named(tmp_path, caplog):
  h, w = 20, 30
  ok = np.zeros((h, w), np.uint8)
  ok[3:9, 4:12] = 1
  bigger = rle_of(np.ones((25, w), np.uint8))  # 750 runs for a 600-pixel image
  bad = {
      21: {'size': [h, w], 'counts': [100, 200, 400]},  # sums past h * w: would overflow
      22: {'size': [h, w], 'counts': [300, -50, 350]},  # negative run
      23: {'size': [h, w], 'counts': 'not an RLE at all!'},  # garbage string
      24: {'size': [h, w], 'counts': bigger['counts']},  # valid string, too many pixels
      25: {'size': ['x', w], 'counts': [h * w]},  # malformed size
      26: {'size': [h, w], 'counts': [299.5, 300.5]},  # non-integer runs
      27: {'size': [h, w], 'counts': 12},
  }
  anns = [ann(1, 1, 3, [4, 3, 8, 6], rle_of(ok)), ann(2, 1, 3, [4, 3, 8, 6],
                                                    rle_of(ok, compressed=False))]
  anns += [ann(k, 1, 3, [4, 3, 8, 6], segm) for k, segm in bad.items()]
  path, image_dir = write_coco(tmp_path, [{'id': 1, 'height': h, 'width': w}], anns)
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco(path, image_dir)
  assert ds.records[0]['ann_ids'].tolist() == [1, 2]
  assert ds.stats == {'rle_invalid_dropped': 7, 'annotation_empty_segmentation': 7}
  assert 'rle_invalid_dropped: 7 (e.g. [21, 22, 23, 24, 25])' in caplog.text
  masks = coco.decode_masks(ds.records[0])
  np.testing.assert_array_equal(masks[0], ok)
  np.testing.assert_array_equal(masks[1], ok)
  # The ground truth for evaluation leaves them out too, so COCOeval never decodes them.
  assert [a['id'] for a in ds.gt_dict()['annotations']] == [1, 2]
  assert _ap(ds.gt_coco(), _perfect_results(ds), 'segm') == pytest.approx(1.0)


# ----------------------------------------------------------- (7) corrupt images at run time
def _sized_coco(root, corrupt=(), shapes=((48, 64),) * 4 + ((64, 48),) * 2):
  """Images of the given (h, w) with one box each; ids in `corrupt` get a garbage file."""
  images = [{'id': i + 1, 'height': hw[0], 'width': hw[1]} for i, hw in enumerate(shapes)]
  anns = [ann(i + 1, i + 1, 3, [2, 2, 20, 20]) for i in range(len(shapes))]
  path, image_dir = write_coco(root, images, anns)
  for i in corrupt:
    with open(os.path.join(image_dir, f'{i}.png'), 'wb') as f:
      f.write(b'\x89PNG broken' * 8)
  return path, image_dir


def _loader(ds, max_bad_images):
  spec = pipeline._InputSpec.from_config(maskrcnn_r50_fpn.get_config('tiny'))
  return pipeline._TrainBatchLoader(ds.records, spec, 0, 2, max_bad_images=max_bad_images)


def test_corrupt_image_is_replaced_by_one_of_its_bucket_and_counted(tmp_path, caplog):
  ds = coco.load_coco(*_sized_coco(tmp_path, corrupt=(2,)))
  loader = _loader(ds, max_bad_images=1)
  planned = (0, np.array([1, 2]), np.array([64, 64]), np.array([False, False]))  # 2.png, 3.png
  with caplog.at_level(logging.WARNING):
    batch = loader(planned)
  assert batch['images'].shape == (2, 64, 96, 3)
  assert list(loader.bad_files) == [1] and '2.png' in loader.bad_files[1]
  assert '2.png' in caplog.text and '1 of at most 1' in caplog.text
  want = pipeline.process_train_example(ds.records[2], 64, False, loader.spec)
  np.testing.assert_array_equal(batch['images'][0], want['images'])  # 3.png took its place
  # A portrait image is never a replacement for a landscape one (other bucket).
  planned = (1, np.array([4, 5]), np.array([64, 64]), np.array([False, True]))
  assert loader(planned)['images'].shape == (2, 96, 64, 3)
  loader(planned)
  assert len(loader.bad_files) == 1  # known bad files are not decoded or counted again


def test_too_many_corrupt_images_raise_listing_them(tmp_path):
  ds = coco.load_coco(*_sized_coco(tmp_path, corrupt=(1, 3)))
  loader = _loader(ds, max_bad_images=1)
  planned = (0, np.array([0, 2]), np.array([64, 64]), np.array([False, False]))
  with pytest.raises(coco.ImageDecodeError, match=r'(?s)2 training images cannot be used, more '
                     r'than config.data.max_bad_images = 1.*1\.png.*3\.png'):
    loader(planned)
  # A bucket whose every image is bad cannot be filled.
  ds = coco.load_coco(*_sized_coco(tmp_path / 'b', corrupt=(5, 6)))
  loader = _loader(ds, max_bad_images=5)
  with pytest.raises(coco.ImageDecodeError, match=r'5\.png: cannot be used and no other training '
                     r'image of its size bucket \(96, 64\)'):
    loader((1, np.array([4, 5]), np.array([64, 64]), np.array([False, False])))


def test_train_iterator_skips_corrupt_images_within_the_budget(tmp_path):
  path, image_dir = _sized_coco(tmp_path, corrupt=(2,))
  config = _tiny_coco_config(path, image_dir, mask_on=True)
  assert config.data.max_bad_images == 10 and not config.data.verify_images
  it = pipeline.make_train_iterator(config)
  for k in range(9):  # three epochs: every image is drawn
    batch = next(it)
    assert batch['images'].shape[1:3] == config.input.buckets[it.plan[k][0]]
  assert list(it._loader.bad_files) == [1]
  config.data.max_bad_images = 0
  it = pipeline.make_train_iterator(config)
  with pytest.raises(coco.ImageDecodeError, match=r'(?s)max_bad_images = 0.*2\.png'):
    for _ in range(9):
      next(it)


def test_verify_images_fails_before_training_listing_the_bad_files(tmp_path):
  path, image_dir = _sized_coco(tmp_path, corrupt=(2, 5))
  config = _tiny_coco_config(path, image_dir, mask_on=True)
  config.data.verify_images = True
  with pytest.raises(coco.ImageDecodeError, match=r'(?s)verify_images: 2 of 6 training images '
                     r'cannot be used.*2\.png.*5\.png'):
    pipeline.make_train_iterator(config)
