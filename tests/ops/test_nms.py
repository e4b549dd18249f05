"""Tests for maskrcnn_jax.ops.nms: exact greedy kept sets, class-aware and batched forms."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import nms as nms_ops

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ops_golden.npz'
N = 64


def np_greedy_nms(boxes, scores, thr, labels=None, valid=None):
  """Textbook greedy NMS: descending score, lower index first on ties, suppress IoU > thr."""
  boxes = np.asarray(boxes, np.float32)
  idx = [i for i in range(len(scores)) if valid is None or valid[i]]
  order = sorted(idx, key=lambda i: (-scores[i], i))
  keep = []
  for i in order:
    suppressed = False
    for j in keep:
      if labels is not None and labels[i] != labels[j]:
        continue
      b, k = boxes[i], boxes[j]
      iw = max(np.float32(0), min(b[2], k[2]) - max(b[0], k[0]))
      ih = max(np.float32(0), min(b[3], k[3]) - max(b[1], k[1]))
      inter = iw * ih
      union = (b[2] - b[0]) * (b[3] - b[1]) + (k[2] - k[0]) * (k[3] - k[1]) - inter
      if union > 0 and inter / union > thr:
        suppressed = True
        break
    if not suppressed:
      keep.append(i)
  return keep


def random_case(rng, n=N):
  """Clustered boxes with exact duplicates, equal scores and some empty boxes."""
  centres = rng.uniform(0, 60, (6, 2))
  ctr = centres[rng.integers(0, 6, n)] + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(4, 20, (n, 2))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  scores = rng.uniform(size=n).astype(np.float32)
  dup = rng.integers(0, n, n // 8)
  boxes[dup[::2]] = boxes[dup[1::2][:len(dup[::2])]]  # exact duplicate boxes
  scores[rng.integers(0, n, n // 4)] = 0.5  # ties
  boxes[rng.integers(0, n, 2)] = [3, 3, 3, 3]  # empty boxes (never suppress nor get suppressed)
  labels = rng.integers(0, 3, n).astype(np.int32)
  valid = rng.uniform(size=n) > 0.15
  return boxes, scores, labels, valid


def kept_list(indices, keep_valid):
  indices, keep_valid = np.asarray(indices), np.asarray(keep_valid)
  assert np.all(keep_valid[:keep_valid.sum()]) and not np.any(keep_valid[keep_valid.sum():])
  assert np.all((indices >= 0) & (indices < N))
  return indices[keep_valid].tolist()


@functools.lru_cache(maxsize=None)
def jitted(kind, thr, max_output):
  if kind == 'nms':
    return jax.jit(lambda b, s, l, v: nms_ops.nms(b, s, thr, max_output, v))
  return jax.jit(lambda b, s, l, v: nms_ops.batched_nms(b, s, l, thr, max_output, v))


def test_toy_three_boxes():
  boxes = jnp.array([[0., 0., 10., 10.], [1., 1., 11., 11.], [20., 20., 30., 30.]])
  scores = jnp.array([0.9, 0.8, 0.7])
  idx, ok = nms_ops.nms(boxes, scores, 0.5, 3)  # IoU(0, 1) = 81 / 119 = 0.68
  np.testing.assert_array_equal(idx, [0, 2, 0])
  np.testing.assert_array_equal(ok, [True, True, False])
  idx, ok = nms_ops.nms(boxes, scores, 0.7, 3)
  np.testing.assert_array_equal(idx[ok], [0, 1, 2])


@pytest.mark.parametrize('thr', [0.3, 0.7])
def test_matches_greedy_reference(thr):
  rng = np.random.default_rng(int(thr * 10))
  f, g = jitted('nms', thr, N), jitted('batched', thr, N)
  for _ in range(12):
    boxes, scores, labels, valid = random_case(rng)
    assert kept_list(*f(boxes, scores, labels, valid)) == np_greedy_nms(
        boxes, scores, thr, valid=valid)
    assert kept_list(*g(boxes, scores, labels, valid)) == np_greedy_nms(
        boxes, scores, thr, labels, valid)


def test_max_output_truncates_in_score_order():
  rng = np.random.default_rng(5)
  f = jitted('nms', 0.5, 7)
  for _ in range(4):
    boxes, scores, labels, valid = random_case(rng)
    ref = np_greedy_nms(boxes, scores, 0.5, valid=valid)
    idx, ok = f(boxes, scores, labels, valid)
    assert np.asarray(idx)[np.asarray(ok)].tolist() == ref[:7]


def test_padding_invariance():
  """Garbage (nan, inf, huge scores) in invalid slots changes no valid output."""
  rng = np.random.default_rng(7)
  f = jitted('batched', 0.5, N)
  boxes, scores, labels, valid = random_case(rng)
  clean = f(boxes, scores, labels, valid)
  garbage_boxes = np.where(valid[:, None], boxes, np.nan).astype(np.float32)
  garbage_boxes[np.nonzero(~valid)[0][:3]] = np.inf
  garbage_scores = np.where(valid, scores, 1e9).astype(np.float32)
  dirty = f(garbage_boxes, garbage_scores, labels, valid)
  assert kept_list(*clean) == kept_list(*dirty)
  none_valid = f(boxes, scores, labels, np.zeros(N, bool))
  assert not np.any(np.asarray(none_valid[1]))


def test_vmap_batched():
  rng = np.random.default_rng(9)
  cases = [random_case(rng) for _ in range(3)]
  stacked = [np.stack(x) for x in zip(*cases)]
  fn = jax.jit(jax.vmap(lambda b, s, l, v: nms_ops.batched_nms(b, s, l, 0.5, N, v)))
  idx, ok = fn(*stacked)
  for i, (boxes, scores, labels, valid) in enumerate(cases):
    assert kept_list(idx[i], ok[i]) == np_greedy_nms(boxes, scores, 0.5, labels, valid)


def test_compiles_once_per_shape():
  traces = []

  @jax.jit
  def f(b, s):
    traces.append(1)
    return nms_ops.nms(b, s, 0.5, 8)

  rng = np.random.default_rng(3)
  for _ in range(3):
    boxes, scores, _, _ = random_case(rng)
    jax.block_until_ready(f(boxes, scores))
  assert len(traces) == 1


@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_torchvision_golden(thr):
  golden = np.load(GOLDEN)
  boxes, scores, labels = golden['nms_boxes'], golden['nms_scores'], golden['nms_labels']
  n = len(scores)
  idx, ok = nms_ops.nms(jnp.asarray(boxes), jnp.asarray(scores), thr, n)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], golden[f'nms_keep_{thr}'])
  idx, ok = nms_ops.batched_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels),
                                thr, n)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)],
                                golden[f'batched_nms_keep_{thr}'])
