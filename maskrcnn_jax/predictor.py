"""Inference on raw images: resize, normalise, pad to a size bucket, detect, map back, paste masks.

    predictor = Predictor(config, variables)
    result = predictor(image_uint8_hwc)  # dict of numpy arrays in original-image pixels

The model compiles once per size bucket (`config.input.buckets`); mask pasting compiles once per
canvas size (the original size rounded up to `canvas_multiple`).
"""

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import structures
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import masks as mask_ops

# Pasting canvases are rounded up to this many pixels per side, so that images of many original
# sizes share a few compiled paste programs.
CANVAS_MULTIPLE = 128


class Predictor:
  """Runs a MaskRCNN on uint8 `[H, W, 3]` RGB images (one, or a list).

  Preprocessing is torchvision's `GeneralizedRCNNTransform`: normalise with the config's mean/std
  (in `config.input.channel_order`), resize bilinearly so the short side is `input.min_size` and
  the long side at most `input.max_size`, zero-pad at the bottom/right, here to the smallest
  configured bucket holding the image. Images of one bucket run together in batches of
  `batch_size` (a short last batch is padded with blank images, so shapes never change).

  Each result is a dict of numpy arrays with only the valid detections, N of them, sorted by
  score: `boxes` float32 `[N, 4]` xyxy in original-image pixels (x and y scaled separately by
  original / resized size, as torchvision), `scores` float32 `[N]`, `labels` int32 `[N]` (1..K),
  and when `config.model.mask_on`, `masks` bool `[N, H, W]` at the original resolution
  (probability > `config.model.test.mask_thresh`, torchvision's reference evaluation).

  `trace_count` counts traces of the model (one per bucket used).
  """

  def __init__(self, config: ml_collections.ConfigDict, variables: Any, batch_size: int = 1,
               canvas_multiple: int = CANVAS_MULTIPLE):
    structures.validate_config(config)
    self.config = ml_collections.FrozenConfigDict(config)
    self.model = mask_rcnn.build_model(self.config)
    self.variables = jax.device_put(variables)
    self.batch_size = int(batch_size)
    self.canvas_multiple = int(canvas_multiple)
    self.trace_count = 0
    self._detect = jax.jit(self._detect_fn)
    self._paste = jax.jit(self._paste_fn, static_argnums=(2, 3))

  # ------------------------------------------------------------------ traced functions
  def _detect_fn(self, variables, images, image_size):
    self.trace_count += 1  # runs only while tracing
    return self.model.apply(variables, images, image_size)

  def _paste_fn(self, masks, boxes, height: int, width: int):
    probs = mask_ops.paste_masks(masks, boxes, height, width)
    return probs > self.config.model.test.mask_thresh

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
    h, w = image.shape[:2]
    x = transforms.normalize(image, i.pixel_mean, i.pixel_std, i.channel_order)
    new_h, new_w = transforms.resize_shape(h, w, i.min_size, i.max_size)
    x = transforms.resize_image(x, new_h, new_w)
    bucket = structures.choose_bucket(new_h, new_w, i.buckets)
    return transforms.pad_to(x, *bucket), (new_h, new_w), bucket

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
        # Masks stay on device for pasting; the small per-detection arrays come to the host.
        masks = det.pop('masks', None)
        det = jax.device_get(det)
        if masks is not None:
          det['masks'] = masks
        for slot, idx in enumerate(chunk):
          results[idx] = self._finish(det, slot, images[idx].shape[:2], prepared[idx][1])
    return results[0] if single else results

  def _finish(self, det, slot: int, original_hw, resized_hw) -> dict[str, np.ndarray]:
    valid = det['valid'][slot]
    # torchvision transform.resize_boxes: per-axis float32 ratios original / resized.
    ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
    ratio = np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    boxes = (det['boxes'][slot] * ratio).astype(np.float32)
    out = {'boxes': boxes[valid], 'scores': det['scores'][slot][valid],
           'labels': det['labels'][slot][valid].astype(np.int32)}
    if 'masks' in det:
      h, w = (int(s) for s in original_hw)
      m = self.canvas_multiple
      canvas = (math.ceil(h / m) * m, math.ceil(w / m) * m)
      masks = self._paste(det['masks'][slot], jnp.asarray(boxes), *canvas)
      out['masks'] = np.asarray(masks)[valid, :h, :w]
    return out


def _class_names(meta: dict, num_classes: int) -> Optional[list[str]]:
  """Names indexed by label (0 = background) from checkpoint metadata, which stores K names for
  labels 1..K (older converted checkpoints stored K + 1 with the background first)."""
  names = list(meta.get('class_names') or [])
  if len(names) == num_classes - 1:
    names = ['background'] + names
  return names if len(names) == num_classes else None


def predict_to_file(config: ml_collections.ConfigDict, image_path: str, out_path: str,
                    checkpoint: str, score_thresh: float = 0.5) -> dict[str, np.ndarray]:
  """`maskrcnn-jax predict`: detects on one image file and draws the result into `out_path`.

  `checkpoint` is a training workdir or a converted checkpoint directory; without one the
  weights are random and the command says so. Returns the
  prediction (all valid detections; only those scoring >= `score_thresh` are drawn).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.evaluation import visualize  # pylint: disable=g-import-not-at-top

  from maskrcnn_jax.data import coco  # pylint: disable=g-import-not-at-top

  structures.validate_config(config)
  if checkpoint:
    abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
    variables, meta = ckpt.restore_variables(checkpoint, abstract, config)
  else:
    print(f'WARNING: no --checkpoint given: the weights are RANDOM (initialised with seed '
          f'{config.seed}), so the detections drawn into {out_path} mean nothing.', flush=True)
    variables = mask_rcnn.init_variables(config, jax.random.key(config.seed))
    meta = {}
  image = coco.load_image(image_path)  # any PIL mode -> RGB uint8; clear error naming the file
  prediction = Predictor(config, variables)(image)
  names = _class_names(meta or {}, int(config.model.num_classes))
  picture = visualize.draw_predictions(image, prediction, names, score_thresh=score_thresh)
  Image.fromarray(picture).save(out_path)
  return prediction
