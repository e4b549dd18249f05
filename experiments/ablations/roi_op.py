"""The RoI-operator ablation (Mask R-CNN paper Table 2c-d, issue #16) as one resumable command.

    python experiments/ablations/roi_op.py --config=configs/ablation_roi_op.py \
        --workdir=runs/ablation_roi_op [--ops=pool,warp,align,align_v2] [--levels=fpn,p5] \
        [--seeds=0,1,2] [--reference=align_v2] [--shard=i/n] [--tiny] [--config.a.b=v ...]

A cell is (operator, pooled levels, seed): a `train.train_and_evaluate` run of the config with
`model.roi_op`, `model.roi.aligned`, `model.roi.pool_level` and `seed` set, in its own
`<workdir>/<op>-<levels>-s<seed>`. Operators: pool (RoIPool: quantised bins, max), warp (RoIWarp:
quantised bins, bilinear samples, `model.roi.warp_reduce`), align (RoIAlign, aligned=False, the
paper's and torchvision v1's), align_v2 (aligned=True, detectron2's ROIAlignV2). Levels: fpn
(each RoI from its FPN level, P2-P5) or pK (every RoI from P_K alone: p4 stride 16, p5 stride
32, the paper's C4 / C5 rows).

A finished cell has `cell.json` (its metrics and wall time) and is skipped on a rerun; an
unfinished one resumes from its checkpoint; a failing one is recorded in `error.txt` and the
grid goes on (a rerun retries it). Each cell runs in a child process of this script (`--isolate`,
the default), so a crash or an out-of-memory kill is one failed cell. `--shard=i/n` runs every
n-th cell, for several processes or machines sharing the workdir. After the cells, the script
aggregates every finished cell in the workdir into `summary.json`, `results.md` and `roi_op.png`
(mean and sample std over seeds; each operator's difference from `--reference` at the same
levels, paired by seed, with a Student-t 95% interval); `--aggregate_only` does only that.

Any dataset: the config's data flags (`--config.data.source=coco --config.data.train_json=...`)
and model flags pass through, so the same grid runs on COCO on a GPU or a pod; with
`--config=configs/shapes_keypoints.py` style configs (`model.keypoint_on`) the table gains the
keypoint AP. `--tiny`: the config's tiny mode, 2 cells of a few steps, for CI.
"""

