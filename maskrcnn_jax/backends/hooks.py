"""The hook points of the backend seam: what `modeling/` and `ops/` may ask a backend for.

A `Backend` is a frozen bundle of functions and module classes. `backends.xla.PLAIN` holds the
plain JAX/flax forms (`lax.conv_general_dilated`, `nn.relu`, `jnp.zeros`, one gather), which
every backend can run and which GPUs and TPUs get; `backends.cpu.CPU` holds the XLA:CPU forms,
each with the same values and gradients as its plain form (tests/backends/).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax


@dataclasses.dataclass(frozen=True)
class Backend:
  """Hook points, each documented with the plain form it stands for.

  Attributes:
    name: 'xla' or 'cpu'.
    conv_general_dilated: `nn.Conv`'s `conv_general_dilated` for every conv of the model
      (plain: `lax.conv_general_dilated`).
    loop_conv_general_dilated: the same for convs that run inside a loop body (the mask head
      under `module_rows_loss`).
    relu: the ResNet body's ReLU (plain: `nn.relu`).
    upsample2x: `[B, H, W, C] -> [B, 2H, 2W, C]` nearest 2x upsampling of the FPN's top-down
      path (plain: two `jnp.repeat`s).
    pointwise_pair: `(x, (kernel_a, bias_a), (kernel_b, bias_b)) -> (a, b)`, two 1x1 convs of the
      same input with HWIO kernels, or None to run them as two `nn.Conv`s (the RPN predictors).
    weighted_row_gather: `(flat [P, C], idx int32 [..., K], wts f32 [..., K]) -> f32 [..., C]`,
      `sum_k wts * flat[idx]` (RoIAlign's bins).
    zeros_after: `(shape, dtype, dependency) -> zeros` (plain: `jnp.zeros`).
    mask_predictor: a module class with `modeling.mask_head.MaskRCNNPredictor`'s fields,
      parameters and outputs, or None for that module itself.
    module_rows_loss: `(fn, modules, rows, aux, num_active, chunk) -> f32 []`, a head's loss
      summed over its slots (plain: `fn(modules, rows, aux)` on every slot).
    conv_transpose_4x4_stride2: `(x [N, H, W, C], kernel [4, 4, out, C], bias) -> [N, 2H, 2W,
      out]`, torch's `ConvTranspose2d(k=4, s=2, p=1)` (the keypoint predictor; plain:
      `lax.conv_transpose`).
  """
  name: str
  conv_general_dilated: Callable[..., Any]
  loop_conv_general_dilated: Callable[..., Any]
  relu: Callable[[Any], Any]
  upsample2x: Callable[[Any], Any]
  pointwise_pair: Optional[Callable[..., Any]]
  weighted_row_gather: Callable[..., Any]
  zeros_after: Callable[..., Any]
  mask_predictor: Optional[type]
  module_rows_loss: Callable[..., Any]
  conv_transpose_4x4_stride2: Callable[..., Any]


# Every XLA:CPU construct runs under a `jax.named_scope` with this prefix, so profiles and
# jaxprs show which ops come from the CPU backend (the plain program has none: tested).
CPU_SCOPE = 'xla_cpu_backend'


def cpu_scoped(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` run under the named scope `CPU_SCOPE.<fn name>`."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with jax.named_scope(f'{CPU_SCOPE}.{fn.__name__}'):
      return fn(*args, **kwargs)

  return wrapper
