"""Faults with real processes: two `train` runs in one workdir, SIGKILL (a crash), SIGTERM (a
preemption), each through the CLI in subprocesses on the tiny shapes config."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from synthetic import REPO
from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax.modeling import mask_rcnn


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory):
  """The tiny config's shapes dataset, generated once (what `train` would generate itself)."""
  from configs import shapes
  from maskrcnn_jax.data import pipeline
  from maskrcnn_jax.data import shapes as shapes_data
  d = shapes.get_config('tiny').data
  root = tmp_path_factory.mktemp('data') / 'shapes'
  shapes_data.write_shapes_dataset(str(root), d.shapes_num_train, d.shapes_num_val,
                                   d.shapes_size, pipeline.SHAPES_SEED)
  return root


def _start(workdir, data, log, *overrides):
  """Starts `maskrcnn-jax train` on the tiny config with one CPU device; output into `log`."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(),
                                                  'maskrcnn_jax_test_jit_cache')
  args = [sys.executable, '-m', 'maskrcnn_jax', 'train', '--config=configs/shapes.py:tiny',
          f'--workdir={workdir}', f'--config.data.root={data}', '--config.run.log_every=1',
          *overrides]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=open(log, 'w'),
                          stderr=subprocess.STDOUT)


def _wait_for(predicate, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'the run ended (code {proc.returncode}) before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.2)


def _holds_lock(workdir, proc):
  try:
    return json.loads((workdir / '.lock').read_text())['pid'] == proc.pid
  except (OSError, ValueError, KeyError):
    return False


def _trained(log, step):
  return f'step {step}:' in log.read_text()


def _restore_all(workdir):
  from configs import shapes
  config = shapes.get_config('tiny')
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  return {step: ckpt.restore_variables(str(workdir), abstract, config, step=step)[0]
          for step in sorted(int(n) for n in os.listdir(workdir) if n.isdigit())}


def test_second_run_in_a_workdir_is_refused_and_the_first_is_intact(shapes_root, tmp_path):
  workdir = tmp_path / 'run'
  # Long enough (about 10 s once compiled) to be running still when the second one is refused.
  first = _start(workdir, shapes_root, tmp_path / 'first.log', '--config.optim.num_steps=120',
                 '--config.run.checkpoint_every=30', '--config.run.keep_checkpoints=4')
  try:
    _wait_for(lambda: _holds_lock(workdir, first), first, 'the first run took the lock')
    started = time.time()
    second = _start(workdir, shapes_root, tmp_path / 'second.log', '--config.optim.num_steps=5')
    assert second.wait(timeout=120) == 1
    took = time.time() - started
    out = (tmp_path / 'second.log').read_text()
    assert first.poll() is None, 'the first run ended before the second was refused'
    assert first.wait(timeout=600) == 0, (tmp_path / 'first.log').read_text()[-3000:]
  finally:
    first.kill()
  errors = [line for line in out.splitlines() if line.startswith('error: ')]
  assert 'Traceback' not in out and len(errors) == 1, out[-3000:]
  assert re.match(rf'error: workdir {re.escape(str(workdir))} is in use by another run '
                  rf'\(pid {first.pid} on host \S+ since \S+, lock file ', errors[0]), errors[0]
  assert took < 60  # refused at start-up, not after building the model
  # The first run's checkpoints are all there, whole (checksums verified), each a new state.
  restored = _restore_all(workdir)
  assert sorted(restored) == [30, 60, 90, 120]
  leaves = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(v)])
            for v in restored.values()]
  assert all(np.any(a != b) for a, b in zip(leaves, leaves[1:]))
  assert (workdir / '.lock').read_text() == ''


def test_crash_leaves_no_lock_and_sigterm_exits_143_after_saving(shapes_root, tmp_path):
  workdir = tmp_path / 'run'
  crashed = _start(workdir, shapes_root, tmp_path / 'crashed.log', '--config.optim.num_steps=500',
                   '--config.run.checkpoint_every=2')
  try:
    # At step 5 the step-2 checkpoint is complete (saving step 4 waited for it) and step 4's
    # may be half-written: the kill leaves orbax's temporary folder behind.
    _wait_for(lambda: _trained(tmp_path / 'crashed.log', 5), crashed, 'step 5')
  finally:
    crashed.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
    crashed.wait(timeout=60)
  assert json.loads((workdir / '.lock').read_text())['pid'] == crashed.pid  # its record stays
  log = tmp_path / 'preempted.log'
  run = _start(workdir, shapes_root, log, '--config.optim.num_steps=500',
               '--config.run.checkpoint_every=0')
  try:
    _wait_for(lambda: re.search(r'step \d+:', log.read_text().split('resumed from', 1)[-1]),
              run, 'a step after resuming')
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=300) == 143, log.read_text()[-3000:]
  finally:
    run.kill()
  out = log.read_text()
  assert 'taking over the lock' in out and f'pid {crashed.pid}' in out  # the stale lock
  assert re.search(r'resumed from \S+ at step [24]\b', out), out[-3000:]
  saved = re.findall(r'^preempted by SIGTERM: saved the checkpoint of step (\d+) in (\S+); the '
                     r'same command resumes from it$', out, re.M)
  assert len(saved) == 1 and saved[0][1] == str(workdir), out[-3000:]
  assert 'summary:' not in out and 'Traceback' not in out
  step = int(saved[0][0])
  assert ckpt.latest_step(str(workdir)) == step and step > 2
  _restore_all(workdir)  # every checkpoint whole
  assert (workdir / '.lock').read_text() == ''
