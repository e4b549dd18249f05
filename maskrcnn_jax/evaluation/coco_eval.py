"""COCO box and mask metrics with pycocotools (no models, no checkpoints: `maskrcnn_jax/evaluate.py`
runs a Predictor over a split and calls this module).

Metrics are the 12 standard COCOeval numbers per IoU type, named as detectron2 names them
(`bbox/AP`, `segm/AP50`, ...), as fractions in [0, 1] (detectron2 reports percentages); a
number with no ground truth to measure (COCOeval's -1) is NaN. Keypoints ('keypoints') are
scored per keypoint set: each category that declares keypoints is evaluated on its own with its
OKS sigmas, giving pycocotools' 10 keypoint numbers as `keypoints-<category name>/AP`, ..., and
`keypoints/AP`, ... their mean over the sets. pycocotools' prints go to this module's logger
(the summary table at INFO, the rest at DEBUG).
"""

import contextlib
import copy
import io
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

IOU_TYPES = ('bbox', 'segm')  # the default of coco_evaluate
SUPPORTED_IOU_TYPES = IOU_TYPES + ('keypoints',)
# The order of COCOeval.stats after summarize() for 'bbox' and 'segm' (pycocotools cocoeval.py).
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
# ... and for 'keypoints' (pycocotools _summarizeKps: no small objects, maxDets 20).
KEYPOINT_METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75', 'ARm', 'ARl')
# COCO's per-keypoint OKS sigmas of the 17 person keypoints (pycocotools Params.setKpParams).
COCO_PERSON_KEYPOINT_OKS_SIGMAS = tuple(
    v / 10.0 for v in (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                       .87, .89, .89))

Prediction = Mapping[str, np.ndarray]


@contextlib.contextmanager
def _stdout_to_log(level: int = logging.DEBUG):
  """Captures pycocotools' prints and sends them to this module's logger."""
  buffer = io.StringIO()
  try:
    with contextlib.redirect_stdout(buffer):
      yield
  finally:
    text = buffer.getvalue().rstrip()
    if text:
      logger.log(level, '%s', text)


def _quiet(fn, *args, level: int = logging.DEBUG, **kwargs):
  with _stdout_to_log(level):
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------- results


def encode_masks(masks: np.ndarray) -> list[dict]:
  """Compressed COCO RLEs of binary masks, JSON-ready.

  Args:
    masks: bool or uint8 [D, H, W], nonzero = inside, original-image pixels.

  Returns:
    D dicts {'size': [H, W], 'counts': str}.
  """
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f'masks must be [D, H, W], got shape {masks.shape}')
  if masks.shape[0] == 0:
    return []
  # pycocotools wants a Fortran-ordered uint8 [H, W, D].
  fortran = np.asfortranarray(np.transpose(masks != 0, (1, 2, 0)).astype(np.uint8))
  rles = mask_utils.encode(fortran)
  for rle in rles:
    rle['counts'] = rle['counts'].decode('ascii')
  return rles


