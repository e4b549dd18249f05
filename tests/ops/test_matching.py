"""Tests for ops/matching.py: IoU matching against a NumPy port of torchvision's Matcher, crowd and
padding handling, and RPN targets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import matching
from maskrcnn_jax.ops import sampling
from maskrcnn_jax.ops.matching import MatchLabel

POS, NEG, IGN = int(MatchLabel.POSITIVE), int(MatchLabel.NEGATIVE), int(MatchLabel.IGNORE)
# One compile per static setting keeps the suite fast (eager dispatch compiles every op).
match = jax.jit(matching.match, static_argnames=('allow_low_quality',))
match_boxes = jax.jit(matching.match_boxes, static_argnames=('allow_low_quality', 'ignore_crowd'))


# ----------------------------------------------------------------------------- NumPy reference


def np_matcher(iou, fg, bg, allow_low_quality):
  """torchvision Matcher, line by line: returns matches >= 0, -1 (below low), -2 (between)."""
  matched_vals = iou.max(axis=0)
  matches = iou.argmax(axis=0)
  all_matches = matches.copy()
  matches = matches.copy()
  matches[matched_vals < bg] = -1
  matches[(matched_vals >= bg) & (matched_vals < fg)] = -2
  if allow_low_quality:
    best_per_gt = iou.max(axis=1)
    for g in range(iou.shape[0]):
      if best_per_gt[g] <= 0:  # the one documented deviation: zero-overlap gts promote nothing
        continue
      for n in np.nonzero(iou[g] == best_per_gt[g])[0]:
        matches[n] = all_matches[n]
  return matches, all_matches


def np_match(iou, gt_valid, fg, bg, allow_low_quality, candidate_valid=None):
  """Reference for `matching.match`: run the Matcher on the valid sub-matrix only."""
  g_count, n_count = iou.shape
  if candidate_valid is None:
    candidate_valid = np.ones(n_count, bool)
  labels = np.full(n_count, NEG)
  matched = np.zeros(n_count, np.int64)
  vg, vc = np.nonzero(gt_valid)[0], np.nonzero(candidate_valid)[0]
  if len(vg) and len(vc):
    m, all_m = np_matcher(iou[np.ix_(vg, vc)], fg, bg, allow_low_quality)
    labels[vc] = np.where(m >= 0, POS, np.where(m == -1, NEG, IGN))
    matched[vc] = vg[all_m]
  labels[~candidate_valid] = IGN
  return matched, labels


def np_iou_ioa(a, b):
  """IoU [len(a), len(b)] and intersection over the area of b."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
  ioa = np.where(area(b)[None] > 0, inter / np.where(area(b)[None] > 0, area(b)[None], 1), 0)
  return iou, ioa


def np_match_boxes(gt_boxes, gt_valid, gt_crowd, cands, cand_valid, fg, bg, lq, ignore_crowd,
                   ioa_thresh):
  iou, ioa = np_iou_ioa(gt_boxes, cands)
  matched, labels = np_match(iou, gt_valid & ~gt_crowd, fg, bg, lq, cand_valid)
  if ignore_crowd:
    crowd = gt_valid & gt_crowd
    covered = (ioa[crowd] >= ioa_thresh).any(axis=0)
    labels[covered & (labels == NEG)] = IGN
  return matched, labels


