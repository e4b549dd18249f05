"""Keypoint heatmap targets and decoding (torchvision `keypoints_to_heatmap` and
`heatmaps_to_keypoints`), with static shapes, for one image (callers vmap over the batch).

Frames: keypoints and boxes are xyxy / (x, y) in padded-input pixels; a heatmap of size S x S
covers its RoI box, cell (i, j) spanning `[x1 + j*w/S, x1 + (j+1)*w/S)` (w = box width).
"""

import math

import jax
import jax.numpy as jnp

# torch upsample_bicubic2d's cubic convolution parameter (Keys' A = -0.75).
CUBIC_A = -0.75
# Decoding refines this many of the best pixels of its coarse grid (`heatmaps_to_keypoints`).
DECODE_CANDIDATES = 3


def keypoints_to_heatmap(keypoints: jnp.ndarray, rois: jnp.ndarray, heatmap_size: int):
  """Heatmap-cell targets of keypoints in their RoIs (torchvision `keypoints_to_heatmap`).

  A keypoint maps to cell `floor((x - x1) * S / (x2 - x1))` (same for y); a keypoint exactly on
  the right or bottom edge goes to the last cell; it is valid when visible (v > 0) and its cell
  lies inside the heatmap.

  Args:
    keypoints: float32 `[R, K, 3]` (x, y, v), padded-input pixels.
    rois: float32 `[R, 4]` xyxy.
    heatmap_size: static S.

  Returns:
    `(target int32 [R, K] = y * S + x (0 where invalid), valid bool [R, K])`. RoIs without
    positive width or height give no valid target.
  """
  s = int(heatmap_size)
  rois = jnp.asarray(rois, jnp.float32)
  kp = jnp.asarray(keypoints, jnp.float32)
  x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))
  w, h = x2 - x1, y2 - y1
  sized = (w > 0) & (h > 0) & jnp.all(jnp.isfinite(rois), axis=1, keepdims=True)
  scale_x = jnp.float32(s) / jnp.where(sized, w, 1.0)
  scale_y = jnp.float32(s) / jnp.where(sized, h, 1.0)
  x, y = kp[..., 0], kp[..., 1]
  finite = jnp.isfinite(x) & jnp.isfinite(y)
  x, y = jnp.where(finite, x, 0.0), jnp.where(finite, y, 0.0)
  cx = jnp.floor((x - x1) * scale_x)
  cy = jnp.floor((y - y1) * scale_y)
  cx = jnp.where(x == x2, s - 1, cx)
  cy = jnp.where(y == y2, s - 1, cy)
  inside = (cx >= 0) & (cy >= 0) & (cx < s) & (cy < s)
  valid = inside & (kp[..., 2] > 0) & finite & sized
  target = jnp.where(valid, cy * s + cx, 0).astype(jnp.int32)
  return target, valid


