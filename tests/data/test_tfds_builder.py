"""The coco_instances TFDS builder: build tiny COCO folders as ArrayRecord, read them back.

tensorflow-datasets and array-record are in the test extra (no TensorFlow needed); the module
is skipped only where they are not installed.
"""

import json

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from maskrcnn_jax.data import coco, shapes, tfds_builder  # noqa: E402

# Non-contiguous ids: labels 1, 2 are categories 4, 9.
CATEGORIES = [{'id': 9, 'name': 'triangle'}, {'id': 4, 'name': 'square'}]


def _disc_rle(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
  rle = mask_utils.encode(np.asfortranarray(mask))
  return {'size': [h, w], 'counts': rle['counts'].decode('ascii')}


def _uncompressed_rle(mask):
  flat = mask.flatten(order='F')
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts
  return {'size': list(mask.shape), 'counts': counts}


def _write_split(root, split, images):
  """images: list of (image_id, h, w, grey, [(category_id, segmentation, iscrowd)]).

  The layout of data/shapes.py: root/instances_{split}.json, file names 'split/NNNNNN.png'.
  """
  (root / split).mkdir(parents=True)
  rng = np.random.default_rng(len(images))
  gt = {'images': [], 'annotations': [], 'categories': CATEGORIES}
  ann_id = 100 * len(split)
  for image_id, h, w, grey, anns in images:
    name = f'{split}/{image_id:06d}.png'
    pixels = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / name)
    gt['images'].append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
    for category_id, segmentation, iscrowd in anns:
      ann_id += 1
      if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
      elif isinstance(segmentation['counts'], list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
      else:
        rle = dict(segmentation, counts=segmentation['counts'].encode())
      gt['annotations'].append({
          'id': ann_id, 'image_id': image_id, 'category_id': category_id,
          'segmentation': segmentation, 'iscrowd': iscrowd,
          'area': float(mask_utils.area(rle)),
          'bbox': [float(v) for v in mask_utils.toBbox(rle)]})
  (root / f'instances_{split}.json').write_text(json.dumps(gt))
  return gt


@pytest.fixture(scope='module')
def shapes_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('shapes')
  crowd = np.zeros((40, 48), np.uint8)
  crowd[30:40, 0:20] = 1
  train = _write_split(root, 'train', [
      (1, 40, 48, False, [(4, [[5, 5, 25, 5, 25, 20, 5, 20]], 0),
                          (9, [[30, 5, 45, 5, 37.5, 25]], 0),
                          (4, _uncompressed_rle(crowd), 1)]),
      (2, 32, 32, True, [(9, _disc_rle(32, 32, 16, 16, 9), 0)]),  # grey PNG
      (3, 24, 36, False, []),  # no instances
  ])
  val = _write_split(root, 'val', [
      (7, 30, 40, False, [(4, [[0, 0, 12, 0, 12, 12, 0, 12], [20, 20, 30, 20, 30, 28]], 0)]),
  ])
  return root, {'train': train, 'validation': val}


@pytest.fixture(scope='module')
def built(shapes_folder, tmp_path_factory):
  root, gt = shapes_folder
  data_dir = tmp_path_factory.mktemp('tfds')
  _build(root, data_dir)
  return str(data_dir), gt


def test_files_are_array_record(built):
  data_dir, _ = built
  builder = tfds.builder('coco_instances/shapes', data_dir=data_dir)
  assert builder.info.file_format.value == 'array_record'
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['validation'].num_examples == 1
  assert builder.info.metadata['categories'] == [
      {'id': 4, 'name': 'square', 'label': 1}, {'id': 9, 'name': 'triangle', 'label': 2}]


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_data_source_matches_json(built, shapes_folder, split):
  data_dir, gt = built
  root, _ = shapes_folder
  gt = gt[split]
  source = tfds.data_source('coco_instances/shapes', split=split, data_dir=data_dir,
                            download=False)
  assert len(source) == len(gt['images'])
  seen = set()
  for i in range(len(source)):
    example = source[i]
    image_id = int(example['image/id'])
    seen.add(image_id)
    info = next(im for im in gt['images'] if im['id'] == image_id)
    anns = [a for a in gt['annotations'] if a['image_id'] == image_id]
    h, w = info['height'], info['width']
    assert example['image'].shape == (h, w, 3) and example['image'].dtype == np.uint8
    on_disk = np.asarray(Image.open(root / info['file_name']).convert('RGB'))
    np.testing.assert_array_equal(example['image'], on_disk)
    objects = example['objects']
    assert len(objects['id']) == len(anns)
    by_id = {int(a): k for k, a in enumerate(objects['id'])}
    for ann in anns:
      k = by_id[ann['id']]
      np.testing.assert_array_equal(objects['bbox'][k], ann['bbox'])  # the file's xywh, as is
      assert objects['category_id'][k] == ann['category_id']
      assert objects['label'][k] == {4: 1, 9: 2}[ann['category_id']]
      assert bool(objects['is_crowd'][k]) == bool(ann['iscrowd'])
      assert objects['area'][k] == ann['area']
      assert objects['has_mask'][k]
      expected = tfds_builder.segmentation_to_rle(ann['segmentation'], h, w)
      stored = {'size': [h, w], 'counts': objects['mask'][k]}
      np.testing.assert_array_equal(mask_utils.decode(stored), mask_utils.decode(expected))
      assert mask_utils.decode(stored).sum() == ann['area'] > 0
  assert seen == {im['id'] for im in gt['images']}


def _build(manual_dir, data_dir, config='shapes'):
  builder = tfds_builder.CocoInstances(config=config, data_dir=str(data_dir),
                                       file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def test_load_tfds(built):
  data_dir, _ = built
  dataset = tfds_builder.load_tfds('coco_instances/shapes', 'train', data_dir)
  records = dataset.records
  assert [r['image_id'] for r in records] == [1, 2, 3]  # image-id order, as load_coco's
  assert dataset.label_map.category_ids == (4, 9)
  assert dataset.label_map.names == ('square', 'triangle')
  by_id = {r['image_id']: r for r in records}
  first = by_id[1]
  assert first['file_name'] == 'train/000001.png'
  assert 'image' not in first  # read lazily
  image = coco.record_image(first)
  assert image.shape == (40, 48, 3) and image.dtype == np.uint8
  assert first['boxes'].shape == (3, 4) and first['boxes'].dtype == np.float32
  order = np.argsort(first['ann_ids'])
  np.testing.assert_array_equal(first['labels'][order], [1, 2, 1])
  np.testing.assert_array_equal(first['crowd'][order], [False, False, True])
  np.testing.assert_allclose(first['boxes'][order[0]], [5, 5, 25, 20])
  masks = coco.decode_masks(first)  # the DATA engineer's decoder reads these records as is
  assert masks.shape == (3, 40, 48)
  assert masks[order[2], 30:40, 0:20].all() and masks[order[2]].sum() == 200
  grey = coco.record_image(by_id[2])
  assert grey.shape == (32, 32, 3)
  assert (grey[..., 0] == grey[..., 2]).all()
  empty = by_id[3]
  assert empty['boxes'].shape == (0, 4) and empty['labels'].shape == (0,)
  assert coco.decode_masks(empty).shape == (0, 24, 36)
  capped = tfds_builder.load_tfds('coco_instances/shapes', 'train', data_dir,
                                  max_instances=1).records
  only = capped[0]
  np.testing.assert_array_equal(only['ann_ids'], first['ann_ids'][order[:1]])  # non-crowd, largest
  other_space = coco.LabelMap(category_ids=(9,), names=('triangle',))
  relabelled = tfds_builder.load_tfds('coco_instances/shapes', 'train', data_dir,
                                      label_map=other_space).records
  first = relabelled[0]
  np.testing.assert_array_equal(first['labels'], [1])  # squares are outside this label space
  assert len(first['ann_ids']) == 1


def test_real_shapes_dataset_matches_coco_reader(tmp_path):
  root = tmp_path / 'shapes'
  shapes.write_shapes_dataset(str(root), num_train=3, num_val=2, size=48, seed=3)
  data_dir = tmp_path / 'tfds'
  _build(root, data_dir)
  for split, json_name in (('train', 'instances_train.json'), ('validation', 'instances_val.json')):
    expected = coco.load_coco(str(root / json_name), str(root)).records
    got = tfds_builder.load_tfds('coco_instances/shapes', split, str(data_dir)).records
    assert [r['image_id'] for r in got] == [r['image_id'] for r in expected]
    for want, have in zip(expected, got):
      assert len(want['labels']) > 0
      for key in ('boxes', 'labels', 'crowd', 'areas', 'ann_ids', 'has_mask'):
        np.testing.assert_array_equal(have[key], want[key], err_msg=key)
      np.testing.assert_array_equal(coco.decode_masks(have), coco.decode_masks(want))
      np.testing.assert_array_equal(coco.record_image(have), coco.load_image(want['file_name']))


def test_coco2017_layout_with_keypoints_and_only_val(tmp_path):
  root = tmp_path / 'coco'
  (root / 'annotations').mkdir(parents=True)
  (root / 'val2017').mkdir()
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
      root / 'val2017' / '000000000139.jpg', quality=90)
  categories = [{'id': 1, 'name': 'person'}, {'id': 18, 'name': 'dog'}]
  person = {'id': 501, 'image_id': 139, 'category_id': 1, 'iscrowd': 0, 'area': 120.0,
            'bbox': [2, 3, 10, 12], 'segmentation': [[2, 3, 12, 3, 12, 15, 2, 15]]}
  dog = {'id': 502, 'image_id': 139, 'category_id': 18, 'iscrowd': 0, 'area': 100.0,
         'bbox': [20, 10, 10, 10], 'segmentation': [[20, 10, 30, 10, 30, 20, 20, 20]]}
  images = [{'id': 139, 'file_name': '000000000139.jpg', 'height': 30, 'width': 40}]
  (root / 'annotations' / 'instances_val2017.json').write_text(json.dumps(
      {'images': images, 'annotations': [person, dog], 'categories': categories}))
  keypoints = np.arange(51, dtype=np.float32).reshape(17, 3)
  keypoints[:, 2] = 2
  names = [f'part_{k}' for k in range(17)]
  (root / 'annotations' / 'person_keypoints_val2017.json').write_text(json.dumps(
      {'images': images, 'categories': [dict(categories[0], keypoints=names, skeleton=[[1, 2]])],
       'annotations': [
          dict(person, keypoints=keypoints.reshape(-1).tolist(), num_keypoints=17)]}))
  builder = _build(root, tmp_path / 'tfds', config='coco2017')
  assert set(builder.info.splits) == {'validation'}  # train2017 files absent: skipped
  dataset = tfds_builder.load_tfds('coco_instances/coco2017', 'validation',
                                   str(tmp_path / 'tfds'), with_keypoints=True)
  (record,) = dataset.records
  assert dataset.label_map.category_ids == (1, 18)
  assert dataset.label_map.keypoint_names == (tuple(names), ())
  assert dataset.label_map.keypoint_skeleton == (((0, 1),), ())
  order = np.argsort(record['ann_ids'])
  np.testing.assert_array_equal(record['labels'][order], [1, 2])
  np.testing.assert_array_equal(record['keypoints'][order[0]], keypoints)
  np.testing.assert_array_equal(record['keypoints'][order[1]], np.zeros((17, 3)))
  want = coco.load_coco(str(root / 'annotations' / 'person_keypoints_val2017.json'),
                        str(root / 'val2017'), with_keypoints=True, keypoint_offset=0.5)
  (shifted,) = tfds_builder.load_tfds('coco_instances/coco2017', 'validation',
                                      str(tmp_path / 'tfds'), with_keypoints=True,
                                      keypoint_offset=0.5).records
  np.testing.assert_array_equal(shifted['keypoints'][order[0]], want.records[0]['keypoints'][0])
  assert shifted['keypoints'][order[0], 0, 0] == keypoints[0, 0] + 0.5
  np.testing.assert_array_equal(record['boxes'][order], [[2, 3, 12, 15], [20, 10, 30, 20]])
  jpeg = np.asarray(Image.open(root / 'val2017' / '000000000139.jpg'))
  np.testing.assert_array_equal(coco.record_image(record), jpeg)  # JPEG bytes stored as is
  gt = dataset.gt_dict()
  by_id = {a['id']: a for a in gt['annotations']}
  assert by_id[501]['keypoints'] == keypoints.reshape(-1).tolist()
  assert by_id[501]['num_keypoints'] == 17 and 'keypoints' not in by_id[502]
  assert gt['categories'][0]['keypoints'] == names


def test_missing_manual_files_raise(tmp_path):
  (tmp_path / 'nothing').mkdir()
  (tmp_path / 'nothing' / 'README').write_text('not a COCO folder')
  with pytest.raises(FileNotFoundError, match='none of the splits'):
    _build(tmp_path / 'nothing', tmp_path / 'tfds', config='coco2017')


def test_build_command(shapes_folder, tmp_path, capsys):
  from maskrcnn_jax.data import build_tfds  # pylint: disable=g-import-not-at-top
  root, _ = shapes_folder
  build_tfds.main(['--config=shapes', f'--manual_dir={root}', f'--data_dir={tmp_path}'])
  lines = capsys.readouterr().out.splitlines()
  assert lines[-2].startswith('coco_instances/shapes/2.0.0 train: 3 images in ')
  assert lines[-1].startswith('coco_instances/shapes/2.0.0 validation: 1 images in ')
  assert len(tfds_builder.load_tfds('coco_instances/shapes', 'train', str(tmp_path)).records) == 3
