"""Multi-process runs on JAX's own runtime: joining the processes, and a watchdog that stops
every process, naming the culprit, when one of them is lost or fails.

The processes of a run are JAX's multi-controller processes (`jax.distributed.initialize`):
each runs the same program on its own devices, collectives go over the global mesh (gloo on
CPU, NCCL on GPU, ICI/DCN on TPU), and process 0 hosts the coordination service, whose
key-value store this module also uses for small messages (heartbeats, verdicts, metrics).

Why a watchdog of our own: a collective whose peer died blocks forever on CPU (gloo does not
notice), and JAX's own heartbeat check ends the survivor with a C++ abort and a stack trace.
Here every process beats into the key-value store; process 0 judges the others, the others
judge process 0, and a process that fails posts its error. The first verdict makes every
process print one `error:` line naming the lost process and exit with EXIT_LOST within
`run.distributed_timeout_s`. JAX's heartbeat check stays on as the backstop, at 3x that.
"""

import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax

from maskrcnn_jax import structures

log = logging.getLogger(__name__)

# The environment variables read when a field is unset. JAX reads the first itself; the other
# two follow its naming (JAX takes those values from a detected cluster, or as arguments).
ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES',
            'process_id': 'JAX_PROCESS_ID'}
UNSET = {'coordinator_address': '', 'num_processes': 0, 'process_id': -1}

EXIT_LOST = 1  # an error its message explains (main.py's EXIT_ERROR)
DEFAULT_TIMEOUT_S = 120  # run.distributed_timeout_s of configs that predate it
# JAX's own check of heartbeats, the backstop. JAX may judge a task dead anywhere from half
# its timeout after the task's death (heartbeats go out at intervals of half the timeout), so
# at three times ours it never comes first.
JAX_HEARTBEAT_FACTOR = 3
# Processes may start minutes apart on a pod (images pulled, VMs booted): joining waits at
# least this long whatever the lost-process timeout.
MIN_JOIN_TIMEOUT_S = 300

_PREFIX = 'maskrcnn_jax'
_BEAT, _DONE, _FAILED = 'beat', 'done', 'failed'


class DistributedError(RuntimeError):
  """The processes of a run cannot be joined, or disagree; the message says which and why."""


# ============================================================================ joining


def settings(config) -> Optional[dict]:
  """{'coordinator_address', 'num_processes', 'process_id'} for jax.distributed.initialize
  (None where JAX's cluster detection must decide), or None when `run.distributed` is off.

  Precedence per field: the config (the command line), then the environment (`ENV_VARS`),
  then the cluster. Raises ConfigError naming the field for a value that cannot be used."""
  r = config.run
  if not bool(r.distributed):
    given = [f'run.{k}' for k, unset in UNSET.items() if r.get(k, unset) != unset]
    if given:
      raise structures.ConfigError(
          f'config.{given[0]} = {r[given[0][4:]]!r} is set but config.run.distributed is False; '
          'add --config.run.distributed=True to run with several processes')
    return None
  out = {}
  for field, unset in UNSET.items():
    value = r.get(field, unset)
    if value == unset:
      text = os.environ.get(ENV_VARS[field], '').strip()
      value = None
      if text:
        value = text if field == 'coordinator_address' else _env_int(field, text)
    out[field] = value
  n, p = out['num_processes'], out['process_id']
  if n is not None and n < 1:
    raise structures.ConfigError(f'config.run.num_processes = {n}: must be >= 1')
  if n is not None and p is not None and not 0 <= p < n:
    raise structures.ConfigError(
        f'config.run.process_id = {p}: must lie in [0, {n}) (run.num_processes = {n})')
  address = out['coordinator_address']
  if address is not None and not _is_host_port(address):
    raise structures.ConfigError(
        f'config.run.coordinator_address = {address!r}: expected host:port of process 0')
  return out


