"""NumPy image/box/mask transforms of the input pipeline, matching torchvision's semantics.

Frames: images are [H, W, C] (HWC), boxes are float32 [N, 4] xyxy in absolute pixels with integer
pixel corners (a 1-pixel box is [0, 0, 1, 1]), masks are uint8 0/1 [M, H, W], keypoints are
float32 [N, K, 3] (x, y, v) in the boxes' pixel frame, v the COCO visibility (0, 1, 2).
"""

from typing import Optional, Sequence

import numpy as np

from maskrcnn_jax import structures

MASK_THRESHOLD = 0.5  # a soft mask value >= this is foreground (detectron2, TPU Mask R-CNN)
# input.resize: whose resize the image path reproduces (`resize_shape`, `prepare_image`).
RESIZES = ('torchvision', 'detectron2')
DEFAULT_CROP_SAMPLES = 2  # bilinear samples per output bin and axis in crop_and_resize_masks


# ----------------------------------------------------------------------------------- resizing
def resize_scale(h: int, w: int, min_size: float, max_size: float) -> float:
  """The resize factor of torchvision's GeneralizedRCNNTransform (double precision, as it is).

  scale = min(min_size / min(h, w), max_size / max(h, w)).
  """
  # torchvision (0.28 checked) computes this in python floats outside scripting/tracing.
  return min(float(min_size) / min(h, w), float(max_size) / max(h, w))


def resize_shape(h: int, w: int, min_size: float, max_size: float,
                 mode: str = 'torchvision') -> tuple[int, int]:
  """Output (new_h, new_w) of the resize, at least 1 pixel a side.

  'torchvision': F.interpolate(scale_factor=s, recompute_scale_factor=True) takes the output
  size as floor(float(dim) * s) in double precision. 'detectron2' (`ResizeShortestEdge`): the
  short side becomes min_size, the other side scales with it, both shrink together if the long
  side passes max_size, and each is rounded half up. For an extreme aspect ratio (2x3000 at
  max_size 1333) the short side reaches 0, where torchvision fails; it is kept at 1 pixel here
  so such an image still trains and predicts.
  """
  if mode == 'detectron2':
    short, size = min(h, w), float(min_size)
    new_h, new_w = (size, size / short * w) if h < w else (size / short * h, size)
    if max(new_h, new_w) > max_size:
      shrink = float(max_size) / max(new_h, new_w)
      new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))
  if mode != 'torchvision':
    raise ValueError(f'input.resize = {mode!r}: expected one of {RESIZES}')
  scale = resize_scale(h, w, min_size, max_size)
  return (max(1, int(np.floor(float(h) * scale))), max(1, int(np.floor(float(w) * scale))))


def resize_uint8_pil(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """detectron2's `ResizeTransform` of a uint8 image: PIL bilinear (which widens its filter,
  i.e. antialiases, when shrinking) with uint8 output. Returns uint8 `[new_h, new_w, C]`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = np.asarray(img)
  if img.dtype != np.uint8:
    raise ValueError(f"input.resize = 'detectron2' resizes uint8 images, got {img.dtype}")
  if img.shape[:2] == (new_h, new_w):
    return img.copy()
  return np.asarray(Image.fromarray(img).resize((int(new_w), int(new_h)), Image.BILINEAR))


def _linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of 1-D linear interpolation, align_corners=False.

  As torch's upsample_linear CPU kernel: src = (dst + 0.5) * in/out - 0.5 clamped at 0 (float32),
  i0 = min(floor(src), in - 1), i1 = i0 + (i0 < in - 1), lambda = clip(src - i0, 0, 1).
  Returns (i0 int64 [out], i1 int64 [out], lambda float32 [out]).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = i0 + (i0 < in_size - 1)
  lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, lam


def resize_image(img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
  """Bilinear resize, align_corners=False, no antialias (torch F.interpolate 'bilinear').

  Args:
    img: [H, W, C] or [H, W], any real dtype (uint8 is read as its values, not divided by 255).
    new_h, new_w: output size.
  Returns:
    float32 [new_h, new_w, C] (or [new_h, new_w]). Done as two separable 1-D passes (rows, then
    columns); agrees with torch to float32 rounding.
  """
  x = np.asarray(img, dtype=np.float32)
  h, w = x.shape[:2]
  if (h, w) == (new_h, new_w):
    return x.copy()
  r0, r1, rl = _linear_indices(h, new_h)
  c0, c1, cl = _linear_indices(w, new_w)
  extra = (1,) * (x.ndim - 2)
  rl = rl.reshape((-1, 1) + extra)
  rows = x[r0] * (np.float32(1) - rl) + x[r1] * rl  # [new_h, W, C]
  cl = cl.reshape((1, -1) + extra)
  out = rows[:, c0] * (np.float32(1) - cl) + rows[:, c1] * cl
  return out.astype(np.float32, copy=False)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch's legacy 'nearest' interpolation: min(floor(dst * in/out), in-1).

  Mirrors torch's nearest_idx, including its exact special cases (same size: identity; exact
  2x upsampling: dst >> 1). int64 [out_size].
  """
  dst = np.arange(out_size, dtype=np.int64)
  if out_size == in_size:
    return dst
  if out_size == 2 * in_size:
    return dst >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  return np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), in_size - 1)


