"""XLA:CPU backend: 2-D convolution whose gradients (and 1x1 forward) are matmuls where XLA:CPU's
convs are slow. Selected through `backends.get('cpu')`; other backends use `lax` directly.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (flax's
`nn.Conv(conv_general_dilated=...)` hook), with the same values and parameters. It changes how
three things are computed:

- An unpadded 1x1 conv is a matmul over the pixels, forward and backward (`_pointwise`):
  XLA:CPU's 1x1 convolution is up to 15x slower than the matmul (narrow outputs worst).
- The gradient with respect to the kernel: XLA:CPU lowers it to a "backward-filter" convolution
  that runs several times slower than the forward convolution of the same size (measured in
  `docs/performance.md`, `experiments/benchmarks/bench_ops.py`). Here it is the textbook
  identity instead,

      dL/dw[i, j] = sum over (n, y, x) of  x_pad[n, s*y + i, s*x + j, :]^T  g[n, y, x, :],

  one `[Cin, N*Ho*Wo] x [N*Ho*Wo, Cout]` matmul per kernel tap (in a loop, see
  `_kernel_grad_matmuls`), which XLA:CPU runs at its matmul speed. It is used where it measured
  faster: 1x1 kernels, and larger kernels whose input and output widths are both at least
  `TAP_MATMUL_MIN_CHANNELS` (narrow 3x3 convs are faster as XLA's own).
- The input gradient is written as forward convs of the output gradient (`_input_grad`): for
  stride 1 the conv with the flipped kernel, which XLA derives too but which in this form keeps
  XLA:CPU's fast convolution inside loop bodies (the autodiff form ran 8x slower there); for
  stride s one conv per input phase, instead of XLA's conv of the zero-dilated gradient.

Every construct here is tested against `lax.conv_general_dilated` (values and gradients) in
tests/backends/.

Shapes: `lhs` float [N, H, W, Cin] (NHWC), `rhs` float [kh, kw, Cin, Cout] (HWIO); the result is
[N, Ho, Wo, Cout]. Other layouts, dilations and grouped convs go to `lax.conv_general_dilated`
unchanged. The kernel gradient is accumulated in float32 and cast to the kernel's dtype.
"""

import functools
from typing import Any, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp

from maskrcnn_jax.backends import cpu_memory
from maskrcnn_jax.backends import hooks

# Below this input/output width, XLA:CPU's backward-filter conv beats per-tap matmuls for kernels
# larger than 1x1 (64->64 and 128->128 3x3 convs measured slower as matmuls).
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
  # The padding value waits for g, so the padded copy of x is not made early in the forward pass
  # and kept alive until here (`cpu_memory.zeros_after`).
  xp = jnp.pad(x, ((0, 0), (pt, hp - h - pt), (pl, wp - w - pl), (0, 0)),
               constant_values=cpu_memory.zeros_after((), x.dtype, g))
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