def random_boxes(rng, n, size=64.0, min_wh=2.0, max_wh=30.0):
  xy = rng.uniform(0, size - max_wh, (n, 2))
  wh = rng.uniform(min_wh, max_wh, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- match


def test_numpy_reference_on_a_hand_worked_case():
  """The NumPy port on a case worked through torchvision's Matcher by hand (-1 below low, -2
  between thresholds)."""
  iou = np.array([[0.9, 0.5, 0.2, 0.0], [0.1, 0.65, 0.25, 0.4]], np.float32)
  m, _ = np_matcher(iou, 0.7, 0.3, False)
  np.testing.assert_array_equal(m, [0, -2, -1, -2])
  m, _ = np_matcher(iou, 0.7, 0.3, True)
  # gt 1's best is 0.65 at candidate 1 (whose argmax gt is 1): promoted.
  np.testing.assert_array_equal(m, [0, 1, -1, -2])


@pytest.mark.parametrize('seed', range(4))
def test_match_equals_numpy_reference(seed):
  rng = np.random.default_rng(seed)
  levels = np.array([0.0, 0.1, 0.3, 0.45, 0.5, 0.6, 0.7, 0.9, 1.0], np.float32)
  g, n = 6, 32  # fixed padded shapes; the random part is which slots are valid
  for case in range(12):
    if case % 2:  # quantised values: many ties, exact threshold hits
      iou = levels[rng.integers(0, len(levels), (g, n))]
    else:
      iou = (rng.random((g, n)) * rng.random()).astype(np.float32)
    gt_valid = rng.random(g) < rng.uniform(0.2, 1.0)
    cand_valid = rng.random(n) < rng.uniform(0.3, 1.0)
    fg, bg = [(0.7, 0.3), (0.5, 0.5)][case % 3 == 0]
    lq = bool(case % 4 < 2)
    ref_m, ref_l = np_match(iou, gt_valid, fg, bg, lq, cand_valid)
    got_m, got_l = match(iou, gt_valid, fg, bg, lq, candidate_valid=cand_valid)
    np.testing.assert_array_equal(np.asarray(got_l), ref_l)
    if gt_valid.any():
      np.testing.assert_array_equal(np.asarray(got_m)[cand_valid], ref_m[cand_valid])


def test_thresholds_are_inclusive_exactly_as_torchvision():
  iou = jnp.array([[0.7, 0.6999, 0.3, 0.2999, 0.0]])
  _, labels = match(iou, jnp.array([True]), 0.7, 0.3, False)
  np.testing.assert_array_equal(labels, [POS, IGN, IGN, NEG, NEG])


def test_low_quality_match_keeps_the_candidates_own_best_gt():
  # gt 0's best IoU (0.4) is candidate 0's, but candidate 0 overlaps gt 1 more (0.6 < fg=0.7):
  # torchvision promotes candidate 0 and matches it to gt 1 (all_matches), not gt 0.
  iou = jnp.array([[0.4, 0.1, 0.0], [0.6, 0.9, 0.0]])
  matched, labels = match(iou, jnp.array([True, True]), 0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [POS, POS, NEG])
  np.testing.assert_array_equal(matched[:2], [1, 1])
  _, labels = match(iou, jnp.array([True, True]), 0.7, 0.3, False)
  np.testing.assert_array_equal(labels, [IGN, POS, NEG])


def test_low_quality_ties_promote_every_tied_candidate():
  iou = jnp.array([[0.5, 0.2, 0.5, 0.5]])
  _, labels = match(iou, jnp.array([True]), 0.7, 0.3, True,
                             candidate_valid=jnp.array([True, True, True, False]))
  np.testing.assert_array_equal(labels, [POS, NEG, POS, IGN])


def test_zero_overlap_gt_promotes_nothing():
  iou = jnp.array([[0.0, 0.0, 0.0], [0.8, 0.1, 0.0]])
  _, labels = match(iou, jnp.array([True, True]), 0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [POS, NEG, NEG])


def test_no_valid_gt_gives_all_negative_and_invalid_candidates_ignored():
  iou = jnp.array([[0.9, 0.8, 0.0], [1.0, 0.5, 0.2]])
  for lq in (False, True):
    _, labels = match(iou, jnp.array([False, False]), 0.7, 0.3, lq,
                               candidate_valid=jnp.array([True, False, True]))
    np.testing.assert_array_equal(labels, [NEG, IGN, NEG])
  matched, labels = match(jnp.zeros((0, 3)), jnp.zeros((0,), bool), 0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [NEG] * 3)
  np.testing.assert_array_equal(matched, [0] * 3)


def test_invalid_gt_rows_are_never_matched_whatever_they_hold():
  iou = jnp.array([[0.2, 0.8, 0.1], [jnp.nan, 1.0, jnp.inf]])
  matched, labels = match(iou, jnp.array([True, False]), 0.7, 0.3, True)
  np.testing.assert_array_equal(labels, [NEG, POS, NEG])
  np.testing.assert_array_equal(matched, [0, 0, 0])


# ----------------------------------------------------------------------------- crowd, match_boxes


def test_crowd_gt_never_positive_and_covers_negatives():
  gt = jnp.array([[0., 0., 20., 20.], [40., 40., 60., 60.], [0., 0., 0., 0.]])
  gt_valid = jnp.array([True, True, False])
  gt_crowd = jnp.array([False, True, True])
  cands = jnp.array([
      [0., 0., 20., 20.],  # gt 0 exactly: positive
      [40., 40., 60., 60.],  # the crowd box exactly: IoA 1 -> ignored, never positive
      [45., 45., 50., 50.],  # inside the crowd region -> ignored
      [55., 55., 70., 70.],  # IoA with crowd 25/225 < 0.7 -> negative
      [10., 10., 30., 30.],  # IoU 1/7 with gt 0 -> negative
  ])
  kw = dict(fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True)
  _, labels = match_boxes(gt, gt_valid, gt_crowd, cands, jnp.ones(5, bool), **kw)
  np.testing.assert_array_equal(labels, [POS, IGN, IGN, NEG, NEG])
  _, labels = match_boxes(gt, gt_valid, gt_crowd, cands, jnp.ones(5, bool),
                                   ignore_crowd=False, **kw)
  np.testing.assert_array_equal(labels, [POS, NEG, NEG, NEG, NEG])


def test_positive_inside_crowd_region_stays_positive():
  gt = jnp.array([[10., 10., 20., 20.], [0., 0., 50., 50.]])
  cands = jnp.array([[10., 10., 20., 21.], [30., 30., 40., 40.]])
  _, labels = match_boxes(gt, jnp.array([True, True]), jnp.array([False, True]), cands,
                                   jnp.ones(2, bool), fg_thresh=0.7, bg_thresh=0.3,
                                   allow_low_quality=False)
  np.testing.assert_array_equal(labels, [POS, IGN])


def test_only_crowd_gts_gives_no_positive():
  gt = jnp.array([[0., 0., 30., 30.]])
  cands = jnp.array([[0., 0., 30., 30.], [40., 40., 50., 50.]])
  _, labels = match_boxes(gt, jnp.array([True]), jnp.array([True]), cands,
                                   jnp.ones(2, bool), fg_thresh=0.7, bg_thresh=0.3,
                                   allow_low_quality=True)
  np.testing.assert_array_equal(labels, [IGN, NEG])


@pytest.mark.parametrize('seed', range(3))
def test_match_boxes_equals_numpy_reference(seed):
  rng = np.random.default_rng(100 + seed)
  gt = random_boxes(rng, 6)
  cands = np.concatenate([random_boxes(rng, 40), gt + rng.normal(0, 1.0, gt.shape)], 0)
  cands = cands.astype(np.float32)
  gt_valid = np.array([1, 1, 1, 1, 0, 0], bool)
  gt_crowd = np.array([0, 0, 1, 0, 1, 0], bool)
  cand_valid = rng.random(len(cands)) < 0.9
  gt_garbage = gt.copy()
  gt_garbage[~gt_valid] = np.nan
  cands_garbage = cands.copy()
  cands_garbage[~cand_valid] = np.inf
  for lq, fg, bg in ((True, 0.7, 0.3), (False, 0.5, 0.5)):
    ref_m, ref_l = np_match_boxes(gt, gt_valid, gt_crowd, cands, cand_valid, fg, bg, lq, True,
                                  0.7)
    got_m, got_l = match_boxes(gt_garbage, gt_valid, gt_crowd, cands_garbage,
                                        cand_valid, fg_thresh=fg, bg_thresh=bg,
                                        allow_low_quality=lq, crowd_ioa_thresh=0.7)
    np.testing.assert_array_equal(np.asarray(got_l), ref_l)
    pos = ref_l == POS
    np.testing.assert_array_equal(np.asarray(got_m)[pos], ref_m[pos])
    assert pos.sum() > 0 and (ref_l == IGN).sum() > 0


def _scattered_case(rng, num_gt=7, num_cands=48):
  """gt slots valid / crowd / padded in random places (not a valid prefix), duplicate gts (ties
  between gt rows), candidates near gts and near-duplicates of each other."""
  gt = random_boxes(rng, num_gt)
  gt[rng.integers(num_gt)] = gt[rng.integers(num_gt)]  # an exact duplicate gt
  cands = np.concatenate([random_boxes(rng, num_cands - 2 * num_gt),
                          gt + rng.normal(0, 1.0, gt.shape), gt], 0).astype(np.float32)
  gt_valid = rng.random(num_gt) < 0.7
  gt_crowd = rng.random(num_gt) < 0.25
  cand_valid = rng.random(len(cands)) < 0.9
  return gt, gt_valid, gt_crowd, cands, cand_valid


@pytest.mark.parametrize('lq,ignore_crowd', [(True, True), (False, False)])
def test_match_boxes_row_loop_equals_dense_match_on_random_cases(lq, ignore_crowd):
  """The row-at-a-time loop gives the labels and matches of the dense [G, N] formulation
  (`match` on `pairwise_iou`, then `apply_crowd_ignore`) and of the NumPy Matcher, with valid
  slots anywhere among the padding (rows after the last valid one are skipped, garbage there is
  harmless) and exact gt duplicates (tie rule: the first gt wins)."""
  rng = np.random.default_rng(7)
  fg, bg = (0.7, 0.3) if lq else (0.5, 0.5)
  kw = dict(fg_thresh=fg, bg_thresh=bg, allow_low_quality=lq, ignore_crowd=ignore_crowd,
            crowd_ioa_thresh=0.7)
  for case in range(25):
    gt, gt_valid, gt_crowd, cands, cand_valid = _scattered_case(rng)
    if case == 0:
      gt_valid[:] = False  # no gt at all
    gt_garbage = np.where(gt_valid[:, None], gt, np.nan).astype(np.float32)
    got_m, got_l = map(np.asarray, match_boxes(gt_garbage, gt_valid, gt_crowd, cands, cand_valid,
                                               **kw))
    ref_m, ref_l = np_match_boxes(gt, gt_valid, gt_crowd, cands, cand_valid, fg, bg, lq,
                                  ignore_crowd, 0.7)
    dense_m, dense_l = match(box_ops.pairwise_iou(jnp.asarray(gt), jnp.asarray(cands)),
                             gt_valid & ~gt_crowd, fg, bg, lq, candidate_valid=cand_valid)
    if ignore_crowd:
      dense_l = matching.apply_crowd_ignore(
          dense_l, box_ops.pairwise_ioa(jnp.asarray(gt), jnp.asarray(cands)),
          jnp.asarray(gt_crowd & gt_valid), 0.7)
    np.testing.assert_array_equal(got_l, ref_l, err_msg=f'case {case}')
    np.testing.assert_array_equal(got_l, np.asarray(dense_l), err_msg=f'case {case}')
    pos = ref_l == POS
    np.testing.assert_array_equal(got_m[pos], ref_m[pos], err_msg=f'case {case}')
    np.testing.assert_array_equal(got_m, np.asarray(dense_m), err_msg=f'case {case}')


def test_match_boxes_vmapped_over_images_with_different_gt_counts():
  """Under vmap the loop runs to the largest image's last valid gt; each image's result equals
  its own unbatched result."""
  rng = np.random.default_rng(3)
  cases = [_scattered_case(rng) for _ in range(3)]
  cases[1][1][:] = False  # an image without gt
  cases[2][1][:] = [True] + [False] * 6  # one gt in the first slot only
  stacked = [np.stack(x) for x in zip(*cases)]
  kw = dict(fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True, ignore_crowd=True)
  batched = jax.jit(jax.vmap(functools.partial(matching.match_boxes, **kw)))(*stacked)
  for i, case in enumerate(cases):
    single = match_boxes(*case, **kw)
    for b, s in zip(batched, single):
      np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(s))


