"""Feature Pyramid Network (Lin et al. 2017): C2..C5 -> P2..P6, torchvision layout, NHWC.

Names mirror torchvision `FeaturePyramidNetwork`: `inner_blocks/{i}` (1x1 lateral convs) and
`layer_blocks/{i}` (3x3 output convs), i = 0 for C2 ... 3 for C5.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax import backends
from maskrcnn_jax.backends import xla

# torchvision FeaturePyramidNetwork: kaiming_uniform_(a=1) weights, zero bias.
fpn_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def resize_nearest(x: jnp.ndarray, out_hw: Sequence[int],
                   upsample2x=xla.upsample2x) -> jnp.ndarray:
  """Nearest-neighbour resize of `[B, H, W, C]` to `out_hw` with torch `F.interpolate`
  (mode='nearest') indexing: `src = floor(dst * in / out)`. Static shapes only; an exact 2x
  upsampling is the backend's `upsample2x`."""
  h, w = x.shape[1:3]
  oh, ow = int(out_hw[0]), int(out_hw[1])
  if (oh, ow) == (2 * h, 2 * w):
    return upsample2x(x)
  ys = np.minimum(np.floor(np.arange(oh) * (h / oh)).astype(np.int32), h - 1)
  xs = np.minimum(np.floor(np.arange(ow) * (w / ow)).astype(np.int32), w - 1)
  return x[:, ys][:, :, xs]


class FPN(nn.Module):
  """Top-down FPN with a max-pool P6 (torchvision `LastLevelMaxPool`).

  Input: `[C2, C3, C4, C5]`, each `[B, H_l, W_l, C_l]`. Output: `[P2, P3, P4, P5, P6]`, each
  `[B, H_l, W_l, channels]`; P6 = P5[:, ::2, ::2] (max-pool kernel 1, stride 2), so its size is
  ceil(H_5 / 2).
  """
  channels: int = 256
  dtype: Any = jnp.float32
  backend: backends.Backend = xla.PLAIN

  def _conv(self, kernel: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(self.channels, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                   dtype=self.dtype, param_dtype=jnp.float32, kernel_init=fpn_init,
                   bias_init=nn.initializers.zeros, name=name,
                   conv_general_dilated=self.backend.conv_general_dilated)

  @nn.compact
  def __call__(self, feats: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    n = len(feats)
    inner = [self._conv(1, f'inner_blocks_{i}') for i in range(n)]
    layer = [self._conv(3, f'layer_blocks_{i}') for i in range(n)]
    last = inner[-1](feats[-1])
    results = [layer[-1](last)]
    for i in range(n - 2, -1, -1):
      lateral = inner[i](feats[i])
      last = lateral + resize_nearest(last, lateral.shape[1:3], self.backend.upsample2x)
      results.insert(0, layer[i](last))
    results.append(results[-1][:, ::2, ::2])
    return results
