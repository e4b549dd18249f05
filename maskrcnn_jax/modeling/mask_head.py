"""The mask head: a RoI head unit with torchvision's layers (`MaskRCNNHeads`,
`MaskRCNNPredictor`), its targets and loss (torchvision `maskrcnn_loss`), inference (the
detected class's mask probabilities) and the paste into original-image pixels.

Parameters: `roi_heads/mask_head/mask_fcn{i}` and
`roi_heads/mask_predictor/{conv5_mask,mask_fcn_logits}`.
"""

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maskrcnn_jax import backends
from maskrcnn_jax.backends import xla
from maskrcnn_jax.modeling import heads
from maskrcnn_jax.modeling import resnet
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.ops import sampling

# torchvision MaskRCNNHeads / MaskRCNNPredictor: kaiming_normal_(mode='fan_out', relu), zero bias.
mask_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Pasting canvases are rounded up to this many pixels per side, so that images of many original
# sizes share a few compiled paste programs.
CANVAS_MULTIPLE = 128


class MaskRCNNPredictor(nn.Module):
  """2x2 stride-2 transposed conv + ReLU (`conv5_mask`), then a 1x1 conv to per-class logits
  (`mask_fcn_logits`): `[N, S, S, C] -> float32 [N, 2S, 2S, num_classes]`, or, given int32
  `labels [N]`, each RoI's own class channel `[N, 2S, 2S]` (torchvision indexes
  `mask_logits[arange(N), labels]`).

  `conv5_mask`'s kernel `[2, 2, out, in]` is torchvision's `ConvTranspose2d.weight
  [in, out, 2, 2]` transposed by (2, 3, 1, 0).
  """
  conv_dim: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None):
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=mask_init)
    x = nn.ConvTranspose(self.conv_dim, (2, 2), strides=(2, 2), transpose_kernel=True,
                         name='conv5_mask', **kw)(x)
    x = nn.relu(x)
    logits = nn.Conv(self.num_classes, (1, 1), name='mask_fcn_logits', **kw)(x)
    logits = logits.astype(jnp.float32)
    if labels is None:
      return logits
    return loss_ops.select_class(logits, labels, axis=-1)


