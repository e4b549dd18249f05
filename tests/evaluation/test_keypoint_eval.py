"""Keypoint metrics: per-set COCOeval equal to pycocotools' own (COCO's person sigmas and custom
sigmas of a 3-keypoint set), padded keypoints never in the results, the runner and pictures."""
import contextlib
import copy
import io
import math

import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import maskrcnn_r50_fpn
from maskrcnn_jax import evaluate
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.evaluation import coco_eval
from maskrcnn_jax.evaluation import visualize

PERSON_NAMES = [f'k{i}' for i in range(17)]
CATEGORIES = [
    {'id': 1, 'name': 'person', 'keypoints': PERSON_NAMES,
     'skeleton': [[16, 14], [14, 12], [6, 8], [8, 10], [1, 2]]},
    {'id': 5, 'name': 'tri', 'keypoints': ['apex', 'left_base', 'right_base'],
     'skeleton': [[1, 2], [1, 3], [2, 3]]},
    {'id': 7, 'name': 'circle'},
]
LABEL_TO_CATEGORY_ID = {1: 1, 2: 5, 3: 7}
K_C = {1: 17, 2: 3, 3: 0}
K_MAX = 17
TRI_SIGMAS = (0.05, 0.08, 0.08)
H, W = 200, 240


def _gt_and_predictions(seed=0, noise=3.0):
  """A ground truth of 4 images (persons, triangles, circles; medium and large, some keypoints
  unlabelled) and predictions with noisy keypoints, a missed instance and false positives."""
  rng = np.random.default_rng(seed)
  images = [{'id': i, 'file_name': f'{i}.png', 'height': H, 'width': W} for i in (3, 4, 5, 6)]
  anns, predictions = [], {}
  for img in images:
    boxes, scores, labels, kps = [], [], [], []
    for label in (1, 2, 1, 3, 2):
      k_c = K_C[label]
      bw, bh = rng.uniform(40, 130, 2)
      x, y = rng.uniform(0, W - bw), rng.uniform(0, H - bh)
      gt_kps = np.zeros((k_c, 3))
      gt_kps[:, 0] = rng.uniform(x, x + bw, k_c)
      gt_kps[:, 1] = rng.uniform(y, y + bh, k_c)
      gt_kps[:, 2] = rng.choice([0, 1, 2, 2, 2], k_c)
      gt_kps[gt_kps[:, 2] == 0] = 0
      a = {'id': len(anns) + 1, 'image_id': img['id'], 'category_id': LABEL_TO_CATEGORY_ID[label],
           'bbox': [x, y, bw, bh], 'area': float(bw * bh * 0.8), 'iscrowd': 0}
      if k_c:
        a['keypoints'] = [round(float(v), 2) for v in gt_kps.reshape(-1)]
        a['num_keypoints'] = int((gt_kps[:, 2] > 0).sum())
      anns.append(a)
      if rng.random() < 0.15:
        continue  # missed
      for _ in range(1 + (rng.random() < 0.3)):  # sometimes a duplicate, a false positive
        pred = np.zeros((K_MAX, 3), np.float32)
        pred[:k_c, :2] = gt_kps[:, :2] + rng.normal(0, noise, (k_c, 2))
        pred[:k_c, 2] = 1
        pred[k_c:] = 1e6  # padded slots hold garbage: never read
        boxes.append([x, y, x + bw, y + bh])
        scores.append(rng.uniform(0.1, 1.0))
        labels.append(label)
        kps.append(pred)
    valid = np.array([[k < K_C[l] for k in range(K_MAX)] for l in labels], bool)
    predictions[img['id']] = {
        'boxes': np.array(boxes, np.float32).reshape(-1, 4),
        'scores': np.array(scores, np.float32), 'labels': np.array(labels, np.int32),
        'keypoints': np.array(kps, np.float32).reshape(-1, K_MAX, 3), 'keypoint_valid': valid,
        'keypoint_scores': np.where(valid, 5.0, 0.0).astype(np.float32)}
  gt = {'images': images, 'annotations': anns, 'categories': CATEGORIES}
  return gt, predictions


def _results(predictions):
  out = []
  for image_id, p in predictions.items():
    out += coco_eval.detections_to_coco_results(image_id, p, LABEL_TO_CATEGORY_ID)
  return out


