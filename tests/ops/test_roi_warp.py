"""Tests for maskrcnn_jax.ops.roi_warp against a loop reference written from its definition:
RoIPool's integer bins (torchvision), RoIAlign's bilinear samples inside them, max or mean."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import roi_align as roi_ops
from maskrcnn_jax.ops import roi_levels
from maskrcnn_jax.ops import roi_warp


def c_round(v):
  return np.floor(v + 0.5) if v >= 0 else -np.floor(-v + 0.5)


def np_bins(lo, hi, scale, size, pooled):
  """RoIPool's clipped integer bins [(start, end)] along one axis (torchvision CPU kernel)."""
  s = int(c_round(np.float32(lo) * np.float32(scale)))
  e = int(c_round(np.float32(hi) * np.float32(scale)))
  extent = max(e - s + 1, 1)
  b = np.float32(extent) / np.float32(pooled)
  return [(min(max(int(np.floor(np.float32(p) * b)) + s, 0), size),
           min(max(int(np.ceil(np.float32(p + 1) * b)) + s, 0), size)) for p in range(pooled)]


def np_taps(pos, size):
  """[(weight, index)] of a sample at `pos` in [0, size] (pixel j spans [j, j + 1)): linear
  between the two nearest pixel centres, the edge pixel's value outside them."""
  pos = max(pos - 0.5, 0.0)
  i0 = int(np.floor(pos))
  if i0 >= size - 1:
    return [(1.0, size - 1), (0.0, size - 1)]
  f = pos - i0
  return [(1.0 - f, i0), (f, i0 + 1)]


def np_roi_warp(feat, boxes, out_hw, scale, ratio, reduce, cot=None):
  """Output [N, oh, ow, C] and, given a cotangent, the feature gradient [H, W, C]."""
  h, w, c = feat.shape
  oh, ow = out_hw
  out = np.zeros((len(boxes), oh, ow, c), np.float64)
  grad = np.zeros((h, w, c), np.float64)
  for n, b in enumerate(boxes):
    if not np.all(np.isfinite(b)):
      continue
    ybins = np_bins(b[1], b[3], scale, h, oh)
    xbins = np_bins(b[0], b[2], scale, w, ow)
    for ph, (y0, y1) in enumerate(ybins):
      for pw, (x0, x1) in enumerate(xbins):
        if y1 <= y0 or x1 <= x0:
          continue
        values, taps = [], []
        for iy in range(ratio):
          y = y0 + (iy + 0.5) * (y1 - y0) / ratio
          for ix in range(ratio):
            x = x0 + (ix + 0.5) * (x1 - x0) / ratio
            t = [(wy * wx, yi, xi) for wy, yi in np_taps(y, h) for wx, xi in np_taps(x, w)]
            values.append(sum(wt * feat[yi, xi].astype(np.float64) for wt, yi, xi in t))
            taps.append(t)
        values = np.stack(values)  # [ratio**2, C]
        if reduce == 'avg':
          out[n, ph, pw] = values.mean(0)
          if cot is not None:
            for t in taps:
              for wt, yi, xi in t:
                grad[yi, xi] += wt * cot[n, ph, pw] / ratio**2
        else:
          out[n, ph, pw] = values.max(0)
          if cot is not None:
            best = values.argmax(0)
            for ch in range(c):
              for wt, yi, xi in taps[best[ch]]:
                grad[yi, xi, ch] += wt * cot[n, ph, pw, ch]
  return out, grad


