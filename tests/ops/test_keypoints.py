"""ops/keypoints.py against slow NumPy ports of torchvision's keypoints_to_heatmap,
heatmaps_to_keypoints (a per-RoI bicubic resize and argmax) and the predictor's 2x bilinear
upsampling, on many random cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import keypoints as kp_ops

A = -0.75


def np_keypoints_to_heatmap(kp, rois, s):
  """torchvision roi_heads.keypoints_to_heatmap, one RoI at a time, float32."""
  r, k = kp.shape[:2]
  target = np.zeros((r, k), np.int64)
  valid = np.zeros((r, k), bool)
  for i in range(r):
    x1, y1, x2, y2 = rois[i].astype(np.float32)
    if not (x2 - x1 > 0 and y2 - y1 > 0):
      continue
    sx, sy = np.float32(s) / (x2 - x1), np.float32(s) / (y2 - y1)
    for j in range(k):
      x, y, v = kp[i, j].astype(np.float32)
      cx = s - 1 if x == x2 else int(np.floor((x - x1) * sx))
      cy = s - 1 if y == y2 else int(np.floor((y - y1) * sy))
      ok = 0 <= cx < s and 0 <= cy < s and v > 0
      valid[i, j] = ok
      target[i, j] = cy * s + cx if ok else 0
  return target, valid


def _cubic(t):
  def near(x):
    return ((A + 2) * x - (A + 3)) * x * x + 1

  def far(x):
    return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def np_bicubic(m, out_h, out_w):
  """torch F.interpolate(mode='bicubic', align_corners=False) of one [S, S] map, float64."""
  s = m.shape[0]
  out = np.zeros((out_h, out_w))
  for oy in range(out_h):
    sy = (oy + 0.5) * (s / out_h) - 0.5
    iy, ty = math.floor(sy), sy - math.floor(sy)
    wy = _cubic(ty)
    for ox in range(out_w):
      sx = (ox + 0.5) * (s / out_w) - 0.5
      ix, tx = math.floor(sx), sx - math.floor(sx)
      wx = _cubic(tx)
      acc = 0.0
      for a in range(4):
        row = min(max(iy - 1 + a, 0), s - 1)
        acc += wy[a] * sum(wx[b] * m[row, min(max(ix - 1 + b, 0), s - 1)] for b in range(4))
      out[oy, ox] = acc
  return out


def np_heatmaps_to_keypoints(maps, rois):
  """torchvision roi_heads.heatmaps_to_keypoints."""
  d, k = maps.shape[:2]
  kps = np.zeros((d, k, 3))
  scores = np.zeros((d, k))
  for i in range(d):
    x1, y1, x2, y2 = rois[i]
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    ow, oh = int(math.ceil(w)), int(math.ceil(h))
    for j in range(k):
      up = np_bicubic(maps[i, j].astype(np.float64), oh, ow)
      pos = int(np.argmax(up))
      yi, xi = divmod(pos, ow)
      kps[i, j] = ((xi + 0.5) * (w / ow) + x1, (yi + 0.5) * (h / oh) + y1, 1.0)
      scores[i, j] = up[yi, xi]
  return kps, scores


@pytest.mark.parametrize('seed', range(8))
def test_keypoints_to_heatmap_matches_torchvision(seed):
  rng = np.random.default_rng(seed)
  r, k, s = 12, 5, 56
  x1y1 = rng.uniform(0, 50, (r, 2))
  wh = np.exp(rng.uniform(np.log(0.3), np.log(80), (r, 2)))  # some narrower than one cell
  rois = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
  rois[0, 2] = rois[0, 0]  # a zero-width RoI: no target
  kp = np.zeros((r, k, 3), np.float32)
  kp[..., :2] = rois[:, None, :2] + rng.uniform(-0.3, 1.3, (r, k, 2)) * wh[:, None].astype(
      np.float32)
  kp[..., 2] = rng.integers(0, 3, (r, k))
  kp[1, 0, :2] = rois[1, 2:]  # exactly on the right/bottom edges: the last cell
  kp[2, 1, :2] = rois[2, :2]  # on the top-left corner
  want_t, want_v = np_keypoints_to_heatmap(kp, rois, s)
  got_t, got_v = jax.jit(kp_ops.keypoints_to_heatmap, static_argnums=2)(kp, rois, s)
  np.testing.assert_array_equal(np.asarray(got_v), want_v)
  np.testing.assert_array_equal(np.asarray(got_t), want_t)
  assert want_v[1, 0] == (kp[1, 0, 2] > 0) and want_t[1, 0] in (0, s * s - 1)


def _peaked_maps(rng, d, k, s):
  """Heatmaps with one dominant Gaussian peak each, plus noise (trained heads look so)."""
  yy, xx = np.mgrid[0:s, 0:s]
  cy, cx = rng.uniform(0, s - 1, (2, d, k, 1, 1))
  sigma = rng.uniform(0.7, 3.0, (d, k, 1, 1))
  peak = 6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
  return (peak + rng.normal(0, 0.3, (d, k, s, s))).astype(np.float32)


@pytest.mark.parametrize('seed', range(4))
def test_heatmaps_to_keypoints_matches_torchvision(seed):
  rng = np.random.default_rng(seed)
  d, k, s, max_side = 6, 3, 56, 160
  maps = _peaked_maps(rng, d, k, s)
  x1y1 = rng.uniform(0, 60, (d, 2))
  # Sides from 1 to 100 pixels (many narrower than 56: several heatmap cells per pixel), aspect
  # ratios up to 4. (A box far thinner than that samples one row of noise, where any argmax
  # is as good as another: see the noise test.)
  side = np.exp(rng.uniform(0.0, np.log(100), d))
  aspect = np.exp(rng.uniform(-np.log(4), np.log(4), d))
  wh = np.stack([side, np.maximum(side * aspect, 1.0)], 1)
  rois = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
  want_k, want_s = np_heatmaps_to_keypoints(maps, rois)
  got_k, got_s = jax.jit(kp_ops.heatmaps_to_keypoints, static_argnums=2)(maps, rois, max_side)
  np.testing.assert_allclose(np.asarray(got_k), want_k, rtol=0, atol=1e-3)
  np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5, atol=1e-4)


def test_heatmaps_to_keypoints_on_noise_agrees_almost_always():
  """Pure noise heatmaps have many near-tied peaks, the hardest case for the grid-and-window
  argmax: the keypoint lands within one pixel of torchvision's most of the time (measured:
  0.84 of keypoints here); trained heads' single-peaked maps are exact (above)."""
  rng = np.random.default_rng(11)
  d, k, s = 8, 4, 56
  maps = rng.normal(0, 1, (d, k, s, s)).astype(np.float32)
  x1y1 = rng.uniform(0, 30, (d, 2))
  wh = rng.uniform(20, 70, (d, 2))
  rois = np.concatenate([x1y1, x1y1 + wh], 1).astype(np.float32)
  want_k, _ = np_heatmaps_to_keypoints(maps, rois)
  got_k, _ = kp_ops.heatmaps_to_keypoints(maps, rois, 128)
  close = np.all(np.abs(np.asarray(got_k)[..., :2] - want_k[..., :2]) <= 1.0, axis=-1)
  assert close.mean() >= 0.8, close.mean()


def test_upsample2x_bilinear_matches_torch_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  got = np.asarray(kp_ops.upsample2x_bilinear(jnp.asarray(x)))

  def ref_axis(n):
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    return i0, np.minimum(i0 + 1, n - 1), src - i0

  want = np.zeros((2, 10, 14, 3))
  (r0, r1, rl), (c0, c1, cl) = ref_axis(5), ref_axis(7)
  for i in range(10):
    for j in range(14):
      top = x[:, r0[i], c0[j]] * (1 - cl[j]) + x[:, r0[i], c1[j]] * cl[j]
      bot = x[:, r1[i], c0[j]] * (1 - cl[j]) + x[:, r1[i], c1[j]] * cl[j]
      want[:, i, j] = top * (1 - rl[i]) + bot * rl[i]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
