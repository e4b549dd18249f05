"""RoI feature extraction from the FPN levels for every RoI head (torchvision
`MultiScaleRoIAlign`; RoIPool or RoIWarp with `model.roi_op`; one level with `roi.pool_level`)."""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from maskrcnn_jax.ops import roi_levels


@dataclasses.dataclass(frozen=True)
class Pooler:
  """Pools RoIs from FPN levels `min_level..max_level`, each box from its `LevelMapper` level,
  or, with `pool_level = k > 0`, every RoI from the single level P_k (stride 2**k: the paper's
  C4 / C5 rows pool all RoIs from one stride-16 / stride-32 map, Table 2c-d).

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
  pool_level: int = 0  # 0: FPN assignment over min_level..max_level; k: every RoI from P_k
  warp_reduce: str = 'max'  # op='warp' only
  max_sampling_ratio: int = 4  # the cap of the adaptive sampling_ratio=0 (op='align')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Pooler':
    m = config.model
    return cls(int(m.roi.min_level), int(m.roi.max_level), int(m.fpn.min_level),
               int(m.roi.sampling_ratio), bool(m.roi.aligned), int(m.roi.canonical_level),
               float(m.roi.canonical_scale), str(m.roi_op),
               str(config.get('execution', {}).get('backend', 'auto')),
               int(m.roi.get('pool_level', 0)), str(m.roi.get('warp_reduce', 'max')),
               int(m.roi.get('max_sampling_ratio', 4)))

  @property
  def levels(self) -> tuple[int, int]:
    """The (lowest, highest) level RoIs are pooled from."""
    if self.pool_level:
      return self.pool_level, self.pool_level
    return self.min_level, self.max_level

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
    lo, hi = self.levels
    first = lo - self.fpn_min_level
    if first < 0 or first + hi - lo >= len(features):
      raise ValueError(f'pooling levels P{lo}..P{hi} need FPN levels the features lack '
                       f'(P{self.fpn_min_level}..P{self.fpn_min_level + len(features) - 1})')
    feats = list(features[first:first + hi - lo + 1])

    # A single map (min_level == max_level) sends every RoI to it: assign_levels clips there.
    def one(f, b):
      return roi_levels.multilevel_roi_align(
          f, b, output_size=int(output_size), sampling_ratio=self.sampling_ratio,
          aligned=self.aligned, min_level=lo, canonical_level=self.canonical_level,
          canonical_scale=self.canonical_scale, op=self.op, backend=self.backend,
          warp_reduce=self.warp_reduce, max_sampling_ratio=self.max_sampling_ratio)

    return jax.vmap(one)(feats, boxes).astype(features[0].dtype)
