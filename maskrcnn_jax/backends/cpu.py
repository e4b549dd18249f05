"""The XLA:CPU backend: the hook points in the forms XLA:CPU runs fast and lean.

Each construct exists only because of how XLA:CPU compiles its plain form (slow backward-filter
and transposed convolutions, slow 1x1 convolutions, reductions over interleaved axes, fresh
buffers kept alive by its scheduler); docs/performance.md has the measurements and the
benchmark commands. Each equals its plain form in `backends.xla`, values and gradients
(tests/backends/).
"""

import functools

import jax
import jax.numpy as jnp

from maskrcnn_jax.backends import cpu_conv
from maskrcnn_jax.backends import cpu_deconv
from maskrcnn_jax.backends import cpu_gather
from maskrcnn_jax.backends import cpu_mask
from maskrcnn_jax.backends import cpu_memory
from maskrcnn_jax.backends import cpu_rows
from maskrcnn_jax.backends import hooks


@hooks.cpu_scoped
def upsample2x(x):
  """`[B, H, W, C] -> [B, 2H, 2W, C]`, each pixel repeated into a 2x2 block."""
  return _upsample2x(x)


@jax.custom_vjp
def _upsample2x(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _upsample2x_fwd(x):
  return _upsample2x(x), None


def _upsample2x_bwd(_, g):
  # The sum of each 2x2 block as four strided slices (one elementwise fusion); the transpose of
  # `repeat` is a reduction over interleaved axes that XLA:CPU runs several times slower and
  # fuses into neighbouring convolutions' fusions.
  return (g[:, 0::2, 0::2] + g[:, 0::2, 1::2] + g[:, 1::2, 0::2] + g[:, 1::2, 1::2],)


_upsample2x.defvjp(_upsample2x_fwd, _upsample2x_bwd)


@hooks.cpu_scoped
def pointwise_pair(x, a, b):
  """Two 1x1 convs of `x [B, H, W, C]`, `a = (kernel [1, 1, C, Ka], bias [Ka])` and `b`, as one
  `Ka + Kb` wide matmul: the forward pass and both gradients read (and, for the kernel gradient,
  transpose) `x` once instead of twice (the RPN's two predictors on P2)."""
  (ka, ba), (kb, bb) = a, b
  kernel = jnp.concatenate([ka, kb], -1)
  bias = jnp.concatenate([ba, bb])
  out = cpu_conv.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias
  return out[..., :ka.shape[-1]], out[..., ka.shape[-1]:]


CPU = hooks.Backend(
    name='cpu',
    conv_general_dilated=cpu_conv.conv_general_dilated,
    # Convs in a loop body take the matmul kernel gradient at any width (XLA:CPU's
    # backward-filter conv is slowest there).
    loop_conv_general_dilated=functools.partial(cpu_conv.conv_general_dilated,
                                                tap_matmul_kernel_grad=True),
    relu=cpu_memory.relu,
    upsample2x=upsample2x,
    pointwise_pair=pointwise_pair,
    weighted_row_gather=cpu_gather.weighted_row_gather,
    zeros_after=cpu_memory.zeros_after,
    mask_predictor=cpu_mask.MaskPredictor,
    module_rows_loss=cpu_rows.module_rows_loss,
    conv_transpose_4x4_stride2=cpu_deconv.conv_transpose_4x4_stride2,
)