def _env_int(field: str, text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise structures.ConfigError(
        f'{ENV_VARS[field]}={text!r} (for config.run.{field}): expected an integer') from None


def _is_host_port(address: str) -> bool:
  host, sep, port = address.rpartition(':')
  return bool(sep and host and port.isdigit())


def timeout_s(config) -> int:
  return int(config.run.get('distributed_timeout_s', DEFAULT_TIMEOUT_S))


def initialize(config) -> bool:
  """Joins this process to the run (`jax.distributed.initialize`) when `run.distributed` is
  on and JAX is not joined yet; True when this call joined it. Must run before anything
  touches a JAX device. Raises ConfigError / DistributedError saying what is missing."""
  wanted = settings(config)
  if wanted is None or jax.distributed.is_initialized():
    return False
  timeout = timeout_s(config)
  try:
    jax.distributed.initialize(
        coordinator_address=wanted['coordinator_address'],
        num_processes=wanted['num_processes'], process_id=wanted['process_id'],
        initialization_timeout=max(timeout, MIN_JOIN_TIMEOUT_S),
        heartbeat_timeout_seconds=JAX_HEARTBEAT_FACTOR * timeout,
        shutdown_timeout_seconds=timeout)
  except ValueError as e:  # a value neither given nor detected from a cluster
    missing = [f'run.{k} ({ENV_VARS[k]})' for k, v in wanted.items() if v is None]
    raise structures.ConfigError(
        f'run.distributed=True, but {", ".join(missing)} is neither set nor detected from a '
        f'cluster (SLURM, Cloud TPU, Kubernetes, Open MPI): {e}') from None
  except RuntimeError as e:
    if 'already' in str(e) or 'once' in str(e):
      raise
    raise DistributedError(
        f'could not join the run as process {wanted["process_id"]} of '
        f'{wanted["num_processes"]} through the coordinator at {wanted["coordinator_address"]}'
        f' within {max(timeout, MIN_JOIN_TIMEOUT_S)} s: {_first_line(e)}') from e
  log.info('joined the run as process %d of %d (%d local devices, %d in all)',
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


@contextlib.contextmanager
def processes(config, clean_exits: tuple = ()) -> Iterator[None]:
  """Joins the run (`initialize`) and watches its processes for the block: a lost or failed
  process ends this one within `run.distributed_timeout_s` (`Watchdog`). On leaving, this
  process posts that it finished (also when it raises one of `clean_exits`, exceptions every
  process raises together, such as a preemption), or the first line of its error.
  Single-process: a no-op."""
  initialize(config)
  if jax.process_count() == 1:
    yield
    return
  watchdog = Watchdog(_client(), jax.process_index(), jax.process_count(),
                      float(timeout_s(config)), prefix=next_tag('watchdog'))
  watchdog.start()
  try:
    yield
  except clean_exits:
    watchdog.finish(None)
    raise
  except BaseException as e:
    if isinstance(e, jax.errors.JaxRuntimeError):
      # A collective may fail because a peer is gone (NCCL notices, gloo blocks): give the
      # watchdog the time to name that process before this one is reported as the failure.
      watchdog.await_verdict()
    watchdog.finish(f'{type(e).__name__}: {_first_line(e)}')
    raise
  watchdog.finish(None)


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _first_line(e: BaseException, limit: int = 300) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line if len(line) <= limit else line[:limit] + '...'


# ============================================================================ the watchdog


class Watchdog:
  """Heartbeats through the coordination service's key-value store, judged in a thread.

  Every process sets `beat/<p>` to a counter every `interval` seconds. Process 0 reads every
  beat and gives the verdict on a process whose counter stood still for `timeout` seconds;
  the others read process 0's beat and the verdict, and judge process 0 lost when its beat
  stood still, or the service it hosts could not be reached, for `timeout` seconds. A failed
  process posts its error as the verdict. One key read per process per interval (process 0
  reads one directory), so the load stays small on large pods.

  On a verdict every process prints `error: <verdict>` and leaves with `os._exit(EXIT_LOST)`:
  the main thread may be blocked in a collective that never returns, and interpreter shutdown
  would block in the same way.
  """

  def __init__(self, client, process: int, count: int, timeout: float, *,
               prefix: str = f'{_PREFIX}/watchdog',
               exit_fn: Callable[[int], None] = os._exit):  # pylint: disable=protected-access
    self.client, self.process, self.count, self.timeout = client, process, count, timeout
    self.prefix = prefix
    self.interval = max(0.05, min(1.0, timeout / 10))
    self._exit = exit_fn
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='maskrcnn_jax-watchdog', daemon=True)
    self._beats = 0
    # process -> (last counter seen, when it last changed, local monotonic clock)
    self._seen: dict[int, tuple[Optional[str], float]] = {}
    self._reachable_at = time.monotonic()

  def start(self) -> None:
    now = time.monotonic()
    self._seen = {q: (None, now) for q in range(self.count) if q != self.process}
    self._beat()
    self._thread.start()

  def finish(self, error: Optional[str]) -> None:
    """This process is done (error None) or failed: posts it, then stops watching (what is
    left to do is JAX's shutdown barrier, bounded by its own timeout)."""
    self._stop.set()
    try:
      if error is None:
        self._set(f'{_DONE}/{self.process}', '1')
      else:
        self._verdict(f'process {self.process} of {self.count} failed: {error}')
    except Exception as e:  # pylint: disable=broad-except  (the service may be gone already)
      log.warning('could not post the end of process %d to the coordinator: %s', self.process,
                  _first_line(e))
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout=2 * self.interval + 1)

  def await_verdict(self) -> None:
    """Waits until the watchdog gave a verdict (it then ends the process) or could have."""
    self._thread.join(timeout=self.timeout + 3 * self.interval)

  # ---- key-value store
  def _key(self, name: str) -> str:
    return f'{self.prefix}/{name}'

  def _set(self, name: str, value: str) -> None:
    self.client.key_value_set(self._key(name), value, allow_overwrite=True)

  def _get(self, name: str) -> Optional[str]:
    try:
      return self.client.key_value_try_get(self._key(name))
    except Exception as e:  # pylint: disable=broad-except
      if 'NOT_FOUND' in str(e) or 'not found' in str(e).lower():
        return None
      raise

  def _verdict(self, text: str) -> None:
    try:  # the first verdict stands
      self.client.key_value_set(self._key('verdict'), text, allow_overwrite=False)
    except Exception:  # pylint: disable=broad-except
      pass

  def _beat(self) -> None:
    self._beats += 1
    self._set(f'{_BEAT}/{self.process}', str(self._beats))

  # ---- judging
  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      try:
        self._beat()
        verdict = self._get('verdict')
        if verdict is None:
          verdict = self._judge()
        self._reachable_at = time.monotonic()
      except Exception as e:  # pylint: disable=broad-except  (the service is unreachable)
        verdict = None
        silent = time.monotonic() - self._reachable_at
        if silent > self.timeout:
          verdict = (f'lost process 0 of {self.count} (it hosts the coordination service, '
                     f'unreachable for {silent:.0f} s: {_first_line(e, 120)})')
      if verdict is not None and not self._stop.is_set():
        self._fail(verdict)
        return

  def _judge(self) -> Optional[str]:
    """A verdict on the processes this one watches, or None while they are alive."""
    now = time.monotonic()
    if self.process == 0:
      entries = dict(self.client.key_value_dir_get(self._key(_BEAT)))
      done = {k.rsplit('/', 1)[-1] for k, _ in self.client.key_value_dir_get(self._key(_DONE))}
      beats = {int(k.rsplit('/', 1)[-1]): v for k, v in entries.items()}
    else:
      done = {'0'} if self._get(f'{_DONE}/0') is not None else set()
      beats = {0: self._get(f'{_BEAT}/0')}
    for q, value in beats.items():
      if q not in self._seen or str(q) in done:
        continue
      last, since = self._seen[q]
      if value != last:
        self._seen[q] = (value, now)
      elif now - since > self.timeout:
        verdict = (f'lost process {q} of {self.count}: no heartbeat for {now - since:.0f} s '
                   '(run.distributed_timeout_s); every process stops, and restarting them all '
                   'resumes from the last complete checkpoint')
        self._verdict(verdict)
        return verdict
    if self.process == 0:  # a process that never beat at all
      for q, (last, since) in self._seen.items():
        if last is None and q not in beats and str(q) not in done and now - since > self.timeout:
          verdict = f'lost process {q} of {self.count}: it never sent a heartbeat'
          self._verdict(verdict)
          return verdict
    return None

  def _fail(self, verdict: str) -> None:
    print(f'error: {verdict}', file=sys.stderr, flush=True)
    log.error('%s', verdict)
    if self.process == 0:
      # Process 0 hosts the store: stay a little so the others read the verdict rather than
      # finding the service gone.
      time.sleep(2 * self.interval)
    for handler in logging.getLogger().handlers:  # os._exit skips the flush at exit
      handler.flush()
    self._exit(EXIT_LOST)


