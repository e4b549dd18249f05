"""Real multi-process runs: JAX's distributed runtime with gloo collectives and a coordinator on
a free localhost port, each process a `tests/multiprocess_worker.py` subprocess with 2 virtual
CPU devices, training the tiny config (global batch 4) on a tiny shapes dataset.

2 processes x 2 devices equal 1 process x 4 devices (losses, parameters, COCO metrics); a
killed process stops the survivor within the timeout, naming it, and both restarted resume to
the uninterrupted result; a step only some processes finished is ignored.
"""
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from synthetic import REPO
from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax.data import pipeline
from maskrcnn_jax.modeling import mask_rcnn

WORKER = REPO / 'tests' / 'multiprocess_worker.py'
HARD_TIMEOUT_S = 420  # no run may hang the suite, whatever breaks
STEPS = 4  # checkpoints at 2 and 4 (checkpoint_every=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(root: pathlib.Path, name: str, data_root, *, processes: int, devices: int,
            args=(), per_process=None) -> list:
  """Starts the processes of one run in `root/name` (its workdir `root/name/w`)."""
  run = root / name
  run.mkdir(parents=True, exist_ok=True)
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = []
  for p in range(processes):
    cmd = [sys.executable, str(WORKER), f'--workdir={run / "w"}', f'--data_root={data_root}',
           f'--num_processes={processes}', f'--process_id={p}', f'--port={port}',
           f'--devices={devices}', f'--steps={STEPS}', f'--out={run / f"p{p}.json"}', *args,
           *((per_process or {}).get(p, ()))]
    log = open(run / f'p{p}.log', 'w')  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
    log.close()
  return procs


def _wait(procs, timeout=HARD_TIMEOUT_S) -> list:
  deadline = time.monotonic() + timeout
  codes = []
  try:
    for proc in procs:
      codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return codes


def _log(root, name, p) -> str:
  return (root / name / f'p{p}.log').read_text()


def _result(root, name, p) -> dict:
  return json.loads((root / name / f'p{p}.json').read_text())


def _variables(workdir):
  config = _tiny_config(None)
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  variables, _ = ckpt.restore_variables(str(workdir), abstract)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def _tiny_config(data_root):
  from configs import maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  config = maskrcnn_r50_fpn.get_config('tiny')
  if data_root is not None:
    config.data.root = str(data_root)
  return config


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b))


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('multiprocess')


@pytest.fixture(scope='module')
def data_root(root):
  """The tiny shapes dataset, generated once here rather than by every process at once."""
  config = _tiny_config(root / 'shapes')
  for split in ('train', 'val'):
    pipeline.load_dataset_records(config, split)
  return root / 'shapes'


@pytest.fixture(scope='module')
def reference_runs(root, data_root):
  """One process x 4 devices and 2 processes x 2 devices, trained and evaluated, at once."""
  procs = _launch(root, 'one', data_root, processes=1, devices=4, args=['--eval'])
  procs += _launch(root, 'two', data_root, processes=2, devices=2, args=['--eval'])
  codes = _wait(procs)
  for (name, p), code in zip((('one', 0), ('two', 0), ('two', 1)), codes):
    assert code == 0, f'{name} process {p} exited {code}:\n{_log(root, name, p)[-4000:]}'
  return root