# ----------------------------------------------------------------------------- rpn_targets


def _rpn_inputs(seed=0, num_anchors=300, num_gt=5):
  rng = np.random.default_rng(seed)
  anchors = random_boxes(rng, num_anchors, size=96.0, min_wh=4.0, max_wh=40.0)
  gt = random_boxes(rng, num_gt, size=96.0, min_wh=8.0, max_wh=40.0)
  anchors[:40] = np.repeat(gt, 8, axis=0)[:40] + rng.normal(0, 1.5, (40, 4)).astype(np.float32)
  gt_valid = np.ones(num_gt, bool)
  gt_valid[-1] = False
  gt[-1] = np.nan
  return anchors, gt, gt_valid


RPN_KW = dict(fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True, batch_size=64,
              positive_fraction=0.5)
rpn_targets = jax.jit(functools.partial(sampling.rpn_targets, **RPN_KW))


def test_rpn_targets_properties_and_box_targets_decode_to_gt():
  anchors, gt, gt_valid = _rpn_inputs()
  anchor_valid = np.ones(len(anchors), bool)
  anchor_valid[250:] = False
  crowd = np.zeros(len(gt), bool)
  t = rpn_targets(jax.random.PRNGKey(0), anchors, anchor_valid, gt, gt_valid, crowd)
  t = jax.tree_util.tree_map(np.asarray, t)
  safe_gt = np.where(gt_valid[:, None], gt, 0)
  _, ref_labels = np_match_boxes(safe_gt, gt_valid, crowd, anchors, anchor_valid, 0.7, 0.3, True,
                                 True, 0.7)
  np.testing.assert_array_equal(t['labels'], ref_labels)
  num_pos_avail = (ref_labels == POS).sum()
  assert 0 < num_pos_avail
  assert t['positive'].sum() == min(num_pos_avail, 32)
  assert t['sampled'].sum() == 64
  assert np.all(ref_labels[t['positive']] == POS)
  assert np.all(ref_labels[t['sampled'] & ~t['positive']] == NEG)
  assert not t['sampled'][~anchor_valid].any()
  np.testing.assert_array_equal(t['objectness'], t['positive'].astype(np.float32))
  assert np.all(t['box_targets'][~t['positive']] == 0)
  decoded = box_ops.decode(t['box_targets'][t['positive']], anchors[t['positive']])
  np.testing.assert_allclose(decoded, gt[t['matched_gt'][t['positive']]], atol=1e-3)


