"""The RoI-head seam: a head written entirely in this file (per-RoI regression of the log-area
of its matched ground-truth box) plugs into the detector through `build_model(config, heads=)`,
trains with the unchanged train step, and comes out of the unchanged Predictor."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax import backends
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import train
from maskrcnn_jax.modeling import heads
from maskrcnn_jax.modeling import mask_rcnn

import synthetic


class LogAreaHead(heads.RoIHead):
  """Predicts log(area) of a RoI's matched gt box from its pooled features, in units of
  `scale` (a toy research head)."""
  pooler_size: int = 7
  scale: float = 8.0

  def setup(self):
    self.log_area_fc = nn.Dense(1)

  def __call__(self, x):  # [N, S, S, C] -> [N]
    return self.log_area_fc(jnp.mean(x, axis=(1, 2)).astype(jnp.float32))[:, 0]

  def init_params(self, channels, dtype):
    self(jnp.zeros((1, self.pooler_size, self.pooler_size, channels), dtype))

  def loss(self, pool, sample, batch):
    fg = sample.foreground_slots()
    b, f = fg.labels.shape
    pred = self(pool(fg.rois, self.pooler_size).reshape((b * f, self.pooler_size,
                                                         self.pooler_size, -1))).reshape(b, f)
    gt = jnp.take_along_axis(batch['gt_boxes'], fg.matched_gt[..., None], axis=1)
    area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    target = jnp.log(jnp.maximum(area, 1.0)) / self.scale
    err = jnp.where(fg.foreground, (pred - target) ** 2, 0.0)
    return {'loss_log_area': jnp.sum(err) / jnp.maximum(jnp.sum(fg.foreground), 1)}

  def inference(self, pool, detections):
    b, d = detections['boxes'].shape[:2]
    x = pool(detections['boxes'], self.pooler_size)
    pred = self(x.reshape((b * d,) + x.shape[2:])).reshape(b, d)
    return {'log_area': jnp.where(detections['valid'], pred, 0.0)}

  def postprocess(self, detections, slot, boxes, original_hw, resized_hw):
    valid = np.asarray(detections['valid'][slot])
    return {'log_area': np.asarray(detections['log_area'][slot])[valid]}


@pytest.mark.slow
def test_a_head_from_outside_trains_and_predicts(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.optim.warmup_steps = 1
  config.optim.grad_clip_norm = 10.0
  backend = backends.get(config.execution.backend)
  extra = {**mask_rcnn.build_heads(config, backend), 'log_area': LogAreaHead()}
  model = mask_rcnn.build_model(config, heads=extra)
  mesh = train.make_mesh(jax.devices()[:1])
  state, _, optimizer = train.init_state(config, model, mesh, (64, 96))
  assert set(state.params['roi_heads']) == {'box_head', 'box_predictor', 'mask_head',
                                            'mask_predictor', 'log_area_fc'}
  batch = synthetic.synthetic_batch(config, 2, seed=1)
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_log_area']))
  # The head's term is part of the total, and training drives it down.
  assert losses[0] > 0.1 and losses[-1] < 0.3 * losses[0], losses
  assert {'loss_mask', 'loss_classifier', 'loss_log_area'} <= set(metrics)

  predictor = predictor_lib.Predictor(config, jax.device_get(state.variables), model=model)
  image = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)
  result = predictor(image)
  n = len(result['scores'])
  assert result['log_area'].shape == (n,) and result['masks'].shape == (n, 60, 90)