def _pycocotools(gt, predictions, cat_id, sigmas):
  """pycocotools' keypoint stats of one category, results written by hand from the arrays."""
  coco_gt = COCO()
  coco_gt.dataset = copy.deepcopy(gt)
  label = {c: l for l, c in LABEL_TO_CATEGORY_ID.items()}[cat_id]
  res = []
  for image_id, p in predictions.items():
    for box, score, l, kps in zip(p['boxes'], p['scores'], p['labels'], p['keypoints']):
      if l != label:
        continue
      flat = np.concatenate([kps[:K_C[l], :2], np.ones((K_C[l], 1))], 1).reshape(-1)
      res.append({'image_id': image_id, 'category_id': cat_id, 'score': float(score),
                  'bbox': [float(box[0]), float(box[1]), float(box[2] - box[0]),
                           float(box[3] - box[1])],
                  'keypoints': [round(float(v), 3) for v in flat]})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(res), 'keypoints')
    ev.params.catIds = [cat_id]
    if sigmas is not None:
      ev.params.kpt_oks_sigmas = np.array(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return [v if v >= 0 else math.nan for v in ev.stats]


def test_keypoint_metrics_equal_pycocotools_per_set():
  gt, predictions = _gt_and_predictions()
  metrics = coco_eval.coco_evaluate(gt, _results(predictions), iou_types=('keypoints',),
                                    keypoint_oks_sigmas={5: TRI_SIGMAS})
  person = _pycocotools(gt, predictions, 1, None)  # pycocotools' default: COCO's sigmas
  tri = _pycocotools(gt, predictions, 5, TRI_SIGMAS)
  assert 0.1 < person[0] < 0.95 and 0.1 < tri[0] < 0.95  # neither trivial
  for k, name in enumerate(coco_eval.KEYPOINT_METRIC_NAMES):
    np.testing.assert_allclose(metrics[f'keypoints-person/{name}'], person[k], rtol=1e-12)
    np.testing.assert_allclose(metrics[f'keypoints-tri/{name}'], tri[k], rtol=1e-12)
    np.testing.assert_allclose(metrics[f'keypoints/{name}'], np.nanmean([person[k], tri[k]]),
                               rtol=1e-12)
  assert set(metrics) == {f'keypoints{s}/{n}' for s in ('', '-person', '-tri')
                          for n in coco_eval.KEYPOINT_METRIC_NAMES}
  # Custom sigmas matter: COCO-like wide ones score the triangles differently.
  wide = coco_eval.coco_evaluate(gt, _results(predictions), iou_types=('keypoints',),
                                 keypoint_oks_sigmas={5: (0.5, 0.5, 0.5)})
  assert wide['keypoints-tri/AP'] > metrics['keypoints-tri/AP']
  assert wide['keypoints-person/AP'] == metrics['keypoints-person/AP']


def test_one_set_mean_is_that_set_and_perfect_scores_one():
  gt, predictions = _gt_and_predictions(seed=1, noise=0.0)
  gt['categories'] = [c if c['id'] != 5 else {'id': 5, 'name': 'tri'} for c in CATEGORIES]
  for p in predictions.values():
    p['keypoint_valid'] = p['keypoint_valid'] & (p['labels'] == 1)[:, None]
  metrics = coco_eval.coco_evaluate(gt, _results(predictions), iou_types=('keypoints',))
  assert not any(k.startswith('keypoints-tri') for k in metrics)
  for name in coco_eval.KEYPOINT_METRIC_NAMES:
    a, b = metrics[f'keypoints/{name}'], metrics[f'keypoints-person/{name}']
    assert a == b or (math.isnan(a) and math.isnan(b))


def test_padded_keypoints_never_reach_the_results():
  gt, predictions = _gt_and_predictions()
  results = _results(predictions)
  by_cat = {}
  for r in results:
    by_cat.setdefault(r['category_id'], []).append(r)
  assert all(len(r['keypoints']) == 3 * 17 for r in by_cat[1])
  assert all(len(r['keypoints']) == 3 * 3 for r in by_cat[5])
  assert all('keypoints' not in r for r in by_cat[7])  # a class without a set: none
  assert max(max(r['keypoints']) for r in results if 'keypoints' in r) < 1e5  # no padding
  assert all(r['keypoints'][2::3] == [1] * (len(r['keypoints']) // 3)
             for r in results if 'keypoints' in r)
  # Whatever the padded slots hold, the metrics are the same.
  zeroed = copy.deepcopy(predictions)
  for p in zeroed.values():
    p['keypoints'][~p['keypoint_valid']] = 0
  kw = dict(iou_types=('keypoints',), keypoint_oks_sigmas={5: TRI_SIGMAS})
  assert (coco_eval.coco_evaluate(gt, results, **kw)
          == coco_eval.coco_evaluate(gt, _results(zeroed), **kw))


def test_keypoint_valid_must_be_a_prefix():
  _, predictions = _gt_and_predictions()
  p = dict(predictions[3])
  p['keypoint_valid'] = p['keypoint_valid'].copy()
  p['keypoint_valid'][0, 0] = False
  with pytest.raises(ValueError, match='not a prefix'):
    coco_eval.detections_to_coco_results(3, p, LABEL_TO_CATEGORY_ID)


def test_sigmas_and_ground_truth_errors():
  gt, predictions = _gt_and_predictions()
  with pytest.raises(ValueError, match=r'category 5 \(tri\) has 3 keypoints and no OKS sigmas'):
    coco_eval.coco_evaluate(gt, _results(predictions), iou_types=('keypoints',))
  with pytest.raises(ValueError, match='2 OKS sigmas for 3 keypoints'):
    coco_eval.coco_evaluate(gt, [], iou_types=('keypoints',),
                            keypoint_oks_sigmas={5: (0.1, 0.1)})
  broken = copy.deepcopy(gt)
  del broken['annotations'][0]['num_keypoints']
  with pytest.raises(ValueError, match='annotation 1 of category 1'):
    coco_eval.coco_evaluate(broken, [], iou_types=('keypoints',),
                            keypoint_oks_sigmas={5: TRI_SIGMAS})
  no_sets = dict(gt, categories=[{'id': c['id'], 'name': c['name']} for c in CATEGORIES])
  with pytest.raises(ValueError, match='declare "keypoints"'):
    coco_eval.coco_evaluate(no_sets, [], iou_types=('keypoints',))


def test_no_results_score_zero():
  gt, _ = _gt_and_predictions()
  metrics = coco_eval.coco_evaluate(gt, [], iou_types=('keypoints',),
                                    keypoint_oks_sigmas={5: TRI_SIGMAS})
  assert metrics['keypoints/AP'] == 0.0 and metrics['keypoints-tri/AR'] == 0.0


def _config(sigmas):
  c = maskrcnn_r50_fpn.get_config('tiny')
  c.model.num_classes = 4
  c.model.keypoint_on = True
  if 'keypoint_head' not in c.model:
    c.model.keypoint_head = ml_collections.ConfigDict()
  c.model.keypoint_head.num_keypoints = (0, 17, 3, 0)
  c.data.keypoint_oks_sigmas = sigmas
  return c


def test_sigmas_from_the_config():
  label_map = coco.LabelMap((1, 5, 7), ('person', 'tri', 'circle')).with_keypoint_sets(
      {1: (tuple(PERSON_NAMES), ()), 5: (('apex', 'left_base', 'right_base'), ())})
  sigmas = evaluate.keypoint_oks_sigmas_of(_config(((), (), TRI_SIGMAS, ())), label_map)
  assert sigmas == {1: coco_eval.COCO_PERSON_KEYPOINT_OKS_SIGMAS, 5: TRI_SIGMAS}
  np.testing.assert_allclose(coco_eval.COCO_PERSON_KEYPOINT_OKS_SIGMAS,
                             COCOeval(iouType='keypoints').params.kpt_oks_sigmas)
  with pytest.raises(structures.ConfigError,
                     match=r'config\.data\.keypoint_oks_sigmas.*label 2 has 3 keypoints'):
    evaluate.keypoint_oks_sigmas_of(_config(()), label_map)


class _Predictor:

  def __init__(self, images, predictions):
    self.by_bytes = {images[i].tobytes(): p for i, p in predictions.items()}

  def __call__(self, images):
    return [self.by_bytes[np.asarray(im).tobytes()] for im in images]


def test_runner_adds_keypoints_and_draws_them(tmp_path):
  gt, predictions = _gt_and_predictions()
  rng = np.random.default_rng(0)
  images = {i: rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for i in predictions}
  metrics = evaluate.evaluate(_Predictor(images, predictions), list(images.items()), gt,
                              LABEL_TO_CATEGORY_ID, tmp_path, num_pictures=1,
                              keypoint_oks_sigmas={5: TRI_SIGMAS})
  assert {'bbox/AP', 'keypoints/AP', 'keypoints-person/AP', 'keypoints-tri/ARl'} <= set(metrics)
  assert not any(k.startswith('segm') for k in metrics)  # no masks predicted
  assert (tmp_path / 'pictures' / '3.png').exists()


def test_pictures_show_keypoints_and_skeleton():
  image = np.zeros((60, 80, 3), np.uint8)
  kps = np.zeros((2, 4, 3), np.float32)
  kps[0, :3, :2] = [[10, 10], [40, 10], [40, 40]]
  kps[1, :, :2] = [[70, 50], [5, 55], [6, 55], [7, 55]]  # slots 1..3 invalid
  prediction = {'boxes': np.array([[5, 5, 45, 45], [60, 45, 78, 58]], np.float32),
                'scores': np.array([0.9, 0.8], np.float32), 'labels': np.array([2, 3], np.int32),
                'keypoints': kps, 'keypoint_valid': np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)}
  plain = visualize.draw_predictions(image, {k: prediction[k] for k in ('boxes', 'scores',
                                                                        'labels')})
  out = visualize.draw_predictions(image, prediction, keypoint_skeleton={2: [(0, 1), (1, 2)]})
  changed = (out != plain).any(-1)
  assert changed[10, 10] and changed[40, 40] and changed[50, 70]  # the dots
  assert changed[10, 25] and changed[25, 40]  # the skeleton's lines
  assert not changed[25, 25]  # (0, 2) is not in the skeleton
  assert not changed[55, 5:8].any()  # invalid keypoints are not drawn
  thresh = visualize.draw_predictions(
      image, dict(prediction, keypoint_scores=np.array([[0, 9, 9, 0], [9, 0, 0, 0]], float)),
      keypoint_skeleton=[(), (), [(0, 1), (1, 2)], ()], keypoint_thresh=1.0)
  assert not (thresh != plain).any(-1)[10, 10] and (thresh != plain).any(-1)[40, 40]
