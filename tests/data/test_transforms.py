"""Tests of data/transforms.py: hand-checked values and a torch golden file."""
import os

import numpy as np
import pytest

from maskrcnn_jax.data import transforms as T

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'resize_golden.npz')


@pytest.mark.parametrize('h,w,mn,mx,expected', [
    (480, 640, 800, 1333, (800, 1066)),  # 640 * 800/480 = 1066.67
    (100, 1000, 800, 1333, (133, 1333)),  # max_size caps: scale 1.333
    (427, 640, 800, 1333, (800, 1199)),
    (64, 64, 64, 96, (64, 64)),
    (50, 70, 64, 96, (64, 89)),  # 70 * 1.28 = 89.6
])
def test_resize_shape_hand_values(h, w, mn, mx, expected):
  assert T.resize_shape(h, w, mn, mx) == expected


@pytest.mark.parametrize('h,w,expected', [
    (2, 3000, (1, 1333)),  # 2 * 1333/3000 = 0.89 floors to 0
    (3000, 2, (1333, 1)),
    (1, 100000, (1, 1333)),
])
def test_resize_shape_keeps_extreme_aspect_ratios_at_least_one_pixel(h, w, expected):
  assert T.resize_shape(h, w, 800, 1333) == expected
  out = T.resize_image(np.ones((h, w, 3), np.uint8), *expected)
  assert out.shape == expected + (3,) and (out == 1).all()


def test_resize_image_hand_values():
  img = np.array([[0., 1.], [2., 3.]], np.float32)
  up = T.resize_image(img, 4, 4)
  # align_corners=False: output x=0 maps to src -0.25 -> clamped 0; x=1 -> 0.25; x=2 -> 0.75.
  np.testing.assert_allclose(up[0], [0, 0.25, 0.75, 1], atol=1e-6)
  np.testing.assert_allclose(up[:, 0], [0, 0.5, 1.5, 2], atol=1e-6)
  np.testing.assert_allclose(up[1, 1], 0.25 * 0.25 * 3 + 0.25 * 0.75 * 1 + 0.75 * 0.25 * 2,
                             atol=1e-6)
  down = T.resize_image(np.arange(16, dtype=np.float32).reshape(4, 4), 2, 2)
  # 2x downsampling samples at src 0.5, 2.5: averages of 2x2 blocks, no antialias.
  np.testing.assert_allclose(down, [[2.5, 4.5], [10.5, 12.5]], atol=1e-6)
  rgb = np.stack([img, img * 2, img * 3], -1).astype(np.uint8)
  out = T.resize_image(rgb, 4, 4)
  assert out.dtype == np.float32 and out.shape == (4, 4, 3)
  np.testing.assert_allclose(out[..., 2], 3 * up, atol=1e-5)


def test_resize_against_torch_golden():
  g = np.load(GOLDEN)
  for h, w, mn, mx, th, tw in g['sizes']:
    assert T.resize_shape(int(h), int(w), int(mn), int(mx)) == (th, tw), (h, w, mn, mx)
  n = 0
  while f'image_{n}' in g:
    ref = g[f'resized_{n}']
    out = T.resize_image(g[f'image_{n}'], *ref.shape[:2])
    # Values are 0..255; torch's fused float32 arithmetic differs in the last bits.
    np.testing.assert_allclose(out, ref, atol=2e-3, rtol=0)
    mref = g[f'masks_resized_{n}']
    np.testing.assert_array_equal(T.resize_masks(g[f'masks_{n}'], *mref.shape[1:]), mref)
    n += 1
  assert n >= 5


