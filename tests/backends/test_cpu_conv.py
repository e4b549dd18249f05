"""Tests for maskrcnn_jax.ops.conv: same values and gradients as lax.conv_general_dilated."""

import flax.linen as nn
import jax
from jax import lax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.backends import cpu_conv as conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


def np_conv(x, w, stride, pad):
  """Direct-loop reference convolution: x [N, H, W, Ci], w [kh, kw, Ci, Co] (float64)."""
  (pt, pb), (pl, pr) = pad
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
      out += patch @ w[i, j].astype(np.float64)
  return out


# (kernel, stride, padding, channels in, channels out, uses the matmul kernel gradient)
CASES = [
    (1, 1, ((0, 0), (0, 0)), 8, 5, True),
    (1, 2, ((0, 0), (0, 0)), 8, 12, True),
    (1, 1, ((1, 0), (0, 2)), 8, 3, True),  # padded: the tap-matmul path, not the plain matmul
    (3, 1, ((1, 1), (1, 1)), 256, 256, True),
    (3, 2, ((1, 1), (1, 1)), 256, 256, True),
    (3, 2, ((1, 2), (0, 1)), 256, 260, True),
    (3, 1, ((1, 1), (1, 1)), 16, 16, False),
    (7, 2, ((3, 3), (3, 3)), 3, 8, False),
]


@pytest.mark.parametrize('k,stride,pad,ci,co,matmul', CASES)
def test_values_and_gradients_match_lax(k, stride, pad, ci, co, matmul):
  rng = np.random.default_rng(k * 100 + stride * 10 + ci)
  x = rng.normal(size=(2, 9, 11, ci)).astype(np.float32)
  w = (rng.normal(size=(k, k, ci, co)) / np.sqrt(k * k * ci)).astype(np.float32)
  assert conv.uses_tap_matmuls(w.shape) == matmul

  def ours(x, w):
    return conv.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)

  def ref(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=NHWC)

  y = jax.jit(ours)(x, w)
  np.testing.assert_allclose(y, np_conv(x, w, stride, pad), rtol=1e-4, atol=1e-4)
  g = rng.normal(size=y.shape).astype(np.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * g)
  dx, dw = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, w)
  rx, rw = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
  scale = float(np.abs(rw).max())
  np.testing.assert_allclose(dx, rx, rtol=1e-4, atol=1e-4 * float(np.abs(rx).max()))
  np.testing.assert_allclose(dw, rw, rtol=1e-4, atol=1e-5 * scale)


def np_conv_input_grad(g, w, hw, strides, pad):
  """dL/dx of a conv by scattering every output gradient back through every tap."""
  (kh, kw), (sy, sx), ((pt, _), (pl, _)) = w.shape[:2], strides, pad
  dx = np.zeros((g.shape[0], hw[0] + 2 * kh, hw[1] + 2 * kw, w.shape[2]))  # margin for pads
  for oy in range(g.shape[1]):
    for ox in range(g.shape[2]):
      for i in range(kh):
        for j in range(kw):
          dx[:, kh + sy * oy + i - pt, kw + sx * ox + j - pl] += g[:, oy, ox] @ w[i, j].T
  return dx[:, kh:kh + hw[0], kw:kw + hw[1]]


def test_input_gradient_by_phases_matches_numpy_on_random_convs():
  """The input gradient as forward convs of g (one per stride phase): kernels 1-7, strides
  1-3, asymmetric padding, sizes that are not multiples of the stride. (The reference is NumPy:
  XLA's own gradient of some of these convs aborts in its algebraic simplifier.)"""
  rng = np.random.default_rng(7)
  for _ in range(40):
    k = tuple(int(v) for v in rng.integers(1, 8, 2))
    strides = tuple(int(v) for v in rng.integers(1, 4, 2))
    pad = tuple((int(rng.integers(0, kk)), int(rng.integers(0, kk))) for kk in k)
    hw = tuple(int(rng.integers(kk, 15)) for kk in k)
    out_hw = tuple((hw[a] + sum(pad[a]) - k[a]) // strides[a] + 1 for a in range(2))
    g = rng.normal(size=(2,) + out_hw + (4,)).astype(np.float32)
    w = rng.normal(size=k + (3, 4)).astype(np.float32)
    got = conv._input_grad(jnp.asarray(g), jnp.asarray(w), hw, strides, pad)  # pylint: disable=protected-access
    np.testing.assert_allclose(got, np_conv_input_grad(g, w, hw, strides, pad), rtol=1e-4,
                               atol=1e-4, err_msg=f'{k} {strides} {pad} {hw}')


def test_gradients_against_finite_differences():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 6, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 3, 4)), jnp.float32)
  jtu.check_grads(
      lambda x, w: conv.conv_general_dilated(x, w, (2, 2), ((0, 0), (0, 0)),
                                             dimension_numbers=NHWC),
      (x, w), order=1, modes=('rev',), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_string_padding_and_bfloat16():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 256, 256)) / 48, jnp.bfloat16)
  for padding in ('SAME', 'VALID'):
    ours = lambda x, w: conv.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC)
    np.testing.assert_array_equal(ours(x, w), ref(x, w))
    dw = jax.grad(lambda w: jnp.sum(ours(x, w).astype(jnp.float32)))(w)
    rw = jax.grad(lambda w: jnp.sum(ref(x, w).astype(jnp.float32)))(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(rw, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(rw))))


def test_flax_conv_with_the_hook_has_the_same_params_and_outputs():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 5, 5, 8)), jnp.float32)
  plain = nn.Conv(6, (1, 1))
  hooked = nn.Conv(6, (1, 1), conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(0), x)
  assert jax.tree.structure(params) == jax.tree.structure(hooked.init(jax.random.key(0), x))
  np.testing.assert_allclose(hooked.apply(params, x), plain.apply(params, x), rtol=1e-5, atol=1e-6)
  gp = jax.grad(lambda p: jnp.sum(plain.apply(p, x) ** 2))(params)
  gh = jax.grad(lambda p: jnp.sum(hooked.apply(p, x) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), gp, gh)