def decode_masks(rles: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
  """Inverse of `encode_masks`: bool [D, H, W] from compressed RLEs (str or bytes counts)."""
  if not rles:
    return np.zeros((0, height, width), bool)
  fixed = [{'size': list(r['size']), 'counts': r['counts'].encode('ascii')
            if isinstance(r['counts'], str) else r['counts']} for r in rles]
  return np.transpose(mask_utils.decode(fixed), (2, 0, 1)).astype(bool)


def detections_to_coco_results(image_id: int, prediction: Prediction,
                               label_to_category_id: Mapping[int, int], *,
                               keypoint_offset: float = 0.0) -> list[dict]:
  """COCO result dicts for one image's detections.

  Args:
    image_id: the COCO image id.
    prediction: the Predictor's dict for this image: `boxes` float32 [D, 4] xyxy in original
      image pixels, `scores` float32 [D], `labels` int32 [D] in 1..K, and optionally `masks`
      bool [D, H, W] at original resolution, and `keypoints` float32 [D, K_max, 3] (x, y, .)
      in original pixels with `keypoint_valid` bool [D, K_max] (the detected class's own K_c
      keypoints, the first K_c slots).
    label_to_category_id: contiguous label -> COCO category id (the dataset's map).
    keypoint_offset: subtracted from the keypoints' x and y (`config.data.keypoint_offset`,
      which training added to the ground truth: detectron2's 0.5 back to COCO pixel indices).

  Returns:
    D dicts with `image_id`, `category_id`, `bbox` ([x, y, w, h], original pixels), `score`,
    `segmentation` (compressed RLE with str counts) when masks are given, and, for detections
    of a class with keypoints, `keypoints`: the flat [x, y, 1] * K_c list of its class's own
    keypoints (v = 1 as torchvision writes it; OKS ignores a detection's v), padded slots left
    out.
  """
  boxes = np.asarray(prediction['boxes'], np.float64).reshape(-1, 4)
  scores = np.asarray(prediction['scores'], np.float64).reshape(-1)
  labels = np.asarray(prediction['labels']).reshape(-1)
  if not len(boxes) == len(scores) == len(labels):
    raise ValueError(f'boxes/scores/labels disagree on the number of detections: '
                     f'{len(boxes)}, {len(scores)}, {len(labels)}')
  rles = None
  if prediction.get('masks') is not None:
    rles = encode_masks(prediction['masks'])
    if len(rles) != len(boxes):
      raise ValueError(f'{len(rles)} masks for {len(boxes)} detections')
  keypoints = _keypoint_lists(prediction, len(boxes), keypoint_offset)
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
  results = []
  for d in range(len(boxes)):
    label = int(labels[d])
    if label not in label_to_category_id:
      raise KeyError(f'label {label} is not in label_to_category_id')
    result = {
        'image_id': int(image_id),
        'category_id': int(label_to_category_id[label]),
        'bbox': [round(float(v), 3) for v in xywh[d]],
        'score': float(scores[d]),
    }
    if rles is not None:
      result['segmentation'] = rles[d]
    if keypoints is not None and keypoints[d]:
      result['keypoints'] = keypoints[d]
    results.append(result)
  return results


def _keypoint_lists(prediction: Prediction, num: int, offset: float = 0.0
                    ) -> Optional[list[list[float]]]:
  """Per detection, the flat [x - offset, y - offset, 1] list of its valid keypoints ([] for
  none), or None when the prediction has no keypoints."""
  if prediction.get('keypoints') is None:
    return None
  kps = np.asarray(prediction['keypoints'], np.float64)
  if kps.ndim != 3 or kps.shape[0] != num or kps.shape[2] != 3:
    raise ValueError(f'keypoints must be [{num} detections, K, 3], got shape {kps.shape}')
  kps = kps - np.array([offset, offset, 0.0])
  valid = prediction.get('keypoint_valid')
  valid = (np.ones(kps.shape[:2], bool) if valid is None
           else np.asarray(valid, bool).reshape(kps.shape[:2]))
  out = []
  for d in range(num):
    k_c = int(valid[d].sum())
    if not valid[d, :k_c].all():
      raise ValueError(f'detection {d}: keypoint_valid {valid[d].tolist()} is not a prefix; '
                       "a class's own keypoints are its first K_c slots")
    out.append([v for x, y in kps[d, :k_c, :2].tolist() for v in (round(x, 3), round(y, 3), 1)])
  return out


# ---------------------------------------------------------------------------------- metrics


GroundTruth = Union[str, os.PathLike, Mapping[str, Any], COCO]


def load_coco(gt: GroundTruth) -> COCO:
  """A pycocotools COCO from a path to an instances JSON, a COCO dict, or the COCO itself."""
  if isinstance(gt, COCO):
    return gt
  if isinstance(gt, Mapping):
    coco = COCO()
    coco.dataset = dict(gt)
    _quiet(coco.createIndex)
    return coco
  return _quiet(COCO, os.fspath(gt))


def _results_coco(coco_gt: COCO, results: list[dict]) -> COCO:
  """`coco_gt.loadRes(results)` that also accepts no results (loadRes indexes results[0])."""
  if results:
    return _quiet(coco_gt.loadRes, results)
  coco_dt = COCO()
  coco_dt.dataset = {'images': list(coco_gt.dataset['images']),
                     'categories': copy.deepcopy(coco_gt.dataset.get('categories', [])),
                     'annotations': []}
  _quiet(coco_dt.createIndex)
  return coco_dt


def _results_for(iou_type: str, results: list[dict]) -> list[dict]:
  """Per-type copies of the results (loadRes writes into the dicts it is given)."""
  if iou_type == 'keypoints':
    # The bbox stays, so loadRes takes a detection's area from its box, as detectron2 does
    # (without one it would take the keypoints' extent).
    return [{k: v for k, v in r.items() if k != 'segmentation'} for r in results
            if 'keypoints' in r]
  if iou_type == 'bbox':
    return [{k: v for k, v in r.items() if k != 'segmentation'} for r in results]
  missing = sum('segmentation' not in r for r in results)
  if missing:
    raise ValueError(f'segm evaluation needs a segmentation in every result; {missing} lack it')
  # Without a bbox, loadRes takes the area from the mask; with one, from the box, which would
  # change which detections count as small/medium/large (detectron2 drops it the same way).
  return [{k: v for k, v in r.items() if k != 'bbox'} for r in results]


def coco_evaluate(gt: GroundTruth, results: list[dict],
                  iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Iterable[int]] = None,
                  per_category: bool = False,
                  keypoint_oks_sigmas: Optional[Mapping[int, Sequence[float]]] = None
                  ) -> dict[str, float]:
  """Runs COCOeval for each IoU type.

  Args:
    gt: path to a COCO instances JSON, a COCO dict, or a pycocotools COCO.
    results: COCO result dicts (see `detections_to_coco_results`); may be empty.
    iou_types: subset of ('bbox', 'segm', 'keypoints').
    image_ids: evaluate only these images (default: every image of `gt`). Pass the ids that
      were actually predicted when evaluating part of a split.
    per_category: also report `{type}/AP-{category name}` for every category with ground truth
      (bbox and segm; keypoint metrics are per category already).
    keypoint_oks_sigmas: {category id: its K_c OKS sigmas} for 'keypoints'; a category with a
      keypoint set that is not in it takes COCO's person sigmas, which fit only 17 keypoints.

  Returns:
    {'bbox/AP': ..., 'bbox/AP50': ..., ..., 'segm/ARl': ...}: the 12 COCOeval stats per type as
    fractions in [0, 1]. A stat that is undefined because no ground truth falls in its area range
    (COCOeval's -1) is NaN, as in detectron2. No results give 0 wherever ground truth exists.
    'keypoints' gives, for every category of `gt` that declares keypoints (its `keypoints`
    names), pycocotools' 10 keypoint stats of that category alone (`params.catIds = [id]`, its
    sigmas) as `keypoints-<category name>/AP`, `.../AP50`, ..., `.../ARl`
    (KEYPOINT_METRIC_NAMES), and `keypoints/<stat>`: their mean over the keypoint sets (over
    the sets where the stat is defined; NaN where none is), so with one set it is that set's.
  """
  coco_gt = load_coco(gt)
  metrics = {}
  for iou_type in iou_types:
    if iou_type not in SUPPORTED_IOU_TYPES:
      raise ValueError(f'iou_type {iou_type!r} is not one of {SUPPORTED_IOU_TYPES}')
    if iou_type == 'keypoints':
      metrics.update(_keypoint_metrics(coco_gt, results, image_ids, keypoint_oks_sigmas or {}))
      continue
    coco_dt = _results_coco(coco_gt, _results_for(iou_type, results))
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    if image_ids is not None:
      evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize, level=logging.INFO)
    for name, value in zip(METRIC_NAMES, evaluator.stats):
      metrics[f'{iou_type}/{name}'] = float(value) if value >= 0 else math.nan
    if per_category:
      metrics.update(_per_category_ap(evaluator, coco_gt, iou_type))
  return metrics


