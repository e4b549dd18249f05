"""Training: over-fitting, 4 devices == 1 device, kill-and-resume equality, NaN stop, SIGTERM,
determinism and compile counts, all on the tiny config with synthetic batches."""
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthetic import ListIterator, synthetic_batch
from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import train
from maskrcnn_jax.modeling import mask_rcnn


def _config(tiny_config, **overrides):
  config = tiny_config.copy_and_resolve_references()
  config.unlock()
  config.input.batch_size = 4
  config.optim.base_batch_size = 4
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_learning_rate_schedule(tiny_config):
  config = _config(tiny_config, **{'optim.base_lr': 0.02, 'optim.base_batch_size': 2,
                                   'optim.warmup_steps': 10, 'optim.warmup_factor': 0.001,
                                   'optim.decay_steps': (20, 30)})
  sched = train.learning_rate_schedule(config)  # batch 4 at base 2: lr 0.04
  np.testing.assert_allclose(sched(0), 0.04 * 0.001, rtol=1e-6)
  np.testing.assert_allclose(sched(5), 0.04 * (0.001 * 0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(sched(10), 0.04, rtol=1e-6)
  np.testing.assert_allclose(sched(25), 0.004, rtol=1e-5)
  np.testing.assert_allclose(sched(35), 0.0004, rtol=1e-5)


def test_frozen_stages_get_no_update(tiny_config):
  config = _config(tiny_config, **{'model.backbone.freeze_at': 2})
  mesh = train.make_mesh(jax.devices()[:1])
  state, shardings, optimizer = train.init_state(config, mask_rcnn.build_model(config), mesh,
                                                 tuple(config.input.buckets[0]))
  before = jax.device_get(state.params)
  step = train.make_jitted_train_step(config, mask_rcnn.build_model(config), optimizer, mesh,
                                      shardings)
  state, metrics = step(state, train.global_batch(synthetic_batch(config, 4), mesh))
  after = jax.device_get(state.params)
  labels = train.trainable_labels(before, config)
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), before, after)
  frozen = [c for c, l in zip(jax.tree_util.tree_leaves(changed),
                              jax.tree_util.tree_leaves(labels)) if l == 'frozen']
  trained = [c for c, l in zip(jax.tree_util.tree_leaves(changed),
                               jax.tree_util.tree_leaves(labels)) if l == 'train']
  assert frozen and not any(frozen)
  assert sum(trained) > 0.9 * len(trained)
  assert np.isfinite(float(metrics['loss']))


def test_four_devices_equal_one_device(tiny_config):
  config = _config(tiny_config)
  batch = synthetic_batch(config, 4, seed=1)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = train.make_mesh(devices)
    model = mask_rcnn.build_model(config)
    state, shardings, optimizer = train.init_state(config, model, mesh,
                                                   tuple(config.input.buckets[0]))
    step = train.make_jitted_train_step(config, model, optimizer, mesh, shardings)
    state, metrics = step(state, train.global_batch(batch, mesh))
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  (loss1, params1), (loss4, params4) = results
  assert abs(loss1 - loss4) < 1e-5 * max(1.0, abs(loss1))
  for a, b in zip(_leaves(params1), _leaves(params4)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _run(config, workdir, batches, steps):
  return train.train_and_evaluate(config, str(workdir), train_iter=ListIterator(batches),
                                  num_steps=steps)


def _restore_params(workdir, config):
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(
      config, jax.random.key(0), tuple(config.input.buckets[0])))
  variables, _ = ckpt.restore_variables(str(workdir), abstract, config)
  return variables['params']


def test_kill_and_resume_equals_uninterrupted(tiny_config, tmp_path):
  config = _config(tiny_config, **{'run.checkpoint_every': 3})
  batches = [synthetic_batch(config, 4, seed=s) for s in range(3)]
  _run(config, tmp_path / 'straight', batches, 6)
  _run(config, tmp_path / 'resumed', batches, 3)  # "killed" after 3 steps
  metrics = _run(config, tmp_path / 'resumed', batches, 6)
  assert metrics['step'] == 6
  for a, b in zip(_leaves(_restore_params(tmp_path / 'straight', config)),
                  _leaves(_restore_params(tmp_path / 'resumed', config))):
    np.testing.assert_array_equal(a, b)