def resize_masks(masks: np.ndarray, new_h: int, new_w: int, mode: str = 'nearest') -> np.ndarray:
  """Resizes binary instance masks.

  mode='nearest' (default) is what torchvision's GeneralizedRCNNTransform does to target masks
  (F.interpolate default mode): pure index gather, so resize_masks(annToMask(ann)) is exactly
  reproducible. mode='bilinear' resizes as resize_image then keeps values >= MASK_THRESHOLD.

  Args:
    masks: uint8/bool [M, H, W] 0/1.
  Returns:
    uint8 [M, new_h, new_w] 0/1.
  """
  masks = np.asarray(masks)
  h, w = masks.shape[1:]
  if mode == 'nearest':
    rows, cols = nearest_indices(h, new_h), nearest_indices(w, new_w)
    return masks.astype(np.uint8, copy=False)[:, rows][:, :, cols]
  if mode == 'bilinear':
    if masks.shape[0] == 0:
      return np.zeros((0, new_h, new_w), np.uint8)
    soft = resize_image(np.moveaxis(masks, 0, -1).astype(np.float32), new_h, new_w)
    soft = soft.reshape(new_h, new_w, -1)
    return np.moveaxis(soft >= MASK_THRESHOLD, -1, 0).astype(np.uint8)
  raise ValueError(f"resize_masks mode {mode!r}: expected 'nearest' or 'bilinear'")


def resize_boxes(boxes: np.ndarray, h: int, w: int, new_h: int, new_w: int) -> np.ndarray:
  """Scales xyxy boxes from an h x w image to new_h x new_w (torchvision resize_boxes).

  The per-axis ratio is new/old in float32. float32 [N, 4].
  """
  ratio_h = np.float32(new_h) / np.float32(h)
  ratio_w = np.float32(new_w) / np.float32(w)
  return (np.asarray(boxes, np.float32) * np.array([ratio_w, ratio_h, ratio_w, ratio_h],
                                                    np.float32)).astype(np.float32)


def resize_keypoints(keypoints: np.ndarray, h: int, w: int, new_h: int, new_w: int) -> np.ndarray:
  """Scales keypoints [..., K, 3] from an h x w image to new_h x new_w (torchvision
  `resize_keypoints`): x * new_w/w, y * new_h/h with float32 ratios, v unchanged. float32."""
  out = np.array(keypoints, np.float32, copy=True)
  out[..., 0] *= np.float32(new_w) / np.float32(w)
  out[..., 1] *= np.float32(new_h) / np.float32(h)
  return out


def zero_unlabelled_keypoints(keypoints: np.ndarray) -> np.ndarray:
  """Keypoints [..., K, 3] with every v == 0 keypoint all zeros (COCO's convention, which
  torchvision's `_flip_coco_person_keypoints` restores after a flip). float32 copy."""
  out = np.array(keypoints, np.float32, copy=True)
  out[out[..., 2] == 0] = 0
  return out


# ------------------------------------------------------------------------------ colour, padding
def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float],
              channel_order: str = 'RGB') -> np.ndarray:
  """(img - mean) / std per channel, in the configured channel order.

  Args:
    img: [H, W, 3] RGB pixels in 0..255 units (uint8 or float).
    mean, std: three values in 0..255 units, given in `channel_order`.
    channel_order: 'RGB' keeps channels, 'BGR' reverses them first (detectron2 MSRA weights).
  Returns:
    float32 [H, W, 3].
  """
  x = np.asarray(img, dtype=np.float32)
  if channel_order == 'BGR':
    x = x[..., ::-1]
  elif channel_order != 'RGB':
    raise ValueError(f"channel_order {channel_order!r}: expected 'RGB' or 'BGR'")
  mean = np.asarray(mean, np.float32)
  inv_std = np.float32(1.0) / np.asarray(std, np.float32)
  return ((x - mean) * inv_std).astype(np.float32)


