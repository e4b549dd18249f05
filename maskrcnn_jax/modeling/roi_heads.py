"""Box and mask heads on RoI features (torchvision `TwoMLPHead`, `FastRCNNPredictor`,
`MaskRCNNHeads`, `MaskRCNNPredictor`) and the multi-level RoI feature extraction feeding them.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.modeling import resnet
from maskrcnn_jax.ops import conv
from maskrcnn_jax.ops import losses as loss_ops
from maskrcnn_jax.ops import roi_align as roi_ops


# torch nn.Linear default (kaiming_uniform_(a=sqrt(5))): U(+-1/sqrt(fan_in)).
fc_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# detectron2 FastRCNNOutputLayers: normal(0.01) for class scores, normal(0.001) for deltas.
cls_score_init = nn.initializers.normal(stddev=0.01)
bbox_pred_init = nn.initializers.normal(stddev=0.001)
# torchvision MaskRCNNHeads / MaskRCNNPredictor: kaiming_normal_(mode='fan_out', relu), zero bias.
mask_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def roi_features(config: ml_collections.ConfigDict, features: Sequence[jnp.ndarray],
                 boxes: jnp.ndarray, output_size: int) -> jnp.ndarray:
  """Pools RoIs from the FPN levels `config.model.roi.min_level..max_level` for a batch.

  Args:
    features: `[P2, ..., P6]` (levels `fpn.min_level..`), each `[B, H_l, W_l, C]`.
    boxes: float32 `[B, N, 4]` xyxy in padded-input pixels.
    output_size: 7 for the box head, 14 for the mask head.

  Returns:
    `[B, N, output_size, output_size, C]` in the features' dtype; `config.model.roi_op` chooses
    RoIAlign or RoIPool; each box reads the level of torchvision's `LevelMapper`.
  """
  m = config.model
  first = m.roi.min_level - m.fpn.min_level
  feats = list(features[first:first + m.roi.max_level - m.roi.min_level + 1])

  def one(f, b):
    return roi_ops.multilevel_roi_align(
        f, b, output_size=output_size, sampling_ratio=int(m.roi.sampling_ratio),
        aligned=bool(m.roi.aligned), min_level=int(m.roi.min_level),
        canonical_level=int(m.roi.canonical_level), canonical_scale=float(m.roi.canonical_scale),
        op=m.roi_op)

  out = jax.vmap(one)(feats, boxes)
  return out.astype(features[0].dtype)


class TwoMLPHead(nn.Module):
  """Flatten `[N, S, S, C]` in torchvision's (C, S, S) order, then `num_fc` fc+ReLU layers
  named fc6, fc7, ... -> `[N, fc_dim]`. fc6's kernel is torchvision's `fc6.weight.T`."""
  fc_dim: int = 1024
  num_fc: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for i in range(self.num_fc):
      x = nn.relu(nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=fc_init, name=f'fc{6 + i}')(x))
    return x


class FastRCNNPredictor(nn.Module):
  """`cls_score` (K+1 logits incl. background 0) and class-specific `bbox_pred` (4(K+1))."""
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    scores = nn.Dense(self.num_classes, kernel_init=cls_score_init, name='cls_score', **kw)(x)
    deltas = nn.Dense(4 * self.num_classes, kernel_init=bbox_pred_init, name='bbox_pred', **kw)(x)
    return scores.astype(jnp.float32), deltas.astype(jnp.float32)


class MaskRCNNHeads(nn.Module):
  """`num_convs` 3x3 conv+ReLU layers named mask_fcn1.. (torchvision `MaskRCNNHeads`)."""
  conv_dim: int = 256
  num_convs: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          param_dtype=jnp.float32, kernel_init=mask_init,
                          name=f'mask_fcn{i + 1}',
                          # Runs inside active_rows_loss's loop: matmul kernel gradients.
                          conv_general_dilated=functools.partial(
                              conv.conv_general_dilated, tap_matmul_kernel_grad=True))(x))
    return x


class BlockConvTranspose(nn.Module):
  """Transposed conv whose stride equals its kernel size (torch `ConvTranspose2d(k, stride=k)`).

  Each input pixel writes its own non-overlapping k x k output block, so the layer is one
  matmul. Same values and parameters as `nn.ConvTranspose(..., transpose_kernel=True)`
  (`kernel [k, k, out, in]`, `bias [out]`), but its gradient is a matmul too: XLA:CPU's
  transposed-convolution gradient is ~60x slower (the mask head's backward took 30 s on CPU).
  """
  features: int
  kernel_size: int = 2
  dtype: Any = jnp.float32
  kernel_init: Any = mask_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, blocked: bool = False):
    """`[N, H, W, C] -> [N, kH, kW, features]`, or with `blocked` the same values before the
    spatial interleave, `[N, H, W, k, k, features]` (`out[n, k*i + a, k*j + b] =
    blocked[n, i, j, a, b]`): pointwise layers that follow can run on the blocked layout and
    interleave a narrower result (the interleave is a full transpose of the activations)."""
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, self.features, x.shape[-1]),
                        jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    y = jnp.einsum('nijc,aboc->nijabo', x.astype(self.dtype), kernel.astype(self.dtype))
    y = y + bias.astype(self.dtype)
    return y if blocked else unblock(y)


def unblock(y):
  """`[N, H, W, k, k, ...] -> [N, kH, kW, ...]`: interleave the k x k blocks of
  `BlockConvTranspose(..., blocked=True)`."""
  n, h, w, k = y.shape[:4]
  y = jnp.moveaxis(y, 3, 2)  # [N, H, k, W, k, ...]
  return y.reshape((n, h * k, w * k) + y.shape[5:])


class ClassLogits(nn.Module):
  """1x1 conv to per-class logits with `nn.Conv`'s parameters (`kernel [1, 1, C, K]`, `bias [K]`).

  `__call__(x)` maps `[N, ..., C]` (any spatial layout) to all K channels `[N, ..., K]`.
  `__call__(x, labels)` gives only channel `labels[n]` of RoI n, `[N, ...]`: the mask loss reads
  one class per RoI (torchvision indexes `mask_logits[arange(N), labels]`), so computing the
  other K-1 channels and their gradients is wasted work (91x the matmul for COCO; 0.4 s of a
  128-RoI CPU step). Values are identical.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None):
    kernel = self.param('kernel', mask_init, (1, 1, x.shape[-1], self.num_classes), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,), jnp.float32)
    x = x.astype(self.dtype)
    if labels is None:
      y = jnp.einsum('n...c,ck->n...k', x, kernel[0, 0].astype(self.dtype))
      return (y + bias.astype(self.dtype)).astype(jnp.float32)
    labels = jnp.clip(labels, 0, self.num_classes - 1)  # padded slots may hold any label
    w = jnp.take(kernel[0, 0].T, labels, axis=0).astype(self.dtype)  # [N, C]
    b = jnp.take(bias, labels).astype(self.dtype).reshape((-1,) + (1,) * (x.ndim - 2))
    return (jnp.einsum('n...c,nc->n...', x, w) + b).astype(jnp.float32)


