"""FPN: torch nearest-upsampling indices, P6 as a stride-2 subsample, level shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.modeling import fpn
from tests.modeling.helpers import numpy_variables


def test_resize_nearest_uses_torch_indexing():
  x = jnp.arange(3.0)[None, :, None, None] * jnp.ones((1, 3, 2, 1))
  # torch F.interpolate(size=5, mode='nearest'): src = floor(dst * 3 / 5) = 0, 0, 1, 1, 2.
  np.testing.assert_array_equal(fpn.resize_nearest(x, (5, 2))[0, :, 0, 0], [0, 0, 1, 1, 2])
  y = jnp.arange(6.0).reshape(1, 2, 3, 1)
  np.testing.assert_array_equal(fpn.resize_nearest(y, (4, 6))[0, :, :, 0],
                                np.repeat(np.repeat(np.arange(6.0).reshape(2, 3), 2, 0), 2, 1))


def test_levels_and_p6():
  model = fpn.FPN(channels=8)
  # An input whose C5 has odd size (3 x 5), as a 96 x 160 image gives.
  shapes = ((24, 40), (12, 20), (6, 10), (3, 5))
  feats = [jax.random.normal(jax.random.key(i), (1, h, w, 4 * 2**i))
           for i, (h, w) in enumerate(shapes)]
  variables = numpy_variables(jax.eval_shape(model.init, jax.random.key(0), feats))
  outs = jax.jit(model.apply)(variables, feats)
  assert [o.shape for o in outs] == [(1, h, w, 8) for h, w in shapes] + [(1, 2, 3, 8)]
  # torchvision LastLevelMaxPool: max_pool2d(kernel 1, stride 2) == subsampling.
  np.testing.assert_array_equal(outs[4], outs[3][:, ::2, ::2])


def test_resize_nearest_2x_gradient_is_the_block_sum():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 4)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 10, 4)), jnp.float32)
  y, vjp = jax.vjp(lambda x: fpn.resize_nearest(x, (6, 10)), x)
  np.testing.assert_array_equal(y, np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
  expected = np.asarray(g).reshape(2, 3, 2, 5, 2, 4).sum(axis=(2, 4))
  np.testing.assert_allclose(vjp(g)[0], expected, rtol=1e-6, atol=1e-6)