def test_resize_masks_bilinear_threshold():
  m = np.zeros((1, 4, 4), np.uint8)
  m[0, :, :2] = 1
  out = T.resize_masks(m, 8, 8, mode='bilinear')
  # Column 3 of 8 reads src 1.25 (0.75 * 1 + 0.25 * 0 >= 0.5); column 4 reads src 1.75 (0.25).
  np.testing.assert_array_equal(out[0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
  assert out.dtype == np.uint8
  with pytest.raises(ValueError):
    T.resize_masks(m, 8, 8, mode='cubic')


def test_resize_boxes():
  boxes = np.array([[10, 20, 30, 40]], np.float32)
  np.testing.assert_allclose(T.resize_boxes(boxes, 100, 200, 50, 400), [[20, 10, 60, 20]])


def test_normalize_and_channel_order():
  img = np.zeros((1, 1, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
  out = T.normalize(img, (1, 2, 3), (1, 2, 3), 'RGB')
  np.testing.assert_allclose(out[0, 0], [9, 9, 9])
  out = T.normalize(img, (3, 2, 1), (1, 2, 4), 'BGR')  # mean/std given in BGR order
  np.testing.assert_allclose(out[0, 0], [27, 9, 2.25])
  with pytest.raises(ValueError):
    T.normalize(img, (0, 0, 0), (1, 1, 1), 'RBG')


def test_pad_to():
  img = np.ones((2, 3, 3), np.float32)
  out = T.pad_to(img, 4, 5)
  assert out.shape == (4, 5, 3) and out.sum() == 18 and out[:2, :3].min() == 1
  with pytest.raises(ValueError):
    T.pad_to(img, 1, 5)


def test_hflip_boxes_and_masks_agree():
  rng = np.random.default_rng(0)
  masks = np.zeros((3, 10, 16), np.uint8)
  boxes = []
  for k in range(3):
    x1, y1 = rng.integers(0, 8, 2)
    x2, y2 = x1 + rng.integers(1, 8), y1 + rng.integers(1, 3)
    masks[k, y1:y2, x1:x2] = 1
    boxes.append([x1, y1, x2, y2])
  img = rng.random((10, 16, 3)).astype(np.float32)
  fimg, fboxes, fmasks = T.hflip(img, np.array(boxes, np.float32), masks)
  np.testing.assert_array_equal(fimg[:, 0], img[:, -1])
  for k in range(3):
    ys, xs = np.nonzero(fmasks[k])
    np.testing.assert_array_equal(fboxes[k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  np.testing.assert_array_equal(T.hflip_boxes(fboxes, 16), boxes)


def test_crop_and_resize_masks_hand_values():
  m = np.zeros((2, 8, 8), np.uint8)
  m[0, 2:6, 2:6] = 1
  m[1, 0:4, 0:8] = 1
  boxes = np.array([[2, 2, 6, 6], [0, 0, 8, 8]], np.float32)
  out = T.crop_and_resize_masks(m, boxes, 4)
  assert out.dtype == np.uint8 and out.shape == (2, 4, 4)
  np.testing.assert_array_equal(out[0], np.ones((4, 4)))  # box == mask: all foreground
  np.testing.assert_array_equal(out[1], [[1] * 4, [1] * 4, [0] * 4, [0] * 4])  # top half
  # A box wider than the mask: left half of the box is the mask.
  out = T.crop_and_resize_masks(m[:1], np.array([[2, 2, 10, 6]], np.float32), 4)
  np.testing.assert_array_equal(out[0], [[1, 1, 0, 0]] * 4)
  assert T.crop_and_resize_masks(m[:0], boxes[:0], 4).shape == (0, 4, 4)


def test_crop_with_index_maps_equals_crop_of_resized_flipped_masks():
  rng = np.random.default_rng(1)
  masks = (rng.random((3, 13, 17)) > 0.4).astype(np.uint8)
  new_h, new_w = 20, 11
  boxes = np.array([[0, 0, 11, 20], [2.5, 3.25, 9.0, 14.5], [4, 1, 6, 19]], np.float32)
  full = T.hflip_masks(T.resize_masks(masks, new_h, new_w))
  ref = T.crop_and_resize_masks(full, boxes, 7)
  out = T.crop_and_resize_masks(masks, boxes, 7, row_map=T.nearest_indices(13, new_h),
                                col_map=T.nearest_indices(17, new_w)[::-1])
  np.testing.assert_array_equal(out, ref)


# detectron2 ResizeShortestEdge(800, 1333) sizes, worked by hand: the long side scales with the
# short one and each is rounded half up (torchvision floors: 427x640 -> 800x1199 there too, but
# 300x451 -> 800x1202 where detectron2 gives 800x1203).
@pytest.mark.parametrize('h,w,expected', [
    ((427), 640, (800, 1199)),  # 640 * 800 / 427 = 1199.06
    (300, 451, (800, 1203)),  # 1202.67 rounds up
    (512, 512, (800, 800)),
    (1000, 1500, (800, 1200)),
    (480, 1280, (500, 1333)),  # long side capped: 800 x 2133.3 shrunk by 1333 / 2133.3
    (2, 3000, (1, 1333)),  # short side 0.89 -> 1 (kept at 1 pixel)
])
def test_detectron2_resize_shape(h, w, expected):
  assert T.resize_shape(h, w, 800, 1333, 'detectron2') == expected


def test_detectron2_resize_is_pil_on_uint8_and_then_normalised():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 45, 3)).astype(np.uint8)
  mean, std = (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)
  x, hw, bucket = T.prepare_image(image, 40, 100, mean, std, 'BGR', ((64, 64),),
                                  resize='detectron2')
  assert hw == (40, 60) and bucket == (64, 64)
  pil = np.asarray(Image.fromarray(image).resize((60, 40), Image.BILINEAR))
  np.testing.assert_array_equal(x[:40, :60], T.normalize(pil, mean, std, 'BGR'))
  assert not x[40:].any() and not x[:, 60:].any()
  with pytest.raises(ValueError, match='input.resize'):
    T.resize_shape(30, 45, 40, 100, 'pil')
