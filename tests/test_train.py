"""Training: over-fitting, 4 devices == 1 device, kill-and-resume equality, NaN stop, SIGTERM,
determinism and compile counts, the workdir lock, never-overwritten and corrupt checkpoints, a
full disk, start-up refusal of bad numbers, all on the tiny config with synthetic batches."""
import errno
import json
import logging
import os
import re
import signal
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthetic import ListIterator, read_tree, synthetic_batch
from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import structures
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


def test_sigterm_saves_and_raises_preempted(tiny_config, tmp_path):
  config = _config(tiny_config, **{'run.checkpoint_every': 100})
  it = _SigtermIterator([synthetic_batch(config, 4)], at=2)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.Preempted, match='saved the checkpoint of step 3') as info:
    train.train_and_evaluate(config, str(tmp_path), train_iter=it, num_steps=50)
  assert info.value.step == 3  # the step in flight when the signal came completes
  assert info.value.workdir == str(tmp_path)
  assert ckpt.latest_step(str(tmp_path)) == 3
  _restore_params(tmp_path, config)  # whole: its checksums verify
  assert (tmp_path / train.LOCK_FILE).read_text() == ''  # the lock is released
  assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is uninstalled


# ---------------------------------------------------------------------------- start-up refusals


class _MustNotBeRead(ListIterator):
  """Fails the test if training got as far as reading a batch."""

  def __init__(self):
    super().__init__([])

  def __next__(self):
    raise AssertionError('training started')


@pytest.mark.parametrize('field,value', [
    ('run.keep_checkpoints', 0),  # orbax would delete every checkpoint
    ('run.keep_checkpoints', -1),  # orbax would die on it
    ('run.log_every', 0),  # a ZeroDivisionError at the first step
    ('optim.num_steps', 0),  # would "evaluate" the random initial weights
    ('optim.base_lr', -0.02),  # would run until NaN
    ('input.batch_size', 0),  # would crash inside grain
])
def test_bad_numbers_are_refused_before_anything_runs(tiny_config, tmp_path, field, value):
  config = _config(tiny_config, **{field: value})
  with pytest.raises(structures.ConfigError, match=rf'^config\.{re.escape(field)} = '):
    train.train_and_evaluate(config, str(tmp_path / 'run'), train_iter=_MustNotBeRead())
  assert not (tmp_path / 'run').exists()  # refused before the workdir was even created


# ---------------------------------------------------------------------------- workdir lock


def test_second_run_in_a_workdir_is_refused_naming_the_holder(tmp_path):
  with train.workdir_lock(str(tmp_path)) as holder:
    assert json.loads((tmp_path / train.LOCK_FILE).read_text()) == holder
    pattern = (rf'workdir {re.escape(str(tmp_path))} is in use by another run \(pid '
               rf'{os.getpid()} on host {re.escape(socket.gethostname())} since '
               rf'{re.escape(holder["since"])}, lock file ')
    with pytest.raises(train.WorkdirBusyError, match=pattern):
      with train.workdir_lock(str(tmp_path)):
        pass
  assert (tmp_path / train.LOCK_FILE).read_text() == ''  # released cleanly
  with train.workdir_lock(str(tmp_path)):  # and free again
    pass