def pad_to(img: np.ndarray, h: int, w: int, value: float = 0) -> np.ndarray:
  """Pads [H, W, ...] at the bottom/right to [h, w, ...] with `value`; raises if it is larger."""
  ih, iw = img.shape[:2]
  if ih > h or iw > w:
    raise ValueError(f'cannot pad a {ih}x{iw} image to {h}x{w}')
  if (ih, iw) == (h, w):
    return img
  out = np.full((h, w) + img.shape[2:], value, dtype=img.dtype)
  out[:ih, :iw] = img
  return out


# ------------------------------------------------------------------------- the one image path
def prepare_image(image: np.ndarray, min_size: int, max_size: int, mean: Sequence[float],
                  std: Sequence[float], channel_order: str,
                  buckets: Sequence[Sequence[int]], flip: bool = False,
                  resize: str = 'torchvision'):
  """The model input of one image, for training and inference alike.

  torchvision's `GeneralizedRCNNTransform` order (`resize='torchvision'`): normalise (in
  `channel_order`), resize bilinearly (short side `min_size`, long side at most `max_size`),
  then (training) mirror, and zero-pad at the bottom/right to the smallest bucket that holds the
  result. `resize='detectron2'` resizes the uint8 pixels first, as `DefaultPredictor` and
  detectron2's data loader do (`resize_shape`'s rounding, `resize_uint8_pil`), then normalises.

  Args:
    image: uint8 `[h, w, 3]` RGB.

  Returns:
    `(float32 [Hb, Wb, 3], (new_h, new_w), (Hb, Wb))`.
  """
  h, w = image.shape[:2]
  new_h, new_w = resize_shape(h, w, min_size, max_size, resize)
  if resize == 'detectron2':
    x = normalize(resize_uint8_pil(image, new_h, new_w), mean, std, channel_order)
  else:
    x = resize_image(normalize(image, mean, std, channel_order), new_h, new_w)
  if flip:
    x = hflip_image(x)
  bucket = structures.choose_bucket(new_h, new_w, buckets)
  return pad_to(x, *bucket), (new_h, new_w), bucket


# ------------------------------------------------------------------------------------ flipping
def hflip_image(img: np.ndarray) -> np.ndarray:
  """Mirrors [H, W, ...] left-right."""
  return np.ascontiguousarray(img[:, ::-1])


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
  """Mirrors xyxy boxes in an image of `width`: x1' = W - x2, x2' = W - x1 (torchvision)."""
  boxes = np.asarray(boxes, np.float32)
  out = boxes.copy()
  out[..., 0] = width - boxes[..., 2]
  out[..., 2] = width - boxes[..., 0]
  return out


def hflip_masks(masks: np.ndarray) -> np.ndarray:
  """Mirrors [M, H, W] masks left-right."""
  return np.ascontiguousarray(masks[:, :, ::-1])


def hflip_keypoints(keypoints: np.ndarray, width: int,
                    flip_index: Optional[np.ndarray] = None) -> np.ndarray:
  """Mirrors keypoints [N, K, 3] in an image of `width` (torchvision's
  `_flip_coco_person_keypoints` with a per-instance permutation).

  Keypoint k of a flipped instance is its keypoint `flip_index[n, k]` (its mirror: a left wrist
  becomes the right wrist) with x' = width - x, as boxes flip; v == 0 keypoints become zeros.

  Args:
    keypoints: float [N, K, 3] (x, y, v).
    width: the image width in the keypoints' frame.
    flip_index: int [N, K] or [K], each row a permutation of 0..K-1 (default: identity).
  Returns:
    float32 [N, K, 3].
  """
  kps = np.asarray(keypoints, np.float32)
  if flip_index is not None:
    index = np.broadcast_to(np.asarray(flip_index, np.int64), kps.shape[:2])
    kps = np.take_along_axis(kps, index[..., None], axis=1)
  out = kps.copy()
  out[..., 0] = np.float32(width) - kps[..., 0]
  return zero_unlabelled_keypoints(out)


def hflip(img: np.ndarray, boxes: np.ndarray, masks: Optional[np.ndarray] = None):
  """Mirrors an image [H, W, C], its boxes [N, 4] and masks [N, H, W] together."""
  width = img.shape[1]
  out_masks = None if masks is None else hflip_masks(masks)
  return hflip_image(img), hflip_boxes(boxes, width), out_masks