# ============================================================================ small messages


_sequence = {'n': 0}


def next_tag(name: str) -> str:
  """A key-value tag unique to this call site's n-th use; every process calls it in the same
  order, so all of them get the same tag."""
  _sequence['n'] += 1
  return f'{_PREFIX}/{name}/{_sequence["n"]}'


def all_gather_json(tag: str, value: Any, timeout_s: float = 24 * 3600) -> list:
  """Every process's JSON-able `value`, in process order (through the key-value store: small
  values only). Single-process: [value]."""
  if jax.process_count() == 1:
    return [value]
  client = _client()
  client.key_value_set(f'{tag}/{jax.process_index()}', json.dumps(value))
  return [json.loads(client.blocking_key_value_get(f'{tag}/{q}', int(timeout_s * 1000)))
          for q in range(jax.process_count())]


def broadcast_json(tag: str, value: Any = None, timeout_s: float = 24 * 3600) -> Any:
  """Process 0's JSON-able `value` on every process. The long default timeout is for process
  0's own work in between (COCOeval of a large split); a lost process 0 is the watchdog's."""
  if jax.process_count() == 1:
    return value
  client = _client()
  if jax.process_index() == 0:
    client.key_value_set(tag, json.dumps(value))
    return value
  return json.loads(client.blocking_key_value_get(tag, int(timeout_s * 1000)))


def check_same(tag: str, value: Any, what: str, hint: str = '') -> None:
  """Raises DistributedError naming the processes whose `value` differs from process 0's."""
  values = all_gather_json(tag, value)
  differ = [q for q, v in enumerate(values) if v != values[0]]
  if differ:
    shown = ', '.join(f'process {q}: {values[q]!r}' for q in [0] + differ[:3])
    raise DistributedError(f'the processes disagree on {what} ({shown}){hint}')