def keypoint_categories(coco_gt: COCO) -> dict[int, list[str]]:
  """{category id: keypoint names} of the categories of `coco_gt` that declare keypoints."""
  return {int(c['id']): list(c['keypoints']) for c in coco_gt.dataset.get('categories', [])
          if c.get('keypoints')}


def _keypoint_metrics(coco_gt: COCO, results: list[dict], image_ids,
                      sigmas_of: Mapping[int, Sequence[float]]) -> dict[str, float]:
  """COCOeval 'keypoints' per keypoint set, and the mean over sets (see coco_evaluate)."""
  sets = keypoint_categories(coco_gt)
  if not sets:
    raise ValueError('keypoint evaluation needs categories that declare "keypoints" in the '
                     'ground truth; it has none')
  per_set = {}
  for cat_id, names in sets.items():
    name = coco_gt.cats[cat_id].get('name', str(cat_id))
    sigmas = tuple(sigmas_of.get(cat_id) or ())
    if not sigmas:
      if len(names) != len(COCO_PERSON_KEYPOINT_OKS_SIGMAS):
        raise ValueError(f'category {cat_id} ({name}) has {len(names)} keypoints and no OKS '
                         f'sigmas; COCO\'s person sigmas fit only '
                         f'{len(COCO_PERSON_KEYPOINT_OKS_SIGMAS)}')
      sigmas = COCO_PERSON_KEYPOINT_OKS_SIGMAS
    if len(sigmas) != len(names):
      raise ValueError(f'category {cat_id} ({name}): {len(sigmas)} OKS sigmas for '
                       f'{len(names)} keypoints')
    _check_keypoint_annotations(coco_gt, cat_id, len(names), name)
    mine = [r for r in _results_for('keypoints', results) if int(r['category_id']) == cat_id]
    for r in mine:
      if len(r['keypoints']) != 3 * len(names):
        raise ValueError(f'a result of category {cat_id} ({name}) on image {r["image_id"]} has '
                         f'{len(r["keypoints"])} keypoint numbers, expected 3 x {len(names)}')
    evaluator = COCOeval(coco_gt, _results_coco(coco_gt, mine), 'keypoints')
    evaluator.params.catIds = [cat_id]
    evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
    if image_ids is not None:
      evaluator.params.imgIds = sorted({int(i) for i in image_ids})
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    logger.info('keypoints of %s:', name)
    _quiet(evaluator.summarize, level=logging.INFO)
    per_set[name] = [float(v) if v >= 0 else math.nan for v in evaluator.stats]
  metrics = {}
  for name, stats in per_set.items():
    metrics.update({f'keypoints-{name}/{m}': v for m, v in zip(KEYPOINT_METRIC_NAMES, stats)})
  for k, m in enumerate(KEYPOINT_METRIC_NAMES):
    defined = [stats[k] for stats in per_set.values() if not math.isnan(stats[k])]
    metrics[f'keypoints/{m}'] = float(np.mean(defined)) if defined else math.nan
  return metrics


