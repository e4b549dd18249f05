"""Tests of data/coco.py: every segmentation kind, label maps, and each kind of bad input."""
import json
import logging
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn_jax.data import coco
from tests.data.coco_testdata import ann, rle_of, write_coco


def _load(path, image_dir, **kw):
  return coco.load_coco(path, image_dir, **kw)


def test_reads_polygons_rles_and_crowd(mixed_coco):
  path, image_dir = mixed_coco
  ds = _load(path, image_dir)
  ref = COCO(path)
  assert [r['image_id'] for r in ds.records] == [1, 2, 5, 9]  # the empty image is kept
  assert ds.label_map.category_ids == (3, 7, 12) and ds.label_map.num_classes == 4
  by_id = {r['image_id']: r for r in ds.records}
  np.testing.assert_array_equal(by_id[1]['labels'], [1, 2])
  np.testing.assert_allclose(by_id[1]['boxes'], [[2.5, 3, 12.5, 15], [10, 5, 30, 20]])
  np.testing.assert_array_equal(by_id[2]['crowd'], [False, True])
  assert by_id[9]['boxes'].shape == (0, 4) and coco.decode_masks(by_id[9]).shape == (0, 20, 20)
  for r in ds.records:
    masks = coco.decode_masks(r)
    assert masks.dtype == np.uint8 and masks.shape == (len(r['labels']), r['height'], r['width'])
    for k, ann_id in enumerate(r['ann_ids']):
      np.testing.assert_array_equal(masks[k], ref.annToMask(ref.anns[int(ann_id)]))
  assert coco.decode_masks(by_id[1])[1, 8:12, 15:18].sum() == 0  # the RLE hole survives
  assert ds.stats == {}


def test_label_map_roundtrip_and_meta(tmp_path, mixed_coco):
  ds = _load(*mixed_coco)
  coco.save_label_map(str(tmp_path / 'labels.json'), ds.label_map)
  back = coco.load_label_map(str(tmp_path / 'labels.json'))
  assert back == ds.label_map
  assert back.meta() == {'label_to_category_id': {1: 3, 2: 7, 3: 12}, 'class_names': ['a', 'b',
                                                                                     'c']}
  # Another split read in this label space: unknown categories are skipped and counted.
  other = coco.LabelMap((7,), ('b',))
  ds2 = _load(*mixed_coco, label_map=other)
  assert sum(len(r['labels']) for r in ds2.records) == 2
  assert ds2.stats['annotation_unknown_category'] == 4


def test_missing_image_file_is_skipped_and_named(tmp_path, caplog):
  images = [{'id': 1, 'height': 10, 'width': 10}, {'id': 2, 'height': 10, 'width': 10,
                                                   'skip_file': True}]
  path, image_dir = write_coco(tmp_path, images, [ann(1, 2, 3, [1, 1, 5, 5])])
  with caplog.at_level(logging.WARNING):
    ds = _load(path, image_dir)
  assert [r['image_id'] for r in ds.records] == [1]
  assert ds.stats['image_file_missing'] == 1
  assert '2.png' in caplog.text
  with pytest.raises(coco.ImageDecodeError, match='2.png'):
    coco.load_image(f'{image_dir}/2.png')


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG'])
def test_truncated_and_corrupt_images_raise_naming_the_file(tmp_path, fmt):
  rng = np.random.default_rng(0)
  good = tmp_path / f'good.{fmt.lower()}'
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good, format=fmt)
  data = good.read_bytes()
  truncated = tmp_path / f'truncated.{fmt.lower()}'
  truncated.write_bytes(data[:len(data) // 2])
  garbage = tmp_path / f'garbage.{fmt.lower()}'
  garbage.write_bytes(b'not an image at all' * 10)
  assert coco.load_image(str(good), (40, 50)).shape == (40, 50, 3)
  for bad in (truncated, garbage):
    with pytest.raises(coco.ImageDecodeError, match=bad.name):
      coco.load_image(str(bad))
  with pytest.raises(coco.ImageDecodeError, match='differs'):
    coco.load_image(str(good), (50, 40))
  assert coco.verify_images([{'file_name': str(truncated), 'height': 40, 'width': 50},
                             {'file_name': str(good), 'height': 40, 'width': 50}]) != []


@pytest.mark.parametrize('content,match', [
    ('{"images": [', 'not valid JSON'),
    ('[1, 2, 3]', 'top level is list'),
    ('{"images": [], "categories": []}', 'missing list "annotations"'),
    ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}',
     r'images\[0\] needs'),
    ('{"images": [], "annotations": [], "categories": [{"name": "x"}]}', r'categories\[0\]'),
])
def test_not_coco_instances_json_raises_naming_the_file(tmp_path, content, match):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  with pytest.raises(coco.CocoFormatError, match=match) as e:
    _load(str(path), str(tmp_path))
  assert 'bad.json' in str(e.value)
  with pytest.raises(coco.CocoFormatError, match='not found'):
    _load(str(tmp_path / 'absent.json'), str(tmp_path))


def test_unknown_image_or_category_is_skipped_and_counted(tmp_path, caplog):
  images = [{'id': 1, 'height': 20, 'width': 20}]
  anns = [ann(1, 1, 3, [1, 1, 5, 5]), ann(2, 99, 3, [1, 1, 5, 5]), ann(3, 1, 42, [1, 1, 5, 5])]
  path, image_dir = write_coco(tmp_path, images, anns)
  with caplog.at_level(logging.WARNING):
    ds = _load(path, image_dir)
  assert ds.records[0]['ann_ids'].tolist() == [1]
  assert ds.stats['annotation_unknown_image'] == 1
  assert ds.stats['annotation_unknown_category'] == 1
  assert 'annotation_unknown_image: 1 (e.g. [2])' in caplog.text
  assert 'annotation_unknown_category: 1 (e.g. [3])' in caplog.text


