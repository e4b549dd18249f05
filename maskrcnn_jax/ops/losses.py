"""Masked loss primitives and the RPN and box-head losses of one image.

The mask loss is the mask head's own (`modeling/mask_head.py`), built from `sigmoid_bce`.

Everything is computed in float32 (inputs may be bfloat16). Padded slots are excluded with
`jnp.where` on the inputs as well as on the result, so garbage there (inf/NaN) changes neither the
loss nor its gradient.

Batch reduction (done by the caller, e.g. `jnp.mean` over the image axis of the vmapped losses):
every head loss here is normalised per image, while torchvision concatenates the samples of all
images and normalises once by the batch total. The two agree exactly if the caller passes
`normalizer` = the per-image count averaged over the (global) batch, computed from the targets:
`mean_b sum(rpn_targets['sampled'][b])` for `rpn_loss`, `mean_b sum(roi_targets['valid'][b])` for
`fastrcnn_loss`; then averages the per-image losses over images. With the default per-image
normalisation they agree whenever every image samples the same count (the usual case: 256 anchors
and 512 RoIs per image). The `num_*` values returned are for logging.
"""

from typing import Optional

import jax
import jax.numpy as jnp

# torchvision rpn.py and roi_heads.fastrcnn_loss: smooth L1 with beta = 1/9.
SMOOTH_L1_BETA = 1.0 / 9
BOX_LOSSES = ('smooth_l1', 'l1')


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x).astype(jnp.float32)


def _mask_like(valid: Optional[jnp.ndarray], x: jnp.ndarray) -> jnp.ndarray:
  """Broadcasts a `valid` mask of shape `x.shape[:k]` (trailing dims added) to `x.shape`."""
  if valid is None:
    return jnp.ones(x.shape, bool)
  valid = jnp.asarray(valid, bool)
  valid = valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim))
  return jnp.broadcast_to(valid, x.shape)


def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
  """num / den, 0 where den == 0 (num is then 0 as well: a sum over nothing)."""
  den = _f32(den)
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def sigmoid_bce(logits: jnp.ndarray, targets: jnp.ndarray,
                valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sum over valid elements of binary cross-entropy with logits (numerically stable).

  Args:
    logits: float `[...]`.
    targets: float `[...]` in [0, 1] (soft targets allowed).
    valid: bool of shape `logits.shape[:k]` (broadcast over trailing dims) or None.

  Returns:
    float32 scalar, `sum(max(x, 0) - x t + log(1 + exp(-|x|)))` over valid elements.
  """
  logits, targets = _f32(logits), _f32(targets)
  mask = _mask_like(valid, logits)
  x = jnp.where(mask, logits, 0.0)
  t = jnp.where(mask, targets, 0.0)
  loss = jnp.maximum(x, 0.0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  return jnp.sum(jnp.where(mask, loss, 0.0))


def softmax_ce(logits: jnp.ndarray, labels: jnp.ndarray,
               valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sum over valid rows of softmax cross-entropy.

  Args:
    logits: float `[N, K]`.
    labels: int `[N]` in 0..K-1.
    valid: bool `[N]` or None.

  Returns:
    float32 scalar.
  """
  logits = _f32(logits)
  num_classes = logits.shape[-1]
  mask = _mask_like(valid, logits[..., 0])
  x = jnp.where(mask[..., None], logits, 0.0)
  labels = jnp.where(mask, jnp.clip(jnp.asarray(labels, jnp.int32), 0, num_classes - 1), 0)
  logp = jax.nn.log_softmax(x, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0.0))


def smooth_l1(pred: jnp.ndarray, target: jnp.ndarray, beta: float = SMOOTH_L1_BETA,
              valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sum over valid elements of torchvision's smooth L1 (`0.5 d^2 / beta` if `|d| < beta`, else
  `|d| - 0.5 beta`); `beta == 0` is plain L1.

  Args:
    pred, target: float `[..., 4]` (any matching shapes).
    beta: static float.
    valid: bool of shape `pred.shape[:k]`, e.g. `[N]` for `[N, 4]`, or None.

  Returns:
    float32 scalar.
  """
  if beta == 0:
    return l1(pred, target, valid)
  pred, target = _f32(pred), _f32(target)
  mask = _mask_like(valid, pred)
  d = jnp.abs(jnp.where(mask, pred, 0.0) - jnp.where(mask, target, 0.0))
  loss = jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
  return jnp.sum(jnp.where(mask, loss, 0.0))


def l1(pred: jnp.ndarray, target: jnp.ndarray,
       valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Sum over valid elements of `|pred - target|`; shapes as `smooth_l1`. float32 scalar."""
  pred, target = _f32(pred), _f32(target)
  mask = _mask_like(valid, pred)
  d = jnp.abs(jnp.where(mask, pred, 0.0) - jnp.where(mask, target, 0.0))
  return jnp.sum(jnp.where(mask, d, 0.0))


