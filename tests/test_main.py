"""End to end through the CLI: shapes -> train (tiny) -> evaluate -> predict, in subprocesses."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from synthetic import REPO


def _cli(*args, timeout=900):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user has
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(),
                                                  'maskrcnn_jax_test_jit_cache')
  proc = subprocess.run([sys.executable, '-m', 'maskrcnn_jax', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout + proc.stderr


@pytest.mark.slow
def test_shapes_train_evaluate_predict(tmp_path):
  data, run = tmp_path / 'shapes', tmp_path / 'run'
  _cli('shapes', f'--out={data}', '--num_train=8', '--num_val=3', '--size=64')
  train_json = json.loads((data / 'instances_train.json').read_text())
  assert len(train_json['images']) == 8 and len(train_json['categories']) == 4

  config = 'configs/shapes.py:tiny'
  out = _cli('train', f'--config={config}', f'--workdir={run}', f'--config.data.root={data}',
             '--config.optim.num_steps=4', '--config.run.checkpoint_every=2',
             '--config.run.eval_at_end=True')
  assert 'summary:' in out and 'segm/AP' in out
  metrics = json.loads((run / 'eval' / 'metrics.json').read_text())
  assert metrics['step'] == 4 and metrics['num_images'] == 3
  assert set(metrics['metrics']) >= {'bbox/AP', 'segm/AP', 'bbox/ARl', 'segm/AP75'}
  assert len(os.listdir(run / 'eval' / 'pictures')) == 3
  assert (run / 'tensorboard').is_dir()

  # A second `train` on the same workdir resumes at step 4 and has nothing left to do.
  out = _cli('train', f'--config={config}', f'--workdir={run}', f'--config.data.root={data}',
             '--config.optim.num_steps=4', '--config.run.eval_at_end=False')
  assert 'resumed from' in out and 'step=4' in out

  out = _cli('evaluate', f'--config={config}', f'--workdir={run}',
             f'--config.data.root={data}')
  assert 'segm/AP' in out

  image = data / json.loads((data / 'instances_val.json').read_text())['images'][0]['file_name']
  vis = tmp_path / 'vis.png'
  _cli('predict', f'--config={config}', f'--image={image}', f'--out={vis}',
       f'--checkpoint={run}', '--score_thresh=0.0')
  assert np.asarray(Image.open(vis)).shape == np.asarray(Image.open(image)).shape

  out = _cli('predict', f'--config={config}', f'--image={image}', f'--out={vis}')
  assert 'random' in out.lower()


def test_unknown_subcommand_is_a_usage_error():
  proc = subprocess.run([sys.executable, '-m', 'maskrcnn_jax', 'fly'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode != 0 and 'usage: maskrcnn-jax' in proc.stderr
