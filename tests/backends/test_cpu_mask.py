"""The XLA:CPU mask predictor's layers: the block transposed conv equals torch ConvTranspose2d,
ClassLogits with labels picks each RoI's channel."""

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.backends import cpu_mask


def test_block_conv_transpose_matches_torch_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  w = rng.normal(size=(5, 6, 2, 2)).astype(np.float32)  # torch ConvTranspose2d [in, out, kh, kw]
  b = rng.normal(size=6).astype(np.float32)
  layer = cpu_mask.BlockConvTranspose(6, 2)
  params = {'params': {'kernel': w.transpose(2, 3, 1, 0), 'bias': b}}
  out = layer.apply(params, x)
  # torch: out[n, 2i + a, 2j + b, o] = sum_c x[n, i, j, c] w[c, o, a, b] + bias[o].
  ref = np.zeros((2, 6, 8, 6), np.float32)
  for a in range(2):
    for bb in range(2):
      ref[:, a::2, bb::2] = np.einsum('nijc,co->nijo', x, w[:, :, a, bb]) + b
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert shapes['params']['kernel'].shape == (2, 2, 6, 5)


def test_class_logits_with_labels_pick_each_rois_channel():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 5, 2, 2, 8)).astype(np.float32))  # blocked layout
  labels = jnp.array([1, 3, 0], jnp.int32)
  layer = cpu_mask.ClassLogits(4)
  params = layer.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  every = layer.apply(params, x)
  picked = layer.apply(params, x, labels)
  assert every.shape == (3, 5, 5, 2, 2, 4) and picked.shape == (3, 5, 5, 2, 2)
  for n in range(3):
    np.testing.assert_allclose(picked[n], every[n, ..., int(labels[n])], rtol=1e-5, atol=1e-5)
