"""The keypoint head (Mask R-CNN paper section 5): a RoI head unit with torchvision's layers
(`KeypointRCNNHeads`, `KeypointRCNNPredictor`), heatmap targets and loss (`keypointrcnn_loss`),
and keypoints decoded from the heatmaps (`heatmaps_to_keypoints`), with per-class keypoint sets.

Per-class sets: label c has `num_keypoints[c]` keypoints (0 for background and for classes
without keypoints). The predictor has one heatmap channel per keypoint of every set, the sets
side by side (COCO person: 17 channels); a RoI of class c reads only its own set's channels, so
targets, loss and inference never touch another class's channels. Outputs are padded to
K = max(num_keypoints) with a per-detection mask (`keypoint_valid`).

Parameters: `roi_heads/keypoint_head/conv_fcn{1..8}` (torchvision `keypoint_head.{0,2,..,14}`)
and `roi_heads/keypoint_predictor/kps_score_lowres` (its ConvTranspose2d).
"""

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
from maskrcnn_jax.ops import keypoints as kp_ops

# torchvision KeypointRCNNHeads / KeypointRCNNPredictor: kaiming_normal_(fan_out, relu), bias 0.
keypoint_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
NORMALIZERS = ('visible', 'fixed')


def channel_table(num_keypoints: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """`(channel int32 [C, K], valid bool [C, K])`: keypoint k of label c is heatmap channel
  `channel[c, k]` when `valid[c, k]` (sets laid side by side in label order)."""
  counts = [int(n) for n in num_keypoints]
  k_max = max(counts + [1])
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  ks = np.arange(k_max, dtype=np.int32)
  valid = ks[None, :] < np.asarray(counts)[:, None]
  channel = np.where(valid, starts[:, None] + ks[None, :], 0).astype(np.int32)
  return channel, valid


class ConvTranspose4x4(nn.Module):
  """torch `ConvTranspose2d(in, features, 4, stride=2, padding=1)` with `nn.ConvTranspose`'s
  parameters (`kernel [4, 4, features, in]`, `bias`), computed by the backend's hook."""
  features: int
  dtype: Any = jnp.float32
  conv_transpose: Any = xla.conv_transpose_4x4_stride2

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', keypoint_init, (4, 4, self.features, x.shape[-1]),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return self.conv_transpose(x.astype(self.dtype), kernel.astype(self.dtype),
                               bias.astype(self.dtype))


class KeypointRCNNPredictor(nn.Module):
  """4x4 stride-2 transposed conv (`kps_score_lowres`, torch padding 1) to `num_channels`
  heatmaps, then 2x bilinear upsampling (align_corners=False): `[N, S, S, C] -> float32
  [N, 4S, 4S, num_channels]`. The kernel `[4, 4, out, in]` is torchvision's ConvTranspose2d
  weight `[in, out, 4, 4]` transposed by (2, 3, 1, 0)."""
  num_channels: int
  dtype: Any = jnp.float32
  conv_transpose: Any = xla.conv_transpose_4x4_stride2

  @nn.compact
  def __call__(self, x):
    x = ConvTranspose4x4(self.num_channels, self.dtype, self.conv_transpose,
                         name='kps_score_lowres')(x)
    return kp_ops.upsample2x_bilinear(x.astype(jnp.float32))


