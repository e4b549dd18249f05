"""The RoI-operator ablation's tiny mode, run as CI runs it (experiments/ablations/roi_op.py):
two cells of a few steps, the table, the JSON and the plot, then a rerun that skips them; and
the statistics and grid bookkeeping on synthetic cell results."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest



REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'experiments' / 'ablations' / 'roi_op.py'


def _run(workdir, *extra):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as the command runs outside the tests
  env['JAX_PLATFORMS'] = 'cpu'
  # The tests' compilation cache: a rerun of the suite does not compile the tiny cells again.
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(),
                                                  'maskrcnn_jax_test_jit_cache')
  env['MASKRCNN_JAX_MALLOC'] = 'default'  # no re-exec: one process is enough here
  cmd = [sys.executable, str(SCRIPT), '--config=configs/ablation_roi_op.py', '--tiny',
         '--noisolate', f'--workdir={workdir}', *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _module():
  """The script's pure functions (importing it defines its absl flags in this process only
  once; the tests below do not parse them)."""
  spec = importlib.util.spec_from_file_location('ablation_roi_op_script', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_tiny_grid_writes_table_json_plot_and_a_rerun_skips_finished_cells(tmp_path):
  proc = _run(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '2 cells, 0 finished, 2 to run' in proc.stdout
  summary = json.loads((tmp_path / 'summary.json').read_text())  # strict JSON (no NaN)
  assert summary['cells_done'] == 2 and summary['cells_total'] == 2
  assert summary['cells_failed'] == {} and summary['cells_missing'] == []
  rows = {(r['op'], r['level']): r for r in summary['rows']}
  assert set(rows) == {('pool', 'p5'), ('align_v2', 'p5')}
  for row in rows.values():
    for column in ('box AP', 'mask AP', 'mask AP50', 'mask AP75'):
      stat = row[column]
      assert stat['n'] == 1 and 0.0 <= stat['mean'] <= 100.0
    assert row['wall_s']['mean'] > 0 and row['step'] == [2]
  pool = rows[('pool', 'p5')]
  diff = pool['diff_vs_reference']['mask AP']
  assert diff['seeds'] == [0] and diff['ci95'] is None  # one seed: no interval
  assert math.isclose(diff['mean'], pool['mask AP']['mean'] - rows[('align_v2', 'p5')]
                      ['mask AP']['mean'], abs_tol=1e-9)
  cell = json.loads((tmp_path / 'pool-p5-s0' / 'cell.json').read_text())
  assert (cell['roi_op'], cell['aligned'], cell['pool_level'], cell['seed']) == ('pool', False,
                                                                                5, 0)
  assert 'segm/AP' in cell['metrics']
  table = (tmp_path / 'results.md').read_text().splitlines()
  header = next(line for line in table if line.startswith('| levels'))
  body = [line for line in table if line.startswith('| P5 only')]
  assert len(body) == 2 and all(line.count('|') == header.count('|') for line in body)
  assert '2 of 2 cells finished' in '\n'.join(table)
  if importlib.util.find_spec('matplotlib') is not None:
    assert (tmp_path / 'roi_op.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  attempts = (tmp_path / 'pool-p5-s0' / 'attempts.json').read_text()

  again = _run(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '2 cells, 2 finished, 0 to run' in again.stdout
  assert (tmp_path / 'pool-p5-s0' / 'attempts.json').read_text() == attempts  # not rerun


def test_statistics_and_table_from_synthetic_cells(tmp_path):
  roi_op = _module()
  cells = roi_op.grid(['pool', 'align_v2'], ['fpn', 'p5'], [0, 1, 2])
  assert [c.name for c in cells[:4]] == ['pool-fpn-s0', 'align_v2-fpn-s0', 'pool-p5-s0',
                                         'align_v2-p5-s0']  # seed-major
  # mask AP: align_v2 = 50 + seed; pool = align_v2 - (2 at FPN, 10 at P5) + small noise.
  noise = {0: 0.5, 1: -0.5, 2: 0.0}
  for c in cells[:-1]:  # the last cell (align_v2-p5-s2) is missing
    gap = 0.0 if c.op == 'align_v2' else (2.0 if c.level == 'fpn' else 10.0)
    mask = (50.0 + c.seed - gap + (noise[c.seed] if c.op == 'pool' else 0.0)) / 100
    os.makedirs(tmp_path / c.name)
    with open(tmp_path / c.name / 'cell.json', 'w') as f:
      json.dump({'op': c.op, 'level': c.level, 'seed': c.seed, 'step': 10, 'wall_s': 60.0,
                 'metrics': {'bbox/AP': 0.6, 'bbox/AP50': 0.9, 'bbox/AP75': 0.7,
                             'segm/AP': mask, 'segm/AP50': 0.8, 'segm/AP75': float('nan')}}, f)
  (tmp_path / cells[-1].name).mkdir()
  (tmp_path / cells[-1].name / 'error.txt').write_text('Traceback\nValueError: boom\n')
  summary = roi_op.aggregate(str(tmp_path), cells, 'align_v2')
  assert summary['cells_done'] == 11 and list(summary['cells_failed']) == ['align_v2-p5-s2']
  rows = {(r['op'], r['level']): r for r in summary['rows']}
  fpn = rows[('pool', 'fpn')]['diff_vs_reference']['mask AP']
  # Differences -1.5, -2.5, -2.0: mean -2, std 0.5, t(0.975, 2) = 4.303.
  assert math.isclose(fpn['mean'], -2.0) and math.isclose(fpn['std'], 0.5)
  half = 4.302652729911275 * 0.5 / math.sqrt(3)
  assert fpn['ci95'] == pytest.approx([-2.0 - half, -2.0 + half])
  p5 = rows[('pool', 'p5')]['diff_vs_reference']['mask AP']
  assert p5['seeds'] == [0, 1] and math.isclose(p5['mean'], -10.0)  # paired on common seeds
  assert rows[('align_v2', 'fpn')]['mask AP']['std'] == pytest.approx(1.0)
  assert rows[('pool', 'fpn')]['mask AP75']['n'] == 0  # NaN metrics are left out
  text = (tmp_path / 'results.md').read_text()
  assert '-2.0 [-3.2, -0.8]' in text and 'failed: align_v2-p5-s2' in text
  json.loads((tmp_path / 'summary.json').read_text())
  assert roi_op.shard_cells(cells, '1/4') == cells[1::4]
  with pytest.raises(ValueError, match='--shard'):
    roi_op.shard_cells(cells, '4/4')
  with pytest.raises(ValueError, match='unknown operator'):
    roi_op.grid(['roipool'], ['fpn'], [0])
  with pytest.raises(ValueError, match="'fpn' or 'pK'"):
    roi_op.grid(['pool'], ['c5'], [0])
