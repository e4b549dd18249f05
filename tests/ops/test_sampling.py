"""Tests for ops/sampling.py: the balanced sampler's counts and randomness, RoI targets against a
NumPy matcher, and mask targets against RoIAlign on full-resolution masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import roi_align as roi_align_ops
from maskrcnn_jax.ops import sampling
from maskrcnn_jax.ops.matching import MatchLabel
from tests.ops.test_matching import np_match_boxes, random_boxes

POS, NEG, IGN = int(MatchLabel.POSITIVE), int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE)

NUM, FRAC = 16, 0.25  # cap of 4 positives
sample = jax.jit(sampling.sample_balanced, static_argnums=(3, 4))


def np_expected_counts(labels, cand_valid, num, frac):
  """torchvision BalancedPositiveNegativeSampler's counts."""
  num_pos = min(int(((labels >= POS) & cand_valid).sum()), int(num * frac))
  num_neg = min(int(((labels == NEG) & cand_valid).sum()), num - num_pos)
  return num_pos, num_neg


def make_labels(rng, n, n_pos, n_neg, n_invalid):
  labels = np.full(n, IGN)
  perm = rng.permutation(n)
  labels[perm[:n_pos]] = rng.integers(1, 4, n_pos)  # class labels count as positive too
  labels[perm[n_pos:n_pos + n_neg]] = NEG
  cand_valid = np.ones(n, bool)
  cand_valid[rng.permutation(n)[:n_invalid]] = False
  return labels.astype(np.int32), cand_valid


def check_sample(labels, cand_valid, indices, is_pos, valid, num, frac):
  indices, is_pos, valid = map(np.asarray, (indices, is_pos, valid))
  exp_pos, exp_neg = np_expected_counts(labels, cand_valid, num, frac)
  assert is_pos.sum() == exp_pos
  assert valid.sum() == exp_pos + exp_neg
  nv = valid.sum()
  assert valid[:nv].all() and not valid[nv:].any()  # valid slots form a prefix
  assert is_pos[:exp_pos].all() and not is_pos[exp_pos:].any()  # positives first
  assert exp_pos <= sampling.max_positives(num, frac)  # so all positives lie in the first P
  chosen = indices[valid]
  assert len(np.unique(chosen)) == len(chosen)  # without replacement
  assert cand_valid[chosen].all()
  assert np.all(labels[indices[is_pos]] >= POS)
  assert np.all(labels[indices[valid & ~is_pos]] == NEG)
  assert np.all(indices[~valid] == 0)


@pytest.mark.parametrize('n_pos,n_neg,n_invalid', [
    (10, 30, 0),  # enough of both: 4 + 12
    (2, 30, 0),  # few positives: negatives fill up to 16
    (10, 3, 0),  # few negatives: fewer than 16 valid
    (0, 0, 0),  # nothing to sample
    (0, 25, 0),  # no positives
    (12, 20, 15),  # some candidates invalid
])
def test_sample_balanced_counts_and_membership(n_pos, n_neg, n_invalid):
  rng = np.random.default_rng(n_pos * 100 + n_neg)
  labels, cand_valid = make_labels(rng, 40, n_pos, n_neg, n_invalid)
  for seed in range(3):
    out = sample(jax.random.PRNGKey(seed), labels, cand_valid, NUM, FRAC)
    check_sample(labels, cand_valid, *out, NUM, FRAC)


def test_sample_balanced_fewer_candidates_than_slots():
  rng = np.random.default_rng(7)
  labels, cand_valid = make_labels(rng, 6, 3, 2, 0)
  out = sample(jax.random.PRNGKey(0), labels, cand_valid, NUM, FRAC)
  assert out[0].shape == (NUM,)
  check_sample(labels, cand_valid, *out, NUM, FRAC)
  assert int(np.asarray(out[2]).sum()) == 5


