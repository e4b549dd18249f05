"""ResNet backbones (18/34/50/101 and a toy 'tiny') with frozen batch norm, NHWC.

Returns the C2..C5 feature maps (strides 4, 8, 16, 32) that feed the FPN. Module and parameter
names mirror torchvision's `resnet` (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax import backends
from maskrcnn_jax.backends import xla

# Blocks per stage (res2..res5) and block type, torchvision resnet18/34/50/101.
STAGE_BLOCKS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    'tiny': ('bottleneck', (1, 1, 1, 1)),
}
BOTTLENECK_EXPANSION = 4
BASIC_EXPANSION = 1
# Stage names in `freeze_at` order: freeze_at=k freezes the first k entries (detectron2 semantics).
STAGE_NAMES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4')

# torchvision resnet: kaiming_normal_(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def dtype_of(config: ml_collections.ConfigDict) -> Any:
  """The compute dtype named by `config.dtype` ('float32' | 'bfloat16')."""
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def stage_channels(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """Output channels of C2..C5 for `config.model.backbone` (e.g. 256..2048 for ResNet-50)."""
  b = config.model.backbone
  kind, _ = STAGE_BLOCKS[b.depth]
  expansion = BOTTLENECK_EXPANSION if kind == 'bottleneck' else BASIC_EXPANSION
  return tuple(int(b.width) * m * expansion for m in (1, 2, 4, 8))


def frozen_stages(freeze_at: int) -> tuple[str, ...]:
  """Names (in `STAGE_NAMES`) of the stages frozen by `freeze_at`; 'stem' is `conv1`+`bn1`."""
  return STAGE_NAMES[:int(freeze_at)]


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine terms (torchvision `FrozenBatchNorm2d`).

  The four vectors live in the non-trainable 'constants' collection under torchvision's buffer
  names; they initialise to the identity transform. `y = (x - mean) / sqrt(var + eps) * w + b`.
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    weight = self.variable('constants', 'weight', lambda: jnp.ones((c,), jnp.float32))
    bias = self.variable('constants', 'bias', lambda: jnp.zeros((c,), jnp.float32))
    mean = self.variable('constants', 'running_mean', lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable('constants', 'running_var', lambda: jnp.ones((c,), jnp.float32))
    scale = weight.value * jax.lax.rsqrt(var.value + self.eps)
    shift = bias.value - mean.value * scale
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def _norm(norm: str, eps: float, name: str):
  """FrozenBatchNorm, or the identity when `norm == 'none'` (convs then carry a bias)."""
  if norm == 'none':
    return lambda x: x
  return FrozenBatchNorm(eps=eps, name=name)


def _conv(features: int, kernel: int, stride: int, norm: str, dtype: Any, name: str,
          backend: backends.Backend) -> nn.Conv:
  # torchvision pads k // 2 on both sides; 'SAME' would pad stride-2 convs asymmetrically.
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=(norm == 'none'), dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=conv_init, name=name,
                 conv_general_dilated=backend.conv_general_dilated)


class Downsample(nn.Module):
  """Projection shortcut: `0` = 1x1 conv with stride, `1` = frozen BN (torchvision names)."""
  features: int
  stride: int
  norm: str
  eps: float
  dtype: Any
  backend: backends.Backend = xla.PLAIN

  @nn.compact
  def __call__(self, x):
    x = _conv(self.features, 1, self.stride, self.norm, self.dtype, '0', self.backend)(x)
    return _norm(self.norm, self.eps, '1')(x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 residual block, 4x expansion (torchvision `Bottleneck`, ResNet v1.5).

  `stride_in_1x1=True` puts the stride on the first 1x1 conv (detectron2 MSRA weights);
  False puts it on the 3x3 conv (torchvision).
  """
  width: int
  stride: int = 1
  stride_in_1x1: bool = False
  norm: str = 'frozen_bn'
  eps: float = 1e-5
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN

  @nn.compact
  def __call__(self, x):
    out_ch = self.width * BOTTLENECK_EXPANSION
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    relu, conv = self.backend.relu, functools.partial(_conv, backend=self.backend)
    y = conv(self.width, 1, s1, self.norm, self.dtype, 'conv1')(x)
    y = relu(_norm(self.norm, self.eps, 'bn1')(y))
    y = conv(self.width, 3, s3, self.norm, self.dtype, 'conv2')(y)
    y = relu(_norm(self.norm, self.eps, 'bn2')(y))
    y = conv(out_ch, 1, 1, self.norm, self.dtype, 'conv3')(y)
    y = _norm(self.norm, self.eps, 'bn3')(y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = Downsample(out_ch, self.stride, self.norm, self.eps, self.dtype, self.backend,
                     name='downsample')(x)
    return relu(x + y)


class BasicBlock(nn.Module):
  """3x3 -> 3x3 residual block (torchvision `BasicBlock`, ResNet-18/34)."""
  width: int
  stride: int = 1
  stride_in_1x1: bool = False  # unused; kept so both block types share a signature
  norm: str = 'frozen_bn'
  eps: float = 1e-5
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN

  @nn.compact
  def __call__(self, x):
    relu, conv = self.backend.relu, functools.partial(_conv, backend=self.backend)
    y = conv(self.width, 3, self.stride, self.norm, self.dtype, 'conv1')(x)
    y = relu(_norm(self.norm, self.eps, 'bn1')(y))
    y = conv(self.width, 3, 1, self.norm, self.dtype, 'conv2')(y)
    y = _norm(self.norm, self.eps, 'bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = Downsample(self.width, self.stride, self.norm, self.eps, self.dtype, self.backend,
                     name='downsample')(x)
    return relu(x + y)


class ResLayer(nn.Module):
  """One stage: `num_blocks` blocks named '0', '1', ...; the first one carries the stride."""
  block: str
  width: int
  num_blocks: int
  stride: int
  stride_in_1x1: bool
  norm: str
  eps: float
  dtype: Any
  backend: backends.Backend = xla.PLAIN

  @nn.compact
  def __call__(self, x):
    cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    for i in range(self.num_blocks):
      x = cls(self.width, self.stride if i == 0 else 1, self.stride_in_1x1, self.norm, self.eps,
              self.dtype, self.backend, name=str(i))(x)
    return x


class ResNet(nn.Module):
  """ResNet body returning `[C2, C3, C4, C5]`, each `[B, H/s, W/s, C]` with s = 4, 8, 16, 32.

  Fields come from `config.model.backbone` (see `ResNet.from_config`). `freeze_at=k` stops
  gradients at the output of the k-th stage in `STAGE_NAMES` (the train loop additionally masks
  those parameters' updates, see `mask_rcnn.trainable_mask`). Input: float `[B, H, W, 3]`,
  normalised; computation in `dtype`, parameters float32. `backend` supplies the convs' and
  ReLUs' implementations (`backends.hooks`).
  """
  depth: Any = 50
  width: int = 64
  freeze_at: int = 2
  stride_in_1x1: bool = False
  norm: str = 'frozen_bn'
  eps: float = 1e-5
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **kwargs) -> 'ResNet':
    b = config.model.backbone
    return cls(depth=b.depth, width=int(b.width), freeze_at=int(b.freeze_at),
               stride_in_1x1=bool(b.stride_in_1x1), norm=b.norm, eps=float(b.bn_eps),
               dtype=dtype_of(config), **kwargs)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
    block, blocks = STAGE_BLOCKS[self.depth]
    x = x.astype(self.dtype)
    x = _conv(self.width, 7, 2, self.norm, self.dtype, 'conv1', self.backend)(x)
    x = self.backend.relu(_norm(self.norm, self.eps, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outs = []
    for i, n in enumerate(blocks):
      x = ResLayer(block, self.width * 2**i, n, 1 if i == 0 else 2, self.stride_in_1x1,
                   self.norm, self.eps, self.dtype, self.backend, name=f'layer{i + 1}')(x)
      if self.freeze_at >= i + 2:
        x = jax.lax.stop_gradient(x)
      outs.append(x)
    return outs

