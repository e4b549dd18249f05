"""Parity of the exported R50-FPN detector (`maskrcnn_jax.export` + `serving`) with the Predictor.

    python experiments/parity/export_parity.py \
        [--out experiments/parity/export_parity.txt] [--platforms cpu,cuda,tpu]

Needs torch + torchvision (for the weights only) + jax + this package in one environment. The
weights are torchvision_parity.py's: a random-init torchvision `maskrcnn_resnet50_fpn` made
non-trivial (calibrated, randomised batch norms; logits spread so that there are 100
detections per image), converted with `weights.from_torchvision`. The config is
configs/torchvision_maskrcnn_r50_fpn.py with the buckets the scikit-image photographs need.

The model is exported for every `--platforms` entry (lowered on this machine whatever it is);
the CPU programs then run through `serving.load` and are compared with the Predictor on the
same uint8 images: the model input (bit for bit), the raw outputs of one preprocessed batch
(boxes, scores, 28x28 mask probabilities), and the final results in original pixels (boxes
within 1e-4 px, identical labels, full-resolution mask IoU >= 0.999 are the targets). The
other platforms' programs are deserialized and checked for the XLA:CPU backend's named scopes,
and, as the nearest check of them this machine can run, the CPU program traced with the plain
forms (`execution.backend=xla`, what they hold) is run and matched against the Predictor too.
"""

import argparse
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, '..', '..'))
# pylint: disable=g-import-not-at-top,wrong-import-position
import torchvision_parity as tp  # the weights, images and report helper
from configs import torchvision_maskrcnn_r50_fpn
from maskrcnn_jax import export
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import serving
from maskrcnn_jax import structures
from maskrcnn_jax import weights
from maskrcnn_jax.backends import hooks
from maskrcnn_jax.data import transforms

BOX_ATOL = 1e-4
MASK_IOU_MIN = 0.999


def config_for(images):
  """The torchvision preset with only the buckets these images resize into."""
  config = torchvision_maskrcnn_r50_fpn.get_config()
  i = config.input
  needed = {structures.choose_bucket(*transforms.resize_shape(*img.shape[:2], i.min_size,
                                                              i.max_size), i.buckets)
            for _, img in images}
  i.buckets = tuple(sorted(needed))
  return config


def check_program(report, directory, artifact):
  with open(os.path.join(directory, artifact['file']), 'rb') as f:
    program = jax.export.deserialize(bytearray(f.read()))
  locations = set(re.findall(r'loc\("([^"]*)"', program.mlir_module()))
  cpu = sum(hooks.CPU_SCOPE in loc for loc in locations)
  report(f'  {artifact["file"]}: {artifact["bytes"] / 2**20:.2f} MiB, platforms '
         f'{program.platforms}, traced with execution.backend={artifact["backend"]}, '
         f'{len(locations)} named locations, {cpu} under {hooks.CPU_SCOPE}.*')
  return cpu


def compare(report, name, image, pred, runtime):
  report(f'\n{name}')
  ours_in = runtime.preprocess(image)
  ref_in = pred.preprocess(image)
  same_input = ours_in[1:] == ref_in[1:] and ours_in[0].tobytes() == ref_in[0].tobytes()
  report(f'  input: bucket {ref_in[2][0]}x{ref_in[2][1]}, content {ref_in[1][0]}x{ref_in[1][1]}; '
         f'serving\'s preprocessing equals the Predictor\'s bit for bit: {same_input}')
  batch = ours_in[0][None]
  size = np.array([ours_in[1]], np.int32)
  raw_ours = jax.device_get(runtime.detect(batch, size))
  raw_ref = pred.detect(batch, size)
  v = raw_ref['valid'][0]
  same_valid = bool((raw_ours['valid'][0] == v).all())
  report(f'  raw outputs (padded-input frame): valid slots {int(v.sum())} vs '
         f'{int(raw_ours["valid"][0].sum())} (identical: {same_valid}); max |box diff| '
         f'{np.abs(raw_ours["boxes"][0][v] - raw_ref["boxes"][0][v]).max():.2e} px, max |score '
         f'diff| {np.abs(raw_ours["scores"][0][v] - raw_ref["scores"][0][v]).max():.2e}, max '
         f'|28x28 mask prob diff| '
         f'{np.abs(raw_ours["masks"][0][v] - raw_ref["masks"][0][v]).max():.2e}')
  ours, ref = runtime(image), pred(image)
  n = len(ref['scores'])
  same_labels = len(ours['labels']) == n and bool((ours['labels'] == ref['labels']).all())
  box = float(np.abs(ours['boxes'] - ref['boxes']).max()) if n else 0.0
  score = float(np.abs(ours['scores'] - ref['scores']).max()) if n else 0.0
  ious = [tp.mask_iou(a, b) for a, b in zip(ours['masks'], ref['masks'])]
  report(f'  results (original frame {image.shape[0]}x{image.shape[1]}): Predictor {n}, '
         f'exported {len(ours["scores"])} detections; labels identical: {same_labels}; max |box '
         f'diff| {box:.2e} px; max |score diff| {score:.2e}; full-resolution mask IoU mean '
         f'{np.mean(ious):.6f}, min {np.min(ious):.6f}')
  return (same_input and same_valid and same_labels and box <= BOX_ATOL
          and min(ious) >= MASK_IOU_MIN)