# ---------------------------------------------------------------------------------- gt masks
def crop_and_resize_masks(masks: np.ndarray, boxes: np.ndarray, size: int,
                          samples: int = DEFAULT_CROP_SAMPLES,
                          row_map: Optional[np.ndarray] = None,
                          col_map: Optional[np.ndarray] = None) -> np.ndarray:
  """Crops each mask to its box and resamples it to size x size (the batch's `gt_masks`).

  Output bin (i, j) of mask m covers the box region
  [x1 + j*bw, x1 + (j+1)*bw) x [y1 + i*bh, y1 + (i+1)*bh), bw = (x2-x1)/size, bh = (y2-y1)/size.
  The mask is read as a bilinear field with pixel (r, c) at its centre (c + 0.5, r + 0.5) and
  zero outside the image (RoIAlign aligned=True, as detectron2's BitMasks.crop_and_resize); each
  bin averages samples x samples evenly spaced points and is foreground when the average is
  >= MASK_THRESHOLD. The output is therefore uint8 0/1, not probabilities.

  row_map/col_map let the masks stay in another frame: target-frame pixel row r reads source row
  row_map[r] (likewise columns). A nearest resize is such an index map, and so is a flip, so
  crop_and_resize_masks(m, b, S, row_map=rows, col_map=cols) equals cropping the resized,
  flipped full masks exactly without materialising them.

  Args:
    masks: uint8/bool [M, Hs, Ws] 0/1 in the source frame.
    boxes: float [M, 4] xyxy in the target frame (the frame of row_map/col_map's domain).
    size: S.
    samples: sampling points per bin and axis.
    row_map: int [Ht] indices into Hs (default: identity, Ht = Hs).
    col_map: int [Wt] indices into Ws (default: identity, Wt = Ws).
  Returns:
    uint8 [M, S, S] 0/1.
  """
  masks = np.asarray(masks)
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  num = masks.shape[0]
  if num == 0:
    return np.zeros((0, size, size), np.uint8)
  if row_map is None:
    row_map = np.arange(masks.shape[1])
  if col_map is None:
    col_map = np.arange(masks.shape[2])
  row_map = np.asarray(row_map, np.int64)
  col_map = np.asarray(col_map, np.int64)
  n = size * samples
  # Sample offsets inside the box, in units of the box size: bin centres of a samples-finer grid.
  frac = (np.arange(n, dtype=np.float32) + np.float32(0.5)) / np.float32(n)
  ys = boxes[:, 1:2] + frac[None] * (boxes[:, 3:4] - boxes[:, 1:2]) - np.float32(0.5)  # [M, n]
  xs = boxes[:, 0:1] + frac[None] * (boxes[:, 2:3] - boxes[:, 0:1]) - np.float32(0.5)
  ry0, ry1, wy0, wy1 = _bilinear_taps(ys, len(row_map))
  cx0, cx1, wx0, wx1 = _bilinear_taps(xs, len(col_map))
  m_idx = np.arange(num)[:, None, None]

  def gather(r, c):
    return masks[m_idx, row_map[r][:, :, None], col_map[c][:, None, :]].astype(np.float32)

  value = (wy0[:, :, None] * (wx0[:, None, :] * gather(ry0, cx0) + wx1[:, None, :] *
                              gather(ry0, cx1)) +
           wy1[:, :, None] * (wx0[:, None, :] * gather(ry1, cx0) + wx1[:, None, :] *
                              gather(ry1, cx1)))  # [M, n, n]
  value = value.reshape(num, size, samples, size, samples).mean(axis=(2, 4))
  return (value >= MASK_THRESHOLD).astype(np.uint8)


def _bilinear_taps(coords: np.ndarray, length: int):
  """Neighbour indices and weights of a bilinear read at pixel-centre coordinates.

  Out-of-range neighbours get weight 0 (zero padding) and a clamped, valid index.
  """
  lo = np.floor(coords)
  frac = (coords - lo).astype(np.float32)
  lo = lo.astype(np.int64)
  hi = lo + 1
  w_lo = np.where((lo >= 0) & (lo < length), np.float32(1) - frac, np.float32(0))
  w_hi = np.where((hi >= 0) & (hi < length), frac, np.float32(0))
  return (np.clip(lo, 0, length - 1), np.clip(hi, 0, length - 1), w_lo.astype(np.float32),
          w_hi.astype(np.float32))