def heatmap_ce_sum(logits: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray):
  """Sum and count of the softmax cross-entropy over heatmap positions of the valid entries
  (torchvision `keypointrcnn_loss` is sum / count; 0 when nothing is valid).

  Args:
    logits: float `[..., S * S]`; target: int32 `[...]` (`keypoints_to_heatmap`); valid: bool
      `[...]`. Invalid entries may hold garbage: they reach neither the sum nor its gradient.

  Returns:
    `(sum float32 [], count float32 [])`.
  """
  logits = jnp.where(valid[..., None], jnp.asarray(logits, jnp.float32), 0.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def _cubic_weights(t: jnp.ndarray):
  """The four cubic-convolution weights of taps -1, 0, 1, 2 at fraction t, as torch computes
  them (`get_cubic_upsample_coefficients`)."""
  a = CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  t2 = 1.0 - t
  return far(t + 1.0), near(t), near(t2), far(t2 + 1.0)


def _bicubic_axis(dst: jnp.ndarray, out_size: jnp.ndarray, in_size: int):
  """Source taps (4 int32 arrays, clamped) and weights (4 arrays) of output indices `dst` along
  one axis of torch's bicubic resize (align_corners=False, scale = in / out, source coordinate
  not clamped, taps clamped to the map)."""
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  src = scale * (dst.astype(jnp.float32) + 0.5) - 0.5
  base = jnp.floor(src)
  taps = tuple(jnp.clip(base.astype(jnp.int32) + o, 0, in_size - 1) for o in (-1, 0, 1, 2))
  return taps, _cubic_weights(src - base)


def _resized_values(heatmaps, ys, xs, out_h, out_w):
  """Values of torch's bicubic resize of `heatmaps [D, K, S, S]` to `out_h x out_w` (float32
  `[D]` each) at output rows `ys [D, K, C, ny]` x columns `xs [D, K, C, nx]`:
  `[D, K, C, ny, nx]`. Along x within each of the 4 source rows, then along y, as torch; one row
  tap at a time, so that only one `[D, K, C, ny, nx]` array is live per tap."""
  d, k, s, _ = heatmaps.shape
  ty, wy = _bicubic_axis(ys, out_h[:, None, None, None], s)
  tx, wx = _bicubic_axis(xs, out_w[:, None, None, None], s)
  di = jnp.arange(d)[:, None, None, None, None]
  ki = jnp.arange(k)[None, :, None, None, None]
  value = None
  for row, weight_y in zip(ty, wy):
    r = row[..., :, None]
    along_x = None
    for col, weight_x in zip(tx, wx):
      term = heatmaps[di, ki, r, col[..., None, :]] * weight_x[..., None, :]
      along_x = term if along_x is None else along_x + term
    term = along_x * weight_y[..., :, None]
    value = term if value is None else value + term
  return value


def heatmaps_to_keypoints(heatmaps: jnp.ndarray, boxes: jnp.ndarray, max_box_size: int):
  """Keypoints from heatmaps (torchvision `heatmaps_to_keypoints`), static shapes.

  torchvision resizes each RoI's S x S heatmaps bicubically to `ceil(h) x ceil(w)` pixels
  (w, h the box size, at least 1), takes the argmax, maps the pixel's centre back into the box
  (`x1 + (x + 0.5) * w / ceil(w)`) and scores it with the resized map's value there. That size
  is data-dependent. Here the resized map is evaluated exactly (same taps and weights, float32)
  at static counts of pixels: first on a grid of at most S x S of its pixels (every pixel of an
  axis no longer than S; evenly spaced ones otherwise), then on the full-resolution windows
  around the `DECODE_CANDIDATES` best grid pixels, one grid step each side. Deviation: exact
  whenever the resized map's maximum lies within a grid step of one of those pixels, which holds
  for single-peaked heatmaps such as a trained head's; tested against a NumPy port of
  torchvision's loop on many random cases, noise included.

  Args:
    heatmaps: float `[D, K, S, S]` logits.
    boxes: float32 `[D, 4]` xyxy detections, padded-input pixels.
    max_box_size: static bound on a box side in pixels (the padded input's longest side), which
      sizes the windows.

  Returns:
    `(keypoints float32 [D, K, 3] = (x, y, 1), scores float32 [D, K])`, padded-input pixels.
  """
  heatmaps = jnp.asarray(heatmaps, jnp.float32)
  d, k, s, _ = heatmaps.shape
  boxes = jnp.asarray(boxes, jnp.float32)
  x1, y1 = boxes[:, 0], boxes[:, 1]
  w = jnp.maximum(boxes[:, 2] - boxes[:, 0], 1.0)
  h = jnp.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
  out_w, out_h = jnp.ceil(w), jnp.ceil(h)
  g = s

  def grid(out_size):
    """`[D, 1, 1, g]` output pixels: all of them when out <= g, else evenly spaced."""
    i = jnp.arange(g, dtype=jnp.float32)
    o = out_size[:, None]
    idx = jnp.where(o > g, jnp.floor(i * o / g), jnp.minimum(i, o - 1))
    return idx.astype(jnp.int32)[:, None, None, :]

  # Stage 1: the grid.
  ys1, xs1 = grid(out_h), grid(out_w)
  coarse = _resized_values(heatmaps, jnp.broadcast_to(ys1, (d, k, 1, g)),
                           jnp.broadcast_to(xs1, (d, k, 1, g)), out_h, out_w)[:, :, 0]
  _, best = jax.lax.top_k(coarse.reshape(d, k, g * g), DECODE_CANDIDATES)  # [D, K, C]
  cy = jnp.take_along_axis(ys1[:, 0, 0][:, None, :], best // g, axis=-1)  # [D, K, C]
  cx = jnp.take_along_axis(xs1[:, 0, 0][:, None, :], best % g, axis=-1)
  # Stage 2: full resolution around the candidates, one grid step (<= max_box_size / g) each
  # side.
  radius = int(math.ceil(max(int(max_box_size), 1) / g))
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.int32)

  def window(center, out_size):
    idx = center[..., None] + offsets
    limit = out_size.astype(jnp.int32)[:, None, None, None]
    return jnp.clip(idx, 0, limit - 1), (idx >= 0) & (idx < limit)

  ys, y_ok = window(cy, out_h)
  xs, x_ok = window(cx, out_w)
  value = _resized_values(heatmaps, ys, xs, out_h, out_w)
  value = jnp.where(y_ok[..., :, None] & x_ok[..., None, :], value, -jnp.inf)
  n = 2 * radius + 1
  flat_value = value.reshape(d, k, -1)
  pick = jnp.argmax(flat_value, axis=-1)
  score = jnp.take_along_axis(flat_value, pick[..., None], axis=-1)[..., 0]
  ci, rem = pick // (n * n), pick % (n * n)
  y_int = jnp.take_along_axis(ys.reshape(d, k, -1), (ci * n + rem // n)[..., None],
                              axis=-1)[..., 0]
  x_int = jnp.take_along_axis(xs.reshape(d, k, -1), (ci * n + rem % n)[..., None],
                              axis=-1)[..., 0]
  x = (x_int.astype(jnp.float32) + 0.5) * (w / out_w)[:, None] + x1[:, None]
  y = (y_int.astype(jnp.float32) + 0.5) * (h / out_h)[:, None] + y1[:, None]
  return jnp.stack([x, y, jnp.ones_like(x)], axis=-1), score


def upsample2x_bilinear(x: jnp.ndarray) -> jnp.ndarray:
  """`[N, H, W, C] -> [N, 2H, 2W, C]`: torch `F.interpolate(scale_factor=2, mode='bilinear',
  align_corners=False)`. Output `2q` is `0.25 x[q-1] + 0.75 x[q]` and `2q + 1` is
  `0.75 x[q] + 0.25 x[q+1]`, the edge rows repeated (torch clamps the source at 0 and its
  taps at the last row): shifted copies and an interleave, whose gradient is as cheap."""

  def axis(v, ax):
    first = jax.lax.slice_in_dim(v, 0, 1, axis=ax)
    last = jax.lax.slice_in_dim(v, v.shape[ax] - 1, v.shape[ax], axis=ax)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(v, 0, v.shape[ax] - 1, axis=ax)], ax)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(v, 1, v.shape[ax], axis=ax), last], ax)
    even = 0.25 * prev + 0.75 * v
    odd = 0.75 * v + 0.25 * nxt
    out = jnp.stack([even, odd], axis=ax + 1)
    shape = list(v.shape)
    shape[ax] *= 2
    return out.reshape(shape)

  return axis(axis(x, 1), 2)
