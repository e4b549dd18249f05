"""2-D convolution whose kernel gradient is a sum of matmuls on the CPU backend.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)` hook). Its forward pass and its gradient with respect to the
input are XLA's own. Only the gradient with respect to the kernel changes, and only when
compiling for the CPU: XLA:CPU lowers that gradient to a "backward-filter" convolution that runs
4-20x slower than the forward convolution of the same size and 5x slower than torch's (on a
200x304x256 map, `experiments/benchmarks/bench_ops.py`: a 3x3 256->256 kernel gradient takes
1.27 s, 0.37 s here, 0.23 s in torch; a 1x1 256->128 one 202 ms, 22 ms here, 38 ms in torch).
Here it is the textbook identity instead,

    dL/dw[i, j] = sum over (n, y, x) of  x_pad[n, s*y + i, s*x + j, :]^T  g[n, y, x, :],

one `[Cin, N*Ho*Wo] x [N*Ho*Wo, Cout]` matmul per kernel tap (in a loop, see
`_kernel_grad_matmuls`), which XLA:CPU runs at its matmul speed. The rewrite is used where it
measured faster: 1x1 kernels of any width, and larger kernels whose input and output widths are
both at least `TAP_MATMUL_MIN_CHANNELS` (narrow 3x3 convs are faster as XLA's own). GPUs and
TPUs keep XLA's convolution gradient (`lax.platform_dependent`).

Shapes: `lhs` float [N, H, W, Cin] (NHWC), `rhs` float [kh, kw, Cin, Cout] (HWIO); the result is
[N, Ho, Wo, Cout]. Other layouts, dilations and grouped convs go to `lax.conv_general_dilated`
unchanged. The kernel gradient is accumulated in float32 and cast to the kernel's dtype.
"""

import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp

# Below this input/output width, XLA:CPU's backward-filter conv beats per-tap matmuls for kernels
# larger than 1x1 (measured: 64->64 and 128->128 3x3 are 1.2-2x slower as matmuls).
TAP_MATMUL_MIN_CHANNELS = 256
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _kernel_grad_matmuls(x, g, kernel_hw, strides, padding):
  """dL/dw as one matmul per kernel tap: x [N, H, W, Cin], g [N, Ho, Wo, Cout] -> float32 HWIO.

  A loop over the taps holds one shifted view of x at a time (unrolled, XLA keeps all kh * kw
  copies alive: 4x the memory, and slower). Strided convs first split x into its stride phases
  `[sy, sx, N, Hp / sy, Wp / sx, Cin]` (one copy), so that every tap is a dense dynamic slice.
  """
  (kh, kw), (sy, sx) = kernel_hw, strides
  n, h, w, cin = x.shape
  _, ho, wo, cout = g.shape
  (pt, pb), (pl, pr) = padding
  hp = -(-(h + pt + pb) // sy) * sy  # padded extent rounded up to whole phases
  wp = -(-(w + pl + pr) // sx) * sx
  xp = jnp.pad(x, ((0, 0), (pt, hp - h - pt), (pl, wp - w - pl), (0, 0)))
  phases = xp.reshape(n, hp // sy, sy, wp // sx, sx, cin).transpose(2, 4, 0, 1, 3, 5)
  g2 = g.reshape(n * ho * wo, cout)

  def tap(t, dw):
    i, j = t // kw, t % kw
    xs = lax.dynamic_slice(phases, (i % sy, j % sx, 0, i // sy, j // sx, 0),
                           (1, 1, n, ho, wo, cin))
    d = lax.dot_general(xs.reshape(n * ho * wo, cin), g2, (((0,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return lax.dynamic_update_slice(dw, d[None], (t, 0, 0))

  dw = lax.fori_loop(0, kh * kw, tap, jnp.zeros((kh * kw, cin, cout), jnp.float32))
  return dw.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _lax_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, padding), x)
  (dx,) = input_vjp(g)

  def xla_kernel_grad(x, g):
    _, kernel_vjp = jax.vjp(lambda w_: _lax_conv(x, w_, strides, padding), w)
    return kernel_vjp(g)[0].astype(jnp.float32)

  def matmul_kernel_grad(x, g):
    return _kernel_grad_matmuls(x, g, w.shape[:2], strides, padding)

  dw = lax.platform_dependent(x, g, cpu=matmul_kernel_grad, default=xla_kernel_grad)
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def uses_tap_matmuls(kernel_shape: Sequence[int]) -> bool:
  """Whether the CPU kernel gradient of an HWIO kernel of this shape is computed as matmuls."""
  kh, kw, cin, cout = kernel_shape
  return (kh, kw) == (1, 1) or min(cin, cout) >= TAP_MATMUL_MIN_CHANNELS


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None) -> Any:
  """`lax.conv_general_dilated` with the CPU kernel-gradient rewrite described above."""
  plain = (lhs.ndim == 4
           and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and feature_group_count == 1 and batch_group_count == 1 and precision is None
           and preferred_element_type is None and uses_tap_matmuls(rhs.shape)
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):  # 'SAME' / 'VALID' as lax resolves them
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, strides, padding)