class MaskHead(heads.RoIHead):
  """The mask head unit (contract in `heads.py`).

  Attributes:
    head: `model.mask_head` (`conv_dim`, `num_convs`, `resolution`).
    pooler_size: RoI feature size (`model.roi.mask_output_size`, 14).
    num_classes: K + 1.
    aligned: targets sample the gt masks with RoIAlign's alignment (`model.roi.aligned`).
    mask_thresh: threshold on a pasted pixel's probability (`model.test.mask_thresh`).
    mask_paste: `model.test.mask_paste`: 'torchvision' (`ops.masks.paste_masks`, foreground
      where prob > mask_thresh) or 'detectron2' (`paste_masks_detectron2`, prob >= mask_thresh).
    loss_chunk: `execution.mask_loss_chunk`: on XLA:CPU the loss runs on chunks of this many
      foreground slots per image, only those holding a real RoI (0: all slots at once).
    backend: the hooks of `execution.backend`.
  """
  head: ml_collections.ConfigDict
  pooler_size: int
  num_classes: int
  aligned: bool = False
  mask_thresh: float = 0.5
  loss_chunk: int = 0
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN
  mask_paste: str = 'torchvision'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  backend: backends.Backend) -> 'MaskHead':
    m = config.model
    return cls(m.mask_head, int(m.roi.mask_output_size), int(m.num_classes),
               bool(m.roi.aligned), float(m.test.mask_thresh),
               int(config.execution.mask_loss_chunk), resnet.dtype_of(config), backend,
               str(m.test.get('mask_paste', 'torchvision')))

  def setup(self):
    h = self.head
    # The convs may run inside the backend's rows loop: its loop-body conv.
    self.mask_head = heads.ConvStack(int(h.conv_dim), int(h.num_convs), 'mask_fcn', self.dtype,
                                     self.backend.loop_conv_general_dilated)
    predictor = self.backend.mask_predictor or MaskRCNNPredictor
    self.mask_predictor = predictor(int(h.conv_dim), int(self.num_classes), self.dtype)

  def __call__(self, x, labels):
    """`x [N, 14, 14, C]`, int32 `labels [N]` -> float32 logits of each label `[N, 28, 28]`."""
    return self.mask_predictor(self.mask_head(x), labels)

  def init_params(self, channels: int, dtype: Any) -> None:
    s = self.pooler_size
    self.mask_predictor(self.mask_head(jnp.zeros((1, s, s, channels), dtype)))

  def targets(self, sample: heads.RoISample, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """float32 `[B, F, M, M]`: each foreground RoI's matched gt mask on its M x M grid (the
    pre-cropped `gt_masks` RoIAligned; 0 for other slots). `sample` is its foreground slots."""
    fn = functools.partial(sampling.mask_targets, resolution=int(self.head.resolution),
                           aligned=bool(self.aligned), backend=self.backend.name)
    return jax.vmap(fn)(batch['gt_masks'], batch['gt_boxes'], sample.rois, sample.matched_gt,
                        roi_valid=sample.foreground)

  def loss(self, pool: heads.Pool, sample: heads.RoISample,
           batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """`loss_mask`: per-pixel BCE of each foreground RoI's gt-class logits against its target,
    averaged over the batch's foreground pixels (torchvision `maskrcnn_loss`; 0, with zero
    gradient, when there is no foreground)."""
    fg = sample.foreground_slots()
    targets = self.targets(fg, batch)
    x = pool(fg.rois, self.pooler_size)

    def bce_sum(calls, xs, aux):
      n = xs.shape[0] * xs.shape[1]
      h = calls['mask_head'](xs.reshape((n,) + xs.shape[2:]))
      logits = calls['mask_predictor'](h, aux['labels'].reshape(n))
      return loss_ops.sigmoid_bce(logits, aux['targets'].reshape(logits.shape),
                                  aux['foreground'].reshape(n))

    aux = {'labels': fg.labels, 'targets': targets, 'foreground': fg.foreground}
    modules = {'mask_head': self.mask_head, 'mask_predictor': self.mask_predictor}
    num_active = jnp.sum(fg.foreground, axis=1, dtype=jnp.int32)
    total = self.backend.module_rows_loss(bce_sum, modules, x, aux, num_active, self.loss_chunk)
    pixels = jnp.sum(fg.foreground).astype(jnp.float32) * targets.shape[-2] * targets.shape[-1]
    return {'loss_mask': jnp.where(pixels > 0, total / jnp.maximum(pixels, 1.0), 0.0)}

  def inference(self, pool: heads.Pool, detections: Mapping[str, jnp.ndarray]
                ) -> dict[str, jnp.ndarray]:
    """`masks`: float32 `[B, D, 28, 28]` probabilities of each detection's class in its box
    (torchvision `maskrcnn_inference`); 0 in invalid slots."""
    boxes = detections['boxes']
    b, d = boxes.shape[:2]
    x = pool(boxes, self.pooler_size)
    logits = self(x.reshape((b * d,) + x.shape[2:]), detections['labels'].reshape(-1))
    probs = jax.nn.sigmoid(logits.reshape((b, d) + logits.shape[1:]))
    return {'masks': jnp.where(detections['valid'][:, :, None, None], probs, 0.0)}

  def postprocess(self, detections: Mapping[str, Any], slot: int, boxes: np.ndarray,
                  original_hw: Sequence[int], resized_hw: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    """`masks`: bool `[N, H, W]` at the original resolution, pasted on device the
    `mask_paste` way (torchvision: probability > `mask_thresh`, as its reference evaluation;
    detectron2: >= `mask_thresh`, as `detector_postprocess`)."""
    h, w = (int(s) for s in original_hw)
    m = CANVAS_MULTIPLE
    canvas = (math.ceil(h / m) * m, math.ceil(w / m) * m)
    masks = _paste(detections['masks'][slot], jnp.asarray(boxes), *canvas,
                   float(self.mask_thresh), str(self.mask_paste))
    valid = np.asarray(detections['valid'][slot])
    return {'masks': np.asarray(masks)[valid, :h, :w]}


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _paste(masks, boxes, height: int, width: int, thresh: float, mode: str):
  """One compile per canvas size and paste mode: bool `[D, height, width]`."""
  return mask_ops.paste_and_threshold(masks, boxes, height, width, thresh, mode)
