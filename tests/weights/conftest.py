"""Fixtures of tests/weights: the golden tiny torchvision model (read without torch)."""

import pytest

from tests.weights.golden_files import GOLDEN_PTH


@pytest.fixture(scope='session')
def tv_tiny_config():
  from configs import torchvision_maskrcnn_r50_fpn
  return torchvision_maskrcnn_r50_fpn.get_config('tiny')


@pytest.fixture(scope='session')
def _tv_state_dict():
  from maskrcnn_jax.weights import safe_io
  return safe_io.find_state_dict(safe_io.load_torch(str(GOLDEN_PTH), use_torch=False),
                                 str(GOLDEN_PTH))


@pytest.fixture
def tv_state_dict(_tv_state_dict):
  """`{torchvision name: float16 ndarray}` of the golden tiny Mask R-CNN (a fresh dict)."""
  return dict(_tv_state_dict)
