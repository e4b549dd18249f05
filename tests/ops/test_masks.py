"""Tests for maskrcnn_jax.ops.masks: both pastes against NumPy references written from
torchvision's and detectron2's algorithms."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import masks as mask_ops

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ops_golden.npz'


def np_resize_bilinear(img, out_h, out_w):
  """F.interpolate(mode='bilinear', align_corners=False), written as loops."""
  in_h, in_w = img.shape

  def taps(o, in_size, out_size):
    src = max((in_size / out_size) * (o + 0.5) - 0.5, 0.0)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    lam = src - i0
    return i0, i1, 1.0 - lam, lam

  out = np.zeros((out_h, out_w))
  for y in range(out_h):
    y0, y1, wy0, wy1 = taps(y, in_h, out_h)
    for x in range(out_w):
      x0, x1, wx0, wx1 = taps(x, in_w, out_w)
      out[y, x] = (wy0 * (wx0 * img[y0, x0] + wx1 * img[y0, x1])
                   + wy1 * (wx0 * img[y1, x0] + wx1 * img[y1, x1]))
  return out


def np_paste_masks(masks, boxes, im_h, im_w):
  """torchvision roi_heads.paste_masks_in_image (expand by 1 px, int boxes, resize, paste)."""
  m = masks.shape[-1]
  scale = np.float32(m + 2) / np.float32(m)
  padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
  out = np.zeros((len(masks), im_h, im_w))
  for d, b in enumerate(boxes.astype(np.float32)):
    w_half = (b[2] - b[0]) * np.float32(0.5) * scale
    h_half = (b[3] - b[1]) * np.float32(0.5) * scale
    xc, yc = (b[2] + b[0]) * np.float32(0.5), (b[3] + b[1]) * np.float32(0.5)
    x1, y1, x2, y2 = (int(v) for v in (xc - w_half, yc - h_half, xc + w_half, yc + h_half))
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = np_resize_bilinear(padded[d], h, w)
    ya, yb, xa, xb = max(y1, 0), min(y2 + 1, im_h), max(x1, 0), min(x2 + 1, im_w)
    if yb > ya and xb > xa:
      out[d, ya:yb, xa:xb] = resized[ya - y1:yb - y1, xa - x1:xb - x1]
  return out


def mask_iou(a, b):
  inter = np.logical_and(a, b).sum((1, 2))
  union = np.logical_or(a, b).sum((1, 2))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def random_case(rng, d, m, h, w):
  masks = rng.uniform(size=(d, m, m)).astype(np.float32)
  masks = (masks + masks[:, ::-1]) / 2  # smoother blobs than iid noise
  xy = rng.uniform([-0.2 * w, -0.2 * h], [w, h], (d, 2))
  wh = rng.uniform(0, 0.7 * max(h, w), (d, 2))
  wh[0] = 0.0
  wh[1] = 0.3
  return masks, np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_matches_numpy_port_of_torchvision():
  rng = np.random.default_rng(0)
  masks, boxes = random_case(rng, 16, 14, 40, 56)
  out = np.asarray(mask_ops.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), 40, 56))
  ref = np_paste_masks(masks, boxes, 40, 56)
  assert out.shape == (16, 40, 56) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=1e-5)
  iou = mask_iou(out > 0.5, ref > 0.5)
  assert iou.mean() >= 0.999, iou


def test_torchvision_golden():
  g = np.load(GOLDEN)
  out = np.asarray(mask_ops.paste_masks(jnp.asarray(g['paste_masks']),
                                        jnp.asarray(g['paste_boxes']), 48, 64))
  np.testing.assert_allclose(out, g['paste_out'], atol=1e-5)
  assert mask_iou(out > 0.5, g['paste_out'] > 0.5).min() >= 0.99


def test_toy_full_box_and_outside_boxes():
  # A constant mask fills its expanded integer box exactly and nothing else.
  masks = np.ones((3, 4, 4), np.float32)
  boxes = np.array([[2, 2, 6, 6], [-50, -50, -20, -20], [np.nan, 0, 5, 5]], np.float32)
  out = np.asarray(mask_ops.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), 10, 10))
  # Box [2, 6] expands by 6/4 about 4 to [1, 7]: pixels 1..7; the zero padding halves the
  # border pixels' probability.
  inside = out[0] > 0.5
  assert inside[2:7, 2:7].all() and not inside[:1].any() and not inside[8:].any()
  assert out[0, 0].max() == 0 and out[0, 9].max() == 0
  np.testing.assert_array_equal(out[1:], 0.0)  # outside the canvas / garbage: empty


def test_vmap_over_images():
  rng = np.random.default_rng(1)
  cases = [random_case(rng, 4, 8, 20, 24) for _ in range(2)]
  masks, boxes = (np.stack(x) for x in zip(*cases))
  out = jax.jit(jax.vmap(lambda m, b: mask_ops.paste_masks(m, b, 20, 24)))(masks, boxes)
  for i in range(2):
    np.testing.assert_allclose(out[i], np_paste_masks(masks[i], boxes[i], 20, 24), atol=1e-5)


# ------------------------------------------------------------------------------ detectron2 paste


def np_grid_sample_1d_taps(coord, size):
  """grid_sample(align_corners=False, padding_mode='zeros') along one axis: [(index, weight)]
  of the in-bounds taps at float32 normalised coordinate `coord`, in float32 as PyTorch."""
  f32 = np.float32
  src = ((coord + f32(1)) * f32(size) - f32(1)) / f32(2)
  i0 = int(np.floor(src))
  taps = [(i0, f32(i0 + 1) - src), (i0 + 1, src - f32(i0))]
  return [(i, float(w)) for i, w in taps if 0 <= i < size]


def np_paste_masks_detectron2(masks, boxes, im_h, im_w, window=False):
  """detectron2 `paste_masks_in_image` written as loops over pixels (float32 coordinates).

  Pixel (y, x) samples the mask at its centre mapped into the float box:
  g = (p + 0.5 - lo) / (hi - lo) * 2 - 1 on each axis. `window=True` samples only the pixels
  of detectron2's CPU path (`skip_empty`: the box grown to integers plus one pixel), zero
  elsewhere; empty boxes (which detectron2 drops before pasting) give zeros.
  """
  m = masks.shape[-1]
  out = np.zeros((len(masks), im_h, im_w))
  f32 = np.float32
  for d, (x0, y0, x1, y1) in enumerate(boxes.astype(np.float32)):
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
      continue
    ys, xs = range(im_h), range(im_w)
    if window:
      ys = range(max(int(np.floor(y0)) - 1, 0), min(int(np.ceil(y1)) + 1, im_h))
      xs = range(max(int(np.floor(x0)) - 1, 0), min(int(np.ceil(x1)) + 1, im_w))
    for y in ys:
      gy = (f32(y) + f32(0.5) - y0) / (y1 - y0) * f32(2) - f32(1)
      ty = np_grid_sample_1d_taps(gy, m)
      for x in xs:
        gx = (f32(x) + f32(0.5) - x0) / (x1 - x0) * f32(2) - f32(1)
        tx = np_grid_sample_1d_taps(gx, m)
        out[d, y, x] = sum(wy * wx * masks[d, iy, ix] for iy, wy in ty for ix, wx in tx)
  return out


def d2_random_case(rng, d, m, h, w):
  """Boxes of every kind: inside, across every edge, far outside, tiny (< 1 px), thin,
  empty, inverted, non-finite; masks with exact 0 / 1 regions and values at 0.5."""
  masks = rng.uniform(size=(d, m, m)).astype(np.float32)
  masks = (masks + masks[:, ::-1]) / 2
  masks[0] = 1.0
  masks[1, : m // 2] = 0.5
  xy = rng.uniform([-0.3 * w, -0.3 * h], [1.1 * w, 1.1 * h], (d, 2))
  wh = rng.uniform(0.1, 0.8 * max(h, w), (d, 2)) * rng.choice([0.02, 1.0], (d, 1))
  boxes = np.concatenate([xy, xy + wh], 1)
  boxes[2] = [3.2, 4.7, 3.6, 5.1]  # smaller than a pixel
  boxes[3] = [-5.0, 2.0, w + 5.0, h + 7.0]  # covers the canvas and beyond
  boxes[4] = [5.0, 5.0, 5.0, 9.0]  # empty
  boxes[5] = [8.0, 8.0, 4.0, 12.0]  # inverted
  boxes[6] = [np.nan, 1.0, 4.0, 6.0]
  boxes[7] = [w - 1.5, 0.0, w + 30.0, 1.25]  # thin, across the right and top edges
  boxes[8] = [1.0, 1.0, 1.0 + 1.0 / 3.0, 11.0]  # 1/3 px wide
  boxes[9] = [-1e9, -1e9, -1e9 + 10, 10.0]  # absurd
  return masks, boxes.astype(np.float32)


def test_detectron2_paste_matches_numpy_reference():
  rng = np.random.default_rng(0)
  for m, (h, w) in ((28, (37, 53)), (5, (20, 16)), (14, (64, 48))):
    masks, boxes = d2_random_case(rng, 24, m, h, w)
    out = np.asarray(mask_ops.paste_masks_detectron2(jnp.asarray(masks), jnp.asarray(boxes),
                                                     h, w))
    ref = np_paste_masks_detectron2(masks, boxes, h, w)
    assert out.shape == (24, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_array_equal(out[4:7], 0.0)  # empty, inverted, non-finite
    # Thresholded as detectron2 (>= 0.5): equal but for values within float error of 0.5.
    near = np.abs(ref - 0.5) < 1e-5
    np.testing.assert_array_equal((out >= 0.5)[~near], (ref >= 0.5)[~near])


def test_detectron2_paste_equals_its_cpu_window_after_threshold():
  """detectron2's CPU path samples only the box grown by a pixel; for thresholds >= 0.5 the
  whole-canvas sampling here gives the same binary masks (outside the window weights are < 1/2)."""
  rng = np.random.default_rng(1)
  masks, boxes = d2_random_case(rng, 24, 28, 40, 40)
  masks[:12] = np.where(masks[:12] > 0.3, 1.0, masks[:12])  # saturated borders: the worst case
  out = np.asarray(mask_ops.paste_masks_detectron2(jnp.asarray(masks), jnp.asarray(boxes),
                                                   40, 40))
  ref = np_paste_masks_detectron2(masks, boxes, 40, 40, window=True)
  for t in (0.5, 0.7):
    near = np.abs(ref - t) < 1e-5
    np.testing.assert_array_equal((out >= t)[~near], (ref >= t)[~near])


def test_detectron2_paste_toy_geometry():
  # With one mask cell per pixel (box [2.5, 6.5], M = 4) pixels 3..5, whose centres are cell
  # centres, take the mask's value; pixels 2 and 6, whose centres lie on the box edge, are half
  # zero padding (0.5, kept by detectron2's >= 0.5), the corners a quarter; nothing beyond.
  masks = np.ones((2, 4, 4), np.float32)
  boxes = np.array([[2.5, 2.5, 6.5, 6.5], [0.0, 0.0, 10.0, 10.0]], np.float32)
  out = np.asarray(mask_ops.paste_masks_detectron2(jnp.asarray(masks), jnp.asarray(boxes),
                                                   10, 10))
  edge = np.array([0, 0, 0.5, 1, 1, 1, 0.5, 0, 0, 0])
  np.testing.assert_allclose(out[0], edge[:, None] * edge[None, :], atol=1e-6)
  assert (out[0] >= 0.5).sum() == 5 * 5 - 4
  # A 10 px box on a 4-cell mask: cell centres at 1.25 .. 8.75, so the outer pixels (centres 0.5
  # and 9.5) are 0.3 cell into the zero padding.
  rim = np.array([0.7] + [1.0] * 8 + [0.7])
  np.testing.assert_allclose(out[1], rim[:, None] * rim[None, :], atol=1e-6)


def test_paste_and_threshold_modes():
  rng = np.random.default_rng(2)
  masks, boxes = d2_random_case(rng, 12, 28, 30, 30)
  masks[1] = 0.5  # exactly the threshold: detectron2 keeps it, torchvision does not
  boxes[1] = [2.0, 2.0, 20.0, 20.0]
  tv = np.asarray(mask_ops.paste_and_threshold(masks, boxes, 30, 30, 0.5, 'torchvision'))
  d2 = np.asarray(mask_ops.paste_and_threshold(masks, boxes, 30, 30, 0.5, 'detectron2'))
  np.testing.assert_array_equal(tv, np.asarray(mask_ops.paste_masks(masks, boxes, 30, 30)) > 0.5)
  assert d2.dtype == bool and d2[1, 5:18, 5:18].all() and not tv[1].any()
  with pytest.raises(ValueError, match='mask paste mode'):
    mask_ops.paste_and_threshold(masks, boxes, 30, 30, 0.5, 'pil')


def test_mask_paste_config_field():
  """`model.test.mask_paste`: validated naming the field, read by the mask head, set by the
  presets (the torchvision paste by default, detectron2's by the detectron2 presets)."""
  from configs import detectron2_maskrcnn_r101_fpn  # pylint: disable=g-import-not-at-top
  from configs import detectron2_maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  from configs import maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import backends  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import structures  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling import mask_head  # pylint: disable=g-import-not-at-top
  base = maskrcnn_r50_fpn.get_config('tiny')
  assert base.model.test.mask_paste == 'torchvision'
  for preset in (detectron2_maskrcnn_r50_fpn, detectron2_maskrcnn_r101_fpn):
    for mode in ('', 'tiny'):
      c = preset.get_config(mode)
      structures.validate_config(c)
      assert c.model.test.mask_paste == 'detectron2'
      head = mask_head.MaskHead.from_config(c, backends.get('xla'))
      assert head.mask_paste == 'detectron2'
  assert detectron2_maskrcnn_r101_fpn.get_config().model.backbone.depth == 101
  assert mask_head.MaskHead.from_config(base, backends.get('xla')).mask_paste == 'torchvision'
  base.model.test.mask_paste = 'pil'
  with pytest.raises(structures.ConfigError, match=r'model\.test\.mask_paste'):
    structures.validate_config(base)
