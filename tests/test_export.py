"""Export and the jax-only runtime: the manifest, every platform's program, results equal to the
Predictor's (in this process and in one where flax, modeling and configs cannot be imported),
serving's own preprocessing and paste against the originals, refused directories, the CLI."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import jax
import numpy as np
import pytest

from maskrcnn_jax import checkpoint as ckpt
from maskrcnn_jax import export
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import serving
from maskrcnn_jax import structures
from maskrcnn_jax.backends import hooks
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import box_head
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import masks as mask_ops
from synthetic import REPO

PLATFORMS = ('cpu', 'cuda', 'tpu')
BATCH = 2
CLASS_NAMES = ['circle', 'square', 'triangle', 'star']
# Sizes whose resize lands in each tiny bucket: 64x96 twice (one full batch of 2), 96x64 and
# 64x64 once (short batches padded with a blank image).
IMAGE_HW = ((48, 80), (100, 60), (64, 64), (30, 200))


def _images():
  rng = np.random.default_rng(0)
  out = []
  for h, w in IMAGE_HW:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = 128 + 60 * np.stack([np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
    out.append(np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8))
  return out


def _mask_iou(a, b):
  union = np.logical_or(a, b).sum()
  return np.logical_and(a, b).sum() / union if union else 1.0


def _assert_same_results(ours, reference):
  assert len(ours) == len(reference)
  for got, want in zip(ours, reference):
    assert sorted(got) == sorted(want)
    assert len(want['scores']) > 0  # random init detects: the comparison is not vacuous
    np.testing.assert_array_equal(got['labels'], want['labels'])
    assert got['labels'].dtype == np.int32
    np.testing.assert_allclose(got['boxes'], want['boxes'], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got['scores'], want['scores'], atol=1e-5, rtol=0)
    assert got['masks'].dtype == bool and got['masks'].shape == want['masks'].shape
    ious = [_mask_iou(a, b) for a, b in zip(got['masks'], want['masks'])]
    assert min(ious) >= 0.999, ious


@pytest.fixture(scope='module')
def exported(tmp_path_factory, tiny_config):
  """The tiny model, random init, saved as `convert` saves, exported for every platform.

  The config asks for the CPU backend, so the cuda and tpu programs show that `export` traces
  them with the plain forms whatever the config says."""
  config = tiny_config.copy_and_resolve_references()
  config.execution.backend = 'cpu'
  variables = mask_rcnn.init_variables(config, jax.random.key(0))
  root = tmp_path_factory.mktemp('export')
  checkpoint = str(root / 'checkpoint')
  meta = {'label_to_category_id': {i + 1: 10 + i for i in range(len(CLASS_NAMES))},
          'class_names': CLASS_NAMES, **ckpt.structure_meta(config),
          'source': 'random init (tests/test_export.py)'}
  ckpt.save_variables(checkpoint, variables, meta)
  out = str(root / 'export')
  manifest = export.export_checkpoint(config, checkpoint, out, batch_size=BATCH,
                                      platforms=PLATFORMS)
  images = _images()
  reference = predictor_lib.Predictor(config, variables, batch_size=BATCH)(images)
  return types.SimpleNamespace(config=config, variables=variables, checkpoint=checkpoint,
                               dir=out, manifest=manifest, images=images, reference=reference)


# ------------------------------------------------------------------------------ the export


def test_manifest_describes_the_export(exported):
  m, config = exported.manifest, exported.config
  assert json.load(open(os.path.join(exported.dir, serving.MANIFEST))) == ckpt.jsonable(m)
  assert (m['format'], m['format_version']) == (serving.FORMAT, serving.FORMAT_VERSION)
  assert m['jax_version'] == jax.__version__
  assert m['calling_convention_version'] == jax.export.maximum_supported_calling_convention_version
  assert m['platforms'] == list(PLATFORMS) and m['batch_size'] == BATCH
  assert m['buckets'] == [list(b) for b in config.input.buckets]
  i = config.input
  assert m['input']['pixel_mean'] == list(i.pixel_mean)
  assert m['input']['pixel_std'] == list(i.pixel_std)
  assert (m['input']['channel_order'], m['input']['min_size'], m['input']['max_size']) == (
      i.channel_order, i.min_size, i.max_size)
  assert m['labels']['class_names'] == ['background'] + CLASS_NAMES
  assert m['labels']['label_to_category_id'] == {'1': 10, '2': 11, '3': 12, '4': 13}
  assert m['mask_thresh'] == config.model.test.mask_thresh
  assert 'keypoints' in m and m['keypoints'] is None  # no keypoint head
  d = config.model.test.detections_per_img
  assert {k: (v['shape'], v['dtype'], v['postprocess']) for k, v in m['outputs'].items()} == {
      'boxes': ([BATCH, d, 4], 'float32', 'boxes_to_original'),
      'scores': ([BATCH, d], 'float32', 'valid_slots'),
      'labels': ([BATCH, d], 'int32', 'valid_slots'),
      'valid': ([BATCH, d], 'bool', 'selector'),
      'masks': ([BATCH, d, 28, 28], 'float32', 'paste_masks')}
  flat = export.flatten_variables(exported.variables)
  assert m['weights']['arrays'] == {n: {'shape': list(a.shape), 'dtype': str(a.dtype)}
                                    for n, a in flat.items()}
  with np.load(os.path.join(exported.dir, serving.WEIGHTS), allow_pickle=False) as f:
    assert sorted(f.files) == sorted(flat)
    for name in flat:
      np.testing.assert_array_equal(f[name], flat[name])
  # One program per (bucket, platform), the CPU one with the XLA:CPU forms.
  assert sorted((tuple(a['bucket']), a['platform'], a['backend']) for a in m['artifacts']) == \
      sorted((tuple(b), p, 'cpu' if p == 'cpu' else 'xla')
             for b in config.input.buckets for p in PLATFORMS)


def test_every_platform_program_deserializes_without_cpu_constructs(exported):
  weights = exported.manifest['weights']['arrays']
  for artifact in exported.manifest['artifacts']:
    with open(os.path.join(exported.dir, artifact['file']), 'rb') as f:
      program = jax.export.deserialize(bytearray(f.read()))
    assert program.platforms == (artifact['platform'],)
    (avals, images, sizes), _ = jax.tree_util.tree_unflatten(program.in_tree, program.in_avals)
    assert {n: {'shape': list(a.shape), 'dtype': str(a.dtype)} for n, a in avals.items()} == \
        weights  # the weights are inputs, all of them
    h, w = artifact['bucket']
    assert (images.shape, sizes.shape) == ((BATCH, h, w, 3), (BATCH, 2))
    locations = set(re.findall(r'loc\("([^"]*)"', program.mlir_module()))
    assert any('jit(fn)/MaskRCNN/' in loc for loc in locations)  # named scopes are recorded
    cpu = {loc for loc in locations if hooks.CPU_SCOPE in loc}
    if artifact['platform'] == 'cpu':
      assert cpu  # the check below can fail: the CPU program does hold the XLA:CPU forms
    else:
      assert not cpu, sorted(cpu)[:3]


def test_runtime_equals_the_predictor(exported):
  runtime = serving.load(exported.dir)
  assert runtime.platform == 'cpu' and sorted(runtime.exported) == sorted(
      tuple(b) for b in exported.config.input.buckets)
  _assert_same_results(runtime(exported.images), exported.reference)
  one = runtime(exported.images[1])  # one image in, one dict out
  _assert_same_results([one], exported.reference[1:2])
  assert runtime.class_names == ['background'] + CLASS_NAMES


def test_runtime_runs_with_flax_modeling_and_configs_blocked(exported, tmp_path):
  images = str(tmp_path / 'images.npz')
  np.savez(images, *exported.images)
  results = str(tmp_path / 'results.npz')
  script = f'''
import importlib.abc, sys
BLOCKED = ('flax', 'maskrcnn_jax.modeling', 'configs', 'ml_collections', 'orbax')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + '.') for b in BLOCKED):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from maskrcnn_jax import serving
try:
  import flax
  sys.exit('the blocker does not work')
except ImportError:
  pass
with np.load({images!r}) as f:
  images = [f['arr_%d' % i] for i in range(len(f.files))]
results = serving.load({exported.dir!r})(images)
loaded = sorted(m for m in sys.modules if m.startswith('maskrcnn_jax'))
assert loaded == ['maskrcnn_jax', 'maskrcnn_jax.serving'], loaded
flat = {{'%d/%s' % (i, k): v for i, r in enumerate(results) for k, v in r.items()}}
np.savez({results!r}, **flat)
'''
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
      tempfile.gettempdir(), 'maskrcnn_jax_test_jit_cache'))
  proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with np.load(results) as f:
    got = [{k: f[f'{i}/{k}'] for k in ('boxes', 'scores', 'labels', 'masks')}
           for i in range(len(exported.images))]
  _assert_same_results(got, exported.reference)


def test_keypoint_model_exports_and_serves_like_the_predictor(tmp_path):
  from configs import keypointrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  config = keypointrcnn_r50_fpn.get_config('tiny')
  config.input.buckets = ((64, 96),)
  config.model.keypoint_head.num_keypoints = (0, 3, 2, 3, 1)  # every class has a set
  variables = mask_rcnn.init_variables(config, jax.random.key(1))
  meta = {'class_names': CLASS_NAMES,
          'keypoint_names': [['c', 'l', 'r'], ['a', 'b'], ['l', 'top', 'r'], ['centre']],
          'keypoint_skeleton': [[[0, 1], [0, 2]], [[0, 1]], [[0, 1], [1, 2]], []],
          'keypoint_flip_map': [[0, 2, 1], [0, 1], [2, 1, 0], [0]]}
  manifest = export.export_model(config, variables, str(tmp_path / 'kp'), meta=meta)
  assert manifest['keypoints'] == {'num_keypoints': [0, 3, 2, 3, 1],
                                   'names': meta['keypoint_names'],
                                   'skeleton': meta['keypoint_skeleton'],
                                   'flip_map': meta['keypoint_flip_map']}
  assert 'masks' not in manifest['outputs']
  assert manifest['outputs']['keypoints']['postprocess'] == 'keypoints_to_original'
  images = [im for im in _images() if serving.choose_bucket(
      *serving.resize_shape(*im.shape[:2], 64, 96), ((64, 96), (96, 64), (64, 64))) == (64, 96)]
  got = serving.load(str(tmp_path / 'kp'))(images)
  want = predictor_lib.Predictor(config, variables)(images)
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w) and w['keypoint_valid'].sum(1).min() >= 1
    np.testing.assert_array_equal(g['labels'], w['labels'])
    np.testing.assert_array_equal(g['keypoint_valid'], w['keypoint_valid'])
    for key, atol in (('boxes', 1e-4), ('keypoints', 1e-4), ('scores', 1e-5),
                      ('keypoint_scores', 1e-5)):
      np.testing.assert_allclose(g[key], w[key], atol=atol, rtol=0)


# ------------------------------------------------------------------------------ serving's copies


@pytest.mark.parametrize('order,resize', [('RGB', 'torchvision'), ('BGR', 'torchvision'),
                                          ('BGR', 'detectron2')])
def test_preprocessing_equals_the_pipeline_bit_for_bit(order, resize):
  rng = np.random.default_rng(1)
  mean, std = (103.53, 116.28, 123.675), (1.0, 2.5, 57.375)
  cases = [((48, 80), 64, 96, ((64, 96), (96, 64), (64, 64))),
           ((1, 500), 64, 96, ((64, 96), (96, 64), (64, 64))),
           ((64, 96), 64, 96, ((64, 96),)),  # the resize leaves it unchanged, no padding
           ((480, 640), 800, 1333, ((800, 1088), (800, 1344), (1344, 800))),
           ((427, 640), 800, 1333, ((800, 1344), (800, 1216), (800, 800))),
           ((1000, 700), 800, 1333, ((1344, 800), (1216, 800)))]
  for (h, w), lo, hi, buckets in cases:
    image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    want = transforms.prepare_image(image, lo, hi, mean, std, order, buckets, resize=resize)
    got = serving.prepare_image(image, lo, hi, mean, std, order, buckets, resize)
    assert got[1:] == want[1:]
    assert got[0].dtype == np.float32 and got[0].tobytes() == want[0].tobytes(), (h, w)


def test_bucket_choice_equals_structures():
  rng = np.random.default_rng(2)
  bucket_sets = [((800, 1344), (1344, 800), (800, 800)), ((64, 96), (96, 64), (64, 64)),
                 ((64, 128), (128, 64), (96, 96))]  # equal areas: the tie rule decides
  for buckets in bucket_sets:
    for _ in range(200):
      h, w = (int(v) for v in rng.integers(1, 1400, 2))
      try:
        want = structures.choose_bucket(h, w, buckets)
      except ValueError:
        with pytest.raises(ValueError, match=f'holds a {h}x{w} image'):
          serving.choose_bucket(h, w, buckets)
        continue
      assert serving.choose_bucket(h, w, buckets) == want


def test_paste_and_box_rescale_equal_the_originals():
  rng = np.random.default_rng(3)
  d, h, w = 40, 130, 210
  masks = rng.uniform(0, 1, (d, 28, 28)).astype(np.float32)
  xy = rng.uniform(-40, 220, (d, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0, 120, (d, 2))], 1).astype(np.float32)
  boxes[0] = (10, 10, 10, 10)  # degenerate
  boxes[1] = (300, 300, 400, 400)  # off the canvas
  boxes[2] = (np.nan, 0, 5, 5)  # padding garbage
  boxes[3] = (-1e9, -1e9, 1e9, 1e9)
  want = np.asarray(mask_ops.paste_masks(masks, boxes, h, w))
  got = np.asarray(jax.jit(serving.paste_masks, static_argnums=(2, 3))(masks, boxes, h, w))
  assert np.abs(got - want).max() <= 1e-6
  assert (want > 0.5).sum() > 1000  # non-trivial canvases
  for original, resized in (((480, 640), (800, 1066)), ((64, 64), (64, 64)), ((3, 500), (1, 96))):
    np.testing.assert_array_equal(serving.boxes_to_original(boxes, original, resized),
                                  box_head.boxes_to_original(boxes, original, resized))


# ------------------------------------------------------------------------------ refusals


def _copy(exported, tmp_path, **manifest_changes):
  out = tmp_path / 'copy'
  shutil.copytree(exported.dir, out)
  manifest = json.loads((out / serving.MANIFEST).read_text())
  manifest.update(manifest_changes)
  (out / serving.MANIFEST).write_text(json.dumps(manifest))
  return str(out)


@pytest.mark.parametrize('changes,message', [
    ({'format_version': 2}, r'has format version 2; this runtime reads version 1 only'),
    ({'jax_version': '99.0.0'}, r'was exported with jax 99\.0\.0, this runtime has jax '),
    ({'jax_version': None}, r'was exported with jax \(unknown\)'),
    ({'calling_convention_version': 999}, r'calling convention version 999 is outside'),
    ({'format': 'something.else'}, r"is not a maskrcnn_jax.export manifest \(format "
                                   r"'something.else'\)"),
    ({'platforms': ['tpu']}, r"holds programs for \['tpu'\], not for this cpu device"),
])
def test_incompatible_manifests_are_refused(exported, tmp_path, changes, message):
  directory = _copy(exported, tmp_path, **changes)
  with pytest.raises(serving.ExportFormatError, match=message):
    serving.load(directory)


def test_a_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "nothing"} is not an export'):
    serving.load(str(tmp_path / 'nothing'))


def test_misshaped_missing_and_unexpected_weights_are_named(exported, tmp_path):
  directory = _copy(exported, tmp_path)
  path = os.path.join(directory, serving.WEIGHTS)
  with np.load(path) as f:
    weights = {k: f[k] for k in f.files}
  conv = 'params/rpn/head/conv/kernel'
  shape = weights[conv].shape
  weights[conv] = np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32)
  weights['params/rpn/head/cls_logits/bias'] = weights['params/rpn/head/cls_logits/bias'].astype(
      np.float64)
  del weights['params/backbone/fpn/layer_blocks_0/bias']
  weights['params/extra/kernel'] = np.zeros(3, np.float32)
  np.savez(path, **weights)
  with pytest.raises(serving.ExportFormatError) as e:
    serving.load(directory)
  text = str(e.value)
  assert f'{path} does not fit the exported programs' in text
  assert 'missing params/backbone/fpn/layer_blocks_0/bias' in text
  assert 'not taken by the program: params/extra/kernel' in text
  assert (f'{conv} is {shape[:-1] + (shape[-1] + 1,)} float32, the program takes {shape} '
          'float32') in text
  assert 'params/rpn/head/cls_logits/bias is (3,) float64, the program takes (3,) float32' in text


def test_a_changed_program_file_is_refused(exported, tmp_path):
  directory = _copy(exported, tmp_path)
  name = serving.artifact_name(exported.config.input.buckets[0], 'cpu')
  with open(os.path.join(directory, name), 'r+b') as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(serving.ExportFormatError, match=f'{name} does not match the SHA-256'):
    serving.load(directory)


def test_export_refuses_a_directory_that_holds_an_export(exported):
  with pytest.raises(FileExistsError, match='already holds an export'):
    export.export_model(exported.config, exported.variables, exported.dir)


def test_flag_parsers():
  assert export.parse_buckets('800x1344, 1344X800') == ((800, 1344), (1344, 800))
  assert export.parse_buckets('') is None
  with pytest.raises(ValueError, match="bucket '800by1344': expected HEIGHTxWIDTH"):
    export.parse_buckets('800by1344')
  assert export.parse_platforms('cpu,CUDA,tpu') == ('cpu', 'cuda', 'tpu')
  with pytest.raises(ValueError, match="platforms 'gpu'"):
    export.parse_platforms('gpu')


# ------------------------------------------------------------------------------ the CLI


def _cli(*args):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(),
                                                  'maskrcnn_jax_test_jit_cache')
  return subprocess.run([sys.executable, '-m', 'maskrcnn_jax', 'export', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600, check=False)


def test_cli_export(exported, tmp_path):
  out = tmp_path / 'cli'
  args = ('--config=configs/maskrcnn_r50_fpn.py:tiny', f'--checkpoint={exported.checkpoint}',
          f'--out={out}')
  proc = _cli(*args, '--buckets=64x96', '--platforms=cpu,tpu', '--batch=1')
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f'wrote 2 programs (cpu, tpu; buckets 64x96; batch 1) and their weights to {out}' in \
      proc.stdout
  manifest = serving.read_manifest(str(out))
  assert (manifest['platforms'], manifest['buckets'], manifest['batch_size']) == (
      ['cpu', 'tpu'], [[64, 96]], 1)
  again = _cli(*args)
  assert again.returncode == 1 and 'Traceback' not in again.stderr
  assert f'error: {out} already holds an export' in again.stderr
  bad = _cli(*args[:2], f'--out={tmp_path / "bad"}', '--buckets=64x90')
  assert bad.returncode == 1 and 'error: config.input.buckets = ((64, 90),)' in bad.stderr
