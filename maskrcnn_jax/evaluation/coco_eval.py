"""COCO box and mask metrics with pycocotools, and the loop that evaluates a Predictor.

Metrics are the 12 standard COCOeval numbers per IoU type, named as detectron2 names them
(`bbox/AP`, `segm/AP50`, ...), as fractions in [0, 1] (detectron2 reports percentages); a
number with no ground truth to measure (COCOeval's -1) is NaN. pycocotools' prints go to this
module's logger (the summary table at INFO, the rest at DEBUG).
"""

import contextlib
import copy
import io
import json
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn_jax.evaluation import visualize

logger = logging.getLogger(__name__)

IOU_TYPES = ('bbox', 'segm')
# The order of COCOeval.stats after summarize() for 'bbox' and 'segm' (pycocotools cocoeval.py).
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.json'
PICTURES_DIR = 'pictures'
PICTURE_SCORE_THRESH = 0.5  # pictures show confident detections; metrics use all of them

Prediction = Mapping[str, np.ndarray]
Predictor = Callable[[list], Sequence[Prediction]]


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
                               label_to_category_id: Mapping[int, int]) -> list[dict]:
  """COCO result dicts for one image's detections.

  Args:
    image_id: the COCO image id.
    prediction: the Predictor's dict for this image: `boxes` float32 [D, 4] xyxy in original
      image pixels, `scores` float32 [D], `labels` int32 [D] in 1..K, and optionally `masks`
      bool [D, H, W] at original resolution.
    label_to_category_id: contiguous label -> COCO category id (the dataset's map).

  Returns:
    D dicts with `image_id`, `category_id`, `bbox` ([x, y, w, h], original pixels), `score`,
    and `segmentation` (compressed RLE with str counts) when masks are given.
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
    results.append(result)
  return results


# ---------------------------------------------------------------------------------- metrics


def load_coco(gt: Union[str, os.PathLike, COCO]) -> COCO:
  """A pycocotools COCO from a path to an instances JSON, or the COCO itself."""
  if isinstance(gt, COCO):
    return gt
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
  if iou_type == 'bbox':
    return [{k: v for k, v in r.items() if k != 'segmentation'} for r in results]
  missing = sum('segmentation' not in r for r in results)
  if missing:
    raise ValueError(f'segm evaluation needs a segmentation in every result; {missing} lack it')
  # Without a bbox, loadRes takes the area from the mask; with one, from the box, which would
  # change which detections count as small/medium/large (detectron2 drops it the same way).
  return [{k: v for k, v in r.items() if k != 'bbox'} for r in results]


def coco_evaluate(gt: Union[str, os.PathLike, COCO], results: list[dict],
                  iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Iterable[int]] = None,
                  per_category: bool = False) -> dict[str, float]:
  """Runs COCOeval for each IoU type.

  Args:
    gt: path to a COCO instances JSON, or a pycocotools COCO.
    results: COCO result dicts (see `detections_to_coco_results`); may be empty.
    iou_types: subset of ('bbox', 'segm').
    image_ids: evaluate only these images (default: every image of `gt`). Pass the ids that
      were actually predicted when evaluating part of a split.
    per_category: also report `{type}/AP-{category name}` for every category with ground truth.

  Returns:
    {'bbox/AP': ..., 'bbox/AP50': ..., ..., 'segm/ARl': ...}: the 12 COCOeval stats per type as
    fractions in [0, 1]. A stat that is undefined because no ground truth falls in its area range
    (COCOeval's -1) is NaN, as in detectron2. No results give 0 wherever ground truth exists.
  """
  coco_gt = load_coco(gt)
  metrics = {}
  for iou_type in iou_types:
    if iou_type not in IOU_TYPES:
      raise ValueError(f'iou_type {iou_type!r} is not one of {IOU_TYPES}')
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


# ---------------------------------------------------------------------------------- loop


def _as_pair(record: Any) -> tuple[int, np.ndarray]:
  """(image_id, uint8 image) from a pair, or from a record dict holding `image` or `file_name`."""
  if isinstance(record, Mapping):
    from maskrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top
    return int(record['image_id']), coco.record_image(record)
  image_id, image = record
  return int(image_id), np.asarray(image)


def as_label_to_category_id(labels: Any) -> dict[int, int]:
  """{label: category id} from such a mapping or from a `data.coco.LabelMap`."""
  if hasattr(labels, 'category_ids'):
    return {i + 1: int(c) for i, c in enumerate(labels.category_ids)}
  return {int(l): int(c) for l, c in labels.items()}


def _batches(records: Iterable[Any], batch_size: int):
  batch = []
  for record in records:
    batch.append(_as_pair(record))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def class_names_from_coco(coco_gt: COCO, label_to_category_id: Mapping[int, int]) -> dict:
  """Contiguous label -> category name (the category id as text where the name is missing)."""
  return {int(label): coco_gt.cats.get(cat, {}).get('name', str(cat))
          for label, cat in label_to_category_id.items()}


def evaluate(predictor: Predictor, records: Iterable[Any], gt_json: Union[str, os.PathLike, COCO],
             label_to_category_id: Mapping[int, int], out_dir: Union[str, os.PathLike], *,
             num_pictures: int = 4, step: Optional[int] = None, summary_writer: Any = None,
             batch_size: int = 1, iou_types: Optional[Sequence[str]] = None,
             tag_prefix: str = 'eval/') -> dict[str, float]:
  """Predicts every record, computes COCO metrics and writes them out.

  Args:
    predictor: any callable taking a list of uint8 [H, W, 3] images and returning one
      prediction dict per image (see `detections_to_coco_results`).
    records: iterable of (image_id, uint8 image [H, W, 3]) pairs, or of record dicts with
      `image_id` and either `image` (tfds records) or `file_name`/`height`/`width` (the records
      of `data.coco.load_coco`, whose images are then read from disk).
    gt_json: the ground-truth instances JSON (path or pycocotools COCO).
    label_to_category_id: contiguous label -> COCO category id, or a `data.coco.LabelMap`.
    out_dir: receives `results.json`, `metrics.json` and `pictures/<image_id>.png`.
    num_pictures: how many of the first images to draw with their predictions.
    step: the training step, for the summary writer and metrics.json.
    summary_writer: a tensorboardX SummaryWriter (or anything with add_scalar/add_image).
    batch_size: images per predictor call.
    iou_types: default 'bbox' plus 'segm' when the predictions carry masks.
    tag_prefix: prefix of the summary tags.

  Returns:
    The metrics of `coco_evaluate` over the predicted images.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  coco_gt = load_coco(gt_json)
  label_to_category_id = as_label_to_category_id(label_to_category_id)
  class_names = class_names_from_coco(coco_gt, label_to_category_id)
  results, image_ids, pictures = [], [], []
  has_masks = True
  for batch in _batches(records, batch_size):
    predictions = predictor([image for _, image in batch])
    if len(predictions) != len(batch):
      raise ValueError(f'predictor returned {len(predictions)} predictions for {len(batch)} '
                       'images')
    for (image_id, image), prediction in zip(batch, predictions):
      image_ids.append(image_id)
      has_masks &= prediction.get('masks') is not None
      results.extend(detections_to_coco_results(image_id, prediction, label_to_category_id))
      if len(pictures) < num_pictures:
        pictures.append((image_id, visualize.draw_predictions(image, prediction, class_names,
                                                              score_thresh=PICTURE_SCORE_THRESH)))
  if iou_types is None:
    iou_types = IOU_TYPES if has_masks else ('bbox',)
  logger.info('Evaluating %d detections on %d images (%s)', len(results), len(image_ids),
              ', '.join(iou_types))

  with open(os.path.join(out_dir, RESULTS_FILE), 'w') as f:
    json.dump(results, f)
  metrics = coco_evaluate(coco_gt, results, iou_types=iou_types, image_ids=image_ids)
  with open(os.path.join(out_dir, METRICS_FILE), 'w') as f:
    json.dump({'step': step, 'num_images': len(image_ids), 'metrics': metrics}, f, indent=2)

  if pictures:
    os.makedirs(os.path.join(out_dir, PICTURES_DIR), exist_ok=True)
  for image_id, picture in pictures:
    Image.fromarray(picture).save(os.path.join(out_dir, PICTURES_DIR, f'{image_id}.png'))
  if summary_writer is not None:
    for name, value in metrics.items():
      if math.isfinite(value):  # NaN marks 'no ground truth in this size range'
        summary_writer.add_scalar(tag_prefix + name, value, step)
    for image_id, picture in pictures:
      summary_writer.add_image(f'{tag_prefix}pictures/{image_id}', picture, step,
                               dataformats='HWC')
    if hasattr(summary_writer, 'flush'):
      summary_writer.flush()
  logger.info('Metrics at step %s: %s', step,
              ', '.join(f'{k}={v:.4f}' for k, v in metrics.items()))
  return metrics


# ------------------------------------------------------------------ config-level entry points
def _label_map_from_meta(meta: Mapping[str, Any]):
  """The stored label map of a checkpoint as a `data.coco.LabelMap`, or None."""
  from maskrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top
  l2c = as_label_to_category_id(meta.get('label_to_category_id') or {})  # JSON keys are str
  if not l2c:
    return None
  labels = sorted(l2c)
  if labels != list(range(1, len(labels) + 1)):
    raise ValueError(f'checkpoint label map has non-contiguous labels {labels}')
  cats = tuple(l2c[k] for k in labels)
  names = list(meta.get('class_names') or [str(c) for c in cats])
  return coco.LabelMap(cats, tuple(names[:len(cats)]))


def evaluate_config(config, variables, step: Optional[int], *, workdir: str,
                    meta: Optional[Mapping[str, Any]] = None, summary_writer: Any = None
                    ) -> dict[str, float]:
  """Evaluates `variables` on the validation split of `config.data` (results in
  `workdir/eval/`). The label map stored with the checkpoint (`meta`) decides how labels map to
  category ids; without one, the validation JSON's own mapping is used."""
  import jax  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  label_map = _label_map_from_meta(meta or {})
  dataset = pipeline.load_dataset_records(config, 'val', label_map=label_map)
  batch_size = max(1, int(config.input.batch_size) // jax.process_count())
  predictor = predictor_lib.Predictor(config, variables, batch_size=batch_size)
  # The records themselves: the Predictor resizes and normalises each image (an EvalDataset
  # would preprocess it a second time, for nothing).
  return evaluate(predictor, dataset.records, dataset.json_path, dataset.label_map,
                  os.path.join(workdir, 'eval'), num_pictures=config.run.num_eval_pictures,
                  step=step, summary_writer=summary_writer, batch_size=batch_size)


def evaluate_checkpoint(config, workdir: str, checkpoint_dir: str) -> dict[str, float]:
  """`maskrcnn-jax evaluate`: restores the variables of `checkpoint_dir` (a training workdir or
  a converted checkpoint) and evaluates them on the validation split."""
  import jax  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import structures  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  structures.validate_config(config)
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  variables, meta = ckpt.restore_variables(checkpoint_dir, abstract, config)
  step = ckpt.latest_step(checkpoint_dir)
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
  try:
    return evaluate_config(config, variables, step, workdir=workdir, meta=meta,
                           summary_writer=writer)
  finally:
    writer.close()
