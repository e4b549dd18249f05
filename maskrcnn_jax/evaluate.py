"""The evaluation runner: restore a checkpoint, build a Predictor, walk a split, score it.

`evaluate(predictor, records, gt, ...)` predicts every record and scores the results with
`evaluation.coco_eval`; `evaluate_config` does it for a config's validation split (the train
loop calls it), `evaluate_checkpoint` for a checkpoint directory (`maskrcnn-jax evaluate`).
With several processes each predicts its own slice of the split and process 0 scores them all
once (`evaluate`).
"""

import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import distributed
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import structures
from maskrcnn_jax.data import coco
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.evaluation import coco_eval
from maskrcnn_jax.evaluation import visualize
from maskrcnn_jax.modeling import mask_rcnn

logger = logging.getLogger(__name__)

RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.json'
PICTURES_DIR = 'pictures'
PICTURE_SCORE_THRESH = 0.5  # pictures show confident detections; metrics use all of them

Predictor = Callable[[list], Sequence[coco_eval.Prediction]]


def _as_pair(record: Any) -> tuple[int, np.ndarray]:
  """(image_id, uint8 image) from a pair, or from a record dict holding `image` or `file_name`."""
  if isinstance(record, Mapping):
    return int(record['image_id']), coco.record_image(record)
  image_id, image = record
  return int(image_id), np.asarray(image)