def test_stale_lock_of_a_crashed_run_is_taken_over(tmp_path, caplog):
  crashed = {'pid': 999999, 'host': 'gone', 'since': '2020-01-01T00:00:00+00:00'}
  (tmp_path / train.LOCK_FILE).write_text(json.dumps(crashed))  # written, but no flock held
  with caplog.at_level(logging.WARNING):
    with train.workdir_lock(str(tmp_path)):
      assert json.loads((tmp_path / train.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert 'taking over the lock' in caplog.text
  assert 'pid 999999 on host gone since 2020-01-01' in caplog.text


def test_locked_workdir_refuses_training_before_anything_runs(tiny_config, tmp_path):
  with train.workdir_lock(str(tmp_path)):
    with pytest.raises(train.WorkdirBusyError, match=f'pid {os.getpid()}'):
      train.train_and_evaluate(_config(tiny_config), str(tmp_path), train_iter=_MustNotBeRead())
  assert os.listdir(tmp_path) == [train.LOCK_FILE]


# ---------------------------------------------------------------------------- checkpoints


def _initial_state(config):
  mesh = train.make_mesh(jax.devices()[:1])
  state, _, _ = train.init_state(config, mask_rcnn.build_model(config), mesh,
                                 tuple(config.input.buckets[0]))
  return state


def _at_step(state, step):
  return state.replace(step=jnp.asarray(step, jnp.int32))


def test_existing_or_newer_steps_are_never_overwritten(tiny_config, tmp_path):
  config = _config(tiny_config)
  state, meta = _initial_state(config), ckpt.structure_meta(config)
  with train._Checkpointer(ckpt.make_manager(str(tmp_path)), str(tmp_path)) as checkpointer:
    checkpointer.save(_at_step(state, 5), ListIterator([]), meta)
  before = read_tree(tmp_path / '5')
  with train._Checkpointer(ckpt.make_manager(str(tmp_path)), str(tmp_path)) as checkpointer:
    for step in (5, 3):
      with pytest.raises(ckpt.CheckpointError,
                         match=rf'refusing to overwrite checkpoints: {re.escape(str(tmp_path))} '
                               rf'already holds step 5 \(this run is at step {step}\)'):
        checkpointer.save(_at_step(state, step), ListIterator([]), meta)
  assert read_tree(tmp_path / '5') == before
  assert ckpt.latest_step(str(tmp_path)) == 5


def test_resume_refuses_a_corrupt_train_item(tiny_config, tmp_path):
  config = _config(tiny_config)
  state = _initial_state(config)
  rng = np.random.default_rng(0)  # momentum of random values: a flipped byte changes one
  opt_state = jax.tree_util.tree_map(
      lambda x: rng.normal(size=x.shape).astype(x.dtype) if x.ndim else x, state.opt_state)
  with train._Checkpointer(ckpt.make_manager(str(tmp_path)), str(tmp_path)) as checkpointer:
    checkpointer.save(_at_step(state.replace(opt_state=opt_state), 2), ListIterator([]),
                      ckpt.structure_meta(config))
  arrays = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / '2' / ckpt.TRAIN)
            for name in names if os.path.basename(root) == 'd']
  path = max(arrays, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  for i in range(64):
    data[len(data) // 2 + 97 * i] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  pattern = (rf'checkpoint {re.escape(str(tmp_path))} step 2( is corrupt: item train, leaf '
             rf'opt_state/\S+: checksum mismatch|: cannot read item train)')
  with ckpt.make_manager(str(tmp_path), read_only=True) as manager:
    with pytest.raises(ckpt.CheckpointError, match=pattern):
      train._restore(manager, state, ListIterator([]), str(tmp_path), config)


# How a full disk reaches Python under orbax's background write (seen on a full tmpfs):
# tensorstore raises a ValueError whose message carries the errno.
_TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "params.fpn.kernel/0.0" in OCDBT database at local file '
    '"/w/4.orbax-checkpoint-tmp/variables.orbax-checkpoint-tmp/ocdbt.process_0/": Failed '
    'writing: "/w/4.orbax-checkpoint-tmp/d/0e63": Failed to write 418493 bytes to file 8: No '
    "space left on device [os_error_code='28']")


def test_os_error_code_is_found_in_every_form():
  assert train._os_error_code(OSError(errno.EACCES, 'Permission denied')) == errno.EACCES
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as e:
      raise RuntimeError('the asynchronous save failed') from e
  except RuntimeError as wrapped:
    assert train._os_error_code(wrapped) == errno.ENOSPC
  assert train._os_error_code(ValueError(_TENSORSTORE_ENOSPC)) == errno.ENOSPC
  assert train._os_error_code(ValueError('a bug')) is None


@pytest.mark.parametrize('where', ['save', 'background write'])
def test_full_disk_is_one_error_and_keeps_earlier_checkpoints(tiny_config, tmp_path,
                                                                monkeypatch, where):
  """ENOSPC raised by orbax's save (an OSError), or by its background write (tensorstore's
  ValueError, surfacing when the next save waits for it), is one CheckpointWriteError naming
  step and directory."""
  import orbax.checkpoint as ocp
  config = _config(tiny_config, **{'run.checkpoint_every': 2})
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / '4.orbax-tmp'))

  def save(self, step, *args, **kwargs):
    if step != 4:
      return real_save(self, step, *args, **kwargs)
    if where == 'save':
      raise full
    self.failed_in_background = True  # nothing written; the failure shows when waited for
    return True

  def wait_until_finished(self):
    if getattr(self, 'failed_in_background', False):
      self.failed_in_background = False
      raise ValueError(_TENSORSTORE_ENOSPC)
    return real_wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  monkeypatch.setattr(ocp.CheckpointManager, 'wait_until_finished', wait_until_finished)
  with pytest.raises(ckpt.CheckpointWriteError,
                     match=rf'^no space left on device writing checkpoint step 4 to '
                           rf'{re.escape(str(tmp_path))} \(the earlier checkpoints there are '
                           r'intact\)$'):
    _run(config, tmp_path, [synthetic_batch(config, 4)], 6)
  assert ckpt.latest_step(str(tmp_path)) == 2
  _restore_params(tmp_path, config)  # whole, checksums verified
  assert (tmp_path / train.LOCK_FILE).read_text() == ''


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