class KeypointHead(heads.RoIHead):
  """The keypoint head unit (contract in `heads.py`).

  Attributes:
    head: `model.keypoint_head` (`conv_dim`, `num_convs`, `resolution` (56), `num_keypoints`
      per label, `loss_normalizer`).
    pooler_size: RoI feature size (`model.roi.keypoint_output_size`, 14).
    max_box_size: the longest padded-input side (bounds the decode windows).
    backend: the hooks of `execution.backend` (its convs).
    score_mode: `model.test.keypoint_score`, what `keypoint_scores` holds: 'logit'
      (torchvision) or 'detectron2' (its softmax-normalised score).
  """
  head: ml_collections.ConfigDict
  pooler_size: int
  max_box_size: int
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN
  score_mode: str = 'logit'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  backend: backends.Backend) -> 'KeypointHead':
    m = config.model
    max_side = max(max(int(s) for s in b) for b in config.input.buckets)
    return cls(m.keypoint_head, int(m.roi.keypoint_output_size), max_side,
               resnet.dtype_of(config), backend, str(m.test.get('keypoint_score', 'logit')))

  def setup(self):
    h = self.head
    self.keypoint_head = heads.ConvStack(int(h.conv_dim), int(h.num_convs), 'conv_fcn',
                                         self.dtype, self.backend.conv_general_dilated)
    self.keypoint_predictor = KeypointRCNNPredictor(
        int(sum(h.num_keypoints)), self.dtype, self.backend.conv_transpose_4x4_stride2)

  def _tables(self):
    channel, valid = channel_table(self.head.num_keypoints)
    return jnp.asarray(channel), jnp.asarray(valid)

  def __call__(self, x, labels):
    """`x [N, 14, 14, C]`, int32 `labels [N]` -> float32 heatmap logits `[N, K, 56, 56]` of
    each RoI's own keypoint set (channels past its set's size are meaningless), and bool
    `[N, K]` marking the set."""
    channel, valid = self._tables()
    labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, channel.shape[0] - 1)
    maps = self.keypoint_predictor(self.keypoint_head(x))  # [N, S, S, T]
    maps = jnp.take_along_axis(maps, channel[labels][:, None, None, :], axis=-1)
    return jnp.moveaxis(maps, -1, 1), valid[labels]

  def init_params(self, channels: int, dtype: Any) -> None:
    s = self.pooler_size
    self.keypoint_predictor(self.keypoint_head(jnp.zeros((1, s, s, channels), dtype)))

  def loss(self, pool: heads.Pool, sample: heads.RoISample,
           batch: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """`loss_keypoint`: the cross-entropy over the S*S heatmap positions of every valid
    (foreground RoI, keypoint of its class's set) pair (torchvision `keypointrcnn_loss`), summed
    and divided by the batch's valid count (`loss_normalizer='visible'`, torchvision) or by
    `B * K * foreground slots` (`'fixed'`, detectron2's default); exactly 0 with zero gradient
    when no pair is valid. Also logs `num_keypoint_targets` (valid pairs per image)."""
    fg = sample.foreground_slots()
    b, f = fg.labels.shape
    s = int(self.head.resolution)
    x = pool(fg.rois, self.pooler_size)
    logits, in_set = self(x.reshape((b * f,) + x.shape[2:]), fg.labels.reshape(-1))
    gt = jnp.take_along_axis(batch['gt_keypoints'], fg.matched_gt[:, :, None, None], axis=1)
    target, valid = jax.vmap(kp_ops.keypoints_to_heatmap, in_axes=(0, 0, None))(
        gt, fg.rois, s)
    k = target.shape[-1]
    valid = valid & fg.foreground[:, :, None] & in_set.reshape(b, f, k)
    total, count = kp_ops.heatmap_ce_sum(logits.reshape(b, f, k, s * s), target, valid)
    if self.head.loss_normalizer == 'fixed':
      # detectron2: images x keypoints x (batch_size_per_image x positive_fraction) RoIs.
      den = jnp.float32(b * k * f)
    else:
      den = jnp.maximum(count, 1.0)
    return {'loss_keypoint': jnp.where(count > 0, total / den, 0.0),
            'num_keypoint_targets': count / b}

  def inference(self, pool: heads.Pool, detections: Mapping[str, jnp.ndarray]
                ) -> dict[str, jnp.ndarray]:
    """`keypoints` float32 `[B, D, K, 3]` (x, y, 1) in the padded-input frame,
    `keypoint_scores` float32 `[B, D, K]` and `keypoint_valid` bool `[B, D, K]` (the detected
    class's set, valid detections only). The score is the resized heatmap's logit at the
    maximum (`score_mode='logit'`, torchvision) or, with 'detectron2', that logit's exp divided
    by the sum of exp over the S x S heatmap (detectron2 `heatmaps_to_keypoints`, which
    normalises by the pooled map so that scores of large and small boxes compare)."""
    boxes = detections['boxes']
    b, d = boxes.shape[:2]
    x = pool(boxes, self.pooler_size)
    maps, in_set = self(x.reshape((b * d,) + x.shape[2:]), detections['labels'].reshape(-1))
    kps, scores = kp_ops.heatmaps_to_keypoints(maps, boxes.reshape(b * d, 4), self.max_box_size)
    if self.score_mode == 'detectron2':
      scores = jnp.exp(scores - jax.nn.logsumexp(maps, axis=(2, 3)))
    k = kps.shape[1]
    valid = in_set.reshape(b, d, k) & detections['valid'][:, :, None]
    return {'keypoints': jnp.where(valid[..., None], kps.reshape(b, d, k, 3), 0.0),
            'keypoint_scores': jnp.where(valid, scores.reshape(b, d, k), 0.0),
            'keypoint_valid': valid}

  def postprocess(self, detections: Mapping[str, Any], slot: int, boxes: np.ndarray,
                  original_hw: Sequence[int], resized_hw: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    """Keypoints in original-image pixels (torchvision `resize_keypoints`: per-axis float32
    ratios original / resized) for the valid detections."""
    del boxes
    valid = np.asarray(detections['valid'][slot])
    kps = np.array(detections['keypoints'][slot], np.float32)
    ratio_h = np.float32(original_hw[0]) / np.float32(resized_hw[0])
    ratio_w = np.float32(original_hw[1]) / np.float32(resized_hw[1])
    kps[..., 0] *= ratio_w
    kps[..., 1] *= ratio_h
    return {'keypoints': kps[valid],
            'keypoint_scores': np.asarray(detections['keypoint_scores'][slot])[valid],
            'keypoint_valid': np.asarray(detections['keypoint_valid'][slot])[valid]}