@pytest.mark.slow
def test_two_processes_equal_one_process(reference_runs):
  root = reference_runs
  one, two = _result(root, 'one', 0), _result(root, 'two', 0)
  assert sorted(one['losses']) == sorted(two['losses']) == [str(s) for s in range(1, STEPS + 1)]
  for step, loss in one['losses'].items():
    assert abs(loss - two['losses'][step]) <= 1e-5, step
  assert _max_diff(_variables(root / 'one' / 'w'), _variables(root / 'two' / 'w')) <= 1e-5

  # COCO metrics from one COCOeval over the gathered slices: identical, on every process.
  metrics_one = json.loads((root / 'one' / 'w' / 'eval' / 'metrics.json').read_text())
  metrics_two = json.loads((root / 'two' / 'w' / 'eval' / 'metrics.json').read_text())
  assert metrics_two['num_images'] == metrics_one['num_images'] == 8
  assert json.dumps(metrics_two, sort_keys=True) == json.dumps(metrics_one, sort_keys=True)
  returned = [{k: v for k, v in _result(root, 'two', p)['metrics'].items() if '/' in k}
              for p in (0, 1)]
  assert json.dumps(returned[0], sort_keys=True) == json.dumps(returned[1], sort_keys=True)
  assert set(returned[0]) >= {'bbox/AP', 'segm/AP'}
  # The detections themselves, in single-process order (process 0's slice, then process 1's).
  results_one = json.loads((root / 'one' / 'w' / 'eval' / 'results.json').read_text())
  results_two = json.loads((root / 'two' / 'w' / 'eval' / 'results.json').read_text())
  assert len(results_one) == len(results_two) > 0
  assert [r['image_id'] for r in results_one] == [r['image_id'] for r in results_two]
  assert max(abs(a['score'] - b['score']) for a, b in zip(results_one, results_two)) <= 1e-5
  assert not [f for f in os.listdir(root / 'two' / 'w' / 'eval') if '.process-' in f]

  # Only process 0 wrote the progress lines, TensorBoard events and pictures.
  assert f'step {STEPS}:' in _log(root, 'two', 0)
  assert f'step {STEPS}:' not in _log(root, 'two', 1)
  events = [f for f in os.listdir(root / 'two' / 'w' / 'tensorboard') if 'tfevents' in f]
  assert len(events) == 1
  assert len(os.listdir(root / 'two' / 'w' / 'eval' / 'pictures')) == 1


@pytest.mark.slow
def test_a_lost_process_stops_the_survivor_and_a_restart_resumes(reference_runs, data_root):
  """Process 1 is killed once checkpoint 2 is written; process 0, blocked in the next step's
  collective, exits non-zero within the timeout naming it. Both restarted (a new coordinator,
  the same workdir) resume at step 3 and end where the uninterrupted run ended."""
  root, timeout = reference_runs, 10
  procs = _launch(root, 'lost', data_root, processes=2, devices=2,
                  args=[f'--timeout={timeout}'], per_process={1: ['--die_after_checkpoint=2']})
  try:
    code = procs[0].wait(timeout=HARD_TIMEOUT_S)
    ended = time.time()
  finally:
    _wait(procs, timeout=5)
  log = _log(root, 'lost', 0)
  died_at = float((root / 'lost' / 'p1.json.dead').read_text())
  assert code != 0, log[-3000:]
  assert 'error: lost process 1 of 2' in log, log[-3000:]
  # The bound, plus the watchdog's polling and the exit of a process held in a collective.
  assert ended - died_at <= timeout + 10, (ended - died_at, log[-3000:])
  assert 'Terminating process because the JAX distributed service' not in log  # ours came first
  assert ckpt.latest_step(str(root / 'lost' / 'w')) == 2

  codes = _wait(_launch(root, 'lost', data_root, processes=2, devices=2))
  assert codes == [0, 0], _log(root, 'lost', 0)[-3000:] + _log(root, 'lost', 1)[-3000:]
  resumed, uninterrupted = _result(root, 'lost', 0), _result(root, 'two', 0)
  assert sorted(resumed['losses']) == ['3', '4']
  for step in ('3', '4'):
    assert abs(resumed['losses'][step] - uninterrupted['losses'][step]) <= 1e-5
  assert _max_diff(_variables(root / 'lost' / 'w'), _variables(root / 'two' / 'w')) <= 1e-5


def test_a_step_only_some_processes_finished_is_never_restored(tmp_path, tiny_config):
  """orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it once every process
  finished its part; our items (meta, checksums) are items of the same step, so a step cut
  short by a lost process, whatever it holds, is never listed nor restored."""
  config = tiny_config
  variables = mask_rcnn.init_variables(config, jax.random.key(0))
  ckpt.save_variables(str(tmp_path), variables, {'source': 'test'}, step=2)
  partial = tmp_path / f'4{ocp.utils.TMP_DIR_SUFFIX}'
  shutil.copytree(tmp_path / '2', partial)  # every item there, only the commit missing
  assert ckpt.latest_step(str(tmp_path)) == 2
  abstract = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  restored, _ = ckpt.restore_variables(str(tmp_path), abstract, config)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert math.isfinite(float(jax.tree_util.tree_leaves(restored)[0].sum()))
