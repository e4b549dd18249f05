"""Fixtures of the modeling tests (tiny config variables built with NumPy, see helpers.py)."""

import functools

import jax
import pytest

from tests.modeling.helpers import numpy_variables


@pytest.fixture(scope='session')
def tiny_variables(tiny_config):
  """NumPy random variables of the tiny MaskRCNN (mask_on)."""
  from maskrcnn_jax.modeling import mask_rcnn
  shapes = jax.eval_shape(functools.partial(mask_rcnn.init_variables, tiny_config),
                          jax.random.key(0))
  return numpy_variables(shapes, seed=0)
