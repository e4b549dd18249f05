"""Tests for maskrcnn_jax.ops.roi_align against loop references of torchvision's CPU kernels."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from maskrcnn_jax.backends import cpu_gather
from maskrcnn_jax.ops import roi_align as roi_ops
from maskrcnn_jax.ops import roi_levels

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ops_golden.npz'


# ------------------------------------------------------------------------------------------------
# NumPy references (slow, loop per RoI / bin / sample, written from torchvision's CPU kernels)
# ------------------------------------------------------------------------------------------------


def np_bilinear_taps(y, x, h, w):
  """[(weight, yi, xi)] of one sample, torchvision bilinear_interpolate rules."""
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return []
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  hy, hx = 1.0 - ly, 1.0 - lx
  return [(hy * hx, y0, x0), (hy * lx, y0, x1), (ly * hx, y1, x0), (ly * lx, y1, x1)]


def np_roi_align(feat, boxes, out_hw, scale, ratio, aligned, cot=None, cap=None):
  """Forward output [N, oh, ow, C] and, given a cotangent, the feature gradient [H, W, C].

  `ratio=0` is the kernel's adaptive grid, ceil(RoI side / bins) per axis; `cap` clips it."""
  h, w, c = feat.shape
  oh, ow = out_hw
  out = np.zeros((len(boxes), oh, ow, c), np.float64)
  grad = np.zeros((h, w, c), np.float64)
  off = 0.5 if aligned else 0.0
  for n, b in enumerate(boxes.astype(np.float64)):
    x1, y1, x2, y2 = b * scale - off
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / oh, rw / ow
    gy = ratio if ratio > 0 else int(np.ceil(rh / oh))
    gx = ratio if ratio > 0 else int(np.ceil(rw / ow))
    if cap is not None:
      gy, gx = min(gy, cap), min(gx, cap)
    count = max(gy * gx, 1)
    for ph in range(oh):
      for pw in range(ow):
        for iy in range(gy):
          y = y1 + ph * bh + (iy + 0.5) * bh / gy
          for ix in range(gx):
            x = x1 + pw * bw + (ix + 0.5) * bw / gx
            for wgt, yi, xi in np_bilinear_taps(y, x, h, w):
              out[n, ph, pw] += wgt * feat[yi, xi] / count
              if cot is not None:
                grad[yi, xi] += wgt * cot[n, ph, pw] / count
  return out, grad


def c_round(v):
  return np.floor(v + 0.5) if v >= 0 else -np.floor(-v + 0.5)


def np_roi_pool(feat, boxes, out_hw, scale, cot=None):
  h, w, c = feat.shape
  oh, ow = out_hw
  out = np.zeros((len(boxes), oh, ow, c), np.float32)
  grad = np.zeros((h, w, c), np.float64)
  for n, b in enumerate(boxes):
    xs, ys, xe, ye = (int(c_round(np.float32(v) * np.float32(scale))) for v in b)
    rw, rh = max(xe - xs + 1, 1), max(ye - ys + 1, 1)
    bh, bw = np.float32(rh) / np.float32(oh), np.float32(rw) / np.float32(ow)
    for ph in range(oh):
      h0 = min(max(int(np.floor(np.float32(ph) * bh)) + ys, 0), h)
      h1 = min(max(int(np.ceil(np.float32(ph + 1) * bh)) + ys, 0), h)
      for pw in range(ow):
        w0 = min(max(int(np.floor(np.float32(pw) * bw)) + xs, 0), w)
        w1 = min(max(int(np.ceil(np.float32(pw + 1) * bw)) + xs, 0), w)
        if h1 <= h0 or w1 <= w0:
          continue
        for ch in range(c):
          best, arg = -np.inf, None
          for yy in range(h0, h1):
            for xx in range(w0, w1):
              if feat[yy, xx, ch] > best:
                best, arg = feat[yy, xx, ch], (yy, xx)
          out[n, ph, pw, ch] = best
          if cot is not None:
            grad[arg[0], arg[1], ch] += cot[n, ph, pw, ch]
  return out, grad


