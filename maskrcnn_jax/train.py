"""train_and_evaluate(): mesh, input, init, jitted step, loop, checkpoint, evaluation.

Read top to bottom: optimiser -> train state -> train_step (pure, top level) -> mesh and
sharding -> initialisation and restore (workdir checkpoint > run.init_checkpoint >
run.pretrained_backbone > scratch) -> host memory -> the loop (logging, NaN stop, SIGTERM,
checkpoints, eval).
"""

import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax.backends import host
from maskrcnn_jax import structures
from maskrcnn_jax.modeling import mask_rcnn

DATA_AXIS = 'data'


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step."""


# ============================================================================ optimiser


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up then step decay; lr scales linearly with the global batch (Goyal et al.)."""
  o = config.optim
  lr = o.base_lr * config.input.batch_size / o.base_batch_size
  boundaries = {int(s): o.decay_factor for s in o.decay_steps}
  decay = optax.piecewise_constant_schedule(lr, boundaries)

  def schedule(step):
    # detectron2 WarmupMultiStepLR 'linear': factor goes from warmup_factor to 1 over warmup.
    alpha = jnp.minimum(step / max(o.warmup_steps, 1), 1.0)
    warm = o.warmup_factor * (1 - alpha) + alpha
    return decay(step) * jnp.where(step < o.warmup_steps, warm, 1.0)

  return schedule


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def trainable_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
  """'train' or 'frozen' per parameter leaf: backbone stages below `freeze_at` are frozen."""
  mask = mask_rcnn.trainable_mask(params, config)
  return jax.tree_util.tree_map(lambda keep: 'train' if keep else 'frozen', mask)


def _decay_mask(params: Any, config: ml_collections.ConfigDict) -> Any:
  def decays(path, leaf):
    if not config.optim.wd_exclude_norm_and_bias:
      return True
    name = _path_str(path)
    return leaf.ndim > 1 and 'norm' not in name and '/bn' not in name

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  """SGD + momentum with coupled weight decay (torchvision/detectron2 style), optional clipping;
  frozen parameters get exactly zero updates and no optimiser state."""
  o = config.optim
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  parts += [
      optax.add_decayed_weights(o.weight_decay, mask=functools.partial(_decay_mask,
                                                                       config=config)),
      optax.sgd(learning_rate_schedule(config), momentum=o.momentum),
  ]
  return optax.multi_transform(
      {'train': optax.chain(*parts), 'frozen': optax.set_to_zero()},
      trainable_labels(params, config))


# ============================================================================ state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  constants: Any  # frozen batch-norm statistics; never updated
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so checkpoints hold plain arrays

  @property
  def variables(self):
    return {'params': self.params, 'constants': self.constants}