def test_random_priorities_are_normal_floats_ordered_like_their_random_bits():
  """The float32 priorities are finite normal numbers whose order is that of the 30 random bits
  they carry: integer resolution (no more ties than 30-bit integers would have)."""
  n = 200_000
  p = np.asarray(sampling._random_priority(jax.random.PRNGKey(0), n))
  assert p.dtype == np.float32
  assert np.all(np.isfinite(p)) and p.min() >= np.finfo(np.float32).tiny and p.max() < 4.0
  bits = p.view(np.uint32).astype(np.int64) - 0x00800000
  assert bits.min() >= 0 and bits.max() < 2**30
  order = np.argsort(p, kind='stable')
  assert np.all(np.diff(bits[order]) >= 0)
  assert n - len(np.unique(p)) < 60  # ~n^2 / 2^31 = 19 expected collisions
  assert 0.45 < np.mean(bits < 2**29) < 0.55  # the top bit is a fair coin


def test_sample_balanced_is_uniform_and_seeded():
  """Each positive is drawn with probability cap / #positives, each negative with
  (num - cap) / #negatives; a fixed key repeats the draw."""
  rng = np.random.default_rng(0)
  labels, cand_valid = make_labels(rng, 40, 10, 30, 0)
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  draw = jax.jit(jax.vmap(lambda k: sampling.sample_balanced(k, labels, cand_valid, NUM, FRAC)))
  indices, is_pos, valid = map(np.asarray, draw(keys))
  counts = np.zeros(40)
  np.add.at(counts, indices[valid], 1)
  freq = counts / len(keys)
  np.testing.assert_allclose(freq[labels >= POS], 4 / 10, atol=0.05)  # 6.5 sigma
  np.testing.assert_allclose(freq[labels == NEG], 12 / 30, atol=0.05)
  assert np.all(freq[labels == IGN] == 0)
  a = sample(jax.random.PRNGKey(5), labels, cand_valid, NUM, FRAC)
  b = sample(jax.random.PRNGKey(5), labels, cand_valid, NUM, FRAC)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(indices[0], indices[1])


# ----------------------------------------------------------------------------- roi_targets

ROI_KW = dict(num_samples=32, positive_fraction=0.25, fg_thresh=0.5, bg_thresh=0.5)
roi_targets = jax.jit(functools.partial(sampling.roi_targets, **ROI_KW))


def _roi_inputs(seed):
  rng = np.random.default_rng(seed)
  gt = random_boxes(rng, 6, size=96.0, min_wh=10.0, max_wh=40.0)
  props = np.concatenate([random_boxes(rng, 40, size=96.0),
                          np.repeat(gt, 4, 0) + rng.normal(0, 2.0, (24, 4))]).astype(np.float32)
  prop_valid = rng.random(len(props)) < 0.9
  gt_labels = rng.integers(1, 5, 6).astype(np.int32)
  gt_valid = np.array([1, 1, 1, 1, 1, 0], bool)
  gt_crowd = np.array([0, 0, 0, 0, 1, 0], bool)
  return props, prop_valid, gt, gt_labels, gt_valid, gt_crowd


def _candidate_index(rois, candidates):
  d = np.abs(rois[:, None, :] - candidates[None, :, :]).max(-1)
  assert np.all(d.min(1) == 0)
  return d.argmin(1)


