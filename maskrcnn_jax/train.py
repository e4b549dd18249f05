"""train_and_evaluate(): mesh, input, init, jitted step, loop, checkpoint, evaluation.

Read top to bottom: optimiser -> train state -> train_step (pure, top level) -> mesh and
sharding -> initialisation and restore (workdir checkpoint > run.init_checkpoint >
run.pretrained_backbone > scratch) -> host memory -> the loop (logging, NaN stop, SIGTERM,
checkpoints, eval), all under an exclusive lock of the workdir.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import gc
import json
import logging
import os
import re
import signal
import socket
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
from maskrcnn_jax import distributed
from maskrcnn_jax.backends import host
from maskrcnn_jax import structures
from maskrcnn_jax.modeling import mask_rcnn

DATA_AXIS = 'data'


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step."""


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock; the message names it (pid, host, start time)."""


class Preempted(Exception):
  """SIGTERM stopped training after a checkpoint of `step` was saved in `workdir`.

  Raised, not returned, so that no caller mistakes a preempted run for a finished one (the CLI
  exits with 128 + SIGTERM = 143, the code a scheduler expects of a terminated job)."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f'preempted by SIGTERM: saved the checkpoint of step {step} in {workdir}; '
                     'the same command resumes from it')
    self.step, self.workdir = step, workdir


# ============================================================================ workdir lock

LOCK_FILE = '.lock'


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive `flock` on `<workdir>/.lock` for the block, or raises WorkdirBusyError.

  Two runs in one workdir would overwrite and delete each other's checkpoints, so the second
  is refused at once, naming the holder from the JSON the lock file holds (pid, host, since).
  The kernel releases a flock when its process dies, so a crashed run never blocks the next: a
  non-empty file that is not locked is a crashed run's record, taken over with a log line. A
  clean exit empties the file instead of deleting it (deleting would let a run that opened the
  old file lock a different inode than one that creates a new file). flock works across NFS
  clients on Linux (it is emulated with byte-range locks there).
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusyError(
          f'workdir {workdir} is in use by another run ({_holder_text(_read_holder(fd))}, lock '
          f'file {path}); wait for it to end, stop it, or use another --workdir') from None
    previous = _read_holder(fd)
    if previous is not None:
      logging.warning('taking over the lock %s left by a run that ended without releasing it '
                      '(%s)', path, _holder_text(previous))
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    logging.info('locked workdir %s (%s)', workdir, path)
    try:
      yield holder
    finally:
      os.ftruncate(fd, 0)  # empty: released cleanly
  finally:
    os.close(fd)  # releases the flock