def odd_boxes(rng, n, h, w):
  """Image-pixel boxes for a map of h x w image pixels: leaving the map, tiny, empty, inverted."""
  xy = rng.uniform([-0.3 * w, -0.3 * h], [1.1 * w, 1.1 * h], (n, 2))
  wh = rng.uniform(-0.1 * w, 0.6 * w, (n, 2))
  wh[:n // 8] = 0.0
  wh[n // 8:n // 4] *= 0.02
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def align_fn(out_hw, scale, ratio, aligned):
  def loss(f, b, t):
    out = roi_ops.roi_align(f, b, out_hw, scale, ratio, aligned)
    return jnp.vdot(out, t), out
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


# ------------------------------------------------------------------------------------------------
# RoIAlign
# ------------------------------------------------------------------------------------------------


def test_toy_5x5_known_answers():
  feat = (10 * np.arange(5)[:, None] + np.arange(5)[None, :]).astype(np.float32)[..., None]
  f = jnp.asarray(feat)
  # aligned: samples at (1, 1), (1, 2), (2, 1), (2, 2) -> mean 16.5 (bilinear is exact here).
  out = roi_ops.roi_align(f, jnp.array([[1., 1., 3., 3.]]), 1, 1.0, 2, aligned=True)
  np.testing.assert_allclose(out[0, :, :, 0], [[16.5]])
  # legacy 2x2 bins of size 2, one sample each at pixel (1|3, 1|3).
  out = roi_ops.roi_align(f, jnp.array([[0., 0., 4., 4.]]), 2, 1.0, 1, aligned=False)
  np.testing.assert_allclose(out[0, :, :, 0], [[11, 13], [31, 33]])
  # Samples at 3.75 and 5.25: those beyond the map (> 5) are zero -> 41.25 / 4.
  out = roi_ops.roi_align(f, jnp.array([[3., 3., 6., 6.]]), 1, 1.0, 2, aligned=False)
  np.testing.assert_allclose(out[0, :, :, 0], [[10.3125]])
  # A sample at (4.25, 4.25) lies between the last pixel and the edge: clamped to pixel (4, 4).
  out = roi_ops.roi_align(f, jnp.array([[3.5, 3.5, 5., 5.]]), 1, 1.0, 1, aligned=False)
  np.testing.assert_allclose(out[0, :, :, 0], [[44.0]])


@pytest.mark.parametrize('aligned', [False, True])
@pytest.mark.parametrize('ratio,scale', [(1, 0.25), (2, 0.5), (3, 1.0), (4, 0.125)])
def test_matches_reference_forward_and_grad(aligned, ratio, scale):
  rng = np.random.default_rng(ratio + 10 * aligned)
  feat = rng.standard_normal((7, 9, 3)).astype(np.float32)
  boxes = odd_boxes(rng, 24, 7 / scale, 9 / scale)
  cot = rng.standard_normal((24, 3, 2, 3)).astype(np.float32)
  (_, out), grad = align_fn((3, 2), scale, ratio, aligned)(feat, boxes, cot)
  ref, ref_grad = np_roi_align(feat, boxes, (3, 2), scale, ratio, aligned, cot)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_many_chunks_in_position_order_return_input_order(monkeypatch):
  # Chunks of 3 RoIs (25 RoIs: 9 chunks, 2 padded slots) visited in the sorted order of their
  # first tap; outputs and gradients must still match the reference RoI by RoI. The shapes are
  # unique to this test, so the patched chunk size is traced afresh.
  c = 5
  monkeypatch.setattr(cpu_gather, 'CHUNK_BYTES', 3 * 2 * 2 * 16 * c * 4)
  rng = np.random.default_rng(7)
  feat = rng.standard_normal((11, 13, c)).astype(np.float32)
  boxes = odd_boxes(rng, 25, 22, 26)
  cot = rng.standard_normal((25, 2, 2, c)).astype(np.float32)
  assert cpu_gather._chunking(25, 2, 2, 16, c) == (3, 9)  # pylint: disable=protected-access

  def loss(f, b, t):
    out = roi_ops.roi_align(f, b, (2, 2), 0.5, 2, False, backend='cpu')
    return jnp.vdot(out, t), out
  (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(feat, boxes, cot)
  ref, ref_grad = np_roi_align(feat, boxes, (2, 2), 0.5, 2, False, cot)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hw', [(1, 1), (1, 4), (3, 1)])
def test_one_pixel_wide_maps(hw):
  # The forward pass reads x-neighbours as two-row windows; a window at the map's last row is
  # moved back by one, and a 1-pixel map gets a padding row.
  rng = np.random.default_rng(sum(hw))
  feat = rng.standard_normal(hw + (3,)).astype(np.float32)
  boxes = odd_boxes(rng, 12, hw[0] * 2, hw[1] * 2)
  cot = rng.standard_normal((12, 2, 2, 3)).astype(np.float32)
  (_, out), grad = align_fn((2, 2), 0.5, 2, False)(feat, boxes, cot)
  ref, ref_grad = np_roi_align(feat, boxes, (2, 2), 0.5, 2, False, cot)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_torchvision_golden_forward_and_grad():
  g = np.load(GOLDEN)
  feat, boxes, cot = g['align_features'], g['align_boxes'], g['align_cotangent']
  for aligned in (False, True):
    for ratio in (1, 2, 3, 4):
      for scale in (0.25, 0.5):
        key = f'align_{int(aligned)}_{ratio}_{scale}'
        (_, out), grad = align_fn((4, 3), scale, ratio, aligned)(feat, boxes, cot)
        np.testing.assert_allclose(out, g[key], rtol=1e-5, atol=3e-6, err_msg=key)
        np.testing.assert_allclose(grad, g[key + '_grad'], rtol=1e-5, atol=1e-5, err_msg=key)


def test_numerical_gradient_and_zero_box_gradient():
  rng = np.random.default_rng(0)
  feat = jnp.asarray(rng.standard_normal((4, 5, 2)).astype(np.float32))
  boxes = jnp.asarray([[1., 1., 9., 13.], [-3., 2., 6., 30.], [5., 5., 5., 5.]])
  fn = lambda f: roi_ops.roi_align(f, boxes, 2, 0.5, 2, False)  # noqa: E731
  jtu.check_grads(fn, (feat,), order=1, modes=['rev'], eps=1e-2, atol=1e-2, rtol=1e-2)
  box_grad = jax.grad(lambda b: roi_ops.roi_align(feat, b, 2, 0.5, 2, False).sum())(boxes)
  np.testing.assert_array_equal(box_grad, np.zeros_like(box_grad))


def test_padded_rois_change_nothing():
  """Non-finite boxes (padding garbage) output 0 and add nothing to the feature gradient."""
  rng = np.random.default_rng(1)
  feat = rng.standard_normal((6, 6, 2)).astype(np.float32)
  good = odd_boxes(rng, 5, 24, 24)
  bad = np.array([[np.nan, 0, 4, 4], [0, 0, np.inf, 8], [-np.inf, 1, 2, 3]], np.float32)
  cot = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
  fn = align_fn((3, 2), 0.25, 2, False)
  (_, out), grad = fn(feat, np.concatenate([good, bad]), cot)
  ref, ref_grad = np_roi_align(feat, good, (3, 2), 0.25, 2, False, cot[:5])
  np.testing.assert_allclose(out[:5], ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_array_equal(out[5:], 0.0)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_bfloat16_features_accumulate_in_float32():
  rng = np.random.default_rng(2)
  feat = rng.standard_normal((6, 7, 4)).astype(np.float32)
  boxes = odd_boxes(rng, 10, 12, 14)
  fb = jnp.asarray(feat, jnp.bfloat16)
  out = roi_ops.roi_align(fb, boxes, 2, 0.5, 2, True)
  assert out.dtype == jnp.bfloat16
  ref, _ = np_roi_align(np.asarray(fb.astype(jnp.float32)), boxes, (2, 2), 0.5, 2, True)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)
  grad = jax.grad(lambda f: roi_ops.roi_align(f, boxes, 2, 0.5, 2, True).astype(
      jnp.float32).sum())(fb)
  assert grad.dtype == jnp.bfloat16
  _, ref_grad = np_roi_align(feat, boxes, (2, 2), 0.5, 2, True, np.ones((10, 2, 2, 4)))
  np.testing.assert_allclose(np.asarray(grad, np.float32), ref_grad, rtol=1e-2, atol=1e-2)


def test_vmap_over_images_and_sampling_ratio_validation():
  rng = np.random.default_rng(3)
  feats = rng.standard_normal((2, 5, 6, 2)).astype(np.float32)
  boxes = np.stack([odd_boxes(rng, 4, 10, 12) for _ in range(2)])
  out = jax.vmap(lambda f, b: roi_ops.roi_align(f, b, 2, 0.5, 2, False))(feats, boxes)
  for i in range(2):
    ref, _ = np_roi_align(feats[i], boxes[i], (2, 2), 0.5, 2, False)
    np.testing.assert_allclose(out[i], ref, rtol=1e-5, atol=2e-6)
  with pytest.raises(ValueError, match='sampling_ratio'):
    roi_ops.roi_align(jnp.asarray(feats[0]), jnp.asarray(boxes[0]), 2, 0.5, -1, False)
  with pytest.raises(ValueError, match='max_sampling_ratio'):
    roi_ops.roi_align(jnp.asarray(feats[0]), jnp.asarray(boxes[0]), 2, 0.5, 0, False,
                      max_sampling_ratio=0)


@pytest.mark.parametrize('aligned', [False, True])
def test_adaptive_sampling_matches_the_kernel_below_the_cap(aligned):
  """sampling_ratio=0: per-RoI ceil(side / bins) samples, exact while no RoI needs > cap."""
  rng = np.random.default_rng(11 + aligned)
  for case in range(12):
    h, w = rng.integers(3, 14, size=2)
    feat = rng.standard_normal((h, w, 3)).astype(np.float32)
    boxes = odd_boxes(rng, 9, 4 * h, 4 * w)
    out_hw = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    cot = rng.standard_normal((len(boxes),) + out_hw + (3,)).astype(np.float32)
    # 0.25 feature pixels per image pixel: the largest RoIs need up to ~w / bins samples.
    cap = 16
    ref, ref_grad = np_roi_align(feat, boxes, out_hw, 0.25, 0, aligned, cot)
    fn = lambda f: roi_ops.roi_align(f, jnp.asarray(boxes), out_hw, 0.25, 0, aligned,
                                     max_sampling_ratio=cap)
    out, vjp = jax.vjp(fn, jnp.asarray(feat))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6, err_msg=f'case {case}')
    np.testing.assert_allclose(vjp(jnp.asarray(cot))[0], ref_grad, rtol=1e-5, atol=1e-5,
                               err_msg=f'case {case}')


def test_adaptive_sampling_is_clipped_at_the_cap_and_matches_fixed_ratios():
  rng = np.random.default_rng(5)
  feat = rng.standard_normal((16, 16, 2)).astype(np.float32)
  boxes = np.array([[0, 0, 60, 60], [4, 8, 12, 50], [3, 3, 3, 9], [10, 10, 30, 14]], np.float32)
  for cap in (1, 2, 3):
    ref, _ = np_roi_align(feat, boxes, (2, 2), 0.25, 0, True, cap=cap)
    got = roi_ops.roi_align(jnp.asarray(feat), jnp.asarray(boxes), 2, 0.25, 0, True,
                            max_sampling_ratio=cap)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6, err_msg=f'cap {cap}')
  # A 60-px box at scale 1/4 in 2 bins needs 8 samples a side: with a cap of 8 it is the fixed 8.
  fixed = roi_ops.roi_align(jnp.asarray(feat), jnp.asarray(boxes[:1]), 2, 0.25, 8, True)
  adaptive = roi_ops.roi_align(jnp.asarray(feat), jnp.asarray(boxes[:1]), 2, 0.25, 0, True,
                               max_sampling_ratio=8)
  np.testing.assert_allclose(adaptive, fixed, rtol=1e-6, atol=1e-7)


def test_adaptive_sampling_in_the_multilevel_op():
  rng = np.random.default_rng(8)
  feats = [rng.standard_normal((32 // 2**k, 32 // 2**k, 2)).astype(np.float32) for k in range(3)]
  boxes = odd_boxes(rng, 20, 128, 128)
  got = roi_levels.multilevel_roi_align([jnp.asarray(f) for f in feats], jnp.asarray(boxes), 3,
                                     sampling_ratio=0, aligned=True, min_level=2,
                                     canonical_scale=56.0, max_sampling_ratio=12)
  levels = np.asarray(roi_levels.assign_levels(jnp.asarray(boxes), 2, 4, 4, 56.0))
  for n, lvl in enumerate(levels):
    ref, _ = np_roi_align(feats[lvl - 2], boxes[n:n + 1], (3, 3), 2.0 ** -lvl, 0, True)
    np.testing.assert_allclose(got[n:n + 1], ref, rtol=1e-5, atol=2e-6, err_msg=f'roi {n}')


# ------------------------------------------------------------------------------------------------
# RoIPool
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('scale', [0.25, 1.0])
def test_roi_pool_matches_reference(scale):
  rng = np.random.default_rng(int(scale * 4))
  feat = rng.standard_normal((7, 8, 3)).astype(np.float32)
  boxes = odd_boxes(rng, 20, 7 / scale, 8 / scale)
  cot = rng.standard_normal((20, 3, 2, 3)).astype(np.float32)
  fn = jax.jit(jax.value_and_grad(
      lambda f: jnp.vdot(roi_ops.roi_pool(f, boxes, (3, 2), scale), cot)))
  out = roi_ops.roi_pool(jnp.asarray(feat), jnp.asarray(boxes), (3, 2), scale)
  _, grad = fn(feat)
  ref, ref_grad = np_roi_pool(feat, boxes, (3, 2), scale, cot)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_roi_pool_torchvision_golden():
  g = np.load(GOLDEN)
  feat, boxes = jnp.asarray(g['align_features']), jnp.asarray(g['align_boxes'])
  for scale in (0.25, 0.5, 1.0):
    np.testing.assert_array_equal(roi_ops.roi_pool(feat, boxes, (4, 3), scale),
                                  g[f'pool_{scale}'])


# ------------------------------------------------------------------------------------------------
# FPN levels
# ------------------------------------------------------------------------------------------------


def test_assign_levels():
  boxes = jnp.array([[0, 0, 224, 224], [0, 0, 223, 223], [0, 0, 448, 448], [0, 0, 10, 10],
                     [0, 0, 2000, 2000], [0, 0, 0, 0], [5, 5, 1, 1], [np.nan, 0, 1, 1]],
                    jnp.float32)
  np.testing.assert_array_equal(roi_levels.assign_levels(boxes, 2, 5), [4, 3, 5, 2, 5, 2, 2, 2])


@pytest.mark.parametrize('op', ['align', 'pool'])
def test_multilevel_matches_per_level_ops(op):
  rng = np.random.default_rng(4)
  levels = [rng.standard_normal((32 // s, 48 // s, 2)).astype(np.float32) for s in (4, 8, 16, 32)]
  ctr = rng.uniform(0, [48, 32], (30, 2))
  wh = np.exp(rng.uniform(np.log(2), np.log(100), (30, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  cot = rng.standard_normal((30, 3, 3, 2)).astype(np.float32)

  def loss(levels):
    out = roi_levels.multilevel_roi_align(levels, boxes, 3, 2, False, min_level=2,
                                       canonical_scale=28, op=op)
    return jnp.vdot(out, cot), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(levels)
  lvl = np.asarray(roi_levels.assign_levels(jnp.asarray(boxes), 2, 5, 4, 28))
  assert len(set(lvl.tolist())) >= 3  # the case exercises a mix of levels
  for i, (b, l) in enumerate(zip(boxes, lvl)):
    if op == 'align':
      ref, _ = np_roi_align(levels[l - 2], b[None], (3, 3), 2.0**-l, 2, False)
    else:
      ref, _ = np_roi_pool(levels[l - 2], b[None], (3, 3), 2.0**-l)
    np.testing.assert_allclose(out[i], ref[0], rtol=1e-5, atol=2e-6)
  for k, g in enumerate(grads):
    mask = lvl == k + 2
    if op == 'align':
      _, ref_grad = np_roi_align(levels[k], boxes[mask], (3, 3), 2.0**-(k + 2), 2, False,
                                 cot[mask])
    else:
      _, ref_grad = np_roi_pool(levels[k], boxes[mask], (3, 3), 2.0**-(k + 2), cot[mask])
    np.testing.assert_allclose(g, ref_grad, rtol=1e-5, atol=1e-5)


def test_multilevel_torchvision_golden():
  g = np.load(GOLDEN)
  levels = [jnp.asarray(g[f'ml_level{l}']) for l in (2, 3, 4, 5)]
  out = roi_levels.multilevel_roi_align(levels, jnp.asarray(g['ml_boxes']), 5, 2, False,
                                     min_level=2, canonical_level=4, canonical_scale=56)
  np.testing.assert_allclose(out, g['ml_align'], rtol=1e-5, atol=3e-6)


def test_multilevel_one_compile_for_any_level_mix():
  traces = []
  levels = [jnp.ones((16 // s, 16 // s, 1)) for s in (4, 8, 16, 32)]

  @jax.jit
  def pool(b):
    traces.append(1)
    return roi_levels.multilevel_roi_align(levels, b, 2, canonical_scale=8)

  small = jnp.array([[0., 0., 2., 2.]] * 3)  # all on P2
  mixed = jnp.array([[0., 0., 2., 2.], [0., 0., 8., 8.], [0., 0., 16., 16.]])  # P2, P4, P5
  np.testing.assert_array_equal(roi_levels.assign_levels(mixed, 2, 5, 4, 8), [2, 4, 5])
  for b in (small, mixed):
    jax.block_until_ready(pool(b))
  assert len(traces) == 1


def test_no_rois_gives_empty_outputs_and_zero_gradients():
  """Zero boxes: `[0, oh, ow, C]` outputs and an all-zero feature gradient, for both ops."""
  feats = jnp.asarray(np.random.default_rng(0).normal(size=(12, 10, 4)), jnp.float32)
  boxes = jnp.zeros((0, 4), jnp.float32)
  ops = {'align': lambda f: roi_ops.roi_align(f, boxes, (3, 3), 0.5, 2, True),
         'pool': lambda f: roi_ops.roi_pool(f, boxes, (3, 3), 0.5)}
  for name, op in ops.items():
    assert op(feats).shape == (0, 3, 3, 4), name
    grad = jax.grad(lambda f: jnp.sum(op(f)))(feats)
    np.testing.assert_array_equal(grad, np.zeros(feats.shape), err_msg=name)