def test_rpn_targets_seeded_determinism_and_randomness():
  anchors, gt, gt_valid = _rpn_inputs(seed=1)
  args = (anchors, np.ones(len(anchors), bool), gt, gt_valid, np.zeros(len(gt), bool))
  a = rpn_targets(jax.random.PRNGKey(3), *args)
  b = rpn_targets(jax.random.PRNGKey(3), *args)
  c = rpn_targets(jax.random.PRNGKey(4), *args)
  np.testing.assert_array_equal(a['sampled'], b['sampled'])
  assert not np.array_equal(a['sampled'], c['sampled'])
  np.testing.assert_array_equal(a['labels'], c['labels'])


def test_rpn_targets_without_gt_and_vmapped_batch():
  anchors, gt, gt_valid = _rpn_inputs(seed=2)
  gts = np.stack([gt, np.full_like(gt, np.nan)])
  valids = np.stack([gt_valid, np.zeros_like(gt_valid)])
  crowds = np.zeros_like(valids)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  fn = jax.jit(jax.vmap(functools.partial(sampling.rpn_targets, **RPN_KW),
                        in_axes=(0, None, None, 0, 0, 0)))
  t = fn(keys, anchors, np.ones(len(anchors), bool), gts, valids, crowds)
  t = jax.tree_util.tree_map(np.asarray, t)
  assert t['positive'][0].sum() > 0
  assert t['positive'][1].sum() == 0 and t['sampled'][1].sum() == 64
  assert np.all(t['labels'][1] == NEG)
  assert np.all(np.isfinite(t['box_targets']))
  single = rpn_targets(keys[0], anchors, np.ones(len(anchors), bool), gts[0], valids[0],
                       crowds[0])
  np.testing.assert_array_equal(t['sampled'][0], single['sampled'])
