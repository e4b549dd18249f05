"""COCO metrics: exact ground truth, hand-computed and pycocotools-computed perturbations."""

import copy
import json
import logging
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.evaluation import coco_eval

ALL_METRICS = [f'{t}/{n}' for t in ('bbox', 'segm') for n in coco_eval.METRIC_NAMES]
NUM_RECALL_POINTS = 101  # COCOeval interpolates precision at recall 0, 0.01, ..., 1


def _results(tiny_coco, predictions=None):
  predictions = tiny_coco.predictions if predictions is None else predictions
  out = []
  for image_id, prediction in predictions.items():
    out += coco_eval.detections_to_coco_results(image_id, prediction,
                                                tiny_coco.label_to_category_id)
  return out


def _select(prediction, keep):
  return {k: np.asarray(v)[keep] for k, v in prediction.items()}


def test_results_format(tiny_coco):
  prediction = tiny_coco.predictions[12]
  results = coco_eval.detections_to_coco_results(12, prediction, tiny_coco.label_to_category_id)
  assert len(results) == 2  # the crowd region is not an instance to detect
  first = results[0]
  assert set(first) == {'image_id', 'category_id', 'bbox', 'score', 'segmentation'}
  assert first['image_id'] == 12 and first['category_id'] == 7
  x1, y1, x2, y2 = prediction['boxes'][0]
  np.testing.assert_allclose(first['bbox'], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
  assert isinstance(first['segmentation']['counts'], str)
  assert first['segmentation']['size'] == [80, 90]
  json.dumps(results)  # JSON-serialisable as is


def test_results_without_masks_have_no_segmentation(tiny_coco):
  prediction = {k: v for k, v in tiny_coco.predictions[11].items() if k != 'masks'}
  results = coco_eval.detections_to_coco_results(11, prediction, tiny_coco.label_to_category_id)
  assert len(results) == 2 and all('segmentation' not in r for r in results)


def test_unknown_label_raises(tiny_coco):
  prediction = dict(tiny_coco.predictions[11], labels=np.array([1, 5], np.int32))
  with pytest.raises(KeyError, match='label 5'):
    coco_eval.detections_to_coco_results(11, prediction, tiny_coco.label_to_category_id)


def test_rle_round_trip():
  rng = np.random.default_rng(1)
  masks = rng.random((4, 23, 31)) > 0.6
  masks[2] = False  # an empty mask
  rles = coco_eval.encode_masks(masks)
  assert len(rles) == 4 and all(isinstance(r['counts'], str) for r in rles)
  decoded = coco_eval.decode_masks(json.loads(json.dumps(rles)), 23, 31)
  assert decoded.dtype == bool
  np.testing.assert_array_equal(decoded, masks)
  assert coco_eval.encode_masks(np.zeros((0, 5, 6), bool)) == []
  assert coco_eval.decode_masks([], 5, 6).shape == (0, 5, 6)


def test_ground_truth_scores_one(tiny_coco):
  metrics = coco_eval.coco_evaluate(tiny_coco.path, _results(tiny_coco))
  assert set(metrics) == set(ALL_METRICS)
  for t in ('bbox', 'segm'):
    for name in coco_eval.METRIC_NAMES:  # AR1 too: maxDets counts per image and class
      assert metrics[f'{t}/{name}'] == pytest.approx(1.0), name


def test_dropping_one_instance_per_class(tiny_coco):
  # Each class has 3 instances; dropping one caps recall at 2/3, with precision 1 below it,
  # so 67 of the 101 recall points (0.00..0.66) score 1.
  predictions = dict(tiny_coco.predictions)
  predictions[11] = _select(predictions[11], [1])  # drops the large square (class 1)
  predictions[13] = _select(predictions[13], [0])  # drops the disc (class 2)
  metrics = coco_eval.coco_evaluate(tiny_coco.path, _results(tiny_coco, predictions))
  for t in ('bbox', 'segm'):
    assert metrics[f'{t}/AP'] == pytest.approx(67 / NUM_RECALL_POINTS)
    assert metrics[f'{t}/AR100'] == pytest.approx(2 / 3)


def test_confident_false_positive(tiny_coco):
  # A class-1 false positive scored above everything: class 1's precision at its three hits
  # is 1/2, 2/3, 3/4, interpolated to 3/4 at every recall; class 2 stays at 1.
  predictions = dict(tiny_coco.predictions)
  p = predictions[13]
  fp_mask = np.zeros((1, 64, 64), bool)
  fp_mask[0, 2:20, 40:60] = True
  predictions[13] = {
      'boxes': np.concatenate([p['boxes'], [[40, 2, 60, 20]]]).astype(np.float32),
      'scores': np.concatenate([p['scores'], [0.99]]).astype(np.float32),
      'labels': np.concatenate([p['labels'], [1]]).astype(np.int32),
      'masks': np.concatenate([p['masks'], fp_mask]),
  }
  metrics = coco_eval.coco_evaluate(tiny_coco.path, _results(tiny_coco, predictions))
  for t in ('bbox', 'segm'):
    assert metrics[f'{t}/AP'] == pytest.approx((0.75 + 1.0) / 2)


def _perturbed(tiny_coco):
  """Shifted boxes, eroded masks, a dropped hit, swapped scores, a wrong class, extra boxes."""
  predictions = copy.deepcopy(tiny_coco.predictions)
  p = predictions[11]
  p['boxes'][0] += [6, 4, 6, 4]
  p['masks'][0] = np.roll(p['masks'][0], (4, 6), axis=(0, 1))
  p['scores'][1] = 0.1
  p = predictions[12]
  p['boxes'][1] += [0, 0, -12, -9]
  p['masks'][1][:, 70:] = False
  p['labels'][0] = 1  # the octagon called a square
  predictions[12] = {k: np.concatenate([v, v[2:]]) for k, v in p.items()}
  predictions[12]['boxes'][-1] += 15  # a duplicate pushed off its instance
  predictions[12]['scores'][-1] = 0.95
  predictions[13] = _select(predictions[13], [1])
  return predictions


def _direct_pycocotools(path, results, iou_type):
  coco_gt = COCO(path)
  results = copy.deepcopy(results)
  if iou_type == 'segm':
    for r in results:  # mask areas define small/medium/large, as coco_evaluate does
      r.pop('bbox')
  evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return evaluator.stats


def test_perturbation_matches_pycocotools(tiny_coco):
  results = _results(tiny_coco, _perturbed(tiny_coco))
  metrics = coco_eval.coco_evaluate(tiny_coco.path, results)
  for t in ('bbox', 'segm'):
    stats = _direct_pycocotools(tiny_coco.path, results, t)
    ours = [metrics[f'{t}/{n}'] for n in coco_eval.METRIC_NAMES]
    expected = [s if s >= 0 else math.nan for s in stats]
    np.testing.assert_array_equal(ours, expected)
    assert 0.2 < metrics[f'{t}/AP'] < 0.9  # the perturbation really changed something
  assert metrics['bbox/AP'] != metrics['segm/AP']


def test_results_not_mutated(tiny_coco):
  results = _results(tiny_coco)
  before = copy.deepcopy(results)
  coco_eval.coco_evaluate(tiny_coco.coco, results)
  assert results == before


def test_empty_results_score_zero(tiny_coco):
  metrics = coco_eval.coco_evaluate(tiny_coco.path, [])
  assert set(metrics) == set(ALL_METRICS)
  assert all(v == 0.0 for v in metrics.values()), metrics


def test_pycocotools_prints_go_to_the_log(tiny_coco, capsys, caplog):
  caplog.set_level(logging.INFO, logger=coco_eval.__name__)
  coco_eval.coco_evaluate(tiny_coco.coco, _results(tiny_coco), iou_types=('bbox',))
  assert capsys.readouterr().out == ''
  assert 'Average Precision  (AP) @[ IoU=0.50:0.95' in caplog.text


def test_missing_area_range_is_nan(tiny_coco):
  # Image 13 holds no large instance, so APl / ARl are undefined there.
  metrics = coco_eval.coco_evaluate(tiny_coco.coco, _results(tiny_coco), iou_types=('bbox',),
                                    image_ids=[13])
  assert set(metrics) == {f'bbox/{n}' for n in coco_eval.METRIC_NAMES}
  assert math.isnan(metrics['bbox/APl']) and math.isnan(metrics['bbox/ARl'])
  assert metrics['bbox/AP'] == pytest.approx(1.0)


def test_image_ids_restrict_evaluation(tiny_coco):
  predictions = dict(tiny_coco.predictions)
  predictions[11] = _select(predictions[11], [])  # image 11 missed entirely
  results = _results(tiny_coco, predictions)
  assert coco_eval.coco_evaluate(tiny_coco.coco, results, image_ids=[12, 13])['segm/AP'] == (
      pytest.approx(1.0))
  assert coco_eval.coco_evaluate(tiny_coco.coco, results)['segm/AP'] < 1.0


def test_per_category(tiny_coco):
  predictions = dict(tiny_coco.predictions)
  predictions[11] = _select(predictions[11], [1])  # drop a square only
  metrics = coco_eval.coco_evaluate(tiny_coco.coco, _results(tiny_coco, predictions),
                                    iou_types=('bbox',), per_category=True)
  assert metrics['bbox/AP-square'] == pytest.approx(67 / NUM_RECALL_POINTS)
  assert metrics['bbox/AP-disc'] == pytest.approx(1.0)
