"""Shared helpers of the modeling tests: cheap random variables without compiling `init`.

Compiling a flax `init` spends most of its time on the per-parameter threefry streams (about
10 s for the tiny model on a 2-core machine); tests build variables with NumPy from the shapes
given by `jax.eval_shape` instead.
"""

import jax
import numpy as np

from tests.ops import test_nms

np_greedy_nms = test_nms.np_greedy_nms  # the one greedy-NMS reference (torchvision semantics)


def numpy_variables(shapes, seed: int = 0):
  """Random float32 variables shaped like the `shapes` tree (from `jax.eval_shape(init)`).

  Kernels ~ N(0, 1/fan_in) (O(1) activations), biases ~ N(0, 0.1); frozen-BN constants get
  random but well-conditioned statistics.
  """
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    shape = leaf.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
      return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == 'running_var':
      return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    if name == 'weight':
      return (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)



def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  """torchvision state-dict key of a variable path (the rules of modeling/mask_rcnn.py)."""
  *modules, leaf = path
  out = []
  for name in modules:
    for prefix in ('inner_blocks_', 'layer_blocks_'):
      if name.startswith(prefix):
        name = f'{prefix[:-1]}.{name[len(prefix):]}.0'
    if name.startswith('mask_fcn') and name != 'mask_fcn_logits':
      name = f'{int(name[len("mask_fcn"):]) - 1}.0'
    out.append(name)
  key = '.'.join(out).replace('rpn.head.conv', 'rpn.head.conv.0.0')
  if collection == 'params':
    leaf = 'bias' if leaf == 'bias' else 'weight'
  return f'{key}.{leaf}'


def variables_from_torchvision(state_dict, shapes):
  """Maps a torchvision Mask R-CNN state dict (numpy arrays) onto a variables shape tree."""
  from flax import traverse_util

  out = {}
  for collection, tree in shapes.items():
    flat = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      w = np.asarray(state_dict[_torch_name(collection, path)], np.float32)
      if path[-1] == 'kernel':
        w = w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)
      assert w.shape == leaf.shape, (path, w.shape, leaf.shape)
      flat[path] = w
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def np_decode(deltas, boxes, weights, clamp=np.log(1000.0 / 16)):
  """Reference box decoding (torchvision BoxCoder.decode_single) in float64."""
  deltas = np.asarray(deltas, np.float64)
  boxes = np.asarray(boxes, np.float64)
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  cx = boxes[..., 0] + 0.5 * w
  cy = boxes[..., 1] + 0.5 * h
  dx, dy = deltas[..., 0] / weights[0], deltas[..., 1] / weights[1]
  dw = np.minimum(deltas[..., 2] / weights[2], clamp)
  dh = np.minimum(deltas[..., 3] / weights[3], clamp)
  pcx, pcy = dx * w + cx, dy * h + cy
  pw, ph = np.exp(dw) * w, np.exp(dh) * h
  return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)
