"""Fixtures of the data tests: small COCO-format folders written to tmp_path."""
import pytest

from tests.data import coco_testdata


@pytest.fixture
def mixed_coco(tmp_path):
  """(json_path, image_dir) of coco_testdata.write_mixed_coco."""
  return coco_testdata.write_mixed_coco(tmp_path / 'mixed')