@pytest.mark.parametrize('seed', range(2))
def test_roi_targets_against_numpy_matcher(seed):
  props, prop_valid, gt, gt_labels, gt_valid, gt_crowd = _roi_inputs(seed)
  t = jax.tree_util.tree_map(np.asarray, roi_targets(jax.random.PRNGKey(seed), props, prop_valid,
                                                     gt, gt_labels, gt_valid, gt_crowd))
  cands = np.concatenate([props, gt])
  cand_valid = np.concatenate([prop_valid, gt_valid & ~gt_crowd])
  ref_m, ref_l = np_match_boxes(gt, gt_valid, gt_crowd, cands, cand_valid, 0.5, 0.5, False, True,
                                0.7)
  exp_pos, exp_neg = np_expected_counts(ref_l, cand_valid, 32, 0.25)
  assert exp_pos == 8 and exp_neg == 24  # enough of both in this set-up
  assert t['foreground'].sum() == exp_pos and t['valid'].sum() == exp_pos + exp_neg
  v, fg = t['valid'], t['foreground']
  idx = _candidate_index(t['rois'][v], cands)
  assert len(np.unique(idx)) == len(idx) and cand_valid[idx].all()
  np.testing.assert_array_equal(ref_l[idx], np.where(fg[v], POS, NEG))
  np.testing.assert_array_equal(t['matched_gt'][v][fg[v]], ref_m[idx][fg[v]])
  np.testing.assert_array_equal(t['labels'][fg], gt_labels[t['matched_gt'][fg]])
  assert np.all(t['labels'][~fg] == 0)
  assert np.all(t['box_targets'][~fg] == 0)
  decoded = box_ops.decode(t['box_targets'][fg], t['rois'][fg], box_ops.ROI_BOX_WEIGHTS)
  np.testing.assert_allclose(decoded, gt[t['matched_gt'][fg]], atol=1e-3)
  assert fg[:sampling.max_positives(32, 0.25)].all() and not fg[8:].any()


def test_roi_targets_garbage_in_padding_changes_nothing():
  props, prop_valid, gt, gt_labels, gt_valid, gt_crowd = _roi_inputs(3)
  key = jax.random.PRNGKey(0)
  clean = roi_targets(key, props, prop_valid, gt, gt_labels, gt_valid, gt_crowd)
  props_g, gt_g, labels_g = props.copy(), gt.copy(), gt_labels.copy()
  props_g[~prop_valid] = np.nan
  gt_g[~gt_valid] = np.array([np.inf, -np.inf, np.nan, 1e30])
  labels_g[~gt_valid] = 12345
  dirty = roi_targets(key, props_g, prop_valid, gt_g, labels_g, gt_valid, gt_crowd)
  for k in clean:
    np.testing.assert_array_equal(clean[k], dirty[k], err_msg=k)


def test_roi_targets_gt_boxes_are_appended_and_no_gt_gives_background():
  props, _, gt, gt_labels, gt_valid, gt_crowd = _roi_inputs(4)
  no_props = np.zeros(len(props), bool)
  t = roi_targets(jax.random.PRNGKey(0), props, no_props, gt, gt_labels, gt_valid, gt_crowd)
  t = jax.tree_util.tree_map(np.asarray, t)
  real = np.nonzero(gt_valid & ~gt_crowd)[0]  # the crowd gt is not appended
  assert t['valid'].sum() == len(real) == t['foreground'].sum()
  np.testing.assert_array_equal(np.sort(t['matched_gt'][t['valid']]), real)
  np.testing.assert_allclose(t['box_targets'][t['valid']], 0, atol=1e-5)
  prop_valid = np.ones(len(props), bool)
  t = roi_targets(jax.random.PRNGKey(0), props, prop_valid, gt, gt_labels, np.zeros(6, bool),
                  gt_crowd)
  assert int(t['valid'].sum()) == 32 and int(t['foreground'].sum()) == 0
  assert np.all(np.asarray(t['labels']) == 0)


# ----------------------------------------------------------------------------- mask_targets

mask_targets = jax.jit(sampling.mask_targets,
                       static_argnames=('resolution', 'aligned', 'sampling_ratio', 'binarize'))
# Reference: RoIAlign of single-channel full-resolution masks.
full_roi_align = jax.jit(lambda mask, rois, res, aligned: roi_align_ops.roi_align(
    mask[..., None], rois, res, 1.0, 2, aligned)[..., 0], static_argnums=(2, 3))


