"""Tests for maskrcnn_jax.ops.masks.paste_masks against a NumPy port of torchvision's pasting."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

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
