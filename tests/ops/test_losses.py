"""Tests for ops/losses.py: hand-computed values, padding invariance, perfect predictions, empty
foreground, gradients, dtypes and the batch normaliser."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops import losses

BETA = 1.0 / 9
# Jitted entry points: one compile per shape instead of one per eager op keeps the file fast.
rpn_loss = jax.jit(losses.rpn_loss, static_argnames=('box_loss', 'beta'))
fastrcnn_loss = jax.jit(losses.fastrcnn_loss, static_argnames=('box_loss', 'beta'))
sigmoid_bce = jax.jit(losses.sigmoid_bce)
softmax_ce = jax.jit(losses.softmax_ce)
smooth_l1 = jax.jit(losses.smooth_l1, static_argnames=('beta',))
l1 = jax.jit(losses.l1)


def np_smooth_l1(d, beta):
  d = np.abs(d)
  return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def np_bce(x, t):
  return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


# ----------------------------------------------------------------------------- primitives


def test_primitives_hand_computed():
  bce = sigmoid_bce(jnp.array([0.0, 2.0, -3.0]), jnp.array([1.0, 0.0, 1.0]),
                           jnp.array([True, True, False]))
  np.testing.assert_allclose(bce, math.log(2) + (2 + math.log1p(math.exp(-2))), rtol=1e-6)
  ce = softmax_ce(jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), jnp.array([2, 0]))
  want = math.log(3) + (math.log(math.exp(1) + math.exp(2) + math.exp(3)) - 1)
  np.testing.assert_allclose(ce, want, rtol=1e-6)
  pred = jnp.array([[0.05, 1.0, -0.2, 0.0]])
  np.testing.assert_allclose(smooth_l1(pred, jnp.zeros((1, 4)), BETA),
                             0.5 * 0.05 ** 2 * 9 + (1 - BETA / 2) + (0.2 - BETA / 2), rtol=1e-6)
  np.testing.assert_allclose(smooth_l1(pred, jnp.zeros((1, 4)), 0.0), 1.25, rtol=1e-6)
  np.testing.assert_allclose(l1(pred, jnp.ones((1, 4)), jnp.array([True])), 3.15,
                             rtol=1e-6)
  np.testing.assert_allclose(l1(pred, jnp.ones((1, 4)), jnp.array([False])), 0.0)


def test_primitives_ignore_garbage_in_padding_values_and_gradients():
  valid = jnp.array([True, False, True])
  logits = jnp.array([0.3, jnp.nan, -1.2])
  targets = jnp.array([1.0, jnp.inf, 0.0])
  f = lambda x: sigmoid_bce(x, targets, valid)
  np.testing.assert_allclose(f(logits), np_bce(np.array([0.3, -1.2]), np.array([1.0, 0.0])).sum(),
                             rtol=1e-6)
  g = jax.jit(jax.grad(f))(logits)
  assert np.all(np.isfinite(g)) and g[1] == 0

  k_logits = jnp.array([[1.0, 2.0], [jnp.inf, jnp.nan], [0.5, -0.5]])
  f = lambda x: softmax_ce(x, jnp.array([1, 99, 0]), valid)
  g = jax.jit(jax.grad(f))(k_logits)
  assert np.isfinite(f(k_logits)) and np.all(np.isfinite(g)) and np.all(g[1] == 0)

  pred = jnp.array([[0.1, 0.2, 0.3, 0.4], [jnp.nan] * 4, [1.0, 1.0, 1.0, 1.0]])
  target = jnp.array([[0.0] * 4, [jnp.inf] * 4, [0.0] * 4])
  for fn in (functools.partial(losses.smooth_l1, beta=BETA), losses.l1):
    f = lambda p: fn(p, target, valid=valid)
    g = jax.jit(jax.grad(f))(pred)
    assert np.isfinite(f(pred)) and np.all(np.isfinite(g)) and np.all(g[1] == 0)


def test_bfloat16_inputs_give_float32_losses():
  x = jnp.array([[0.5, -1.0, 2.0]], jnp.bfloat16)
  assert sigmoid_bce(x, jnp.ones_like(x)).dtype == jnp.float32
  assert softmax_ce(x, jnp.array([1])).dtype == jnp.float32
  assert smooth_l1(x, jnp.zeros_like(x), BETA).dtype == jnp.float32
  np.testing.assert_allclose(sigmoid_bce(jnp.zeros((2, 4), jnp.bfloat16), jnp.ones((2, 4))),
                             8 * math.log(2), rtol=1e-6)


# ----------------------------------------------------------------------------- RPN


def _rpn_case(rng, num_anchors=50, num_sampled=20, num_pos=6):
  idx = rng.permutation(num_anchors)
  sampled = np.zeros(num_anchors, bool)
  sampled[idx[:num_sampled]] = True
  positive = np.zeros(num_anchors, bool)
  positive[idx[:num_pos]] = True
  box_targets = np.where(positive[:, None], rng.normal(size=(num_anchors, 4)), 0.0)
  return {'objectness': positive.astype(np.float32), 'sampled': sampled, 'positive': positive,
          'box_targets': box_targets.astype(np.float32)}


def test_rpn_loss_hand_computed_torchvision_normalisation():
  rng = np.random.default_rng(0)
  t = _rpn_case(rng)
  logits = rng.normal(size=50).astype(np.float32)
  deltas = rng.normal(size=(50, 4)).astype(np.float32)
  out = rpn_loss(logits, deltas, t, box_loss='smooth_l1', beta=BETA)
  s, p = t['sampled'], t['positive']
  want_obj = np_bce(logits[s], t['objectness'][s]).mean()  # BCE mean over sampled anchors
  want_box = np_smooth_l1(deltas[p] - t['box_targets'][p], BETA).sum() / s.sum()
  np.testing.assert_allclose(out['loss_objectness'], want_obj, rtol=1e-5)
  np.testing.assert_allclose(out['loss_rpn_box_reg'], want_box, rtol=1e-5)
  assert out['num_sampled'] == 20 and out['num_positive'] == 6
  out = rpn_loss(logits, deltas, t, box_loss='l1')
  np.testing.assert_allclose(out['loss_rpn_box_reg'],
                             np.abs(deltas[p] - t['box_targets'][p]).sum() / 20, rtol=1e-5)
  with pytest.raises(ValueError, match='box_loss'):
    rpn_loss(logits, deltas, t, box_loss='giou')


def test_rpn_loss_perfect_prediction_and_unsampled_garbage():
  rng = np.random.default_rng(1)
  t = _rpn_case(rng)
  logits = np.where(t['objectness'] > 0, 30.0, -30.0).astype(np.float32)
  deltas = t['box_targets'].copy()
  logits[~t['sampled']] = np.nan  # anchors that are not sampled must not matter
  deltas[~t['positive']] = np.inf
  out = rpn_loss(logits, deltas, t)
  assert out['loss_objectness'] < 1e-10 and out['loss_rpn_box_reg'] == 0
  grads = jax.grad(lambda l, d: sum(rpn_loss(l, d, t)[k]
                                    for k in ('loss_objectness', 'loss_rpn_box_reg')),
                   argnums=(0, 1))(logits, deltas)
  for g in grads:
    assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- box head


def test_fastrcnn_loss_hand_computed():
  rng = np.random.default_rng(2)
  s, k = 6, 4
  logits = rng.normal(size=(s, k)).astype(np.float32)
  deltas = rng.normal(size=(s, k * 4)).astype(np.float32)
  labels = np.array([0, 2, 1, 0, 3, 1], np.int32)
  targets = rng.normal(size=(s, 4)).astype(np.float32)
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  out = fastrcnn_loss(logits, deltas, labels, targets, valid)
  lse = np.log(np.exp(logits).sum(-1))
  want_cls = (lse - logits[np.arange(s), labels])[valid].mean()
  fg = valid & (labels > 0)
  per_class = deltas.reshape(s, k, 4)[np.arange(s), labels]
  want_box = np_smooth_l1(per_class[fg] - targets[fg], BETA).sum() / valid.sum()
  np.testing.assert_allclose(out['loss_classifier'], want_cls, rtol=1e-5)
  np.testing.assert_allclose(out['loss_box_reg'], want_box, rtol=1e-5)
  assert out['num_sampled'] == 5 and out['num_foreground'] == 3
  out3 = fastrcnn_loss(logits, deltas.reshape(s, k, 4), labels, targets, valid)
  np.testing.assert_allclose(out3['loss_box_reg'], want_box, rtol=1e-5)
  agn = fastrcnn_loss(logits, per_class, labels, targets, valid)  # class-agnostic [S, 4]
  np.testing.assert_allclose(agn['loss_box_reg'], want_box, rtol=1e-5)


def test_fastrcnn_loss_padding_invariance_no_foreground_and_gradients():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(5, 3)).astype(np.float32)
  deltas = rng.normal(size=(5, 12)).astype(np.float32)
  labels = np.array([1, 0, 2, 0, 0], np.int32)
  targets = rng.normal(size=(5, 4)).astype(np.float32)
  valid = np.array([1, 1, 1, 0, 0], bool)
  ref = fastrcnn_loss(logits, deltas, labels, targets, valid)
  logits_g, deltas_g = logits.copy(), deltas.copy()
  labels_g, targets_g = labels.copy(), targets.copy()
  logits_g[3:], deltas_g[3:], labels_g[3:], targets_g[3:] = np.nan, np.inf, 77, -np.inf
  dirty = fastrcnn_loss(logits_g, deltas_g, labels_g, targets_g, valid)
  for k in ref:
    np.testing.assert_array_equal(ref[k], dirty[k])
  total = lambda l, d, lab: sum(fastrcnn_loss(l, d, lab, targets_g, valid)[k]
                                for k in ('loss_classifier', 'loss_box_reg'))
  g = jax.grad(total, argnums=(0, 1))(logits_g, deltas_g, labels_g)
  assert all(np.all(np.isfinite(x)) for x in g) and np.all(g[0][3:] == 0)
  bg_only = fastrcnn_loss(logits, deltas, np.zeros(5, np.int32), targets, valid)
  assert bg_only['loss_box_reg'] == 0 and np.isfinite(bg_only['loss_classifier'])
  empty = fastrcnn_loss(logits, deltas, labels, targets, np.zeros(5, bool))
  assert empty['loss_classifier'] == 0 and empty['loss_box_reg'] == 0
