"""Evaluation wall time of the shapes validation split with 1 and 2 processes on one machine.

    python experiments/benchmarks/bench_eval_processes.py
        [--processes=1,2] [--repeats=2] [--pin=0,1] [--cores_per_process=0] [--checkpoint=DIR]

Runs `maskrcnn-jax evaluate --config=configs/shapes.py` as N real processes joined by JAX's
distributed runtime (a coordinator on a free localhost port, gloo collectives), each with one
CPU device and its own slice of the 100 validation images; process 0 gathers the detections
and runs COCOeval once. Without --checkpoint the weights are a random initialisation (seed 0)
written once under runs/bench_eval_processes/: the programs and the number of detections per
image are those of a trained model (static shapes), only the AP differs. Prints, per process
count, the best of --repeats whole-command wall times (start-up, compile, prediction,
COCOeval), the slowest process's prediction time (its first batch's compile included), and
whether the metrics equal the single-process run's; then a markdown table. With --pin=1 each
process is pinned to its share of the cores, as one process per host has its host's; unpinned
(0), every process's XLA threads compete for all of them. On a 2-core CPU the processes can
only split the same two cores, so there is little to gain there.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, 'runs', 'bench_eval_processes')
CONFIG = 'configs/shapes.py'
PREDICTED = re.compile(r'process (\d+) predicted (\d+) images in ([\d.]+) s')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _random_checkpoint() -> str:
  path = os.path.join(OUT, 'random_init')
  if os.path.isdir(path):
    return path
  code = (
      'import jax, sys; sys.path.insert(0, %r)\n'
      'from configs import shapes\n'
      'from maskrcnn_jax import checkpoint as ckpt\n'
      'from maskrcnn_jax.modeling import mask_rcnn\n'
      'from maskrcnn_jax.data import pipeline\n'
      'c = shapes.get_config()\n'
      'labels = pipeline.load_dataset_records(c, "val").label_map.meta()\n'
      'v = jax.device_get(mask_rcnn.init_variables(c, jax.random.key(0)))\n'
      'ckpt.save_variables(%r, v, {**ckpt.structure_meta(c), **labels, "source": "random"})\n'
  ) % (REPO, path)
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)
  return path


def _cores(p: int, processes: int, pin: bool, per_process: int = 0):
  """With `per_process` = k > 0, process p runs on cores [p*k, (p+1)*k), whatever the number of
  processes (a host's own cores, the same for every run); else with `pin`, process p of n on its
  own 1/n of the cores, else on all of them."""
  cores = sorted(os.sched_getaffinity(0))
  if per_process:
    if processes * per_process > len(cores):
      raise SystemExit(f'{processes} processes x {per_process} cores need more than the '
                       f'{len(cores)} cores here')
    mine = cores[p * per_process:(p + 1) * per_process]
    return lambda: os.sched_setaffinity(0, mine)
  if not pin or processes == 1:
    return None
  mine = cores[p * len(cores) // processes:(p + 1) * len(cores) // processes] or cores
  return lambda: os.sched_setaffinity(0, mine)


def _run(processes: int, checkpoint: str, workdir: str, pin: bool, per_process: int = 0) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env['JAX_PLATFORMS'] = 'cpu'
  port = _free_port()
  procs = []
  started = time.perf_counter()
  for p in range(processes):
    cmd = [sys.executable, '-m', 'maskrcnn_jax', 'evaluate', f'--config={CONFIG}',
           f'--workdir={workdir}', f'--checkpoint={checkpoint}',
           '--config.run.num_eval_pictures=0']
    if processes > 1:
      cmd += ['--config.run.distributed=True',
              f'--config.run.coordinator_address=localhost:{port}',
              f'--config.run.num_processes={processes}', f'--config.run.process_id={p}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  preexec_fn=_cores(p, processes, pin, per_process)))
  outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
  wall = time.perf_counter() - started
  for proc, out in zip(procs, outputs):
    if proc.returncode:
      raise SystemExit(f'evaluate with {processes} processes failed:\n{out[-4000:]}')
  predicted = [PREDICTED.search(out) for out in outputs]
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  return {'processes': processes, 'wall_s': wall,
          'predict_s': max(float(m.group(3)) for m in predicted),
          'images': [int(m.group(2)) for m in predicted], 'metrics': metrics['metrics']}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--processes', default='1,2')
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--checkpoint', default='')
  parser.add_argument('--pin', default='0,1', help='0: every process on all cores; 1: each '
                      'process on its own share of them; 0,1: both')
  parser.add_argument('--cores_per_process', type=int, default=0,
                      help='k > 0: every process (also a single one) on k cores of its own, as '
                           'each host of a pod brings its own; overrides --pin')
  args = parser.parse_args()
  per = args.cores_per_process
  checkpoint = args.checkpoint or _random_checkpoint()
  rows = []
  for n in [int(x) for x in args.processes.split(',')]:
    pins = {True} if per else ({bool(int(x)) for x in args.pin.split(',')} if n > 1 else {False})
    for pin in sorted(pins):
      runs = [_run(n, checkpoint, os.path.join(OUT, f'eval_{n}_{r}'), pin, per)
              for r in range(args.repeats)]
      best = min(runs, key=lambda r: r['wall_s'])
      best['predict_s'] = min(r['predict_s'] for r in runs)
      best['pinned'] = pin
      rows.append(best)
      print(json.dumps({k: v for k, v in best.items() if k != 'metrics'}), flush=True)
  reference = json.dumps(rows[0]['metrics'], sort_keys=True)
  print(f'\nweights: {"random init (seed 0)" if not args.checkpoint else checkpoint}; '
        f'{os.cpu_count()} CPU cores\n')
  print('| processes | cores per process | images per process | whole command (best of %d) | '
        'prediction, slowest process | metrics equal 1 process |' % args.repeats)
  print('|---|---|---|---|---|---|')
  cores = len(os.sched_getaffinity(0))
  for row in rows:
    same = json.dumps(row['metrics'], sort_keys=True) == reference
    share = (f'{per} (its own)' if per else
             f'{cores // row["processes"]} (pinned)' if row['pinned'] else f'{cores} (shared)')
    print(f'| {row["processes"]} | {share} | {" + ".join(map(str, row["images"]))} | '
          f'{row["wall_s"]:.1f} s | {row["predict_s"]:.1f} s | {"yes" if same else "NO"} |')


if __name__ == '__main__':
  main()
