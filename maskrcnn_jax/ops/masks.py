"""Pastes per-detection M x M mask probabilities into full-canvas masks, on device.

Two conventions, each written as two batched matrix products (`R_y @ mask @ R_x^T`), so both are
vectorised over detections and jit/vmap-safe:

* `paste_masks`: torchvision `roi_heads.paste_masks_in_image` (pad the mask by one pixel, expand
  the box by (M + 2) / M, truncate it to integers, bilinearly resize with align_corners=False,
  paste); its users threshold with `> 0.5`.
* `paste_masks_detectron2`: detectron2 `layers.mask_ops.paste_masks_in_image` (`grid_sample` of
  the mask at every image pixel centre mapped into the float box, zeros outside); detectron2
  thresholds with `>= 0.5`.

Bilinear sampling of a separable grid (x depends only on the column, y only on the row) is
separable, which is why one row matrix and one column matrix per detection suffice.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from maskrcnn_jax.ops import boxes as box_ops

# torchvision paste_masks_in_image(padding=1): one zero pixel around the mask before resizing.
MASK_PADDING = 1
# `model.test.mask_paste` values: which paste, and which threshold comparison goes with it.
PASTE_MODES = ('torchvision', 'detectron2')


def _expanded_int_boxes(boxes: jnp.ndarray, m: int) -> jnp.ndarray:
  """torchvision `expand_boxes(boxes, (M + 2p) / M)` followed by `.to(torch.int64)` (truncate)."""
  scale = jnp.float32(m + 2 * MASK_PADDING) / jnp.float32(m)
  boxes = boxes.astype(jnp.float32)
  w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
  h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
  x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
  y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
  expanded = jnp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=-1)
  finite = jnp.all(jnp.isfinite(expanded), axis=-1, keepdims=True)
  expanded = jnp.where(finite, expanded, -1.0)  # padding garbage -> the empty pixel (-1, -1)
  # Bounded so that the int32 cast is defined for absurd boxes; far outside any canvas anyway.
  return jnp.trunc(jnp.clip(expanded, -2.0**30, 2.0**30)).astype(jnp.int32)


def _resize_matrix(lo: jnp.ndarray, hi: jnp.ndarray, in_size: int, out_size: int) -> jnp.ndarray:
  """Interpolation matrices `[D, out_size, in_size]` mapping padded-mask rows to canvas rows.

  Row `y` of the canvas takes the align_corners=False bilinear sample (PyTorch CPU
  `upsample_bilinear2d` index/lambda rules) of the mask resized to `hi - lo + 1` pixels placed at
  `lo`; rows outside `[lo, hi]` are zero.
  """
  length = jnp.maximum(hi - lo + 1, 1)  # torchvision: max(int(x2 - x1 + 1), 1)
  ratio = box_ops.true_divide(jnp.full(length.shape, in_size, jnp.float32),
                              length.astype(jnp.float32))
  pix = jnp.arange(out_size, dtype=jnp.int32)[None, :]
  dst = (pix - lo[:, None]).astype(jnp.float32)
  src = jnp.maximum(ratio[:, None] * (dst + 0.5) - 0.5, 0.0)
  i0 = src.astype(jnp.int32)
  lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
  i1 = jnp.where(i0 < in_size - 1, i0 + 1, i0)
  inside = (pix >= lo[:, None]) & (pix <= hi[:, None])
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, None, :]
  mat = (jnp.where(cols == i0[..., None], (1.0 - lam)[..., None], 0.0)
         + jnp.where(cols == i1[..., None], lam[..., None], 0.0))
  return jnp.where(inside[..., None], mat, 0.0)


@functools.partial(jax.jit, static_argnames=('out_h', 'out_w'))
def paste_masks(masks: jnp.ndarray, boxes: jnp.ndarray, out_h: int, out_w: int) -> jnp.ndarray:
  """Pastes mask probabilities into `out_h x out_w` canvases (torchvision paste_masks_in_image).

  Each `M x M` mask is zero-padded to `M + 2`, its box expanded about its centre by
  `(M + 2) / M` and truncated to integer corners `(x1, y1, x2, y2)`; the padded mask is resized
  bilinearly (align_corners=False, no antialias) to `(y2 - y1 + 1) x (x2 - x1 + 1)` and written
  at `(y1, x1)`, cropped to the canvas; pixels outside the box are 0.

  The resize is computed as `R_y @ mask @ R_x^T` with the same source indices and weights as
  PyTorch's CPU bilinear kernel, so results equal torchvision up to float rounding (tests:
  max abs difference ~1e-6 against a NumPy port of torchvision's algorithm). Cost is
  O(D * out_h * out_w * (M + 2)) multiply-adds.

  Args:
    masks: float `[D, M, M]` probabilities (e.g. the predicted class's 28 x 28 mask).
    boxes: float `[D, 4]` xyxy detection boxes in the canvas frame (pixels).
    out_h, out_w: static canvas size.

  Returns:
    float32 `[D, out_h, out_w]` probabilities (threshold, e.g. > 0.5, in the caller).
  """
  m = masks.shape[-1]
  if masks.shape[-2] != m:
    raise ValueError(f'masks must be square [D, M, M], got {masks.shape}')
  size = m + 2 * MASK_PADDING
  padded = jnp.pad(masks.astype(jnp.float32),
                   ((0, 0), (MASK_PADDING, MASK_PADDING), (MASK_PADDING, MASK_PADDING)))
  ib = _expanded_int_boxes(boxes, m)
  ry = _resize_matrix(ib[:, 1], ib[:, 3], size, out_h)  # [D, out_h, size]
  rx = _resize_matrix(ib[:, 0], ib[:, 2], size, out_w)  # [D, out_w, size]
  hp = lax.Precision.HIGHEST
  rows = jnp.einsum('dij,dxj->dix', padded, rx, precision=hp)  # [D, size, out_w]
  return jnp.einsum('dyi,dix->dyx', ry, rows, precision=hp)


def _grid_sample_matrix(lo: jnp.ndarray, hi: jnp.ndarray, in_size: int,
                        out_size: int) -> jnp.ndarray:
  """`[D, out_size, in_size]` weights of `grid_sample(align_corners=False, padding zeros)` along
  one axis, for canvas pixels whose centres `p + 0.5` are mapped linearly from `[lo, hi]` (the
  float box side) onto the mask's `[-1, 1]`.

  Float operations follow detectron2 (`(p + 0.5 - lo) / (hi - lo) * 2 - 1`) and PyTorch's
  unnormalisation (`((g + 1) * M - 1) / 2`, which equals `(g + 1) * (M / 2) - 0.5` bit for bit),
  so the taps and weights are the ones PyTorch computes. Taps outside `[0, M - 1]` weigh 0 (zero
  padding); boxes with a side <= 0 or non-finite corners get all-zero rows (detectron2 drops
  empty boxes before pasting, so there is nothing to imitate).
  """
  pix = jnp.arange(out_size, dtype=jnp.float32)[None, :] + 0.5
  side = hi - lo
  ok = (side > 0) & jnp.isfinite(lo) & jnp.isfinite(hi)
  side = jnp.where(ok, side, 1.0)
  lo = jnp.where(ok, lo, 0.0)
  num = pix - lo[:, None]
  # The barriers keep XLA from turning the division into a reciprocal multiply and from folding
  # `* 2 - 1` into the unnormalisation's `+ 1` (each moves the result by an ulp off PyTorch's).
  num, den = lax.optimization_barrier((num, jnp.broadcast_to(side[:, None], num.shape)))
  g = lax.optimization_barrier(num / den * 2.0 - 1.0)
  src = ((g + 1.0) * jnp.float32(in_size) - 1.0) / 2.0
  # Both taps of a sample below -1 or above M lie in the zero padding; clipping there keeps them
  # there and keeps the int32 cast defined for absurd boxes.
  src = jnp.clip(src, -2.0, in_size + 1.0)
  i0 = jnp.floor(src)
  w1 = src - i0  # weight of tap i0 + 1; tap i0 gets (i0 + 1) - src, as PyTorch writes it
  w0 = (i0 + 1.0) - src
  i0 = i0.astype(jnp.int32)
  cols = jnp.arange(in_size, dtype=jnp.int32)[None, None, :]
  # A tap index outside [0, M - 1] equals no column, which is the zero padding.
  mat = (jnp.where(cols == i0[..., None], w0[..., None], 0.0)
         + jnp.where(cols == i0[..., None] + 1, w1[..., None], 0.0))
  return jnp.where(ok[:, None, None], mat, 0.0)


@functools.partial(jax.jit, static_argnames=('out_h', 'out_w'))
def paste_masks_detectron2(masks: jnp.ndarray, boxes: jnp.ndarray, out_h: int,
                           out_w: int) -> jnp.ndarray:
  """Pastes mask probabilities into `out_h x out_w` canvases as detectron2 does.

  detectron2 `paste_masks_in_image` semantics: canvas pixel `(y, x)` (centre `(y + .5, x + .5)`)
  of detection `d` is the bilinear sample (`F.grid_sample`, align_corners=False, zero padding)
  of `masks[d]` at the point where the centre falls when the float box `boxes[d]` is stretched
  onto the whole `M x M` mask; there is no integer rounding of the box and no 1-pixel mask
  padding (unlike `paste_masks`). Pixels whose centre lies more than half a mask cell outside the
  box are 0.

  detectron2 on the CPU samples only a window of the box extended by one pixel
  (`skip_empty=True`); on the GPU it samples the whole image, which is what this computes. For
  thresholds >= 0.5 the two agree: outside that window the sample weight is below 1/2.

  Args:
    masks: float `[D, M, M]` probabilities (the detected class's 28 x 28 mask).
    boxes: float `[D, 4]` xyxy boxes in the canvas frame (original-image pixels), float corners.
    out_h, out_w: static canvas size.

  Returns:
    float32 `[D, out_h, out_w]` probabilities; detectron2 binarises with `>= threshold` (0.5).
  """
  m = masks.shape[-1]
  if masks.shape[-2] != m:
    raise ValueError(f'masks must be square [D, M, M], got {masks.shape}')
  boxes = boxes.astype(jnp.float32)
  ry = _grid_sample_matrix(boxes[:, 1], boxes[:, 3], m, out_h)  # [D, out_h, M]
  rx = _grid_sample_matrix(boxes[:, 0], boxes[:, 2], m, out_w)  # [D, out_w, M]
  hp = lax.Precision.HIGHEST
  rows = jnp.einsum('dij,dxj->dix', masks.astype(jnp.float32), rx, precision=hp)  # [D, M, W]
  return jnp.einsum('dyi,dix->dyx', ry, rows, precision=hp)


def paste_and_threshold(masks: jnp.ndarray, boxes: jnp.ndarray, out_h: int, out_w: int,
                        thresh: float, mode: str = 'torchvision') -> jnp.ndarray:
  """bool `[D, out_h, out_w]`: the paste of `mode` (`PASTE_MODES`) with its own comparison:
  torchvision's evaluation keeps `prob > thresh`, detectron2 keeps `prob >= thresh`."""
  if mode == 'torchvision':
    return paste_masks(masks, boxes, out_h, out_w) > thresh
  if mode == 'detectron2':
    return paste_masks_detectron2(masks, boxes, out_h, out_w) >= thresh
  raise ValueError(f'mask paste mode must be one of {PASTE_MODES}, got {mode!r}')