def test_same_seed_same_losses_and_one_compile(tiny_config):
  config = _config(tiny_config)
  batches = [synthetic_batch(config, 4, seed=s) for s in range(2)]
  runs = []
  for _ in range(2):
    mesh = train.make_mesh(jax.devices()[:1])
    model = mask_rcnn.build_model(config)
    state, shardings, optimizer = train.init_state(config, model, mesh,
                                                   tuple(config.input.buckets[0]))
    step = train.make_jitted_train_step(config, model, optimizer, mesh, shardings)
    losses = []
    for i in range(4):
      state, metrics = step(state, train.global_batch(batches[i % 2], mesh))
      losses.append(float(metrics['loss']))
    assert step._cache_size() == 1  # pylint: disable=protected-access
    runs.append(losses)
  assert runs[0] == runs[1]


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_config, tmp_path):
  config = _config(tiny_config, **{'run.checkpoint_every': 2})
  good = synthetic_batch(config, 4)
  bad = dict(good, images=np.full_like(good['images'], np.nan))
  batches = [good, good, good, bad]  # step 4 sees NaN images
  with pytest.raises(train.NonFiniteLossError, match='step 4'):
    _run(config, tmp_path, batches, 6)
  assert ckpt.latest_step(str(tmp_path)) == 2
  params = _restore_params(tmp_path, config)
  assert all(np.all(np.isfinite(x)) for x in _leaves(params))


class _SigtermIterator(ListIterator):
  def __init__(self, batches, at):
    super().__init__(batches)
    self.at = at

  def __next__(self):
    if self.index == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_saves_and_exits(tiny_config, tmp_path):
  config = _config(tiny_config, **{'run.checkpoint_every': 100})
  it = _SigtermIterator([synthetic_batch(config, 4)], at=2)
  metrics = train.train_and_evaluate(config, str(tmp_path), train_iter=it, num_steps=50)
  assert metrics['step'] == 3  # the step in flight when the signal came completes
  assert ckpt.latest_step(str(tmp_path)) == 3


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(tiny_config):
  config = _config(tiny_config, **{'optim.base_lr': 0.01, 'optim.warmup_steps': 20,
                                   'optim.decay_steps': (10_000,), 'optim.grad_clip_norm': 10.0})
  batch = synthetic_batch(config, 4, seed=3)
  mesh = train.make_mesh(jax.devices()[:1])
  model = mask_rcnn.build_model(config)
  state, shardings, optimizer = train.init_state(config, model, mesh,
                                                 tuple(config.input.buckets[0]))
  step = train.make_jitted_train_step(config, model, optimizer, mesh, shardings)
  gbatch = train.global_batch(batch, mesh)
  losses = []
  for _ in range(300):
    state, metrics = step(state, gbatch)
    losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:5]), np.mean(losses[-10:])
  assert np.all(np.isfinite(losses))
  assert last < first / 5, (first, last)


def test_finetune_from_converted_model_with_other_class_count(tmp_path):
  """The fine-tuning path: a converted torchvision model (5 classes) trains on 3 classes; the
  class-specific layers re-initialise and training continues from the loaded backbone."""
  from configs import torchvision_maskrcnn_r50_fpn
  from maskrcnn_jax import weights
  from synthetic import REPO
  golden_pth = REPO / 'tests' / 'weights' / 'golden' / 'tv_tiny_maskrcnn.pth'
  config = torchvision_maskrcnn_r50_fpn.get_config('tiny')
  config.model.num_classes = 3
  config.input.batch_size = 4
  config.optim.base_batch_size = 4
  config.optim.base_lr = 0.001
  converted = tmp_path / 'converted'
  weights.convert_file('torchvision', str(golden_pth), str(converted), config,
                       allow_class_mismatch=True)
  loaded = _restore_params(converted, config)
  assert loaded['roi_heads']['box_predictor']['cls_score']['kernel'].shape[-1] == 3
  config.run.init_checkpoint = str(converted)
  metrics = train.train_and_evaluate(config, str(tmp_path / 'run'),
                                     train_iter=ListIterator([synthetic_batch(config, 4)]),
                                     num_steps=2)
  assert np.isfinite(metrics['loss']) and metrics['step'] == 2
  tuned = _restore_params(tmp_path / 'run', config)
  fresh = jax.device_get(mask_rcnn.init_variables(config, jax.random.key(0))['params'])
  body = lambda p: np.concatenate([x.ravel() for x in _leaves(p['backbone']['body'])])
  assert np.abs(body(tuned) - body(loaded)).max() < 1e-2 * np.abs(body(loaded)).max()
  assert np.abs(body(tuned) - body(fresh)).max() > 10 * np.abs(body(tuned) - body(loaded)).max()


def test_bfloat16_step_keeps_float32_state(tiny_config):
  config = _config(tiny_config, dtype='bfloat16')
  mesh = train.make_mesh(jax.devices()[:1])
  model = mask_rcnn.build_model(config)
  state, shardings, optimizer = train.init_state(config, model, mesh,
                                                 tuple(config.input.buckets[0]))
  step = train.make_jitted_train_step(config, model, optimizer, mesh, shardings)
  state, metrics = step(state, train.global_batch(synthetic_batch(config, 4), mesh))
  assert np.isfinite(float(metrics['loss']))
  assert metrics['loss'].dtype == jnp.float32
  leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
  dtypes = {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes == {jnp.dtype(jnp.float32)}  # bf16 compute, float32 parameters and momentum
