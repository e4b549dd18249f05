"""Box and mask heads: the block transposed conv equals torch ConvTranspose2d; head shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.modeling import roi_heads


def test_block_conv_transpose_matches_torch_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  w = rng.normal(size=(5, 6, 2, 2)).astype(np.float32)  # torch ConvTranspose2d [in, out, kh, kw]
  b = rng.normal(size=6).astype(np.float32)
  layer = roi_heads.BlockConvTranspose(6, 2)
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


def test_head_shapes_and_flatten_order():
  head = roi_heads.TwoMLPHead(fc_dim=8, num_fc=2)
  x = jnp.arange(2 * 3 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 3, 4)
  params = jax.eval_shape(head.init, jax.random.key(0), x)['params']
  assert set(params) == {'fc6', 'fc7'} and params['fc6']['kernel'].shape == (36, 8)
  # fc6 sees the (C, H, W) flattening of torchvision: an identity fc6 returns x in that order.
  ident = {'params': {'fc6': {'kernel': jnp.eye(36, 8), 'bias': jnp.zeros(8)},
                      'fc7': {'kernel': jnp.eye(8), 'bias': jnp.zeros(8)}}}
  out = head.apply(ident, x)
  np.testing.assert_array_equal(out, np.asarray(x).transpose(0, 3, 1, 2).reshape(2, -1)[:, :8])
  predictor = roi_heads.FastRCNNPredictor(num_classes=5)
  (scores, deltas), _ = jax.eval_shape(
      lambda: predictor.init_with_output(jax.random.key(0), jnp.zeros((7, 8))))
  assert scores.shape == (7, 5) and deltas.shape == (7, 20)


def test_class_logits_with_labels_pick_each_rois_channel():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 5, 2, 2, 8)).astype(np.float32))  # blocked layout
  labels = jnp.array([1, 3, 0], jnp.int32)
  layer = roi_heads.ClassLogits(4)
  params = layer.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  every = layer.apply(params, x)
  picked = layer.apply(params, x, labels)
  assert every.shape == (3, 5, 5, 2, 2, 4) and picked.shape == (3, 5, 5, 2, 2)
  for n in range(3):
    np.testing.assert_allclose(picked[n], every[n, ..., int(labels[n])], rtol=1e-5, atol=1e-5)
