"""detectron2's keypoint coordinate convention (`data.keypoint_offset`): +0.5 on the labelled
keypoints when a COCO file is read, -0.5 on the predictions written as COCO results, so that a
model's perfect predictions score exactly what they score without the offset."""

import numpy as np
import pytest

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.evaluation import coco_eval
from tests.data.coco_testdata import ann, write_coco

CATEGORIES = [{'id': 3, 'name': 'tri', 'keypoints': ['apex', 'left_base', 'right_base']}]
SIGMAS = {3: (0.01, 0.01, 0.01)}  # narrow: half a pixel costs OKS on these boxes
IMAGES = [{'id': 1, 'height': 60, 'width': 80}, {'id': 2, 'height': 50, 'width': 70}]


def _annotations():
  return [
      {**ann(1, 1, 3, [10, 5, 40, 30]), 'keypoints': [12, 8, 2, 35, 20, 1, 0, 0, 0]},
      {**ann(2, 1, 3, [45, 20, 30, 35]), 'keypoints': [50, 22, 2, 60, 50, 2, 70, 40, 2]},
      {**ann(3, 2, 3, [3, 3, 50, 40]), 'keypoints': [20, 4, 2, 5, 40, 2, 51, 41, 1]},
  ]


def _load(tmp_path, offset):
  json_path, image_dir = write_coco(tmp_path, IMAGES, _annotations(), CATEGORIES)
  return coco.load_coco(json_path, image_dir, with_keypoints=True, keypoint_offset=offset)


def test_offset_is_added_to_labelled_keypoints_only(tmp_path):
  plain = _load(tmp_path / 'a', 0.0)
  shifted = _load(tmp_path / 'b', 0.5)
  assert any((r['keypoints'][..., 2] == 0).any() for r in plain.records)
  for p, s in zip(plain.records, shifted.records):
    labelled = p['keypoints'][..., 2] > 0
    np.testing.assert_array_equal(s['keypoints'][labelled][:, :2],
                                  p['keypoints'][labelled][:, :2] + 0.5)
    np.testing.assert_array_equal(s['keypoints'][~labelled], 0.0)  # v = 0 stays all zeros
    np.testing.assert_array_equal(s['keypoints'][..., 2], p['keypoints'][..., 2])
  np.testing.assert_array_equal(plain.records[0]['keypoints'][0], [[12, 8, 2], [35, 20, 1],
                                                                   [0, 0, 0]])
  # The ground truth the evaluator scores is the file's, unshifted.
  assert shifted.gt_dict()['annotations'][0]['keypoints'] == [12, 8, 2, 35, 20, 1, 0, 0, 0]


def test_pipeline_reads_the_offset_from_the_config(tmp_path):
  json_path, image_dir = write_coco(tmp_path, IMAGES, _annotations(), CATEGORIES)
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.mask_on = False
  c.model.keypoint_on = True
  c.model.num_classes = 2
  c.model.keypoint_head.num_keypoints = (0, 3)
  c.data.source = 'coco'
  c.data.train_json, c.data.train_images = json_path, image_dir
  c.data.keypoint_offset = 0.5
  records = pipeline.load_dataset_records(c, 'train').records
  assert records[0]['keypoints'][0, 0].tolist() == [12.5, 8.5, 2.0]


def _perfect_results(dataset, offset):
  """COCO results of a perfect model trained on `dataset`'s records: each ground-truth box with
  the record's keypoints (the training targets, offset included) as its prediction."""
  results = []
  for r in dataset.records:
    n = len(r['labels'])
    prediction = {'boxes': r['boxes'], 'scores': np.linspace(0.9, 0.5, n, dtype=np.float32),
                  'labels': r['labels'], 'keypoints': r['keypoints'],
                  'keypoint_valid': np.ones(r['keypoints'].shape[:2], bool)}
    results += coco_eval.detections_to_coco_results(
        r['image_id'], prediction, dataset.label_map.label_to_category_id(),
        keypoint_offset=offset)
  return results


def _keypoint_ap(dataset, results):
  metrics = coco_eval.coco_evaluate(dataset.gt_dict(), results, iou_types=('keypoints',),
                                    keypoint_oks_sigmas=SIGMAS)
  return metrics['keypoints/AP'], metrics['keypoints/AP75']


def test_eval_round_trip_scores_as_without_the_offset(tmp_path):
  plain = _load(tmp_path / 'a', 0.0)
  shifted = _load(tmp_path / 'b', 0.5)
  reference = _keypoint_ap(plain, _perfect_results(plain, 0.0))
  assert reference == (1.0, 1.0)
  assert _keypoint_ap(shifted, _perfect_results(shifted, 0.5)) == reference
  # Forgetting to subtract it moves every keypoint half a pixel: OKS drops on these boxes.
  assert _keypoint_ap(shifted, _perfect_results(shifted, 0.0))[0] < 1.0


def test_results_subtract_the_offset_from_x_and_y():
  prediction = {'boxes': np.array([[0, 0, 10, 10]], np.float32),
                'scores': np.array([0.9], np.float32), 'labels': np.array([1], np.int32),
                'keypoints': np.array([[[3.5, 4.5, 1.0], [0.5, 9.5, 1.0]]], np.float32)}
  out = coco_eval.detections_to_coco_results(7, prediction, {1: 3}, keypoint_offset=0.5)
  assert out[0]['keypoints'] == [3.0, 4.0, 1, 0.0, 9.0, 1]


@pytest.mark.parametrize('field,value', [('data.keypoint_offset', 1.0),
                                         ('data.keypoint_offset', -0.5),
                                         ('model.test.keypoint_score', 'softmax')])
def test_bad_values_are_refused_naming_the_field(field, value):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.keypoint_on = True
  c.model.keypoint_head.num_keypoints = (0, 3, 0, 0, 0)
  group, key = field.rsplit('.', 1)
  node = c
  for part in group.split('.'):
    node = node[part]
  node[key] = value
  with pytest.raises(structures.ConfigError, match=field.replace('.', r'\.')):
    structures.validate_config(c)


def test_tfds_source_with_an_offset_is_refused_naming_the_field():
  """TFDS records are built without load_coco: the offset would reach only the evaluation."""
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.keypoint_on = True
  c.data.source = 'tfds'
  c.data.keypoint_offset = 0.5
  with pytest.raises(structures.ConfigError, match=r'data\.keypoint_offset'):
    structures.validate_data(c, ('train',))
