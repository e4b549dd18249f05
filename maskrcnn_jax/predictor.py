"""Inference on raw images: resize, normalise, pad to a size bucket, detect, map back, paste masks.

    predictor = Predictor(config, variables)
    result = predictor(image_uint8_hwc)  # dict of numpy arrays in original-image pixels

The model compiles once per size bucket (`config.input.buckets`); each RoI head maps its outputs
to original-image pixels (`postprocess`; the mask paste compiles once per canvas size).
"""

import os
from typing import Any, Optional, Sequence, Union

import jax
import ml_collections
import numpy as np

from maskrcnn_jax import structures
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import box_head
from maskrcnn_jax.modeling import mask_rcnn


class Predictor:
  """Runs a MaskRCNN on uint8 `[H, W, 3]` RGB images (one, or a list).

  Preprocessing is the input pipeline's (`data.transforms.prepare_image`, torchvision's
  `GeneralizedRCNNTransform`): normalise, resize, zero-pad to the smallest configured bucket
  holding the image. Images of one bucket run together in batches of `batch_size` (a short last
  batch is padded with blank images, so shapes never change).

  Each result is a dict of numpy arrays with only the valid detections, N of them, sorted by
  score: `boxes` float32 `[N, 4]` xyxy in original-image pixels (x and y scaled separately by
  original / resized size, as torchvision), `scores` float32 `[N]`, `labels` int32 `[N]` (1..K),
  and each RoI head's outputs, e.g. with `config.model.mask_on`, `masks` bool `[N, H, W]` at the
  original resolution (probability > `config.model.test.mask_thresh`, torchvision's reference
  evaluation).

  `trace_count` counts traces of the model (one per bucket used).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: Any, batch_size: int = 1,
               model: Optional[mask_rcnn.MaskRCNN] = None):
    structures.validate_config(config)
    self.config = ml_collections.FrozenConfigDict(config)
    self.model = model if model is not None else mask_rcnn.build_model(self.config)
    self.variables = jax.device_put(variables)
    self.batch_size = int(batch_size)
    self._box_head = mask_rcnn.box_head_of(self.model)
    self.trace_count = 0
    self._detect = jax.jit(self._detect_fn)

  # ------------------------------------------------------------------ traced functions
  def _detect_fn(self, variables, images, image_size):
    self.trace_count += 1  # runs only while tracing
    return self.model.apply(variables, images, image_size)

  # ------------------------------------------------------------------ host side
  def detect(self, images: np.ndarray, image_size: np.ndarray) -> dict[str, np.ndarray]:
    """Raw model detections (padded-input frame, all D slots) of a preprocessed batch
    `[batch_size, bh, bw, 3]` with content sizes `[batch_size, 2]`; shares the compile cache."""
    return jax.device_get(self._detect(self.variables, images, image_size))

  def preprocess(self, image: np.ndarray):
    """`(padded float32 [bh, bw, 3], (resized_h, resized_w), bucket (bh, bw))` of one image."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected an [H, W, 3] RGB image, got shape {image.shape}')
    i = self.config.input
    return transforms.prepare_image(image, i.min_size, i.max_size, i.pixel_mean, i.pixel_std,
                                    i.channel_order, i.buckets,
                                    resize=i.get('resize', 'torchvision'))

  def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
    single = isinstance(images, np.ndarray) and images.ndim == 3
    images = [images] if single else list(images)
    prepared = [self.preprocess(im) for im in images]
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for idx, (_, _, bucket) in enumerate(prepared):
      by_bucket.setdefault(bucket, []).append(idx)
    results: list[dict[str, np.ndarray]] = [None] * len(images)
    for bucket, indices in by_bucket.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        batch = np.zeros((self.batch_size,) + bucket + (3,), np.float32)
        sizes = np.tile(np.array(bucket, np.int32), (self.batch_size, 1))
        for slot, idx in enumerate(chunk):
          batch[slot] = prepared[idx][0]
          sizes[slot] = prepared[idx][1]
        det = self._detect(self.variables, batch, sizes)
        # The small per-detection arrays come to the host; the heads' outputs stay on device for
        # their postprocess (the mask paste runs there).
        det.update(jax.device_get({k: det[k] for k in ('boxes', 'scores', 'labels', 'valid')}))
        for slot, idx in enumerate(chunk):
          results[idx] = self._finish(det, slot, images[idx].shape[:2], prepared[idx][1])
    return results[0] if single else results

  def _finish(self, det, slot: int, original_hw, resized_hw) -> dict[str, np.ndarray]:
    boxes = box_head.boxes_to_original(det['boxes'][slot], original_hw, resized_hw)
    if self.config.model.test.get('drop_empty_boxes', False):
      boxes, valid = box_head.clip_and_drop_empty(boxes, det['valid'][slot], original_hw)
      det = {**det, 'valid': np.array(det['valid'], copy=True)}
      det['valid'][slot] = valid
    out = self._box_head.postprocess(det, slot, boxes, original_hw, resized_hw)
    for head in self.model.heads.values():
      out.update(head.postprocess(det, slot, boxes, original_hw, resized_hw))
    return out