def odd_boxes(rng, n, h, w):
  """Image-pixel boxes for a map of h x w image pixels: leaving the map, tiny, empty, inverted."""
  xy = rng.uniform([-0.3 * w, -0.3 * h], [1.1 * w, 1.1 * h], (n, 2))
  wh = rng.uniform(-0.1 * w, 0.6 * w, (n, 2))
  wh[:n // 8] = 0.0
  wh[n // 8:n // 4] *= 0.02
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def warp_fn(out_hw, scale, ratio, reduce, backend):
  def loss(f, b, t):
    out = roi_warp.roi_warp(f, b, out_hw, scale, ratio, reduce, backend)
    return jnp.vdot(out, t), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_toy_known_answers():
  # f[y, x] = 10 y + x on a 5x5 map: bilinear samples are exact, so the answers are by hand.
  feat = (10 * np.arange(5)[:, None] + np.arange(5)[None, :]).astype(np.float32)[..., None]
  f = jnp.asarray(feat)
  # Box [0.4, 0.4, 2.6, 2.6] rounds to pixels 0..3 (4 wide): one bin [0, 4), 2 samples per axis
  # at 1 and 3, i.e. between pixel centres 0|1 and 2|3 -> 10 y + x at y, x in {0.5, 2.5}.
  box = jnp.array([[0.4, 0.4, 2.6, 2.6]])
  np.testing.assert_allclose(roi_warp.roi_warp(f, box, 1, 1.0, 2, 'max')[0, 0, 0], [27.5])
  np.testing.assert_allclose(roi_warp.roi_warp(f, box, 1, 1.0, 2, 'avg')[0, 0, 0], [16.5])
  # One sample per bin in 2x2 bins of 2 pixels [0, 2), [2, 4): at 1 and 3.
  out = roi_warp.roi_warp(f, jnp.array([[0., 0., 3., 3.]]), 2, 1.0, 1, 'max')
  np.testing.assert_allclose(out[0, :, :, 0], [[5.5, 7.5], [25.5, 27.5]])
  # A 1-pixel bin [4, 5) at the edge: samples at pixel positions 3.75 and 4.25 (clamped to 4).
  out = roi_warp.roi_warp(f, jnp.array([[4., 4., 4., 4.]]), 1, 1.0, 2, 'avg')
  np.testing.assert_allclose(out[0, :, :, 0], [[42.625]])
  # A 1-pixel bin [1, 2) inside the map: samples at 0.75 / 1.25 read both neighbours.
  out = roi_warp.roi_warp(f, jnp.array([[1., 1., 1., 1.]]), 1, 1.0, 2, 'avg')
  np.testing.assert_allclose(out[0, :, :, 0], [[11.0]])
  # Entirely off the map: every bin clipped away -> 0, as RoIPool.
  out = roi_warp.roi_warp(f, jnp.array([[7., 7., 9., 9.]]), 2, 1.0, 2, 'max')
  np.testing.assert_allclose(out, 0.0)


@pytest.mark.parametrize('reduce', ['max', 'avg'])
@pytest.mark.parametrize('ratio,scale,out_hw', [(1, 1.0, (3, 3)), (2, 0.5, (4, 3)),
                                                (3, 0.25, (2, 2))])
def test_matches_reference_forward_and_grad(reduce, ratio, scale, out_hw):
  rng = np.random.default_rng(ratio * 10 + len(reduce))
  h, w, c = 9, 11, 3
  feat = rng.normal(size=(h, w, c)).astype(np.float32)
  boxes = odd_boxes(rng, 40, h / scale, w / scale)
  boxes[-1] = [np.nan, 0, 1, 1]  # padding garbage: zeros, no gradient
  cot = rng.normal(size=(len(boxes),) + out_hw + (c,)).astype(np.float32)
  want, want_grad = np_roi_warp(feat, boxes, out_hw, scale, ratio, reduce, cot)
  for backend in ('xla', 'cpu'):
    (_, out), grad = warp_fn(out_hw, scale, ratio, reduce, backend)(feat, boxes, cot)
    np.testing.assert_allclose(out, want, atol=1e-5, err_msg=backend)
    np.testing.assert_allclose(grad, want_grad, atol=1e-4, err_msg=backend)
  assert np.abs(want).max() > 0.5 and np.abs(want_grad).max() > 0.5  # the cases are not empty


def test_one_sample_per_one_pixel_bin_reads_that_pixel_so_warp_max_equals_pool():
  """Boxes of 4 whole pixels into 4 bins: every bin is one pixel and its one sample sits at the
  pixel's centre, so RoIWarp (either reduction) equals RoIPool exactly."""
  rng = np.random.default_rng(3)
  feat = jnp.asarray(rng.normal(size=(12, 12, 4)).astype(np.float32))
  xy = rng.integers(0, 6, (20, 2)).astype(np.float32)
  boxes = jnp.asarray(np.concatenate([xy, xy + 3.0], 1))  # 4 pixels per side -> 4 bins of 1
  pool = roi_ops.roi_pool(feat, boxes, 4, 1.0)
  for reduce in ('max', 'avg'):
    np.testing.assert_allclose(roi_warp.roi_warp(feat, boxes, 4, 1.0, 1, reduce), pool,
                               atol=1e-6)
  # Two samples per axis interpolate towards the neighbours: no longer RoIPool.
  assert np.abs(roi_warp.roi_warp(feat, boxes, 4, 1.0, 2, 'avg') - pool).max() > 0.1


def test_multilevel_warp_matches_per_level_warp():
  rng = np.random.default_rng(5)
  levels = [jnp.asarray(rng.normal(size=(32 // 2**k, 32 // 2**k, 4)).astype(np.float32))
            for k in range(3)]  # levels 2, 3, 4 of a 128-pixel image
  boxes = odd_boxes(rng, 30, 128, 128) * np.float32(1.0)
  boxes[:10, 2:] = boxes[:10, :2] + 100.0  # some large RoIs, for the coarse levels
  level = np.asarray(roi_levels.assign_levels(jnp.asarray(boxes), 2, 4, 4, 56))
  assert len(set(level.tolist())) == 3
  for reduce in ('max', 'avg'):
    out = roi_levels.multilevel_roi_align(levels, boxes, 3, 2, min_level=2, canonical_scale=56,
                                       op='warp', warp_reduce=reduce)
    for lv in range(2, 5):
      sel = level == lv
      want = roi_warp.roi_warp(levels[lv - 2], boxes[sel], 3, 2.0**-lv, 2, reduce)
      np.testing.assert_allclose(out[sel], want, atol=1e-6)


def test_no_rois_and_argument_validation():
  f = jnp.ones((4, 4, 2))
  assert roi_warp.roi_warp(f, jnp.zeros((0, 4)), 3, 1.0).shape == (0, 3, 3, 2)
  with pytest.raises(ValueError, match='sampling_ratio'):
    roi_warp.roi_warp(f, jnp.zeros((1, 4)), 3, 1.0, 0)
  with pytest.raises(ValueError, match='reduce'):
    roi_warp.roi_warp(f, jnp.zeros((1, 4)), 3, 1.0, 2, 'sum')
  with pytest.raises(ValueError, match="'warp'"):
    roi_levels.multilevel_roi_align([f], jnp.zeros((1, 4)), 3, op='bogus')
