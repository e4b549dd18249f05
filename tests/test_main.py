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


# ---------------------------------------------------------------------------- one-line errors


def _cli_fails(*args, timeout=300):
  """Runs the CLI expecting failure: (returncode, stdout + stderr)."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(),
                                                  'maskrcnn_jax_test_jit_cache')
  proc = subprocess.run([sys.executable, '-m', 'maskrcnn_jax', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.returncode, proc.stdout + proc.stderr


def _error_lines(out):
  assert 'Traceback' not in out, out[-5000:]
  return [line for line in out.splitlines() if line.startswith('error: ')]


@pytest.mark.parametrize('override,message', [
    ('--config.model.not_a_field=1',
     'error: config field model.not_a_field does not exist (config.model has: anchors, '
     'backbone, box_head, '),
    ('--config.train.num_steps=3',
     'error: config field train.num_steps does not exist (the config has: data, dtype, '
     'execution, input, model, optim, run, seed)'),
    ('--config.optim.num_step=3',
     'error: config field optim.num_step does not exist (config.optim has: '),
    ('--config.model.backbone.width.x=3',
     'error: config field model.backbone.width.x does not exist: config.model.backbone.width '
     'is a int, not a section'),
])
def test_unknown_config_field_is_one_line(override, message):
  code, out = _cli_fails('train', '--config=configs/shapes.py:tiny', override)
  lines = _error_lines(out)
  assert code == 2 and len(lines) == 1 and lines[0].startswith(message), out[-3000:]
  if 'num_step=' in override:
    assert lines[0].endswith('did you mean optim.num_steps?')


def test_unloadable_config_file_is_one_line():
  code, out = _cli_fails('train', '--config=configs/no_such_config.py')
  lines = _error_lines(out)
  assert code == 2 and len(lines) == 1, out[-3000:]
  assert lines[0].startswith('error: cannot load --config=configs/no_such_config.py: ')
  assert 'No such file or directory' in lines[0]


def test_out_of_range_number_is_one_line_before_anything_runs(tmp_path):
  code, out = _cli_fails('train', '--config=configs/shapes.py:tiny', f'--workdir={tmp_path / "w"}',
                         '--config.run.log_every=0')
  assert code == 1
  assert _error_lines(out) == ['error: config.run.log_every = 0: must be an integer >= 1']
  assert not (tmp_path / 'w').exists()


def _image(tmp_path):
  path = tmp_path / 'image.png'
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
  return path


def test_predict_into_a_missing_directory_fails_before_loading(tmp_path):
  out_path = tmp_path / 'missing' / 'vis.png'
  code, out = _cli_fails('predict', '--config=configs/shapes.py:tiny',
                         f'--image={_image(tmp_path)}', f'--out={out_path}')
  assert code == 1 and 'RANDOM' not in out  # refused before the model is built
  assert _error_lines(out) == [f'error: --out {out_path}: the directory {out_path.parent} does '
                               'not exist; create it first']
  assert not out_path.parent.exists()  # not created
  code, out = _cli_fails('predict', '--config=configs/shapes.py:tiny',
                         f'--image={_image(tmp_path)}', f'--out={tmp_path / "vis.bmpx"}')
  assert code == 1 and _error_lines(out)[0].startswith(f'error: --out {tmp_path / "vis.bmpx"}: '
                                                       'cannot write pictures with extension')


def test_corrupt_checkpoint_is_one_line(tmp_path):
  import jax
  from maskrcnn_jax import checkpoint as ckpt
  from maskrcnn_jax.modeling import mask_rcnn
  from configs import shapes
  config = shapes.get_config('tiny')
  variables = jax.device_get(mask_rcnn.init_variables(config, jax.random.key(0)))
  ckpt.save_variables(str(tmp_path / 'ck'), variables, ckpt.structure_meta(config))
  arrays = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / 'ck' / '0')
            for name in names if os.path.basename(root) == 'd']
  path = max(arrays, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  for i in range(64):
    data[len(data) // 2 + 97 * i] ^= 0xFF
  open(path, 'wb').write(bytes(data))
  code, out = _cli_fails('predict', '--config=configs/shapes.py:tiny',
                         f'--image={_image(tmp_path)}', f'--out={tmp_path / "vis.png"}',
                         f'--checkpoint={tmp_path / "ck"}')
  lines = _error_lines(out)
  assert code == 1 and len(lines) == 1, out[-3000:]
  # The flip either breaks the compressed stream ('step 0: cannot read item ...') or decodes
  # to other values, which the checksum catches ('step 0 is corrupt: ...').
  assert lines[0].startswith(f'error: checkpoint {tmp_path / "ck"} step 0')
  assert 'is corrupt: item variables, leaf params/' in lines[0] or 'cannot read item' in lines[0]
  assert not (tmp_path / 'vis.png').exists()
