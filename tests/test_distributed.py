"""Multi-process settings (config > environment > cluster) and the watchdog's verdicts, on an
in-memory stand-in for the coordination service's key-value store. The real processes are in
test_multiprocess.py."""
import threading
import time

import pytest

from maskrcnn_jax import distributed
from maskrcnn_jax import structures


class FakeStore:
  """The key-value calls the watchdog makes, with the errors the real client raises."""

  def __init__(self):
    self.kv, self.down, self.lock = {}, False, threading.Lock()

  def _check(self):
    if self.down:
      raise RuntimeError('UNAVAILABLE: failed to connect to all addresses')

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      self._check()
      if key in self.kv and not allow_overwrite:
        raise RuntimeError(f'ALREADY_EXISTS: key {key} already exists.')
      self.kv[key] = value

  def key_value_try_get(self, key):
    with self.lock:
      self._check()
      if key not in self.kv:
        raise RuntimeError(f'NOT_FOUND: Config key {key} not found.')
      return self.kv[key]

  def key_value_dir_get(self, key):
    with self.lock:
      self._check()
      return [(k, v) for k, v in self.kv.items() if k.startswith(key + '/')]


class Exits:
  def __init__(self):
    self.codes, self.event = [], threading.Event()

  def __call__(self, code):
    self.codes.append(code)
    self.event.set()


TIMEOUT = 0.4  # seconds; the watchdog polls every 0.05 s at this timeout


def _watchdog(store, process, count, exits=None):
  return distributed.Watchdog(store, process, count, TIMEOUT, prefix='t',
                              exit_fn=exits or Exits())


def _beating(store, process, stop):
  """A stand-in for another live process: its counter moves every 20 ms."""
  def run():
    n = 0
    while not stop.is_set():
      n += 1
      store.key_value_set(f't/beat/{process}', str(n), allow_overwrite=True)
      time.sleep(0.02)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread


def test_process_0_names_the_process_whose_heartbeat_stopped(capsys):
  store, exits, stop = FakeStore(), Exits(), threading.Event()
  _beating(store, 2, stop)
  store.key_value_set('t/beat/1', '1')  # process 1 beat once, then died
  watchdog = _watchdog(store, 0, 3, exits)
  watchdog.start()
  try:
    assert exits.event.wait(10 * TIMEOUT)
  finally:
    stop.set()
  assert exits.codes == [distributed.EXIT_LOST]
  assert store.kv['t/verdict'].startswith('lost process 1 of 3: no heartbeat for')
  assert 'error: lost process 1 of 3' in capsys.readouterr().err


def test_a_failed_process_stops_the_others_with_its_error(capsys):
  store, exits, stop = FakeStore(), Exits(), threading.Event()
  _beating(store, 0, stop)
  watchdog = _watchdog(store, 1, 2, exits)
  watchdog.start()
  _watchdog(store, 0, 2).finish('OSError: [Errno 28] No space left on device: eval/metrics.json')
  try:
    assert exits.event.wait(10 * TIMEOUT)
  finally:
    stop.set()
  assert 'error: process 0 of 2 failed: OSError: [Errno 28]' in capsys.readouterr().err


def test_process_1_judges_process_0_lost_when_its_service_is_gone(capsys):
  store, exits, stop = FakeStore(), Exits(), threading.Event()
  _beating(store, 0, stop)
  watchdog = _watchdog(store, 1, 2, exits)
  watchdog.start()
  time.sleep(2 * TIMEOUT)
  assert not exits.event.is_set()  # alive while process 0 beats
  store.down = True  # process 0, and the coordination service with it, is gone
  stop.set()
  assert exits.event.wait(10 * TIMEOUT)
  assert 'error: lost process 0 of 2 (it hosts the coordination service' in \
      capsys.readouterr().err


def test_process_0_stopped_beating_is_lost_for_the_others(capsys):
  store, exits = FakeStore(), Exits()
  store.key_value_set('t/beat/0', '7')  # process 0 hangs: the store answers, its beat stands
  watchdog = _watchdog(store, 1, 2, exits)
  watchdog.start()
  assert exits.event.wait(10 * TIMEOUT)
  assert 'error: lost process 0 of 2: no heartbeat' in capsys.readouterr().err


def test_finished_processes_are_never_lost():
  store, exits = FakeStore(), Exits()
  watchdog = _watchdog(store, 0, 2, exits)
  watchdog.start()
  done = _watchdog(store, 1, 2)
  done.start()
  done.finish(None)  # process 1 is done and stops beating; process 0 is still evaluating
  time.sleep(3 * TIMEOUT)
  watchdog.finish(None)
  assert not exits.codes and 't/verdict' not in store.kv


# ============================================================================ settings


def _config(tiny_config, **run):
  config = tiny_config.copy_and_resolve_references()
  for key, value in run.items():
    config.run[key] = value
  return config


def test_settings_off_by_default(tiny_config):
  assert distributed.settings(tiny_config) is None


def test_settings_take_the_config_then_the_environment(tiny_config, monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  config = _config(tiny_config, distributed=True, process_id=1)
  assert distributed.settings(config) == {'coordinator_address': '10.0.0.1:1234',
                                          'num_processes': 4, 'process_id': 1}
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name)
  # Left to JAX's cluster detection (SLURM, Cloud TPU, Kubernetes).
  assert distributed.settings(_config(tiny_config, distributed=True)) == {
      'coordinator_address': None, 'num_processes': None, 'process_id': None}


@pytest.mark.parametrize('run, env, field', [
    ({'num_processes': 2}, {}, 'config.run.num_processes = 2 is set but config.run.distributed'),
    ({'distributed': True, 'num_processes': 2, 'process_id': 2}, {}, 'config.run.process_id = 2'),
    ({'distributed': True, 'coordinator_address': 'node0'}, {},
     "config.run.coordinator_address = 'node0'"),
    ({'distributed': True}, {'JAX_PROCESS_ID': 'one'}, "JAX_PROCESS_ID='one'"),
])
def test_settings_refuse_bad_values_naming_them(tiny_config, monkeypatch, run, env, field):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(structures.ConfigError, match=field.replace('.', r'\.')):
    distributed.settings(_config(tiny_config, **run))


def test_numeric_ranges_of_the_run_fields(tiny_config):
  for key, value in (('num_processes', -1), ('process_id', -2), ('distributed_timeout_s', 0)):
    with pytest.raises(structures.ConfigError, match=f'config.run.{key}'):
      structures.validate_config(_config(tiny_config, **{key: value}))
