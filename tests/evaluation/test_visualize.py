"""draw_predictions: shape, dtype, mask blending and box outlines."""

import numpy as np
import pytest

from maskrcnn_jax.evaluation import visualize


def _prediction():
  masks = np.zeros((2, 60, 80), bool)
  masks[0, 30:50, 10:30] = True
  masks[1, 35:55, 50:75] = True
  return {'boxes': np.array([[10, 30, 30, 50], [50, 35, 75, 55]], np.float32),
          'scores': np.array([0.9, 0.3], np.float32),
          'labels': np.array([1, 2], np.int32),
          'masks': masks}


def test_shape_dtype_and_input_untouched():
  image = np.full((60, 80, 3), 100, np.uint8)
  copy = image.copy()
  out = visualize.draw_predictions(image, _prediction(), {1: 'cat', 2: 'dog'})
  assert out.shape == (60, 80, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(image, copy)


def test_mask_pixels_blend_towards_label_colour():
  image = np.full((60, 80, 3), 100, np.uint8)
  out = visualize.draw_predictions(image, _prediction(), ['bg', 'cat', 'dog'])
  for label, (y, x) in ((1, (42, 20)), (2, (47, 62))):  # inside a mask, away from edges/text
    expected = np.round(0.5 * 100 + 0.5 * np.array(visualize.label_color(label)))
    np.testing.assert_array_equal(out[y, x], expected)
  np.testing.assert_array_equal(out[5, 60], [100, 100, 100])  # outside everything
  assert visualize.label_color(1) != visualize.label_color(2)


def test_box_outline_and_threshold():
  image = np.zeros((60, 80, 3), np.uint8)
  prediction = {k: v for k, v in _prediction().items() if k != 'masks'}
  out = visualize.draw_predictions(image, prediction, None)
  np.testing.assert_array_equal(out[54, 60], visualize.label_color(2))  # bottom edge, box 2
  np.testing.assert_array_equal(out[45, 10], visualize.label_color(1))  # left edge, box 1
  filtered = visualize.draw_predictions(image, prediction, None, score_thresh=0.5)
  np.testing.assert_array_equal(filtered[54, 60], [0, 0, 0])
  np.testing.assert_array_equal(filtered[45, 10], visualize.label_color(1))


@pytest.mark.parametrize('shape', [(20, 30), (20, 30, 1)])
def test_grey_images_become_rgb(shape):
  empty = {'boxes': np.zeros((0, 4), np.float32), 'scores': np.zeros(0, np.float32),
           'labels': np.zeros(0, np.int32), 'masks': np.zeros((0, 20, 30), bool)}
  out = visualize.draw_predictions(np.full(shape, 7, np.uint8), empty)
  assert out.shape == (20, 30, 3)
  assert (out == 7).all()
