"""The plain backend: every hook point in its ordinary JAX/flax form (GPUs, TPUs, and any
platform when `execution.backend='xla'`)."""

from typing import Any

import flax.linen as nn
from jax import lax
import jax.numpy as jnp

from maskrcnn_jax.backends import hooks


def upsample2x(x: jnp.ndarray) -> jnp.ndarray:
  """`[B, H, W, C] -> [B, 2H, 2W, C]`, each pixel repeated into a 2x2 block."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def weighted_row_gather(flat: jnp.ndarray, idx: jnp.ndarray, wts: jnp.ndarray) -> jnp.ndarray:
  """`sum_k wts[..., k] * flat[idx[..., k]]` in float32: float `[P, C]`, int32 `[..., K]`,
  float32 `[..., K]` -> float32 `[..., C]`; autodiff gives the scatter-add backward."""
  rows = flat.at[idx].get(mode='promise_in_bounds').astype(jnp.float32)
  return jnp.einsum('...k,...kc->...c', wts.astype(jnp.float32), rows)


def zeros_after(shape, dtype, dependency: Any) -> jnp.ndarray:
  del dependency
  return jnp.zeros(shape, dtype)


def module_rows_loss(fn, modules, rows, aux, num_active, chunk):
  """`fn(modules, rows, aux)`: the head runs on every slot; rows past `num_active` are masked
  by `fn` itself."""
  del num_active, chunk
  return fn(dict(modules), rows, aux)


def conv_transpose_4x4_stride2(x, kernel, bias):
  """torch `ConvTranspose2d(k=4, s=2, p=1)` as flax's `ConvTranspose(transpose_kernel=True)`
  computes it: padding k - 1 - p = 2 on the stride-dilated input; kernel `[4, 4, out, C]`."""
  y = lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'), transpose_kernel=True)
  return y + bias


PLAIN = hooks.Backend(
    name='xla',
    conv_general_dilated=lax.conv_general_dilated,
    loop_conv_general_dilated=lax.conv_general_dilated,
    relu=nn.relu,
    upsample2x=upsample2x,
    pointwise_pair=None,
    weighted_row_gather=weighted_row_gather,
    zeros_after=zeros_after,
    mask_predictor=None,
    module_rows_loss=module_rows_loss,
    conv_transpose_4x4_stride2=conv_transpose_4x4_stride2,
)
