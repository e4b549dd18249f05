"""XLA:CPU backend: the mask predictor (deconv, ReLU, per-class 1x1 logits) as matmuls.

`MaskPredictor` has the parameters and outputs of `modeling.mask_head.MaskRCNNPredictor`
(`conv5_mask/{kernel [2, 2, out, in], bias}`, `mask_fcn_logits/{kernel [1, 1, C, K], bias}`),
computed differently:

- the stride-2 2x2 transposed conv is one matmul (`BlockConvTranspose`): XLA:CPU's
  transposed-convolution gradient was tens of times slower;
- ReLU and the 1x1 logits run on the deconv's blocked layout, so the interleave moves the 1 or
  K logit channels rather than the 256-channel activations;
- given labels, only each RoI's own class channel is computed (`ClassLogits`): the loss and
  inference read one class per RoI, and the other K-1 channels were most of the head's time.

Values equal the plain predictor's (tests/backends/).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maskrcnn_jax.backends import hooks

# torchvision MaskRCNNHeads / MaskRCNNPredictor: kaiming_normal_(mode='fan_out', relu), zero bias.
mask_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BlockConvTranspose(nn.Module):
  """Transposed conv whose stride equals its kernel size (torch `ConvTranspose2d(k, stride=k)`).

  Each input pixel writes its own non-overlapping k x k output block, so the layer is one
  matmul. Same values and parameters as `nn.ConvTranspose(..., strides=(k, k),
  transpose_kernel=True)` (`kernel [k, k, out, in]`, `bias [out]`), and its gradient is a matmul
  too.
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
    blocked[n, i, j, a, b]`)."""
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

  `__call__(x)` maps `[N, ..., C]` (any spatial layout) to all K channels `[N, ..., K]`;
  `__call__(x, labels)` gives only channel `labels[n]` of RoI n, `[N, ...]`. Values are
  identical.
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


class MaskPredictor(nn.Module):
  """`modeling.mask_head.MaskRCNNPredictor`'s computation on the blocked layout.

  `[N, S, S, C] -> float32 [N, 2S, 2S, num_classes]`, or, given int32 `labels [N]`, only each
  RoI's class channel `[N, 2S, 2S]`.
  """
  conv_dim: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None):
    with jax.named_scope(f'{hooks.CPU_SCOPE}.MaskPredictor'):
      x = BlockConvTranspose(self.conv_dim, 2, self.dtype, name='conv5_mask')(x, blocked=True)
      x = nn.relu(x)
      logits = ClassLogits(self.num_classes, self.dtype, name='mask_fcn_logits')(x, labels)
      return unblock(logits)
