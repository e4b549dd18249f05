"""XLA:CPU backend: the keypoint predictor's 4x4 stride-2 transposed conv as four phase convs.

torch's `ConvTranspose2d(k=4, stride=2, padding=1)` writes output row `2q` from input rows
`q - 1, q` (kernel taps 3, 1) and row `2q + 1` from rows `q, q + 1` (taps 2, 0), and likewise for
columns, so each of the four output phases is a stride-1 2x2 convolution of the input, and the
output interleaves them. As forward convolutions (`cpu_conv`), the layer and its gradients run on
XLA:CPU's fast paths; XLA:CPU's own transposed convolution and its gradient were most of the
keypoint head's time (docs/performance.md). Same values and gradients as the plain form,
`backends.xla.conv_transpose_4x4_stride2` (tests/backends/).
"""

import jax.numpy as jnp

from maskrcnn_jax.backends import cpu_conv
from maskrcnn_jax.backends import hooks

# Per output phase (0: even rows, 1: odd rows): the kernel taps of its two input rows, in
# correlation order, and the conv padding that aligns them.
_TAPS = ((3, 1), (2, 0))
_PADS = ((1, 0), (0, 1))


@hooks.cpu_scoped
def conv_transpose_4x4_stride2(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray):
  """torch `ConvTranspose2d(k=4, s=2, p=1)`: `x [N, H, W, C]`, `kernel [4, 4, out, C]` (flax
  `ConvTranspose(transpose_kernel=True)` layout), `bias [out]` -> `[N, 2H, 2W, out]`."""
  rows = []
  for ty, py in zip(_TAPS, _PADS):
    cols = []
    for tx, px in zip(_TAPS, _PADS):
      sub = kernel[jnp.array(ty)][:, jnp.array(tx)]  # [2, 2, out, C]
      cols.append(cpu_conv.conv_general_dilated(
          x, jnp.swapaxes(sub, 2, 3), (1, 1), (py, px),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    rows.append(jnp.stack(cols, axis=3))  # [N, H, W, 2 (column phase), out]
  y = jnp.stack(rows, axis=2)  # [N, H, 2 (row phase), W, 2, out]
  n, h, _, w = y.shape[:4]
  return y.reshape(n, 2 * h, 2 * w, -1) + bias
