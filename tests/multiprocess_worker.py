"""One process of a multi-process tiny training run, for tests/test_multiprocess.py.

    python tests/multiprocess_worker.py --workdir=W --data_root=D --num_processes=2
        --process_id=0 --port=P --devices=2 --steps=4 --out=W/p0.json [--eval]
        [--die_after_checkpoint=K] [--timeout=T]

Runs `train.train_and_evaluate` on the tiny config (global batch 4) over the real input
pipeline of a tiny shapes dataset, with `--devices` virtual CPU devices in this process and
JAX's distributed runtime joining `--num_processes` of them (gloo collectives, a coordinator
on localhost:P). Writes {'losses': {step: loss}, 'metrics': ...} to --out. The test hook
--die_after_checkpoint=K kills this process with SIGKILL once its part of checkpoint K is
written, after writing the time to OUT.dead.
"""
import argparse
import json
import os
import pathlib
import signal
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser()
  for name in ('workdir', 'data_root', 'out'):
    parser.add_argument(f'--{name}', required=True)
  for name, default in (('num_processes', 1), ('process_id', 0), ('port', 0), ('devices', 2),
                        ('steps', 4), ('die_after_checkpoint', 0), ('timeout', 60)):
    parser.add_argument(f'--{name}', type=int, default=default)
  parser.add_argument('--eval', action='store_true')
  args = parser.parse_args()

  # Before JAX is imported: this process's virtual devices, and the tests' compile cache.
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ['JAX_PLATFORMS'] = 'cpu'
  sys.path.insert(0, str(REPO))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(tempfile.gettempdir(), 'maskrcnn_jax_test_jit_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  from configs import maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top

  config = maskrcnn_r50_fpn.get_config('tiny')
  config.input.batch_size = 4
  config.optim.base_batch_size = 4
  config.optim.num_steps = args.steps
  config.data.root = args.data_root
  config.run.checkpoint_every = 2
  config.run.eval_at_end = args.eval
  config.run.num_eval_pictures = 1
  if args.num_processes > 1:
    config.run.distributed = True
    config.run.coordinator_address = f'localhost:{args.port}'
    config.run.num_processes = args.num_processes
    config.run.process_id = args.process_id
    config.run.distributed_timeout_s = args.timeout

  losses = {}
  log = train._log  # pylint: disable=protected-access

  def recording_log(writer, progress, step, metrics):
    losses[step] = metrics['loss']
    log(writer, progress, step, metrics)

  train._log = recording_log  # pylint: disable=protected-access
  save = train._Checkpointer.save  # pylint: disable=protected-access

  def fatal_save(self, state, train_iter, meta):
    save(self, state, train_iter, meta)
    if int(state.step) == args.die_after_checkpoint:
      self.wait()  # this process's part is written; orbax commits the step on process 0
      pathlib.Path(args.out + '.dead').write_text(str(time.time()))
      os.kill(os.getpid(), signal.SIGKILL)

  train._Checkpointer.save = fatal_save  # pylint: disable=protected-access
  metrics = train.train_and_evaluate(config, args.workdir)
  pathlib.Path(args.out).write_text(json.dumps({'losses': losses, 'metrics': metrics}))


if __name__ == '__main__':
  main()