def _batches(records: Iterable[Any], batch_size: int):
  batch = []
  for record in records:
    batch.append(_as_pair(record))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def process_slice(records: Sequence[Any]) -> Sequence[Any]:
  """This process's contiguous slice of a split: process p of n takes [p*N//n, (p+1)*N//n).
  Contiguous slices, gathered in process order, put the results in single-process order."""
  n, p = jax.process_count(), jax.process_index()
  return records[p * len(records) // n:(p + 1) * len(records) // n]


def evaluate(predictor: Predictor, records: Iterable[Any], gt_json: coco_eval.GroundTruth,
             label_to_category_id: Mapping[int, int], out_dir: "str | os.PathLike", *,
             num_pictures: int = 4, step: Optional[int] = None, summary_writer: Any = None,
             batch_size: int = 1, iou_types: Optional[Sequence[str]] = None,
             tag_prefix: str = 'eval/',
             keypoint_oks_sigmas: Optional[Mapping[int, Sequence[float]]] = None,
             keypoint_offset: float = 0.0) -> dict[str, float]:
  """Predicts every record, computes COCO metrics and writes them out.

  On multi-process runs every process calls this at the same point with its own records (its
  `process_slice` of the split) and the same `out_dir` on a filesystem all hosts see: each
  writes its results to a file there, process 0 gathers them in process order, runs COCOeval
  once over every image and writes the files, pictures and summaries (of its own first
  images), and every process returns process 0's metrics, which equal a single-process run's.

  Args:
    predictor: any callable taking a list of uint8 [H, W, 3] images and returning one
      prediction dict per image (see `detections_to_coco_results`).
    records: iterable of (image_id, uint8 image [H, W, 3]) pairs, or of record dicts with
      `image_id` and either `image` (tfds records) or `file_name`/`height`/`width` (the records
      of `data.coco.load_coco`, whose images are then read from disk).
    gt_json: the ground truth (an instances JSON path, a COCO dict or a pycocotools COCO).
    label_to_category_id: contiguous label -> COCO category id, or a `data.coco.LabelMap`.
    out_dir: receives `results.json`, `metrics.json` and `pictures/<image_id>.png`.
    num_pictures: how many of the first images to draw with their predictions.
    step: the training step, for the summary writer and metrics.json.
    summary_writer: a tensorboardX SummaryWriter (or anything with add_scalar/add_image).
    batch_size: images per predictor call.
    iou_types: default 'bbox', plus 'segm' when the predictions carry masks and 'keypoints'
      when they carry keypoints.
    tag_prefix: prefix of the summary tags.
    keypoint_oks_sigmas: {category id: OKS sigmas} of the keypoint sets (coco_evaluate's;
      `keypoint_oks_sigmas_of(config, label_map)` reads them from a config).
    keypoint_offset: subtracted from predicted keypoints in the COCO results
      (`config.data.keypoint_offset`, what training added to the ground truth).

  Returns:
    The metrics of `coco_evaluate` over the predicted images.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  coco_gt = coco_eval.load_coco(gt_json)
  label_to_category_id = coco_eval.as_label_to_category_id(label_to_category_id)
  class_names = coco_eval.class_names_from_coco(coco_gt, label_to_category_id)
  skeletons = coco_eval.keypoint_skeletons_from_coco(coco_gt, label_to_category_id)
  results, image_ids, pictures = [], [], []
  has_masks = has_keypoints = True
  main = jax.process_index() == 0
  num_pictures = num_pictures if main else 0
  started = time.perf_counter()
  for batch in _batches(records, batch_size):
    predictions = predictor([image for _, image in batch])
    if len(predictions) != len(batch):
      raise ValueError(f'predictor returned {len(predictions)} predictions for {len(batch)} '
                       'images')
    for (image_id, image), prediction in zip(batch, predictions):
      image_ids.append(image_id)
      has_masks &= prediction.get('masks') is not None
      has_keypoints &= prediction.get('keypoints') is not None
      results.extend(coco_eval.detections_to_coco_results(
          image_id, prediction, label_to_category_id, keypoint_offset=keypoint_offset))
      if len(pictures) < num_pictures:
        pictures.append((image_id, visualize.draw_predictions(
            image, prediction, class_names, score_thresh=PICTURE_SCORE_THRESH,
            keypoint_skeleton=skeletons)))
  logger.info('process %d predicted %d images in %.2f s', jax.process_index(), len(image_ids),
              time.perf_counter() - started)
  if jax.process_count() > 1:
    gathered = _gather_results(out_dir, {'results': results, 'image_ids': image_ids,
                                         'has_masks': bool(has_masks),
                                         'has_keypoints': bool(has_keypoints)})
    if not main:
      return distributed.broadcast_json(distributed.next_tag('eval_metrics'))
    results = [r for part in gathered for r in part['results']]
    image_ids = [i for part in gathered for i in part['image_ids']]
    if len(set(image_ids)) < len(image_ids):
      raise ValueError('evaluate: several processes predicted the same images; on a '
                       'multi-process run pass each process its process_slice(records)')
    has_masks = all(part['has_masks'] for part in gathered)
    has_keypoints = all(part['has_keypoints'] for part in gathered)
  if iou_types is None:
    # Keypoints need predicted keypoints and ground-truth categories that declare a set.
    keypoints = has_keypoints and image_ids and coco_eval.keypoint_categories(coco_gt)
    iou_types = ('bbox',) + (('segm',) if has_masks else ()) + (('keypoints',) if keypoints else ())
  logger.info('Evaluating %d detections on %d images (%s)', len(results), len(image_ids),
              ', '.join(iou_types))

  with open(os.path.join(out_dir, RESULTS_FILE), 'w') as f:
    json.dump(results, f)
  metrics = coco_eval.coco_evaluate(coco_gt, results, iou_types=iou_types, image_ids=image_ids,
                                    keypoint_oks_sigmas=keypoint_oks_sigmas)
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
  if jax.process_count() > 1:
    distributed.broadcast_json(distributed.next_tag('eval_metrics'), metrics)
  return metrics


def _gather_results(out_dir: str, part: dict) -> Optional[list]:
  """Every process's `part` (its COCO results and image ids), in process order, on process 0
  (None elsewhere). Through files in `out_dir`: results of a large split are far beyond what
  the coordination service's messages should carry, and the workdir is shared anyway."""
  p, n = jax.process_index(), jax.process_count()
  name = f'results.process-{p}-of-{n}.json'
  path = os.path.join(out_dir, name)
  with open(path + '.tmp', 'w') as f:
    json.dump(part, f)
  os.replace(path + '.tmp', path)  # a reader never sees half a file
  written = distributed.all_gather_json(distributed.next_tag('eval_parts'), name)
  if p != 0:
    return None
  parts = []
  for q, other in enumerate(written):
    other_path = os.path.join(out_dir, other)
    if not os.path.exists(other_path):
      raise distributed.DistributedError(
          f'evaluation: process {q} wrote its results to {other_path}, which process 0 cannot '
          'see; the workdir must be a filesystem every host sees, at the same path '
          '(docs/pods.md)')
    with open(other_path) as f:
      parts.append(json.load(f))
    os.remove(other_path)  # results.json holds them all
  return parts


# ============================================================================ from a config
def _label_map_from_meta(meta: Mapping[str, Any]):
  """The stored label map of a checkpoint as a `data.coco.LabelMap`, or None."""
  # JSON keys are str.
  l2c = coco_eval.as_label_to_category_id(meta.get('label_to_category_id') or {})
  if not l2c:
    return None
  labels = sorted(l2c)
  if labels != list(range(1, len(labels) + 1)):
    raise ValueError(f'checkpoint label map has non-contiguous labels {labels}')
  cats = tuple(l2c[k] for k in labels)
  names = list(meta.get('class_names') or [str(c) for c in cats])
  return coco.LabelMap(cats, tuple(names[:len(cats)]))


def keypoint_oks_sigmas_of(config, label_map: coco.LabelMap) -> dict[int, tuple[float, ...]]:
  """{category id: OKS sigmas} of the label map's keypoint sets from `data.keypoint_oks_sigmas`
  (per label, background first; () takes COCO's person sigmas, only for 17 keypoints). Raises
  ConfigError naming the field."""
  counts = label_map.num_keypoints
  counts += (0,) * (int(config.model.num_classes) - len(counts))
  per_label = pipeline.keypoint_oks_sigmas(config, counts)
  out = {}
  for label, category in label_map.label_to_category_id().items():
    if counts[label]:
      out[category] = per_label[label] or coco_eval.COCO_PERSON_KEYPOINT_OKS_SIGMAS
  return out


def evaluate_config(config, variables, step: Optional[int], *, workdir: str,
                    meta: Optional[Mapping[str, Any]] = None, summary_writer: Any = None,
                    model: Optional[mask_rcnn.MaskRCNN] = None) -> dict[str, float]:
  """Evaluates `variables` on the validation split of `config.data` (results in
  `workdir/eval/`). The label map stored with the checkpoint (`meta`) decides how labels map to
  category ids; without one, the validation JSON's own mapping is used. `model` defaults to
  `build_model(config)` (pass it when the model has heads of your own)."""
  label_map = _label_map_from_meta(meta or {})
  dataset = pipeline.load_dataset_records(config, 'val', label_map=label_map)
  records = process_slice(dataset.records)  # this process's share; process 0 scores them all
  batch_size = max(1, int(config.input.batch_size) // jax.process_count())
  predictor = predictor_lib.Predictor(config, variables, batch_size=batch_size, model=model)
  # The records themselves: the Predictor reads, resizes and normalises each image.
  # The normalised ground truth (unique ids, iscrowd and area filled), not the raw file.
  sigmas = (keypoint_oks_sigmas_of(config, dataset.label_map)
            if pipeline.keypoints_on(config) else None)
  return evaluate(predictor, records, dataset.gt_dict(), dataset.label_map,
                  os.path.join(workdir, 'eval'), num_pictures=config.run.num_eval_pictures,
                  step=step, summary_writer=summary_writer, batch_size=batch_size,
                  keypoint_oks_sigmas=sigmas,
                  keypoint_offset=float(config.data.get('keypoint_offset', 0.0)))


def evaluate_checkpoint(config, workdir: str, checkpoint_dir: str) -> dict[str, float]:
  """`maskrcnn-jax evaluate`: restores the variables of `checkpoint_dir` (a training workdir or
  a converted checkpoint) and evaluates them on the validation split."""
  structures.validate_config(config)
  structures.validate_data(config, ('val',))
  pipeline.check_built(config, ('val',))
  distributed.settings(config)
  with distributed.processes(config):
    # Each process reads a whole copy onto its first device (restore_variables).
    abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
    variables, meta = ckpt.restore_variables(checkpoint_dir, abstract, config)
    step = ckpt.latest_step(checkpoint_dir)
    writer = (SummaryWriter(os.path.join(workdir, 'tensorboard'))
              if jax.process_index() == 0 else None)
    try:
      return evaluate_config(config, variables, step, workdir=workdir, meta=meta,
                             summary_writer=writer)
    finally:
      if writer is not None:
        writer.close()
