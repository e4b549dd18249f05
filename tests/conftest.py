"""Test set-up: four virtual CPU devices (configured before JAX is imported anywhere), a
persistent compilation cache so repeated tiny-model compiles are cheap, and a synthetic batch."""
import os
import pathlib
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'maskrcnn_jax_test_jit_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def tiny_config():
  from configs import maskrcnn_r50_fpn
  return maskrcnn_r50_fpn.get_config('tiny')


def synthetic_batch(config, batch_size: int, seed: int = 0, bucket=None) -> dict:
  """A host batch in the `structures.py` format: random boxes holding filled ellipses."""
  rng = np.random.default_rng(seed)
  h, w = bucket or tuple(config.input.buckets[0])
  m, s = config.input.max_instances, config.input.gt_mask_size
  k = config.model.num_classes - 1
  images = rng.normal(0, 0.1, (batch_size, h, w, 3)).astype(np.float32)
  boxes = np.zeros((batch_size, m, 4), np.float32)
  labels = np.zeros((batch_size, m), np.int32)
  valid = np.zeros((batch_size, m), bool)
  yy, xx = np.mgrid[0:s, 0:s]
  ellipse = (((yy + 0.5) / s - 0.5) ** 2 + ((xx + 0.5) / s - 0.5) ** 2 <= 0.25).astype(np.uint8)
  masks = np.zeros((batch_size, m, s, s), np.uint8)
  for b in range(batch_size):
    n = int(rng.integers(1, min(m, 4) + 1))
    for j in range(n):
      bw, bh = rng.uniform(0.25, 0.6) * w, rng.uniform(0.25, 0.6) * h
      x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      boxes[b, j] = (x0, y0, x0 + bw, y0 + bh)
      labels[b, j] = rng.integers(1, k + 1)
      valid[b, j] = True
      masks[b, j] = ellipse
      iy0, ix0 = int(y0), int(x0)
      images[b, iy0:int(y0 + bh), ix0:int(x0 + bw), labels[b, j] % 3] += 1.0
  return {
      'images': images,
      'image_size': np.tile(np.array([[h, w]], np.int32), (batch_size, 1)),
      'gt_boxes': boxes, 'gt_labels': labels, 'gt_masks': masks,
      'gt_crowd': np.zeros((batch_size, m), bool), 'gt_valid': valid,
  }


class ListIterator:
  """An iterator over fixed batches with the pipeline's get_state/set_state protocol."""

  def __init__(self, batches):
    self.batches, self.index = list(batches), 0
    self.meta = {'label_to_category_id': {}, 'class_names': []}

  def __next__(self):
    batch = self.batches[self.index % len(self.batches)]
    self.index += 1
    return batch

  def __iter__(self):
    return self

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = int(state['index'])