def create_train_state(config, model, optimizer_fn, key, image_hw) -> TrainState:
  """Pure: builds the initial state (used under jax.eval_shape and jit)."""
  init_key, state_key = jax.random.split(key)
  variables = mask_rcnn.init_variables(config, init_key, image_hw, model=model)
  params = variables['params']
  tx = optimizer_fn(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    constants=variables.get('constants', {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(state_key))


# ============================================================================ step


def train_step(state: TrainState, batch: dict, *, model, optimizer) -> tuple[TrainState, dict]:
  """One SGD step on a global batch. Pure; jit it with the state donated.

  batch: as in `structures.py`, leading axis = global batch (sharded over the 'data' axis).
  Returns the new state and scalar metrics (every loss term, total loss, lr, gradient norm).
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    variables = {'params': params, 'constants': state.constants}
    total, terms = model.apply(variables, batch, key, method=mask_rcnn.MaskRCNN.losses)
    return total, terms

  (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(terms)
  metrics['loss'] = total
  metrics['grad_norm'] = optax.global_norm(grads)
  metrics['finite'] = jnp.isfinite(total) & jnp.isfinite(metrics['grad_norm'])
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


# ============================================================================ mesh and sharding


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every host, axis 'data'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over 'data' (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def per_host_batch_size(config) -> int:
  global_bs = config.input.batch_size
  if global_bs % jax.device_count():
    raise structures.ConfigError(
        f'config.input.batch_size = {global_bs}: the global batch must divide evenly over '
        f'{jax.device_count()} devices')
  return global_bs // jax.process_count()


def make_jitted_train_step(config, model, optimizer, mesh, state_shardings):
  """jit(train_step) with the state donated; one compile per size bucket."""
  step = functools.partial(train_step, model=model, optimizer=optimizer)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


# ============================================================================ initialisation


def init_state(config, model, mesh, image_hw) -> tuple[TrainState, Any, Callable]:
  """Initialises by shape, then materialises the state replicated over the mesh."""
  key = jax.random.key(config.seed)
  optimizer_fn = functools.partial(make_optimizer, config)
  create = functools.partial(create_train_state, config, model, optimizer_fn,
                             image_hw=image_hw)
  abstract = jax.eval_shape(create, key)
  shardings = jax.tree_util.tree_map(lambda _: replicated(mesh), abstract)
  state = jax.jit(create, out_shardings=shardings)(key)
  optimizer = optimizer_fn(state.params)
  return state, shardings, optimizer


def _load_init_variables(config, state: TrainState) -> TrainState:
  """run.init_checkpoint, else run.pretrained_backbone (both optional)."""
  if config.run.init_checkpoint:
    abstract = {'params': state.params, 'constants': state.constants}
    variables, _ = ckpt.restore_variables(config.run.init_checkpoint, abstract, config)
    logging.info('initialised from %s', config.run.init_checkpoint)
    return state.replace(params=variables['params'], constants=variables['constants'])
  if config.run.pretrained_backbone:
    from maskrcnn_jax import weights  # pylint: disable=g-import-not-at-top
    params, constants = weights.load_pretrained_backbone(
        config.run.pretrained_backbone, state.params, state.constants, config)
    return state.replace(params=params, constants=constants)
  return state


_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


# ============================================================================ the loop


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint and returns cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _save(manager, state: TrainState, train_iter, meta: dict) -> None:
  step = int(state.step)
  manager.save(step, args=ocp.args.Composite(**{
      ckpt.VARIABLES: ocp.args.StandardSave(state.variables),
      ckpt.TRAIN: ocp.args.StandardSave({'opt_state': state.opt_state, 'step': state.step,
                                         'rng': state.rng}),
      ckpt.INPUT: ocp.args.JsonSave(ckpt.jsonable(train_iter.get_state())),
      ckpt.META: ocp.args.JsonSave(ckpt.jsonable(meta)),
  }), force=True)


def _restore(manager, state: TrainState, train_iter, workdir: str, config) -> TrainState:
  step = manager.latest_step()
  meta = ckpt.read_meta(workdir, step)
  ckpt.check_model_config(meta, config, workdir)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        ckpt.VARIABLES: ocp.args.StandardRestore(state.variables),
        ckpt.TRAIN: ocp.args.StandardRestore({'opt_state': state.opt_state, 'step': state.step,
                                              'rng': state.rng}),
        ckpt.INPUT: ocp.args.JsonRestore(),
    }))
  except Exception as e:
    raise ckpt.CheckpointError(f'cannot resume from {workdir} step {step}: {e}') from e
  train_iter.set_state(restored[ckpt.INPUT])
  v, t = restored[ckpt.VARIABLES], restored[ckpt.TRAIN]
  logging.info('resumed from %s at step %d', workdir, step)
  return state.replace(step=t['step'], params=v['params'], constants=v['constants'],
                       opt_state=t['opt_state'], rng=t['rng'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iter=None, evaluate_fn: Optional[Callable] = None,
                       num_steps: Optional[int] = None, model=None) -> dict:
  """Trains `config` in `workdir` (resuming from it when it holds a checkpoint).

  `train_iter` (an iterator of host-local batches with get_state/set_state) and `evaluate_fn`
  (called as evaluate_fn(variables, step) -> metrics) default to the configured dataset and the
  COCO evaluator. `num_steps` overrides `config.optim.num_steps` as the stopping step (tests).
  `model` defaults to `mask_rcnn.build_model(config)` (pass one with heads of your own).
  Returns the last logged metrics (and evaluation metrics when evaluated).
  """
  structures.validate_config(config)
  if train_iter is None:
    structures.validate_data(config, ('train', 'val') if _evaluates(config) else ('train',))
  if config.run.distributed:
    jax.distributed.initialize()
  os.makedirs(workdir, exist_ok=True)
  total_steps = int(num_steps if num_steps is not None else config.optim.num_steps)

  # ---- input
  meta = {**ckpt.structure_meta(config), 'source': 'train'}
  host_batch_size = per_host_batch_size(config)  # checks the batch divides over the devices
  owns_iterator = train_iter is None
  if owns_iterator:
    from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    train_iter = pipeline.make_train_iterator(config, per_host_batch_size=host_batch_size)
  meta.update(getattr(train_iter, 'meta', {}) or {})

  # ---- model and state
  mesh = make_mesh()
  model = model if model is not None else mask_rcnn.build_model(config)
  bucket = tuple(config.input.buckets[0])
  state, state_shardings, optimizer = init_state(config, model, mesh, bucket)
  manager = ckpt.make_manager(workdir, max_to_keep=config.run.keep_checkpoints)
  if manager.latest_step() is not None:
    state = _restore(manager, state, train_iter, workdir, config)
  else:
    state = _load_init_variables(config, state)
  state = jax.device_put(state, state_shardings)
  step_fn = make_jitted_train_step(config, model, optimizer, mesh, state_shardings)

  writer = _summary_writer(workdir)
  start_step = int(state.step)
  last_metrics: dict = {}
  pending = None  # (step, metrics) of the previous step, checked one step late (no stall)
  t_last, n_images = time.time(), 0
  progress = _progress(start_step, total_steps)

  def check(pending_step, pending_metrics):
    host = jax.device_get(pending_metrics)
    if not bool(host['finite']):
      raise NonFiniteLossError(
          f'non-finite loss at step {pending_step} (loss={float(host["loss"])}); the last '
          f'checkpoint in {workdir} is intact')
    return {k: float(v) for k, v in host.items() if k != 'finite'}

  compiles = []  # backend compiles since the last step (a new size bucket)

  def on_compile(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == _COMPILE_EVENT:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_compile)
  with _Preemption() as preemption:
    try:
      step = start_step
      while step < total_steps:
        batch = global_batch(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
        if compiles:
          compiles.clear()
          host.release_host_memory()
        step += 1
        n_images += config.input.batch_size
        if pending is not None:
          last_metrics = check(*pending)
        pending = (step, metrics)
        progress.update(1)
        if step % config.run.log_every == 0 or step == total_steps:
          last_metrics = check(*pending)
          pending = None
          now = time.time()
          last_metrics['images_per_sec'] = n_images / max(now - t_last, 1e-9)
          last_metrics['step_time'] = (now - t_last) / max(n_images / config.input.batch_size, 1)
          last_metrics['lr'] = float(learning_rate_schedule(config)(step - 1))
          t_last, n_images = now, 0
          _log(writer, progress, step, last_metrics)
        if (config.run.checkpoint_every and step % config.run.checkpoint_every == 0) or \
            preemption.requested or step == total_steps:
          if pending is not None:
            last_metrics = check(*pending)
            pending = None
          _save(manager, state, train_iter, meta)
        if preemption.requested:
          break
        if config.run.eval_every and step % config.run.eval_every == 0 and step < total_steps:
          last_metrics.update(_evaluate(config, state, step, workdir, writer, evaluate_fn, meta,
                                        model))
      if not preemption.requested and config.run.eval_at_end:
        last_metrics.update(_evaluate(config, state, step, workdir, writer, evaluate_fn, meta,
                                      model))
    finally:
      jax.monitoring.unregister_event_duration_listener(on_compile)
      manager.wait_until_finished()
      manager.close()
      progress.close()
      if owns_iterator and hasattr(train_iter, 'close'):
        train_iter.close()  # stops prefetch threads and worker processes
      if writer is not None:
        writer.flush()
  last_metrics['step'] = int(state.step)
  return last_metrics


def _evaluates(config) -> bool:
  return bool(config.run.eval_every or config.run.eval_at_end)


def _evaluate(config, state, step, workdir, writer, evaluate_fn, meta, model) -> dict:
  if evaluate_fn is None:
    from maskrcnn_jax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate_fn = functools.partial(evaluate.evaluate_config, config, workdir=workdir,
                                    meta=meta, summary_writer=writer, model=model)
  variables = jax.device_get(state.variables)
  metrics = evaluate_fn(variables, step) or {}
  logging.info('step %d eval: %s', step, json.dumps(metrics, sort_keys=True))
  return metrics


# ============================================================================ logging


def _summary_writer(workdir: str):
  if jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def _progress(start: int, total: int):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=start, desc='train', unit='step', dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=1.0)


def _log(writer, progress, step: int, metrics: dict) -> None:
  text = ' '.join(f'{k}={v:.4g}' for k, v in sorted(metrics.items()))
  progress.write(f'step {step}: {text}')
  logging.info('step %d: %s', step, text)
  if writer is not None:
    for k, v in metrics.items():
      writer.add_scalar(f'train/{k}', v, step)
