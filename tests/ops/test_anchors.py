"""Tests for maskrcnn_jax.ops.anchors (order, sizes, options) and a torchvision golden."""

import pathlib

import numpy as np
import pytest

from maskrcnn_jax.ops import anchors

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ops_golden.npz'
STRIDES = (4, 8, 16, 32, 64)
SIZES = (32, 64, 128, 256, 512)
RATIOS = (0.5, 1.0, 2.0)


def np_anchors(hw, stride, size, ratios, offset, round_base):
  """Loop reference: for each row, column, ratio an anchor centred at (i + offset) * stride."""
  fh, fw = -(-hw[0] // stride), -(-hw[1] // stride)
  out = []
  for i in range(fh):
    for j in range(fw):
      for r in ratios:
        w = size / np.sqrt(r)
        h = size * np.sqrt(r)
        half = np.array([-w / 2, -h / 2, w / 2, h / 2])
        if round_base:
          half = np.round(half)
        cx, cy = (j + offset) * stride, (i + offset) * stride
        out.append(half + [cx, cy, cx, cy])
  return np.array(out, np.float32)


def test_level_sizes():
  assert anchors.level_sizes((800, 1344), STRIDES) == [(200, 336), (100, 168), (50, 84),
                                                      (25, 42), (13, 21)]


@pytest.mark.parametrize('offset,round_base', [(0.0, True), (0.5, False), (0.0, False)])
def test_matches_loop_reference(offset, round_base):
  hw = (64, 96)
  levels = anchors.generate_anchors(hw, STRIDES, SIZES, RATIOS, offset, round_base)
  assert len(levels) == 5
  for lvl, stride, size in zip(levels, STRIDES, SIZES):
    assert lvl.dtype == np.float32
    np.testing.assert_allclose(lvl, np_anchors(hw, stride, size, RATIOS, offset, round_base),
                               atol=1e-4)


def test_order_is_location_major_then_anchor():
  lvl = anchors.generate_anchors((32, 32), (8,), (16,), RATIOS)[0].reshape(4, 4, 3, 4)
  centres = (lvl[..., :2] + lvl[..., 2:]) / 2
  # Same location for the 3 anchors; x moves along axis 1, y along axis 0 (NHWC flattening).
  np.testing.assert_allclose(centres[1, 2], [[16, 8]] * 3)
  widths = lvl[0, 0, :, 2] - lvl[0, 0, :, 0]
  heights = lvl[0, 0, :, 3] - lvl[0, 0, :, 1]
  np.testing.assert_allclose(heights / widths, RATIOS, rtol=0.1)  # ratio = height / width


def test_torchvision_golden():
  golden = np.load(GOLDEN)['anchors_64x96']
  levels = anchors.generate_anchors((64, 96), STRIDES, SIZES, RATIOS, stride_from_grid=True)
  np.testing.assert_array_equal(np.concatenate(levels), golden)
  # With nominal strides only P6 differs (96 / ceil(96 / 64) = 48 != 64).
  nominal = anchors.generate_anchors((64, 96), STRIDES, SIZES, RATIOS)
  first_four = np.concatenate(nominal[:4])
  np.testing.assert_array_equal(first_four, golden[:len(first_four)])
  assert not np.array_equal(nominal[4], golden[len(first_four):])


def test_multiple_sizes_per_level():
  lvl = anchors.generate_anchors((16, 16), (16,), ((32, 64),), (1.0,))[0]
  np.testing.assert_array_equal(lvl, [[-16, -16, 16, 16], [-32, -32, 32, 32]])
  assert anchors.num_anchors_per_location(((32, 64),), RATIOS) == 6