def _input_grad(g, w, in_hw, strides, padding):
  """dL/dx of `_lax_conv(x, w, strides, padding)` for x of spatial size `in_hw`, as forward
  convolutions of g (which XLA:CPU runs on its fast path, in loop bodies too).

  Stride 1: the conv of g with the flipped, in/out-swapped kernel. Stride s: the same per
  output phase. Input row i = s*q + a receives g[o] w[k] exactly where s*o + k = i + pad_lo,
  so only the taps k = s*m + c with c = (a + pad_lo) mod s reach phase a, and they form a
  stride-1 correlation of g with the sub-kernel w[c::s]; the s*s phases are then interleaved.
  XLA's own form dilates g with zeros ("base-dilated" conv), several times slower on the CPU
  (docs/performance.md).
  """
  (kh, kw), (sy, sx) = w.shape[:2], strides
  n, ho, wo, _ = g.shape
  h, wd = in_hw
  cin = w.shape[2]
  qy, qx = -(-h // sy), -(-wd // sx)  # rows and columns of every phase

  def axis_phase(a, s, k, pad_lo, out_len, q):
    """(first tap c, taps M, conv padding (lo, hi)) giving phase a's q rows."""
    c = (a + pad_lo) % s
    m = len(range(c, k, s))
    d = (a + pad_lo - c) // s
    lo = m - 1 - d
    return c, m, (lo, q - out_len - lo + m - 1)

  rows = []
  for a in range(sy):
    cy, my, pad_y = axis_phase(a, sy, kh, padding[0][0], ho, qy)
    cols = []
    for b in range(sx):
      cx, mx, pad_x = axis_phase(b, sx, kw, padding[1][0], wo, qx)
      if my == 0 or mx == 0:  # no tap reaches this phase (e.g. a 1x1 kernel with stride 2)
        cols.append(jnp.zeros((n, qy, qx, cin), g.dtype))
        continue
      sub = jnp.flip(w[cy::sy, cx::sx], (0, 1)).swapaxes(2, 3)
      # Negative padding crops g; as a slice, since XLA:CPU's conv read garbage for negative
      # conv padding in some shapes.
      crop = g[:, max(-pad_y[0], 0):ho - max(-pad_y[1], 0),
               max(-pad_x[0], 0):wo - max(-pad_x[1], 0)]
      pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in (pad_y, pad_x))
      cols.append(_lax_conv(crop, sub, (1, 1), pads))
    rows.append(jnp.stack(cols, axis=3))  # [N, Qy, Qx, sx, Cin]
  dx = jnp.stack(rows, axis=2)  # [N, Qy, sy, Qx, sx, Cin]
  return dx.reshape(n, qy * sy, qx * sx, cin)[:, :h, :wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, tap_matmul_kernel_grad):
  del tap_matmul_kernel_grad
  return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding, tap_matmul_kernel_grad):
  del tap_matmul_kernel_grad
  return _lax_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, tap_matmul_kernel_grad, residuals, g):
  x, w = residuals
  dx = _input_grad(g, w, x.shape[1:3], strides, padding)

  def xla_kernel_grad(x, g):
    _, kernel_vjp = jax.vjp(lambda w_: _lax_conv(x, w_, strides, padding), w)
    return kernel_vjp(g)[0].astype(jnp.float32)

  def matmul_kernel_grad(x, g):
    return _kernel_grad_matmuls(x, g, w.shape[:2], strides, padding)

  dw = matmul_kernel_grad(x, g) if tap_matmul_kernel_grad else xla_kernel_grad(x, g)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def uses_tap_matmuls(kernel_shape: Sequence[int]) -> bool:
  """Whether the CPU kernel gradient of an HWIO kernel of this shape is computed as matmuls."""
  kh, kw, cin, cout = kernel_shape
  return (kh, kw) == (1, 1) or min(cin, cout) >= TAP_MATMUL_MIN_CHANNELS


@hooks.cpu_scoped
def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None,
                         tap_matmul_kernel_grad: Optional[bool] = None) -> Any:
  """`lax.conv_general_dilated` with the rewrites described above.

  `tap_matmul_kernel_grad=True` forces the matmul kernel gradient whatever the width: convs
  run inside a loop body need it (there XLA:CPU's backward-filter conv is far slower still: the
  mask head inside `cpu_rows.active_rows_loss`).
  """
  plain = (lhs.ndim == 4
           and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and feature_group_count == 1 and batch_group_count == 1 and precision is None
           and preferred_element_type is None
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
  if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
    return _pointwise(lhs, rhs, strides)
  if tap_matmul_kernel_grad is None:
    tap_matmul_kernel_grad = uses_tap_matmuls(rhs.shape)
  return _conv(lhs, rhs, strides, padding, bool(tap_matmul_kernel_grad))


def _pointwise(x, w, strides):
  """An unpadded 1x1 conv as a matmul over the (strided) pixels; its gradients are matmuls.

  XLA:CPU's 1x1 convolution is slower than the same matmul (narrowest outputs worst, such as the
  RPN's 3-channel objectness), and its kernel gradient is the slow backward-filter conv
  described above.
  """
  sy, sx = strides
  if (sy, sx) != (1, 1):
    x = x[:, ::sy, ::sx]
  return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())))
