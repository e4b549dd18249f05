"""The RoI-head seam: what the detector hands a head, and the five parts every head has.

A RoI head (the box head, the mask head, or one of your own) is a flax module with:

    the module itself      its layers, created in `setup` under torchvision's names
    loss(pool, sample, batch) -> {'loss_<name>': f32 [], ...}
                           builds its targets on device from the sampled RoIs and the padded
                           ground truth (static shapes), runs itself and returns its loss terms;
                           every `loss_*` entry is added to the total loss
    inference(pool, detections) -> {key: [B, D, ...]}
                           its outputs for the final detections, in the box frame
    postprocess(detections, slot, boxes, original_hw, resized_hw) -> {key: numpy [N, ...]}
                           host side: one image's outputs mapped to original-image pixels, for
                           its N valid detections (needs no parameters)
    init_params(channels, dtype)
                           touches every parameter with dummy inputs (for `init`)

`MaskRCNN` runs the box head, then every head of the `heads` dict that `build_model(config)`
makes from the config (or that a caller passes). A head reads only its own sub-config. Its
parameters live directly under `params/roi_heads/` (torchvision's layout), so a head must name
its layers uniquely (`mask_head`, `mask_predictor`, ...).
"""

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# `pool(boxes [B, N, 4] f32 padded-input xyxy, output_size) -> [B, N, S, S, C]` RoI features.
Pool = Callable[[jnp.ndarray, int], jnp.ndarray]


@flax.struct.dataclass
class RoISample:
  """The RoIs the box branch sampled for training, per image (`ops.sampling.roi_targets`).

  Attributes:
    rois: float32 `[B, S, 4]` xyxy, padded-input pixels.
    labels: int32 `[B, S]`, the matched gt class for foreground, 0 otherwise.
    box_targets: float32 `[B, S, 4]` encoded deltas of the matched gt (0 where not foreground).
    matched_gt: int32 `[B, S]` index into the batch's gt slots (meaningful where foreground).
    valid: bool `[B, S]`; foreground: bool `[B, S]`.
    num_fg_slots: static; every image's foreground RoIs lie in its first `num_fg_slots` slots.
  """
  rois: jnp.ndarray
  labels: jnp.ndarray
  box_targets: jnp.ndarray
  matched_gt: jnp.ndarray
  valid: jnp.ndarray
  foreground: jnp.ndarray
  num_fg_slots: int = flax.struct.field(pytree_node=False, default=0)

  def foreground_slots(self) -> 'RoISample':
    """The first `num_fg_slots` slots, which hold every foreground RoI (what heads that train on
    foreground RoIs run on; padding and background slots there have `foreground` False)."""
    n = self.num_fg_slots
    return RoISample(self.rois[:, :n], self.labels[:, :n], self.box_targets[:, :n],
                     self.matched_gt[:, :n], self.valid[:, :n], self.foreground[:, :n], n)


class RoIHead(nn.Module):
  """Base class of the heads that run on the box branch's RoIs and detections (see the module
  docstring for the contract). Subclasses override every method below."""

  def loss(self, pool: Pool, sample: RoISample, batch: Mapping[str, jnp.ndarray]
           ) -> dict[str, jnp.ndarray]:
    raise NotImplementedError

  def inference(self, pool: Pool, detections: Mapping[str, jnp.ndarray]
                ) -> dict[str, jnp.ndarray]:
    raise NotImplementedError

  def postprocess(self, detections: Mapping[str, Any], slot: int, boxes: np.ndarray,
                  original_hw: Sequence[int], resized_hw: Sequence[int]
                  ) -> dict[str, np.ndarray]:
    """Args: `detections`, the batch's raw outputs (padded-input frame, all D slots, arrays on
    host or device); `slot`, this image's index; `boxes`, float32 `[D, 4]` its boxes in
    original-image pixels; `original_hw`; `resized_hw`, the size of the image inside the
    padding. Returns arrays for the valid detections only."""
    raise NotImplementedError

  def init_params(self, channels: int, dtype: Any) -> None:
    raise NotImplementedError


class ConvStack(nn.Module):
  """`num_convs` 3x3 conv+ReLU layers of `conv_dim` named `{prefix}1`, `{prefix}2`, ... (the
  trunk of torchvision's `MaskRCNNHeads` and `KeypointRCNNHeads`; both initialise with
  kaiming_normal_(mode='fan_out', relu) and zero bias)."""
  conv_dim: int
  num_convs: int
  prefix: str
  dtype: Any = jnp.float32
  conv_general_dilated: Any = jax.lax.conv_general_dilated

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          param_dtype=jnp.float32, kernel_init=init,
                          name=f'{self.prefix}{i + 1}',
                          conv_general_dilated=self.conv_general_dilated)(x))
    return x


class RoIHeads(nn.Module):
  """The container named `roi_heads` (torchvision `RoIHeads`): the box head and the extra heads
  share its scope, so their layers' parameters sit directly under `params/roi_heads/`."""
  box: RoIHead
  heads: Mapping[str, RoIHead]

  def setup(self):
    # Clones adopted here (not by the detector that holds the dict), then scope-shared.
    self.box_head_unit = self.box.clone(parent=None)
    self.units = {name: head.clone(parent=None) for name, head in self.heads.items()}
    nn.share_scope(self, self.box_head_unit)
    for unit in self.units.values():
      nn.share_scope(self, unit)