def _check_keypoint_annotations(coco_gt: COCO, cat_id: int, k_c: int, name: str) -> None:
  """pycocotools reads `keypoints` and `num_keypoints` of every ground-truth annotation of a
  keypoint category; say which one lacks them instead of a KeyError inside COCOeval."""
  for ann in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id])):
    if len(ann.get('keypoints') or ()) != 3 * k_c or 'num_keypoints' not in ann:
      raise ValueError(f'ground-truth annotation {ann.get("id")} of category {cat_id} ({name}) '
                       f'needs "keypoints" (3 x {k_c} numbers) and "num_keypoints" for keypoint '
                       'evaluation (CocoDataset.gt_dict() of a dataset read with keypoints fills '
                       'them)')


def _per_category_ap(evaluator: COCOeval, coco_gt: COCO, iou_type: str) -> dict[str, float]:
  # precision: [iou thresholds, recall points, categories, area ranges, max dets];
  # area 'all' is index 0, maxDets=100 is the last (pycocotools Params.setDetParams).
  precision = evaluator.eval['precision']
  out = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    if p.size:
      name = coco_gt.cats[cat_id].get('name', str(cat_id))
      out[f'{iou_type}/AP-{name}'] = float(np.mean(p))
  return out


def as_label_to_category_id(labels: Any) -> dict[int, int]:
  """{label: category id} from such a mapping or from a `data.coco.LabelMap`."""
  if hasattr(labels, 'category_ids'):
    return {i + 1: int(c) for i, c in enumerate(labels.category_ids)}
  return {int(l): int(c) for l, c in labels.items()}


def class_names_from_coco(coco_gt: COCO, label_to_category_id: Mapping[int, int]) -> dict:
  """Contiguous label -> category name (the category id as text where the name is missing)."""
  return {int(label): coco_gt.cats.get(cat, {}).get('name', str(cat))
          for label, cat in label_to_category_id.items()}


def keypoint_skeletons_from_coco(coco_gt: COCO, label_to_category_id: Mapping[int, int]
                                 ) -> dict[int, list[tuple[int, int]]]:
  """Contiguous label -> its category's skeleton as 0-based index pairs (COCO writes them
  1-based), for the labels whose category declares keypoints."""
  out = {}
  for label, cat in label_to_category_id.items():
    info = coco_gt.cats.get(cat, {})
    if info.get('keypoints'):
      out[int(label)] = [(int(a) - 1, int(b) - 1) for a, b in info.get('skeleton') or ()]
  return out
