"""Shared test helpers: synthetic batches, a resumable iterator (no dataset on disk), and a
byte snapshot of a directory tree."""
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def read_tree(root) -> dict:
  """{relative path: bytes} of every file under `root` (to assert files are or are not touched)."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out
