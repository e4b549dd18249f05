"""RoI feature extraction from the FPN levels for every RoI head (torchvision
`MultiScaleRoIAlign`, or RoIPool with `model.roi_op='pool'`)."""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.ops import roi_align as roi_ops


@dataclasses.dataclass(frozen=True)
class Pooler:
  """Pools RoIs from FPN levels `min_level..max_level`, each box from its `LevelMapper` level.

  Built from `config.model` by `from_config`; a head calls `pool(features, boxes, size)` with
  the size its own sub-config names (7 for the box head, 14 for the mask head).
  """
  min_level: int
  max_level: int
  fpn_min_level: int
  sampling_ratio: int
  aligned: bool
  canonical_level: int
  canonical_scale: float
  op: str
  backend: str = 'auto'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Pooler':
    m = config.model
    return cls(int(m.roi.min_level), int(m.roi.max_level), int(m.fpn.min_level),
               int(m.roi.sampling_ratio), bool(m.roi.aligned), int(m.roi.canonical_level),
               float(m.roi.canonical_scale), str(m.roi_op),
               str(config.get('execution', {}).get('backend', 'auto')))

  def __call__(self, features: Sequence[jnp.ndarray], boxes: jnp.ndarray,
               output_size: int) -> jnp.ndarray:
    """RoI features of a batch.

    Args:
      features: `[P2, ..., P6]` (levels `fpn_min_level..`), each `[B, H_l, W_l, C]`.
      boxes: float32 `[B, N, 4]` xyxy in padded-input pixels.
      output_size: static int.

    Returns:
      `[B, N, output_size, output_size, C]` in the features' dtype.
    """
    first = self.min_level - self.fpn_min_level
    feats = list(features[first:first + self.max_level - self.min_level + 1])

    def one(f, b):
      return roi_ops.multilevel_roi_align(
          f, b, output_size=int(output_size), sampling_ratio=self.sampling_ratio,
          aligned=self.aligned, min_level=self.min_level, canonical_level=self.canonical_level,
          canonical_scale=self.canonical_scale, op=self.op, backend=self.backend)

    return jax.vmap(one)(feats, boxes).astype(features[0].dtype)