class MaskRCNNPredictor(nn.Module):
  """2x2 stride-2 transposed conv + ReLU (`conv5_mask`), then 1x1 conv to per-class logits
  (`mask_fcn_logits`): `[N, S, S, C] -> float32 [N, 2S, 2S, num_classes]`, or, given int32
  `labels [N]`, only each RoI's class channel `[N, 2S, 2S]` (see `ClassLogits`).

  `conv5_mask`'s kernel `[2, 2, out, in]` is torchvision's `ConvTranspose2d.weight
  [in, out, 2, 2]` transposed by (2, 3, 1, 0) (see `BlockConvTranspose`).
  """
  conv_dim: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None):
    # ReLU and the 1x1 logits are per pixel: run them on the deconv's blocked layout and
    # interleave the logits (1 or K channels) instead of the 256-channel activations.
    x = BlockConvTranspose(self.conv_dim, 2, self.dtype, name='conv5_mask')(x, blocked=True)
    x = nn.relu(x)
    return unblock(ClassLogits(self.num_classes, self.dtype, name='mask_fcn_logits')(x, labels))


class RoIHeads(nn.Module):
  """Container mirroring torchvision `RoIHeads`: `box_head`, `box_predictor` and, when
  `config.model.mask_on`, `mask_head` and `mask_predictor` (absent otherwise: no parameters).

  `box(x [N, 7, 7, C]) -> (class_logits f32 [N, K+1], box_deltas f32 [N, 4(K+1)])`;
  `mask(x [N, 14, 14, C]) -> logits f32 [N, 28, 28, K+1]`.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    m = self.config.model
    dtype = resnet.dtype_of(self.config)
    self.box_head = TwoMLPHead(int(m.box_head.fc_dim), int(m.box_head.num_fc), dtype)
    self.box_predictor = FastRCNNPredictor(int(m.num_classes), dtype)
    if m.mask_on:
      self.mask_head = MaskRCNNHeads(int(m.mask_head.conv_dim), int(m.mask_head.num_convs), dtype)
      self.mask_predictor = MaskRCNNPredictor(int(m.mask_head.conv_dim), int(m.num_classes), dtype)

  def box(self, x):
    return self.box_predictor(self.box_head(x))

  def mask(self, x, labels=None):
    """Mask logits: all classes `[N, 28, 28, K]`, or `labels`' channel `[N, 28, 28]` if given."""
    return self.mask_predictor(self.mask_head(x), labels)

  def mask_bce_sum(self, x, labels, targets, foreground, chunk: int):
    """Sum over the foreground RoIs' pixels of the per-pixel BCE of their class's mask logits.

    Args:
      x: `[B, S, 14, 14, C]` RoI features of the foreground slots, each image's foreground
        first (as `sampling.roi_targets` orders them).
      labels: int32 `[B, S]`; targets: float32 `[B, S, 28, 28]`; foreground: bool `[B, S]`.
      chunk: 0 runs the head on all `B * S` slots; otherwise only the chunks of `chunk` slots
        per image that hold a foreground RoI (`losses.active_rows_loss`), which skips the
        padding slots' convolutions (most of them while the RPN is untrained).

    Returns:
      float32 scalar (the caller divides by the pixel count); gradients flow to `x` and to the
      mask head's parameters.
    """
    # Unbound clones of the two modules applied to this module's parameters: a pure function
    # of explicit parameters, as active_rows_loss needs.
    head, predictor = self.mask_head.clone(parent=None), self.mask_predictor.clone(parent=None)
    params = {k: self.variables['params'][k] for k in ('mask_head', 'mask_predictor')}

    def bce_sum(p, xs, aux):
      h = head.apply({'params': p['mask_head']}, xs.reshape((-1,) + xs.shape[2:]))
      logits = predictor.apply({'params': p['mask_predictor']}, h, aux['labels'].reshape(-1))
      return loss_ops.sigmoid_bce(logits, aux['targets'].reshape(logits.shape),
                                  aux['foreground'].reshape(-1))

    aux = {'labels': labels, 'targets': targets, 'foreground': foreground}
    if not chunk:
      return bce_sum(params, x, aux)
    return loss_ops.active_rows_loss(bce_sum, params, x, aux,
                                     jnp.sum(foreground, axis=1, dtype=jnp.int32), chunk)
