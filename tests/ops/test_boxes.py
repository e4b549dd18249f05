"""Tests for maskrcnn_jax.ops.boxes against NumPy loops and torchvision goldens."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ops_golden.npz'


@pytest.fixture(scope='module')
def golden():
  return np.load(GOLDEN)


def random_boxes(rng, n, degenerate=True):
  xy = rng.uniform(0, 50, (n, 2))
  wh = rng.uniform(0, 30, (n, 2))
  if degenerate:
    wh[::7] = 0.0
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def np_iou(a, b, over_b=False):
  out = np.zeros((len(a), len(b)), np.float64)
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = iw * ih
      area_p = (p[2] - p[0]) * (p[3] - p[1])
      area_q = (q[2] - q[0]) * (q[3] - q[1])
      den = area_q if over_b else area_p + area_q - inter
      out[i, j] = inter / den if den > 0 else 0.0
  return out


def test_area_and_remove_small():
  b = np.array([[0, 0, 1, 1], [2, 3, 5, 4], [1, 1, 1, 9], [0, 0, 0.5, 2]], np.float32)
  np.testing.assert_allclose(box_ops.area(jnp.asarray(b)), [1, 3, 0, 1])
  np.testing.assert_array_equal(box_ops.remove_small(jnp.asarray(b), 1.0),
                                [True, True, False, False])


def test_pairwise_iou_and_ioa_match_loops():
  rng = np.random.default_rng(0)
  a, b = random_boxes(rng, 23), random_boxes(rng, 17)
  iou = jax.jit(box_ops.pairwise_iou)(a, b)
  ioa = jax.jit(box_ops.pairwise_ioa)(a, b)
  np.testing.assert_allclose(iou, np_iou(a, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ioa, np_iou(a, b, over_b=True), rtol=1e-5, atol=1e-6)
  # Identical empty boxes have zero union: defined as 0, never nan.
  z = np.zeros((2, 4), np.float32)
  assert np.all(np.asarray(box_ops.pairwise_iou(z, z)) == 0)


def test_iou_golden(golden):
  iou = box_ops.pairwise_iou(jnp.asarray(golden['coder_ref']), jnp.asarray(golden['coder_tgt']))
  np.testing.assert_allclose(iou, golden['iou'], rtol=1e-6, atol=1e-7)


def test_clip_with_traced_size():
  b = jnp.array([[-5., -1., 20., 40.], [3., 4., 5., 6.]])
  clip = jax.jit(box_ops.clip_boxes)(b, jnp.int32(30), jnp.int32(10))
  np.testing.assert_array_equal(clip, [[0, 0, 10, 30], [3, 4, 5, 6]])


def np_encode(t, r, w):
  rw, rh = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
  rx, ry = r[:, 0] + 0.5 * rw, r[:, 1] + 0.5 * rh
  tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
  tx, ty = t[:, 0] + 0.5 * tw, t[:, 1] + 0.5 * th
  return np.stack([w[0] * (tx - rx) / rw, w[1] * (ty - ry) / rh,
                   w[2] * np.log(tw / rw), w[3] * np.log(th / rh)], 1)


@pytest.mark.parametrize('name,weights', [('rpn', box_ops.RPN_BOX_WEIGHTS),
                                          ('roi', box_ops.ROI_BOX_WEIGHTS)])
def test_encode_decode_golden(golden, name, weights):
  ref, tgt, deltas = golden['coder_ref'], golden['coder_tgt'], golden['coder_deltas']
  enc = box_ops.encode(jnp.asarray(tgt), jnp.asarray(ref), weights)
  np.testing.assert_allclose(enc, golden[f'encode_{name}'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(enc, np_encode(tgt.astype(np.float64), ref.astype(np.float64),
                                            weights), rtol=1e-4, atol=1e-5)
  dec = box_ops.decode(jnp.asarray(deltas), jnp.asarray(ref), weights)
  np.testing.assert_allclose(dec, golden[f'decode_{name}'], rtol=1e-5, atol=1e-3)


def test_decode_inverts_encode_and_clamps():
  rng = np.random.default_rng(1)
  ref = random_boxes(rng, 40, False) + [0, 0, 1, 1]
  tgt = random_boxes(rng, 40, False) + [0, 0, 1, 1]
  for w in (box_ops.RPN_BOX_WEIGHTS, box_ops.ROI_BOX_WEIGHTS):
    back = box_ops.decode(box_ops.encode(jnp.asarray(tgt), jnp.asarray(ref), w),
                          jnp.asarray(ref), w)
    np.testing.assert_allclose(back, tgt, rtol=1e-5, atol=1e-3)
  # dw = 100 is clamped to log(1000/16): the width grows by exactly 62.5x.
  out = box_ops.decode(jnp.array([[0., 0., 100., 0.]]), jnp.array([[0., 0., 2., 2.]]))
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 2 * math.exp(box_ops.DEFAULT_SCALE_CLAMP),
                             rtol=1e-5)


def test_vmap_over_images():
  rng = np.random.default_rng(2)
  a, b = random_boxes(rng, 6 * 2).reshape(2, 6, 4), random_boxes(rng, 5 * 2).reshape(2, 5, 4)
  batched = jax.vmap(box_ops.pairwise_iou)(a, b)
  for i in range(2):
    np.testing.assert_allclose(batched[i], np_iou(a[i], b[i]), rtol=1e-5, atol=1e-6)
