"""Latency of the exported R50-FPN detector (`serving.load`) against the Predictor, same run.

    python experiments/benchmarks/bench_export.py [--repeats=5]
        [--backend=auto|xla|cpu]

One 800x1216 image (bench_model.py's), end to end in both: preprocessing, the detector, box
rescale and mask paste. The weights are bench_model.py's (the random torchvision model,
converted, when torch imports). Subprocesses, one after another: one exports (CPU program,
traced with `backend_for('cpu', config)`); one times the Predictor and the exported program in
turns (A, B, A, B, ...), so that load from other processes on a shared machine falls on both
alike: the latency comparison; then one runs each alone for its first call and peak RSS, the
exported program in a process where flax, `maskrcnn_jax.modeling` and the configs cannot be
imported (the serving process as deployed). Prints one JSON line per case and a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BLOCKED = ('flax', 'maskrcnn_jax.modeling', 'configs', 'ml_collections', 'orbax')


def _block_imports() -> None:
  import importlib.abc  # pylint: disable=g-import-not-at-top

  class Block(importlib.abc.MetaPathFinder):

    def find_spec(self, name, path=None, target=None):
      del path, target
      if any(name == b or name.startswith(b + '.') for b in BLOCKED):
        raise ImportError(f'blocked in the serving benchmark: {name}')

  sys.meta_path.insert(0, Block())


def _export(directory: str, backend: str) -> dict:
  import bench_model  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import export  # pylint: disable=g-import-not-at-top
  config, variables, source = bench_model._jax_setup(backend)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  manifest = export.export_model(config, variables, directory, platforms=('cpu',),
                                 meta={'source': source})
  return {'case': 'export', 'export_s': time.perf_counter() - t0, 'weights': source,
          'backend': manifest['artifacts'][0]['backend'],
          'program_mb': manifest['artifacts'][0]['bytes'] / 2**20}


def _time(call, image, repeats: int, result: dict) -> dict:
  import bench_model  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  out = call(image)
  result['first_call_s'] = time.perf_counter() - t0
  steady = bench_model._reset_peak_rss()  # pylint: disable=protected-access
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call(image)
    times.append(time.perf_counter() - t0)
  result.update(median_s=statistics.median(times), min_s=min(times),
                detections=int(len(out['scores'])),
                peak_rss_mb=bench_model._peak_rss_mb())  # pylint: disable=protected-access
  if steady:
    # pylint: disable-next=protected-access
    result['step_peak_rss_mb'] = bench_model._steady_peak_rss_mb()
  return result


def _interleaved(image, repeats: int, backend: str, directory: str) -> dict:
  import bench_model  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import predictor  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax import serving  # pylint: disable=g-import-not-at-top
  config, variables, source = bench_model._jax_setup(backend)  # pylint: disable=protected-access
  calls = {'predictor': predictor.Predictor(config, variables), 'exported': serving.load(directory)}
  del variables
  times = {name: [] for name in calls}
  for call in calls.values():
    call(image)  # compile
  for _ in range(repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      call(image)
      times[name].append(time.perf_counter() - t0)
  out = {'case': 'interleaved', 'weights': source}
  for name, ts in times.items():
    out[f'{name}_median_s'], out[f'{name}_min_s'] = statistics.median(ts), min(ts)
  return out


def run_case(case: str, repeats: int, backend: str, directory: str) -> dict:
  import bench_model  # pylint: disable=g-import-not-at-top
  image = bench_model._image()  # pylint: disable=protected-access
  if case == 'interleaved':
    return _interleaved(image, repeats, backend, directory)
  if case == 'predictor':
    from maskrcnn_jax import predictor  # pylint: disable=g-import-not-at-top
    config, variables, source = bench_model._jax_setup(backend)  # pylint: disable=protected-access
    pred = predictor.Predictor(config, variables)
    del variables
    return _time(pred, image, repeats, {'case': case, 'weights': source, 'backend': backend})
  if case == 'exported':
    _block_imports()
    from maskrcnn_jax import serving  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    runtime = serving.load(directory)
    result = {'case': case, 'load_s': time.perf_counter() - t0,
              'backend': runtime.manifest['artifacts'][0]['backend']}
    result = _time(runtime, image, repeats, result)
    result['modules'] = sorted(m for m in sys.modules if m.startswith('maskrcnn_jax'))
    assert not any(m.split('.')[0] in ('flax', 'configs') for m in sys.modules)
    return result
  raise ValueError(case)


def main() -> None:
  for path in (REPO, HERE):
    if path not in sys.path:
      sys.path.insert(0, path)
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--backend', default='auto', choices=('auto', 'xla', 'cpu'))
  parser.add_argument('--only', choices=('export', 'interleaved', 'predictor', 'exported'),
                      help=argparse.SUPPRESS)
  parser.add_argument('--dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.only:
    # As the CLI and bench_model.py; the children inherit it (and the serving child imports
    # nothing of maskrcnn_jax but serving).
    from maskrcnn_jax.backends import host  # pylint: disable=g-import-not-at-top
    host.reexec_with_huge_page_malloc()
  if args.only == 'export':
    print(json.dumps(_export(args.dir, args.backend)))
    return
  if args.only:
    print(json.dumps(run_case(args.only, args.repeats, args.backend, args.dir)))
    return
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get('PYTHONPATH',
                                                                               '')]))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, 'export')
    for case in ('export', 'interleaved', 'predictor', 'exported'):
      proc = subprocess.run([sys.executable, __file__, '--only', case, '--repeats',
                             str(args.repeats), '--backend', args.backend, '--dir', directory],
                            capture_output=True, text=True, env=env, check=False)
      lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
      if proc.returncode or not lines:
        print(f'{case}: failed\n{proc.stderr[-3000:]}', file=sys.stderr)
        return
      results[case] = json.loads(lines[-1])
      print(json.dumps(results[case]), flush=True)
  e, i, p, x = (results[k] for k in ('export', 'interleaved', 'predictor', 'exported'))
  print('\n| case | median, in turns (s) | min, in turns (s) | median alone (s) | first call '
        '(s) | peak RSS during the steps / of the process, alone (MB) |\n|---|---|---|---|---|---|')
  for name, key, r in (
      (f'Predictor (execution.backend={p["backend"]})', 'predictor', p),
      (f'exported program via serving.load (traced with {x["backend"]}; export '
       f'{e["export_s"]:.0f} s, load {x["load_s"]:.1f} s)', 'exported', x)):
    print(f'| {name} | {i[key + "_median_s"]:.3f} | {i[key + "_min_s"]:.3f} | '
          f'{r["median_s"]:.3f} | {r["first_call_s"]:.1f} | '
          f'{r.get("step_peak_rss_mb", float("nan")):.0f} / {r["peak_rss_mb"]:.0f} |')
  print(f'\nratio exported / Predictor, median in turns: '
        f'{i["exported_median_s"] / i["predictor_median_s"]:.3f}; detections '
        f'{x["detections"]} / {p["detections"]}; weights: {e["weights"]}')


if __name__ == '__main__':
  main()
