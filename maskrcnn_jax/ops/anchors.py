"""Multi-level anchor boxes for the RPN (static numpy arrays; one set per padded size bucket).

Order within a level is location-major (row y, then column x) and anchor-minor, the
torchvision `AnchorGenerator` order, which equals flattening an NHWC RPN head output
`[H, W, A]`. Levels are concatenated by the caller in the order given.
"""

from typing import Sequence

import numpy as np


def level_sizes(image_hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """Feature-map sizes `(ceil(H / s), ceil(W / s))` of each level for a padded input size.

  This is what a stride-2 conv/max-pool stack with 'SAME'-style padding produces (including
  P6 = max_pool(P5, 1, stride 2)), for any input size.
  """
  h, w = image_hw
  return [(-(-int(h) // int(s)), -(-int(w) // int(s))) for s in strides]


def base_anchors(size: float, aspect_ratios: Sequence[float], round_base: bool = True
                 ) -> np.ndarray:
  """float32 `[A, 4]` anchors centred on the origin, one per aspect ratio (height / width).

  `w = size / sqrt(r)`, `h = size * sqrt(r)`, box `(-w/2, -h/2, w/2, h/2)`. torchvision
  (`AnchorGenerator.generate_anchors`) rounds these to integers (half to even); detectron2 does not.
  """
  # float32 arithmetic as in torchvision, so rounding ties resolve identically.
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1.0) / h_ratios
  ws = w_ratios * np.float32(size)
  hs = h_ratios * np.float32(size)
  anchors = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2.0)
  if round_base:
    anchors = np.round(anchors)
  return anchors.astype(np.float32)


def generate_anchors(image_hw: tuple[int, int], strides: Sequence[int],
                     sizes: Sequence, aspect_ratios: Sequence[float], offset: float = 0.0,
                     round_base: bool = True, stride_from_grid: bool = False
                     ) -> list[np.ndarray]:
  """Anchors of every level for a static padded input size.

  Args:
    image_hw: `(H, W)` of the padded model input (a size bucket).
    strides: stride of each level, e.g. `(4, 8, 16, 32, 64)` for P2..P6.
    sizes: one anchor size per level (a number, or a sequence of sizes for several scales per
      level; anchors are then ratio-major, size-minor as in torchvision).
    aspect_ratios: height / width ratios, e.g. `(0.5, 1.0, 2.0)`.
    offset: grid offset in units of the stride; anchor centres are at `(i + offset) * stride`.
      0.0 in torchvision and detectron2; 0.5 centres anchors on the pixels of the level.
    round_base: round the origin-centred anchors to integers (torchvision) or not (detectron2).
    stride_from_grid: use torchvision's effective stride `image_size // feature_size` instead of
      the nominal stride (they differ only when a level does not divide the input, e.g. P6 with
      H/32 odd: torchvision then spaces P6 anchors by 61 px on an 800 px input).

  Returns:
    list (one per level) of float32 numpy `[H_l * W_l * A, 4]` xyxy anchors in input pixels.
  """
  if len(sizes) != len(strides):
    raise ValueError(f'need one anchor size per level, got sizes={sizes} strides={strides}')
  out = []
  for (fh, fw), stride, level_size in zip(level_sizes(image_hw, strides), strides, sizes):
    level_size = tuple(level_size) if isinstance(level_size, (tuple, list)) else (level_size,)
    base = np.concatenate(
        [base_anchors(s, [r], round_base) for r in aspect_ratios for s in level_size], axis=0)
    if stride_from_grid:
      sy, sx = image_hw[0] // fh, image_hw[1] // fw
    else:
      sy = sx = stride
    ys = (np.arange(fh, dtype=np.float32) + np.float32(offset)) * np.float32(sy)
    xs = (np.arange(fw, dtype=np.float32) + np.float32(offset)) * np.float32(sx)
    yy, xx = np.meshgrid(ys, xs, indexing='ij')
    shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
    out.append((shifts + base[None]).reshape(-1, 4).astype(np.float32))
  return out


def num_anchors_per_location(sizes: Sequence, aspect_ratios: Sequence[float]) -> int:
  """A: anchors per feature-map location (sizes per level x aspect ratios)."""
  first = sizes[0]
  per_level = len(first) if isinstance(first, (tuple, list)) else 1
  return per_level * len(aspect_ratios)