def _blob(rng, s):
  """A random 0/1 blob filling most of an s x s crop."""
  yy, xx = np.mgrid[:s, :s] + 0.5
  cy, cx = rng.uniform(0.35 * s, 0.65 * s, 2)
  ry, rx = rng.uniform(0.25 * s, 0.5 * s, 2)
  return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def test_mask_target_of_the_gt_box_is_the_block_mean_of_the_crop():
  rng = np.random.default_rng(0)
  crop = _blob(rng, 56)
  gt = np.array([[10., 20., 66., 76.]], np.float32)  # 56 x 56 px, scale 1
  out = mask_targets(crop[None], gt, gt, np.zeros(1, np.int32), resolution=28, aligned=True,
                     sampling_ratio=2, binarize=False)
  block_mean = crop.reshape(28, 2, 28, 2).mean((1, 3))
  np.testing.assert_allclose(out[0], block_mean, atol=1e-6)
  out = mask_targets(crop[None], gt, gt, np.zeros(1, np.int32), resolution=28, aligned=True,
                     sampling_ratio=2)
  np.testing.assert_array_equal(out[0], (block_mean >= 0.5).astype(np.float32))


@pytest.mark.parametrize('aligned', [False, True])
def test_mask_targets_equal_roi_align_of_the_full_mask_at_crop_scale_1(aligned):
  """With the gt box exactly S x S pixels, resampling the crop must equal RoIAlign on the
  full-resolution mask (torchvision's `project_masks_on_boxes`) for any RoI."""
  rng = np.random.default_rng(1)
  s, size = 32, 96
  crops = np.stack([_blob(rng, s), _blob(rng, s)])
  gt = np.array([[20., 30., 52., 62.], [50., 10., 82., 42.]], np.float32)
  full = np.zeros((2, size, size), np.float32)
  for g in range(2):
    x1, y1 = gt[g, :2].astype(int)
    full[g, y1:y1 + s, x1:x1 + s] = crops[g]
  matched = np.array([0, 0, 0, 1, 1, 1], np.int32)
  rois = gt[matched] + rng.uniform(-8, 8, (6, 4)).astype(np.float32)
  got = mask_targets(crops, gt, rois, matched, resolution=14, aligned=aligned, sampling_ratio=2,
                     binarize=False)
  for g in range(2):
    want = full_roi_align(jnp.asarray(full[g]), rois[matched == g], 14, aligned)
    np.testing.assert_allclose(got[matched == g], want, atol=1e-5)


def test_mask_targets_from_a_coarser_crop_agree_after_thresholding():
  rng = np.random.default_rng(2)
  s = 28
  crop = _blob(rng, s)
  gt = np.array([[8., 4., 64., 60.]], np.float32)  # 56 px: crop is half resolution
  full = np.zeros((72, 72), np.float32)
  full[4:60, 8:64] = np.kron(crop, np.ones((2, 2)))
  rois = gt + rng.uniform(-6, 6, (4, 4)).astype(np.float32)
  got = mask_targets(crop[None], gt, rois, np.zeros(4, np.int32), resolution=28)
  want = full_roi_align(jnp.asarray(full), rois, 28, False) >= 0.5
  assert np.mean(np.asarray(got) == np.asarray(want)) > 0.97


def test_mask_targets_padding_is_zero_and_garbage_safe():
  rng = np.random.default_rng(3)
  crops = np.stack([_blob(rng, 28), np.full((28, 28), 7, np.uint8)])
  gt = np.array([[0., 0., 28., 28.], [np.nan, 0., np.inf, 5.]], np.float32)
  rois = np.array([[0., 0., 28., 28.], [np.nan, np.nan, 1., 1.], [1., 1., 9., 9.]], np.float32)
  out = np.asarray(mask_targets(crops, gt, rois, np.array([0, 1, 1], np.int32),
                                roi_valid=np.array([True, False, False])))
  assert np.all(np.isfinite(out)) and set(np.unique(out)) <= {0.0, 1.0}
  assert out[0].sum() > 100 and np.all(out[1:] == 0)