def compare_plain(report, name, image, pred, runtime):
  """The plain-form program (what the cuda and tpu programs hold) run on the CPU against the
  Predictor (XLA:CPU forms): other float summation orders, so detections are matched (same
  label, IoU >= tp.MATCH_IOU) rather than compared slot by slot."""
  ours, ref = runtime(image), pred(image)
  pairs = tp.match(ref['boxes'], ref['labels'], ours['boxes'], ours['labels'])
  line = (f'  {name.split(" (")[0]}: Predictor {len(ref["scores"])}, plain program '
          f'{len(ours["scores"])} detections; {100 * len(pairs) / max(len(ref["scores"]), 1):.1f}% '
          f'matched')
  if pairs:
    i, j = map(np.array, zip(*pairs))
    ious = [tp.mask_iou(ref['masks'][a], ours['masks'][b]) for a, b in pairs]
    line += (f'; max |score diff| {np.abs(ref["scores"][i] - ours["scores"][j]).max():.2e}, max '
             f'|box diff| {np.abs(ref["boxes"][i] - ours["boxes"][j]).max():.2e} px, mask IoU '
             f'mean {np.mean(ious):.4f}, min {np.min(ious):.4f}')
  report(line)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(HERE, 'export_parity.txt'))
  parser.add_argument('--platforms', default='cpu,cuda,tpu')
  parser.add_argument('--no_plain', action='store_true',
                      help='skip the plain-form program run on the CPU')
  parser.add_argument('--export_dir', default='', help='keep the export here (default: a '
                      'temporary directory)')
  args = parser.parse_args(argv)
  platforms = export.parse_platforms(args.platforms)
  if 'cpu' not in platforms:
    parser.error('--platforms must include cpu: the parity runs the CPU programs')
  torch.set_num_threads(2)
  report = tp.Report([])
  images = tp.load_images()
  tv_model = tp.build_torchvision([tp.to_torch(img) for _, img in images])
  state_dict = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  del tv_model
  config = config_for(images)
  variables = weights.from_torchvision(state_dict, config,
                                       source='random torchvision maskrcnn_resnet50_fpn')
  del state_dict
  report(f'maskrcnn_jax export ({", ".join(platforms)}) vs Predictor: jax {jax.__version__} '
         f'({jax.devices()[0].platform}), configs/torchvision_maskrcnn_r50_fpn.py, buckets '
         f'{", ".join("x".join(map(str, b)) for b in config.input.buckets)}, batch 1; weights: '
         f'torchvision {tp.torchvision.__version__} maskrcnn_resnet50_fpn, random init, '
         f'calibrated BN, logits std {tp.LOGIT_STD}, converted')
  with tempfile.TemporaryDirectory() as tmp:
    directory = args.export_dir or os.path.join(tmp, 'export')
    t0 = time.perf_counter()
    manifest = export.export_model(config, variables, directory, platforms=platforms,
                                   meta={'source': 'random torchvision maskrcnn_resnet50_fpn'})
    report(f'\nexport: {len(manifest["artifacts"])} programs in {time.perf_counter() - t0:.0f} s; '
           f'weights.npz {os.path.getsize(os.path.join(directory, serving.WEIGHTS)) / 2**20:.0f} '
           f'MiB ({len(manifest["weights"]["arrays"])} arrays)')
    cpu_scoped = {a['file']: check_program(report, directory, a) for a in manifest['artifacts']}
    plain_clean = all(n == 0 for f, n in cpu_scoped.items() if not f.endswith('_cpu.jaxexport'))
    report(f'  no {hooks.CPU_SCOPE}.* construct in any non-CPU program: {plain_clean}')
    t0 = time.perf_counter()
    runtime = serving.load(directory)
    report(f'  serving.load: {time.perf_counter() - t0:.1f} s (manifest, SHA-256 of every file, '
           'programs, weights checked against the programs\' inputs)')
    pred = predictor_lib.Predictor(config, variables)
    ok = [compare(report, name, img, pred, runtime) for name, img in images]
    del runtime
    if not args.no_plain:
      plain_config = config.copy_and_resolve_references()
      plain_config.execution.backend = 'xla'
      plain_dir = os.path.join(tmp, 'plain')
      export.export_model(plain_config, variables, plain_dir, platforms=('cpu',))
      report('\nthe CPU program traced with execution.backend=xla (the plain forms, as in the '
             'cuda and tpu programs), run on the CPU, vs the Predictor:')
      plain = serving.load(plain_dir)
      for name, img in images:
        compare_plain(report, name, img, pred, plain)
  report(f'\nall targets met (identical input and labels, boxes within {BOX_ATOL} px, mask IoU '
         f'>= {MASK_IOU_MIN}, no CPU construct off the CPU): {all(ok) and plain_clean}')
  with open(args.out, 'w') as f:
    f.write('\n'.join(report.lines) + '\n')
  print(f'\nwrote {args.out}')
  return 0 if all(ok) and plain_clean else 1


if __name__ == '__main__':
  sys.exit(main())