def test_bad_polygons_nan_negative_and_degenerate_boxes(tmp_path):
  images = [{'id': 1, 'height': 20, 'width': 30}]
  nan = float('nan')
  anns = [
      ann(1, 1, 3, [1, 1, 8, 8], [[1, 1, 9, 1]]),  # 2 points only: dropped
      ann(2, 1, 3, [1, 1, 8, 8], [[1, 1, 9, 1], [1, 1, 9, 1, 9, 9]]),  # short part dropped
      ann(3, 1, 3, [nan, 1, 8, 8]),  # NaN box
      ann(4, 1, 3, [1, 1, 8, 8], [[1, nan, 9, 1, 9, 9]]),  # NaN polygon: no part left
      ann(5, 1, 3, [-5, -3, 20, 10], [[-5, -3, 15, -3, 15, 7]]),  # clipped to the image
      ann(6, 1, 3, [4, 4, 0, 6]),  # zero width
      ann(7, 1, 3, [4, 4, 6, 0.5]),  # under a pixel tall
      ann(9, 1, 3, [4, 4, 6, 6], rle_of(np.ones((5, 5), np.uint8))),  # RLE of another size
      ann(10, 1, 3, [4, 4, 6, 6], [[1, 1, 'x', 1, 9, 9]]),
      ann(11, 1, 3, [25, 15, 10, 10]),  # runs off the image: clipped, 5x5 left
  ]
  path, image_dir = write_coco(tmp_path, images, anns)
  ds = _load(path, image_dir)
  r = ds.records[0]
  assert r['ann_ids'].tolist() == [2, 5, 11]
  np.testing.assert_allclose(r['boxes'], [[1, 1, 9, 9], [0, 0, 15, 7], [25, 15, 30, 20]])
  assert r['segmentations'][0] == [[1, 1, 9, 1, 9, 9]]
  masks = coco.decode_masks(r)
  assert masks[1].sum() > 0 and np.isfinite(r['boxes']).all()
  assert ds.stats == {
      'polygon_part_too_short_dropped': 2, 'polygon_part_nonfinite_dropped': 2,
      'annotation_empty_segmentation': 4, 'annotation_bad_bbox': 1,
      'annotation_degenerate_box': 2, 'box_clipped_to_image': 2, 'rle_size_mismatch_dropped': 1}


def test_more_instances_than_max_keeps_the_largest(tmp_path, caplog):
  images = [{'id': 1, 'height': 40, 'width': 40}, {'id': 2, 'height': 40, 'width': 40}]
  sizes = [3, 9, 5, 12, 7]
  anns = [ann(k + 1, 1, 3, [0, 0, s, s]) for k, s in enumerate(sizes)]
  anns.append(ann(6, 1, 3, [0, 0, 30, 30], iscrowd=1))  # biggest, but crowd goes last
  anns.append(ann(7, 2, 3, [0, 0, 4, 4]))
  path, image_dir = write_coco(tmp_path, images, anns)
  with caplog.at_level(logging.WARNING):
    ds = _load(path, image_dir, max_instances=3)
  assert ds.records[0]['ann_ids'].tolist() == [2, 4, 5]  # sides 9, 12, 7; order kept
  assert ds.records[1]['ann_ids'].tolist() == [7]
  assert ds.stats['image_instances_capped'] == 1
  assert 'image_instances_capped: 1' in caplog.text


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16', 'LA', 'CMYK'])
def test_grayscale_rgba_palette_and_16bit_become_rgb_uint8(tmp_path, mode):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
  if mode == 'L':
    im, want = Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)
  elif mode == 'LA':
    im = Image.fromarray(np.stack([gray, gray // 2], -1), mode='LA')
    want = np.repeat(gray[..., None], 3, -1)
  elif mode == 'RGBA':
    im = Image.fromarray(np.concatenate([rgb, gray[..., None]], -1), mode='RGBA')
    want = rgb
  elif mode == 'P':
    im = Image.fromarray(rgb).quantize(8)
    want = np.asarray(im.convert('RGB'))
  elif mode == 'I;16':
    im = Image.fromarray(gray.astype(np.uint16) * 257)  # full 16-bit range
    want = np.repeat(gray[..., None], 3, -1)
  else:
    im = Image.fromarray(rgb).convert('CMYK')
    want = np.asarray(im.convert('RGB'))
  fmt = 'JPEG' if mode == 'CMYK' else 'PNG'
  path = tmp_path / f'img.{fmt.lower()}'
  im.save(path, format=fmt)
  if mode == 'I;16':
    assert Image.open(path).mode.startswith('I')
  if mode == 'CMYK':
    want = coco.to_rgb_uint8(Image.open(path))  # lossy JPEG: just the conversion path
  out = coco.load_image(str(path), (6, 7))
  assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
  np.testing.assert_array_equal(out, want)


def test_json_numbers_roundtrip_float_areas(tmp_path):
  # 'area' may be missing or non-finite: the box area stands in.
  images = [{'id': 1, 'height': 20, 'width': 20}]
  a = ann(1, 1, 3, [1, 1, 4, 5])
  del a['area']
  path, image_dir = write_coco(tmp_path, images, [a])
  r = _load(path, image_dir).records[0]
  assert r['areas'].tolist() == [20.0] and not math.isnan(r['areas'][0])
  assert json.loads(open(path).read())['annotations'][0]['id'] == 1