import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs (the tests import its functions)."""
  config_flags.DEFINE_config_file('config', None, 'the base config, e.g. '
                                  'configs/ablation_roi_op.py', lock_config=False)
  flags.DEFINE_string('workdir', 'runs/ablation_roi_op', 'the grid: one folder per cell, results')
  flags.DEFINE_list('ops', None, 'operators (default pool,warp,align,align_v2; --tiny: '
                    'pool,align_v2)')
  flags.DEFINE_list('levels', None, 'fpn and/or pK (default fpn,p5; --tiny: p5)')
  flags.DEFINE_list('seeds', None, 'seeds (default 0,1,2; --tiny: 0)')
  flags.DEFINE_string('reference', 'align_v2', 'the operator the differences are taken from')
  flags.DEFINE_string('shard', '0/1', 'i/n: run cells i, i + n, ... of the grid')
  flags.DEFINE_bool('tiny', False, "the config's tiny mode with evaluation, 2 cells (CI)")
  flags.DEFINE_integer('tiny_steps', 2, 'training steps of a --tiny cell')
  flags.DEFINE_bool('isolate', True, 'run each cell in a child process')
  flags.DEFINE_bool('aggregate_only', False, 'only aggregate the finished cells of the workdir')
  flags.DEFINE_string('run_cell', '', 'internal: run this one cell in this process')


# op -> (model.roi_op, model.roi.aligned).
OPS = {'pool': ('pool', False), 'warp': ('warp', False), 'align': ('align', False),
       'align_v2': ('align', True)}
OP_LABELS = {'pool': 'RoIPool', 'warp': 'RoIWarp', 'align': 'RoIAlign', 'align_v2': 'RoIAlignV2'}
DEFAULT_OPS, DEFAULT_LEVELS, DEFAULT_SEEDS = tuple(OPS), ('fpn', 'p5'), (0, 1, 2)
TINY_OPS, TINY_LEVELS, TINY_SEEDS = ('pool', 'align_v2'), ('p5',), (0,)
# (column, metrics.json key); AP values are reported in points (x 100).
BOX_MASK_METRICS = (('box AP', 'bbox/AP'), ('box AP50', 'bbox/AP50'), ('box AP75', 'bbox/AP75'),
                    ('mask AP', 'segm/AP'), ('mask AP50', 'segm/AP50'),
                    ('mask AP75', 'segm/AP75'))
KEYPOINT_METRICS = (('kp AP', 'keypoints/AP'), ('kp AP75', 'keypoints/AP75'))
DIFF_METRICS = ('box AP', 'box AP75', 'mask AP', 'mask AP75', 'kp AP')
CELL_FILE, ERROR_FILE, ATTEMPTS_FILE = 'cell.json', 'error.txt', 'attempts.json'
PREEMPTED_EXIT = 143  # 128 + SIGTERM, as `maskrcnn-jax train` exits when preempted
SUMMARY_FILE, TABLE_FILE, PLOT_FILE = 'summary.json', 'results.md', 'roi_op.png'


@dataclasses.dataclass(frozen=True)
class Cell:
  op: str
  level: str
  seed: int

  @property
  def name(self) -> str:
    return f'{self.op}-{self.level}-s{self.seed}'


def pool_level(level: str) -> int:
  """'fpn' -> 0 (FPN assignment), 'pK' -> K."""
  if level == 'fpn':
    return 0
  if len(level) == 2 and level[0] == 'p' and level[1].isdigit():
    return int(level[1])
  raise ValueError(f"level {level!r}: expected 'fpn' or 'pK' (e.g. p4, p5)")


def level_label(level: str) -> str:
  return 'FPN P2-P5' if level == 'fpn' else f'P{level[1]} only (stride {2 ** pool_level(level)})'


def grid(ops, levels, seeds) -> list[Cell]:
  """Seed-major order: a grid cut short holds whole seeds of every (op, levels) pair."""
  for op in ops:
    if op not in OPS:
      raise ValueError(f'--ops: unknown operator {op!r}; expected some of {tuple(OPS)}')
  for level in levels:
    pool_level(level)
  return [Cell(op, level, int(seed)) for seed in seeds for level in levels for op in ops]


def shard_cells(cells: list[Cell], shard: str) -> list[Cell]:
  try:
    i, n = (int(v) for v in shard.split('/'))
  except ValueError:
    raise ValueError(f'--shard={shard!r}: expected i/n, e.g. 0/2') from None
  if not 0 <= i < n:
    raise ValueError(f'--shard={shard!r}: needs 0 <= i < n')
  return cells[i::n]


def cell_config(base, cell: Cell):
  config = base.copy_and_resolve_references()
  roi_op, aligned = OPS[cell.op]
  config.model.roi_op = roi_op
  config.model.roi.aligned = aligned
  config.model.roi.pool_level = pool_level(cell.level)
  config.seed = cell.seed
  return config


# ============================================================================ running cells


def _read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return default


def _write_json(path, value) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # a reader never sees half a file


def is_done(workdir: str, cell: Cell) -> bool:
  return os.path.exists(os.path.join(workdir, cell.name, CELL_FILE))


def run_cell(base, cell: Cell, workdir: str) -> dict:
  """Trains and evaluates one cell in this process (resuming its checkpoint) and writes
  `cell.json`; the wall time of every attempt is kept in `attempts.json`."""
  from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top
  cell_dir = os.path.join(workdir, cell.name)
  os.makedirs(cell_dir, exist_ok=True)
  attempts_path = os.path.join(cell_dir, ATTEMPTS_FILE)
  attempts = _read_json(attempts_path, [])
  config = cell_config(base, cell)
  start = time.time()
  outcome = 'failed'
  try:
    metrics = train.train_and_evaluate(config, cell_dir)
    outcome = 'done'
  finally:
    attempts.append({'started': datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
                     .isoformat(timespec='seconds'), 'wall_s': round(time.time() - start, 1),
                     'outcome': outcome})
    _write_json(attempts_path, attempts)
  result = {'op': cell.op, 'level': cell.level, 'seed': cell.seed,
            'roi_op': config.model.roi_op, 'aligned': bool(config.model.roi.aligned),
            'pool_level': int(config.model.roi.pool_level), 'step': int(metrics.get('step', 0)),
            'wall_s': round(sum(a['wall_s'] for a in attempts), 1),
            'metrics': {k: v for k, v in metrics.items() if '/' in k}}
  _write_json(os.path.join(cell_dir, CELL_FILE), result)
  error = os.path.join(cell_dir, ERROR_FILE)
  if os.path.exists(error):
    os.remove(error)
  return result


def _child_argv(cell: Cell) -> list[str]:
  """This script's command line for one cell: every flag but the grid's own."""
  own = ('--shard', '--run_cell', '--aggregate_only', '--isolate', '--noisolate')
  keep = [a for a in sys.argv[1:] if not a.split('=', 1)[0] in own]
  return [sys.executable, os.path.abspath(__file__)] + keep + [f'--run_cell={cell.name}']


def run_grid(base, cells: list[Cell], workdir: str, isolate: bool) -> list[tuple[Cell, str]]:
  """Runs the unfinished cells; returns the (cell, error) of those that failed."""
  failures = []
  todo = [c for c in cells if not is_done(workdir, c)]
  print(f'{len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run', flush=True)
  for k, cell in enumerate(todo):
    cell_dir = os.path.join(workdir, cell.name)
    os.makedirs(cell_dir, exist_ok=True)
    print(f'[{k + 1}/{len(todo)}] {cell.name}', flush=True)
    error = ''
    if isolate:
      with open(os.path.join(cell_dir, 'log.txt'), 'a') as log:
        code = subprocess.call(_child_argv(cell), stdout=log, stderr=subprocess.STDOUT)
      if code == PREEMPTED_EXIT:  # the child was preempted, its checkpoint saved: stop the grid
        raise SystemExit(f'{cell.name} preempted; rerun the same command to resume')
      if code != 0:
        error = f'exit code {code}; the last lines of {cell_dir}/log.txt:\n' + _tail(
            os.path.join(cell_dir, 'log.txt'))
    else:
      try:
        run_cell(base, cell, workdir)
      except Exception:  # pylint: disable=broad-except  (one failed cell; the grid goes on)
        error = traceback.format_exc()
    if error or not is_done(workdir, cell):
      error = error or 'finished without writing cell.json'
      with open(os.path.join(cell_dir, ERROR_FILE), 'w') as f:
        f.write(error)
      failures.append((cell, error))
      print(f'  FAILED: {error.strip().splitlines()[-1] if error.strip() else error}', flush=True)
    else:
      r = _read_json(os.path.join(workdir, cell.name, CELL_FILE))
      m = r['metrics']
      print(f"  box AP {100 * m.get('bbox/AP', math.nan):.1f}, mask AP "
            f"{100 * m.get('segm/AP', math.nan):.1f}, {r['wall_s'] / 60:.1f} min", flush=True)
  return failures


def _tail(path: str, lines: int = 15) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-lines:])
  except OSError:
    return ''


# ============================================================================ aggregation


def _t_quantile(df: int) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a dependency of jax)
  return float(stats.t.ppf(0.975, df))


def mean_std(values) -> dict:
  n = len(values)
  mean = sum(values) / n if n else math.nan
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
  return {'mean': mean, 'std': std, 'n': n, 'values': list(values)}


def paired_difference(a: dict, b: dict) -> dict:
  """Mean of a[s] - b[s] over the seeds s in both, with a Student-t 95% interval (n - 1
  degrees of freedom; none below two pairs)."""
  seeds = sorted(set(a) & set(b))
  d = [a[s] - b[s] for s in seeds]
  out = mean_std(d)
  out['seeds'] = seeds
  if len(d) > 1:
    half = _t_quantile(len(d) - 1) * out['std'] / math.sqrt(len(d))
    out['ci95'] = [out['mean'] - half, out['mean'] + half]
  else:
    out['ci95'] = None
  return out


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def aggregate(workdir: str, cells: list[Cell], reference: str) -> dict:
  """Reads the finished cells of `cells` and writes summary.json, results.md and roi_op.png."""
  results, missing, failed = {}, [], {}
  for cell in cells:
    r = _read_json(os.path.join(workdir, cell.name, CELL_FILE))
    if r is not None:
      results[cell] = r
    elif os.path.exists(os.path.join(workdir, cell.name, ERROR_FILE)):
      with open(os.path.join(workdir, cell.name, ERROR_FILE)) as f:
        failed[cell.name] = f.read().strip().splitlines()[-1:] or ['']
    else:
      missing.append(cell.name)
  keypoints = any('keypoints/AP' in r['metrics'] for r in results.values())
  metrics = BOX_MASK_METRICS + (KEYPOINT_METRICS if keypoints else ())
  ops = list(dict.fromkeys(c.op for c in cells))
  levels = list(dict.fromkeys(c.level for c in cells))
  rows = []
  for level in levels:
    for op in ops:
      mine = {c.seed: r for c, r in results.items() if c.op == op and c.level == level}
      if not mine:
        continue
      row = {'op': op, 'level': level, 'seeds': sorted(mine),
             'wall_s': mean_std([r['wall_s'] for r in mine.values()]),
             'step': sorted({r['step'] for r in mine.values()})}
      for column, key in metrics:
        values = {s: 100 * r['metrics'][key] for s, r in mine.items()
                  if _finite(r['metrics'].get(key))}
        row[column] = mean_std([values[s] for s in sorted(values)])
        row[column]['by_seed'] = values
      rows.append(row)
  by_key = {(row['op'], row['level']): row for row in rows}
  for row in rows:
    ref = by_key.get((reference, row['level']))
    row['diff_vs_reference'] = {}
    if ref is None or row['op'] == reference:
      continue
    for column in DIFF_METRICS:
      if column in row and column in ref:
        row['diff_vs_reference'][column] = paired_difference(row[column]['by_seed'],
                                                             ref[column]['by_seed'])
  summary = {'reference': reference, 'cells_total': len(cells), 'cells_done': len(results),
             'cells_failed': failed, 'cells_missing': missing, 'rows': rows,
             'metrics': [c for c, _ in metrics], 'units': 'AP points (x 100); wall_s seconds',
             'interval': 'paired over seeds, Student-t 95% (n - 1 degrees of freedom)',
             'machine': machine(), 'command': command_line(), 'written': datetime.datetime.now(
                 datetime.timezone.utc).isoformat(timespec='seconds')}
  _write_json(os.path.join(workdir, SUMMARY_FILE), _json_safe(summary))
  with open(os.path.join(workdir, TABLE_FILE), 'w') as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(workdir, PLOT_FILE))
  return summary


def _json_safe(x):
  """NaN -> None (strict JSON)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _pm(stat) -> str:
  if not stat or not stat['n']:
    return '-'
  if stat['n'] < 2:
    return f"{stat['mean']:.1f}"
  return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _diff(d) -> str:
  if not d:
    return ''
  if d['ci95'] is None:
    return f"{d['mean']:+.1f}"
  lo, hi = d['ci95']
  return f"{d['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def markdown(summary: dict) -> str:
  columns = summary['metrics']
  diffs = [c for c in DIFF_METRICS if c in columns]
  ref = OP_LABELS.get(summary['reference'], summary['reference'])
  lines = [f"Mean ± std over seeds (AP points). Δ: minus {ref} at the same levels, paired by "
           'seed, [Student-t 95% interval].', '',
           '| levels | operator | seeds | ' + ' | '.join(columns) + ' | ' +
           ' | '.join(f'Δ {c}' for c in diffs) + ' | min/cell |',
           '|' + '---|' * (4 + len(columns) + len(diffs))]
  for row in summary['rows']:
    cells = [level_label(row['level']), OP_LABELS[row['op']], str(len(row['seeds']))]
    cells += [_pm(row.get(c)) for c in columns]
    cells += [_diff(row['diff_vs_reference'].get(c)) for c in diffs]
    cells.append(f"{row['wall_s']['mean'] / 60:.1f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines.append('')
  lines.append(f"{summary['cells_done']} of {summary['cells_total']} cells finished"
               + (f"; failed: {', '.join(summary['cells_failed'])}" if summary['cells_failed']
                  else '')
               + (f"; not run: {', '.join(summary['cells_missing'])}" if summary['cells_missing']
                  else '') + '.')
  m = summary['machine']
  lines.append(f"Machine: {m['cpu']} ({m['cpu_count']} cores), JAX {m['jax']} on "
               f"{m['jax_backend']}. Command: `{summary['command']}`")
  return '\n'.join(lines) + '\n'


def plot(summary: dict, path: str) -> bool:
  """AP and AP75 (box and mask) by operator, one line per pooled level; skipped (False)
  without matplotlib (the `ablation` extra)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('matplotlib is not installed (pip install -e .[ablation]): no %s', path)
    return False
  rows = summary['rows']
  ops = list(dict.fromkeys(r['op'] for r in rows))
  levels = list(dict.fromkeys(r['level'] for r in rows))
  panels = [c for c in ('box AP', 'box AP75', 'mask AP', 'mask AP75', 'kp AP', 'kp AP75')
            if c in summary['metrics']]
  cols = 2
  fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(9, 3.2 * -(-len(panels) // 2)),
                           squeeze=False)
  for ax, column in zip(axes.flat, panels):
    for j, level in enumerate(levels):
      xs, ys, es = [], [], []
      for i, op in enumerate(ops):
        row = next((r for r in rows if r['op'] == op and r['level'] == level), None)
        if row is None or not row[column]['n']:
          continue
        xs.append(i + 0.06 * (j - (len(levels) - 1) / 2))
        ys.append(row[column]['mean'])
        es.append(row[column]['std'] if _finite(row[column]['std']) else 0.0)
      ax.errorbar(xs, ys, yerr=es, marker='o', capsize=3, label=level_label(level))
    ax.set_xticks(range(len(ops)), [OP_LABELS[o] for o in ops])
    ax.set_title(column)
    ax.set_ylabel('AP (points)')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  axes.flat[0].legend(fontsize=8)
  fig.suptitle('RoI operator ablation: mean ± std over seeds', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  devices = jax.devices()
  return {'cpu': cpu, 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'jax_backend': f'{len(devices)} x {devices[0].device_kind}', 'python':
          platform.python_version()}


def command_line() -> str:
  args = [a for a in sys.argv[1:] if not a.startswith(('--run_cell', '--aggregate_only'))]
  return ' '.join(['python', 'experiments/ablations/roi_op.py'] + args)


# ============================================================================ main


def load_config():
  """The --config file's config; with --tiny its tiny mode, set to evaluate after
  `--tiny_steps` steps (the --config.* overrides applied on top)."""
  if not FLAGS.tiny:
    return FLAGS.config
  path = config_flags.get_config_filename(FLAGS['config']).split(':', 1)[0]
  spec = importlib.util.spec_from_file_location('_ablation_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tiny')
  config.optim.num_steps = FLAGS.tiny_steps
  config.optim.warmup_steps = 1
  config.optim.decay_steps = (max(1, FLAGS.tiny_steps - 1),)
  config.run.eval_at_end = True
  config.run.checkpoint_every = FLAGS.tiny_steps
  config.run.num_eval_pictures = 0
  overrides = config_flags.get_override_values(FLAGS['config'])
  if config.data.source != 'coco' and 'data.root' not in overrides:
    # The tiny synthetic set is generated inside the grid, never over the real one in data/.
    config.data.root = os.path.join(FLAGS.workdir, 'data', f'{config.data.source}_tiny')
  for field, value in overrides.items():
    node = config
    *parents, leaf = field.split('.')
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if FLAGS.config is None:
    raise app.UsageError('needs --config=FILE, e.g. --config=configs/ablation_roi_op.py')
  logging.set_verbosity(logging.INFO if FLAGS.run_cell else logging.WARNING)
  ops = FLAGS.ops or (TINY_OPS if FLAGS.tiny else DEFAULT_OPS)
  levels = FLAGS.levels or (TINY_LEVELS if FLAGS.tiny else DEFAULT_LEVELS)
  seeds = FLAGS.seeds or (TINY_SEEDS if FLAGS.tiny else DEFAULT_SEEDS)
  try:
    if FLAGS.reference not in OPS:
      raise ValueError(f'--reference={FLAGS.reference!r}: expected one of {tuple(OPS)}')
    cells = grid(ops, levels, [int(s) for s in seeds])
    mine = shard_cells(cells, FLAGS.shard)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  config = load_config()
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  if FLAGS.run_cell:
    cell = next((c for c in cells if c.name == FLAGS.run_cell), None)
    if cell is None:
      raise app.UsageError(f'--run_cell={FLAGS.run_cell}: not a cell of this grid')
    import jax  # pylint: disable=g-import-not-at-top
    # Seeds of one (op, levels) compile the same programs: the cache makes the later ones cheap.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
    from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top
    try:
      run_cell(config, cell, workdir)
    except train.Preempted as e:  # checkpoint saved: the driver stops the grid, a rerun resumes
      print(e, flush=True)
      sys.exit(PREEMPTED_EXIT)
    return
  failures = [] if FLAGS.aggregate_only else run_grid(config, mine, workdir, FLAGS.isolate)
  summary = aggregate(workdir, cells, FLAGS.reference)
  print(markdown(summary))
  print(f'wrote {os.path.join(workdir, TABLE_FILE)}, {SUMMARY_FILE} and {PLOT_FILE}')
  if failures:
    print(f'{len(failures)} cells failed: {", ".join(c.name for c, _ in failures)} (their '
          'error.txt says why; rerun the command to retry them)', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  from maskrcnn_jax.backends import host  # pylint: disable=g-import-not-at-top
  host.reexec_with_huge_page_malloc()
  app.run(main)