def box_regression_loss(pred: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray,
                        box_loss: str = 'smooth_l1', beta: float = SMOOTH_L1_BETA) -> jnp.ndarray:
  """`smooth_l1(beta)` or `l1` summed over valid rows of `[N, 4]` deltas (config `box_loss`)."""
  if box_loss == 'smooth_l1':
    return smooth_l1(pred, target, beta, valid)
  if box_loss == 'l1':
    return l1(pred, target, valid)
  raise ValueError(f'box_loss={box_loss!r}: expected one of {BOX_LOSSES}')


def rpn_loss(objectness_logits: jnp.ndarray,
             deltas: jnp.ndarray,
             targets: dict,
             *,
             box_loss: str = 'smooth_l1',
             beta: float = SMOOTH_L1_BETA,
             normalizer: Optional[jnp.ndarray] = None) -> dict:
  """RPN losses of one image (torchvision `RegionProposalNetwork.compute_loss`).

  `loss_objectness` = BCE averaged over the sampled anchors; `loss_rpn_box_reg` = box loss summed
  over sampled positives, divided by the number of sampled anchors (not positives).

  Args:
    objectness_logits: float `[A]` (any dtype), anchors in `anchors.generate_anchors` order.
    deltas: float `[A, 4]` predicted `(dx, dy, dw, dh)`.
    targets: the dict of `sampling.rpn_targets` (uses `objectness`, `sampled`, `positive`,
      `box_targets`).
    box_loss: `'smooth_l1'` (torchvision, beta 1/9) or `'l1'` (config `model.rpn.box_loss`).
    beta: smooth-L1 beta (`model.rpn.smooth_l1_beta`).
    normalizer: optional scalar replacing the per-image sampled count (see the module docstring).

  Returns:
    dict of float32 scalars: `loss_objectness`, `loss_rpn_box_reg`, `num_sampled`, `num_positive`.
  """
  sampled = jnp.asarray(targets['sampled'], bool)
  positive = jnp.asarray(targets['positive'], bool)
  num_sampled = jnp.sum(sampled).astype(jnp.float32)
  den = num_sampled if normalizer is None else normalizer
  obj = sigmoid_bce(objectness_logits, targets['objectness'], sampled)
  box = box_regression_loss(deltas, targets['box_targets'], positive, box_loss, beta)
  return {
      'loss_objectness': _safe_div(obj, den),
      'loss_rpn_box_reg': _safe_div(box, den),
      'num_sampled': num_sampled,
      'num_positive': jnp.sum(positive).astype(jnp.float32),
  }


def select_class(per_class: jnp.ndarray, labels: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Takes each row's `labels[i]` entry along `axis` (which is removed) of `per_class [N, ...]`."""
  axis = axis % per_class.ndim
  num_classes = per_class.shape[axis]
  idx = jnp.clip(jnp.asarray(labels, jnp.int32), 0, num_classes - 1)
  idx = idx.reshape(idx.shape + (1,) * (per_class.ndim - 1))
  return jnp.take_along_axis(per_class, idx, axis=axis).squeeze(axis)


def fastrcnn_loss(class_logits: jnp.ndarray,
                  box_deltas: jnp.ndarray,
                  labels: jnp.ndarray,
                  box_targets: jnp.ndarray,
                  valid: jnp.ndarray,
                  *,
                  box_loss: str = 'smooth_l1',
                  beta: float = SMOOTH_L1_BETA,
                  normalizer: Optional[jnp.ndarray] = None) -> dict:
  """Box-head losses of one image (torchvision `roi_heads.fastrcnn_loss`).

  `loss_classifier` = softmax CE averaged over the sampled RoIs; `loss_box_reg` = box loss of the
  ground-truth class's deltas, summed over foreground RoIs and divided by the number of sampled
  RoIs (not foreground).

  Args:
    class_logits: float `[S, K]` (K includes background at 0).
    box_deltas: float `[S, K * 4]` or `[S, K, 4]` class-specific deltas, or `[S, 4]`
      class-agnostic.
    labels: int32 `[S]`, 0 background (from `sampling.roi_targets`).
    box_targets: float32 `[S, 4]`.
    valid: bool `[S]`.
    box_loss, beta: config `model.roi.box_loss`, `smooth_l1_beta`.
    normalizer: optional scalar replacing the per-image sampled count.

  Returns:
    dict of float32 scalars: `loss_classifier`, `loss_box_reg`, `num_sampled`, `num_foreground`.
  """
  num_rois, num_classes = class_logits.shape
  valid = jnp.asarray(valid, bool)
  labels = jnp.asarray(labels, jnp.int32)
  foreground = valid & (labels > 0)
  if box_deltas.ndim == 2 and box_deltas.shape[-1] != 4:
    box_deltas = box_deltas.reshape(num_rois, num_classes, 4)
  if box_deltas.ndim == 3:
    box_deltas = select_class(box_deltas, labels, axis=1)
  num_sampled = jnp.sum(valid).astype(jnp.float32)
  den = num_sampled if normalizer is None else normalizer
  cls = softmax_ce(class_logits, labels, valid)
  box = box_regression_loss(box_deltas, box_targets, foreground, box_loss, beta)
  return {
      'loss_classifier': _safe_div(cls, den),
      'loss_box_reg': _safe_div(box, den),
      'num_sampled': num_sampled,
      'num_foreground': jnp.sum(foreground).astype(jnp.float32),
  }