def _read_holder(fd: int) -> Optional[dict]:
  """The holder record of an open lock file, None when empty, {} when unreadable."""
  data = os.pread(fd, 4096, 0)
  if not data.strip():
    return None
  try:
    holder = json.loads(data)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _holder_text(holder: Optional[dict]) -> str:
  if not holder:
    return 'holder not recorded'
  return (f'pid {holder.get("pid", "?")} on host {holder.get("host", "?")} since '
          f'{holder.get("since", "?")}')


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
  """SIGTERM sets a flag; the loop saves a checkpoint and train_and_evaluate raises Preempted.

  With several processes a SIGTERM may reach only some of them, and all must save the same
  step: JAX's preemption service (its own SIGTERM handler, left in place) propagates the
  notice and `reached_preemption_sync_point` names the one step every process stops at."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = None
    return self

  def poll(self, step: int) -> bool:
    """Whether to stop after `step`; called once per step, by every process."""
    if self._multi and not self.requested:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
      if self.requested:
        logging.warning('preemption notice: every process saves step %d and stops', step)
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _train_item(state: TrainState) -> dict:
  return {'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}


class _Checkpointer:
  """Writes the training checkpoints of `workdir` through an orbax manager (async, atomic).

  Never overwrites: a step that already exists, or a newer one (another run wrote it), is an
  error naming it. An OSError while writing (a full disk, a vanished mount), whether orbax
  raises it at once or from its background write, becomes one CheckpointWriteError naming the
  step and the directory; orbax writes into a temporary folder it renames when complete, so
  the earlier checkpoints are intact.
  """

  def __init__(self, manager: ocp.CheckpointManager, workdir: str):
    self.manager, self.workdir = manager, workdir
    self._in_flight = None  # the step whose background write may not have finished
    self._log_filter = _QuietAbandonedWrites()
    for name in self._log_filter.LOGGERS:
      logging.getLogger(name).addFilter(self._log_filter)
    ckpt.drop_closed_loop_reports()  # the other echo of an abandoned read or write

  def save(self, state: TrainState, train_iter, meta: dict) -> None:
    step = int(state.step)
    self.wait()  # a failure of the previous write is reported with its own step
    self.manager.reload()  # the steps on disk now, not those cached when it was opened
    existing = self.manager.all_steps()
    if step in existing or (existing and max(existing) > step):
      raise ckpt.CheckpointError(
          f'refusing to overwrite checkpoints: {self.workdir} already holds step '
          f'{step if step in existing else max(existing)} (this run is at step {step}); was it '
          'written by another run?')
    variables, train_item = state.variables, _train_item(state)
    with self._writing(step):
      saved = self.manager.save(step, args=ocp.args.Composite(**{
          ckpt.VARIABLES: ocp.args.StandardSave(variables),
          ckpt.TRAIN: ocp.args.StandardSave(train_item),
          ckpt.INPUT: ocp.args.JsonSave(ckpt.jsonable(train_iter.get_state())),
          ckpt.META: ocp.args.JsonSave(ckpt.jsonable(meta)),
          ckpt.CHECKSUMS: ocp.args.JsonSave(ckpt.checksums({ckpt.VARIABLES: variables,
                                                            ckpt.TRAIN: train_item})),
      }))
    if not saved:  # orbax's save policy declined (it never should with these options)
      raise ckpt.CheckpointWriteError(f'orbax did not save checkpoint step {step} to '
                                      f'{self.workdir}')
    self._in_flight = step

  def wait(self) -> None:
    step, self._in_flight = self._in_flight, None
    if step is not None:
      with self._writing(step):
        self.manager.wait_until_finished()

  def __enter__(self) -> '_Checkpointer':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close(quiet=exc_type is not None)

  def close(self, quiet: bool = False) -> None:
    """Waits for the last write and closes the manager; with `quiet` (another error is on its
    way out) a write error is logged instead of raised, so it cannot hide that error."""
    reported = quiet
    try:
      self.wait()
    except ckpt.CheckpointWriteError as e:
      if not quiet:
        reported = True
        raise
      logging.error('%s', e)
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not reported:
          raise
        # orbax may raise its failed background write again; it is already being reported.
        logging.warning('closing the checkpoint manager of %s: %s', self.workdir, e)
      finally:
        for name in self._log_filter.LOGGERS:
          logging.getLogger(name).removeFilter(self._log_filter)

  @contextlib.contextmanager
  def _writing(self, step: int):
    try:
      yield
    except ckpt.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      code = _os_error_code(e)
      if code is None:
        raise
      what = 'no space left on device' if code == errno.ENOSPC else os.strerror(code)
      gc.collect()  # finalise the write coroutines orbax abandoned while Python still runs
      raise ckpt.CheckpointWriteError(
          f'{what} writing checkpoint step {step} to {self.workdir} (the earlier checkpoints '
          'there are intact)') from e


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _os_error_code(e: BaseException) -> Optional[int]:
  """The errno of the OS error behind `e`, or None: an OSError in its chain of causes and
  contexts, or tensorstore's report of one (a ValueError such as `RESOURCE_EXHAUSTED: ...
  Failed writing ...: No space left on device [os_error_code='28']`, which is how a full disk
  under orbax's background write surfaces)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e.errno
    match = _OS_ERROR_CODE.search(str(e))
    if match:
      return int(match.group(1))
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


class _QuietAbandonedWrites(logging.Filter):
  """A failed write is reported once, as a CheckpointWriteError; this keeps its echoes short:
  the errors orbax's background threads log keep their one-line message but lose their
  traceback, and asyncio's "Task exception was never retrieved" for the write tasks orbax
  abandoned (the same failure, found when they are collected) is dropped."""

  LOGGERS = ('absl', 'asyncio')  # orbax logs through absl

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == 'asyncio' and record.msg == 'Task exception was never retrieved':
      return False
    if record.exc_info and record.levelno >= logging.ERROR and 'orbax' in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def _restore(manager, state: TrainState, train_iter, workdir: str, config) -> TrainState:
  step = manager.latest_step()
  meta = ckpt.read_meta(workdir, step)
  ckpt.check_model_config(meta, config, workdir)
  restored = ckpt.restore_items(manager, workdir, step,
                                {ckpt.VARIABLES: state.variables, ckpt.TRAIN: _train_item(state)},
                                json_items=(ckpt.INPUT,))
  train_iter.set_state(restored[ckpt.INPUT])
  distributed.check_same(distributed.next_tag('input_state'), ckpt.jsonable(
      train_iter.get_state()), 'the restored input state', _SHARED_WORKDIR_HINT)
  v, t = restored[ckpt.VARIABLES], restored[ckpt.TRAIN]
  logging.info('resumed from %s at step %d', workdir, step)
  return state.replace(step=t['step'], params=v['params'], constants=v['constants'],
                       opt_state=t['opt_state'], rng=t['rng'])


_SHARED_WORKDIR_HINT = ('; the workdir must be a filesystem every host sees, at the same path '
                        '(docs/pods.md)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iter=None, evaluate_fn: Optional[Callable] = None,
                       num_steps: Optional[int] = None, model=None) -> dict:
  """Trains `config` in `workdir` (resuming from it when it holds a checkpoint).

  `train_iter` (an iterator of host-local batches with get_state/set_state) and `evaluate_fn`
  (called as evaluate_fn(variables, step) -> metrics) default to the configured dataset and the
  COCO evaluator. `num_steps` overrides `config.optim.num_steps` as the stopping step (tests).
  `model` defaults to `mask_rcnn.build_model(config)` (pass one with heads of your own).
  Returns the last logged metrics (and evaluation metrics when evaluated).

  The whole run holds the workdir's lock (`workdir_lock`; a second run in the same workdir
  raises WorkdirBusyError before building anything). On multi-process runs only process 0
  takes it: the processes of one run share the workdir, and a second run is stopped by its own
  process 0 (its other processes stop on the watchdog's verdict naming it). Raises Preempted
  after SIGTERM, once the checkpoint is written.

  Multi-process runs (`run.distributed`, docs/pods.md): every process calls this with the same
  config and workdir (a filesystem all hosts see); each feeds its slice of every global batch,
  writes its part of each checkpoint (orbax commits a step once every process finished it),
  checks that all resume from the same step and input state, and evaluates its slice of the
  validation split. Only process 0 writes TensorBoard events, the progress bar, pictures and
  metrics. A lost or failed process stops the others within `run.distributed_timeout_s`.
  """
  structures.validate_config(config)
  if num_steps is not None and not (isinstance(num_steps, int) and num_steps >= 1):
    raise ValueError(f'num_steps = {num_steps!r}: must be an integer >= 1')
  if train_iter is None:
    splits = ('train', 'val') if _evaluates(config) else ('train',)
    structures.validate_data(config, splits)
    from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    pipeline.check_built(config, splits)
  distributed.settings(config)  # a bad process setting stops the run before anything starts
  with distributed.processes(config, clean_exits=(Preempted,)):
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as stack:  # unwound in reverse: manager, input, then the lock
      if jax.process_index() == 0:
        stack.enter_context(workdir_lock(workdir))
      return _train_and_evaluate(config, workdir, stack, train_iter=train_iter,
                                 evaluate_fn=evaluate_fn, num_steps=num_steps, model=model)


def _train_and_evaluate(config, workdir: str, stack: contextlib.ExitStack, *, train_iter,
                        evaluate_fn, num_steps, model) -> dict:
  """train_and_evaluate's body; `stack` closes what it opens however it ends."""
  total_steps = int(num_steps if num_steps is not None else config.optim.num_steps)

  # ---- input
  meta = {**ckpt.structure_meta(config), 'source': 'train'}
  host_batch_size = per_host_batch_size(config)  # checks the batch divides over the devices
  if train_iter is None:
    from maskrcnn_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    train_iter = pipeline.make_train_iterator(config, per_host_batch_size=host_batch_size)
    if hasattr(train_iter, 'close'):
      stack.callback(train_iter.close)  # stops prefetch threads and worker processes
  meta.update(getattr(train_iter, 'meta', {}) or {})

  # ---- model and state
  mesh = make_mesh()
  model = model if model is not None else mask_rcnn.build_model(config)
  bucket = tuple(config.input.buckets[0])
  state, state_shardings, optimizer = init_state(config, model, mesh, bucket)
  manager = ckpt.make_manager(workdir, max_to_keep=config.run.keep_checkpoints)
  checkpointer = stack.enter_context(_Checkpointer(manager, workdir))
  # Every process must resume from the same step; they see different ones when the workdir
  # is not one filesystem that all hosts share.
  distributed.check_same(distributed.next_tag('latest_step'), manager.latest_step(),
                         f'the latest checkpoint step in {workdir}', _SHARED_WORKDIR_HINT)
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
        preemption.poll(step)
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
          checkpointer.save(state, train_iter, meta)
        if preemption.requested:
          break
        if config.run.eval_every and step % config.run.eval_every == 0 and step < total_steps:
          last_metrics.update(_evaluate(config, state, step, workdir, writer, evaluate_fn, meta,
                                        model))
      # The loop stopped for a SIGTERM; one during the final evaluation lets it finish instead.
      preempted = preemption.requested
      if not preempted and config.run.eval_at_end:
        last_metrics.update(_evaluate(config, state, step, workdir, writer, evaluate_fn, meta,
                                      model))
    finally:
      jax.monitoring.unregister_event_duration_listener(on_compile)
      progress.close()
      if writer is not None:
        writer.flush()
  if preempted:
    checkpointer.wait()  # "saved" only once it is on disk; a write error is raised as such
    raise Preempted(int(state.step), workdir)
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
  if jax.process_index() == 0:
    progress.write(f'step {step}: {text}')
  logging.info('step %d: %s', step, text)
  if writer is not None:
    for k, v in metrics.items():
      writer.add_scalar(f'train/{k}', v, step)