def _class_names(meta: dict, num_classes: int) -> Optional[list[str]]:
  """Names indexed by label (0 = background) from checkpoint metadata, which stores K names for
  labels 1..K (older converted checkpoints stored K + 1 with the background first)."""
  names = list(meta.get('class_names') or [])
  if len(names) == num_classes - 1:
    names = ['background'] + names
  return names if len(names) == num_classes else None


def check_output_path(out_path: str) -> None:
  """Refuses, before any model is loaded, an `out_path` the picture could not be written to:
  its directory missing (raises FileNotFoundError; it is not created, so that a mistyped path
  fails instead of writing somewhere unexpected) or not writable (PermissionError), the path a
  directory (IsADirectoryError), or an extension PIL cannot write (ValueError). Each message
  names the path."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(os.path.abspath(out_path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'--out {out_path}: the directory {directory} does not exist; '
                            'create it first')
  if os.path.isdir(out_path):
    raise IsADirectoryError(f'--out {out_path} is a directory; name a picture file in it')
  if not os.access(directory, os.W_OK):
    raise PermissionError(f'--out {out_path}: the directory {directory} is not writable')
  extension = os.path.splitext(out_path)[1].lower()
  if extension not in Image.registered_extensions():
    raise ValueError(f'--out {out_path}: cannot write pictures with extension '
                     f'{extension or "(none)"}; use .png or .jpg')


def predict_to_file(config: ml_collections.ConfigDict, image_path: str, out_path: str,
                    checkpoint: str, score_thresh: float = 0.5) -> dict[str, np.ndarray]:
  """`maskrcnn-jax predict`: detects on one image file and draws the result into `out_path`.

  `checkpoint` is a training workdir or a converted checkpoint directory; without one the
  weights are random and the command says so. Returns the
  prediction (all valid detections; only those scoring >= `score_thresh` are drawn).
  What can fail cheaply (the output path, `check_output_path`; the image) is checked before the
  model is restored and compiled.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top

  from maskrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top

  structures.validate_config(config)
  check_output_path(out_path)
  image = coco.load_image(image_path)  # any PIL mode -> RGB uint8; clear error naming the file
  if checkpoint:
    abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
    variables, meta = ckpt.restore_variables(checkpoint, abstract, config)
  else:
    print(f'WARNING: no --checkpoint given: the weights are RANDOM (initialised with seed '
          f'{config.seed}), so the detections drawn into {out_path} mean nothing.', flush=True)
    variables = mask_rcnn.init_variables(config, jax.random.key(config.seed))
    meta = {}
  prediction = Predictor(config, variables)(image)
  names = _class_names(meta or {}, int(config.model.num_classes))
  # Stored per label 1..K like class_names (entry i is label i + 1); none without keypoints.
  skeletons = {i + 1: s for i, s in enumerate((meta or {}).get('keypoint_skeleton') or [])}
  picture = visualize.draw_predictions(image, prediction, names, score_thresh=score_thresh,
                                       keypoint_skeleton=skeletons)
  Image.fromarray(picture).save(out_path)
  return prediction
