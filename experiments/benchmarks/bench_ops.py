"""Times RoIAlign forward+backward and NMS against torchvision on this machine's CPU.

  python experiments/benchmarks/bench_ops.py   # in a venv with this package, torch and torchvision

Prints a markdown table: our compile time (`jit(...).lower(...).compile()`, kept apart), and
steady-state medians after warm-up (with `block_until_ready`) of wall time and of process CPU
time for ours and torchvision's (when importable), with the ratios ours / theirs. Ours and
theirs are called in alternation, round after round, so both see the same machine load. CPU time is
reported because the machine may be shared: it is less sensitive to other processes' load.
Workloads: RoIAlign 7x7, sampling_ratio 2, legacy (aligned=False), spatial_scale 1/4 on a
2 x 200 x 336 x 256 float32 map (P2 of an 800 x 1344 input) with 1000 RoIs, 500 per image
(`jax.vmap` over the two images; torchvision gets the same 1000 RoIs with batch indices);
backward is the gradient of <out, cotangent> with respect to the features. NMS: 4000 random
boxes, IoU threshold 0.7, all kept boxes returned (max_output = 4000); and the box-head case
of 1000 proposals x 90 classes = 90000 class-aware candidates, threshold 0.5, 100 outputs.
Conv kernel gradients (`backends/cpu_conv.py` against XLA's own `lax.conv_general_dilated`
gradient and torch's `conv2d_weight`): a 3x3 256->256 conv and a 1x1 256->128 conv on a
1 x 200 x 304 x 256 map (P2 / res2 of an 800 x 1216 input), stride 1. `--backend` sets
RoIAlign's `execution.backend` ('xla': the plain program).

The process restarts itself with glibc's huge-page malloc as the `maskrcnn-jax` CLI does
(`backends.host.reexec_with_huge_page_malloc`; ours and torchvision share the process, so both
get it); `MASKRCNN_JAX_MALLOC=default` keeps the C library's default allocator.
"""

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from maskrcnn_jax.backends import host  # noqa: E402

host.reexec_with_huge_page_malloc()  # as the CLI does; MASKRCNN_JAX_MALLOC=default to compare

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from maskrcnn_jax.backends import cpu_conv as conv_ops  # noqa: E402
from maskrcnn_jax.ops import nms as nms_ops  # noqa: E402
from maskrcnn_jax.ops import roi_align as roi_ops  # noqa: E402

try:
  import torch
  import torchvision
except ImportError:  # torch is optional: only our timings are printed then
  torch = None

IMAGE_HW = (800, 1344)
FEATURE_STRIDE = 4
CHANNELS = 256
ROIS_PER_IMAGE = 500
NUM_IMAGES = 2
OUTPUT_SIZE = 7
SAMPLING_RATIO = 2


def _alternate(fns: dict, repeats: int) -> dict:
  """{name: (median wall seconds, median process-CPU seconds)} over `repeats` rounds that call
  every function once in turn, after 2 warm-up rounds.

  Alternating puts ours and torchvision's calls in the same stretch of time: timed one after the
  other, ours (about 1 s in all) and theirs (10 s and more) would see different loads of a
  shared machine.
  """
  for _ in range(2):
    for fn in fns.values():
      fn()
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def _compile(jitted, args):
  """(compile seconds, a call that waits for the result) of a jitted function on `args`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  return compile_s, lambda: jax.block_until_ready(compiled(*args))


def _rows(compiled: dict, theirs: dict, repeats: int):
  """Times ours (`{row: (compile_s, fn)}`) and theirs (`{row: fn}`) alternately -> the
  `(rows, theirs)` of a bench function."""
  fns = {('ours', row): fn for row, (_, fn) in compiled.items()}
  fns.update({('theirs', row): fn for row, fn in theirs.items()})
  timed = _alternate(fns, repeats)
  return ({row: (c,) + timed[('ours', row)] for row, (c, _) in compiled.items()},
          {row: timed[('theirs', row)] for row in theirs})


def _random_boxes(rng, n, hw, min_size, max_size):
  """xyxy boxes with uniform centres in the image and log-uniform sides (proposal-like)."""
  ctr = rng.uniform(0, [hw[1], hw[0]], (n, 2))
  wh = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
  return np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).astype(np.float32)


def bench_roi_align(rng, repeats, backend='auto'):
  fh, fw = IMAGE_HW[0] // FEATURE_STRIDE, IMAGE_HW[1] // FEATURE_STRIDE
  feats = rng.standard_normal((NUM_IMAGES, fh, fw, CHANNELS)).astype(np.float32)
  boxes = np.stack([_random_boxes(rng, ROIS_PER_IMAGE, IMAGE_HW, 16, 512)
                    for _ in range(NUM_IMAGES)])
  cot = rng.standard_normal(
      (NUM_IMAGES, ROIS_PER_IMAGE, OUTPUT_SIZE, OUTPUT_SIZE, CHANNELS)).astype(np.float32)
  scale = 1.0 / FEATURE_STRIDE

  def align(f, b):
    return jax.vmap(lambda fi, bi: roi_ops.roi_align(
        fi, bi, OUTPUT_SIZE, scale, SAMPLING_RATIO, aligned=False, backend=backend))(f, b)

  fwd = jax.jit(align)
  fwd_bwd = jax.jit(jax.value_and_grad(lambda f, b, t: jnp.vdot(align(f, b), t)))
  jf, jb, jc = jnp.asarray(feats), jnp.asarray(boxes), jnp.asarray(cot)
  ours = {'RoIAlign forward': _compile(fwd, (jf, jb)),
          'RoIAlign forward+backward': _compile(fwd_bwd, (jf, jb, jc))}
  theirs = {}
  if torch is not None:
    tf = torch.from_numpy(feats.transpose(0, 3, 1, 2).copy())
    tb = torch.from_numpy(np.concatenate(
        [np.repeat(np.arange(NUM_IMAGES, dtype=np.float32), ROIS_PER_IMAGE)[:, None],
         boxes.reshape(-1, 4)], 1))
    tc = torch.from_numpy(cot.reshape(-1, OUTPUT_SIZE, OUTPUT_SIZE, CHANNELS)
                          .transpose(0, 3, 1, 2).copy())

    def t_fwd():
      with torch.no_grad():
        torchvision.ops.roi_align(tf, tb, OUTPUT_SIZE, scale, SAMPLING_RATIO, False)

    def t_fwd_bwd():
      f = tf.detach().requires_grad_(True)
      out = torchvision.ops.roi_align(f, tb, OUTPUT_SIZE, scale, SAMPLING_RATIO, False)
      (out * tc).sum().backward()

    theirs = {'RoIAlign forward': t_fwd, 'RoIAlign forward+backward': t_fwd_bwd}
  return _rows(ours, theirs, repeats)


def bench_nms(rng, repeats):
  ours, theirs = {}, {}
  n = 4000
  boxes = _random_boxes(rng, n, IMAGE_HW, 16, 512)
  scores = rng.uniform(size=n).astype(np.float32)
  f = jax.jit(lambda b, s: nms_ops.nms(b, s, 0.7, n))
  jb, js = jnp.asarray(boxes), jnp.asarray(scores)
  ours['NMS 4000 boxes'] = _compile(f, (jb, js))
  kept = int(f(jb, js)[1].sum())
  # Box-head postprocess: 1000 proposals x 90 classes, most below the score threshold.
  props = _random_boxes(rng, 1000, IMAGE_HW, 16, 512)
  jitter = rng.normal(0, 4, (1000, 90, 4)).astype(np.float32)
  cls_boxes = (props[:, None, :] + jitter).reshape(-1, 4)
  cls_scores = rng.uniform(size=90000).astype(np.float32) ** 4
  labels = np.tile(np.arange(1, 91, dtype=np.int32), 1000)
  valid = cls_scores > 0.05
  g = jax.jit(lambda b, s, l, v: nms_ops.batched_nms(b, s, l, 0.5, 100, v))
  args = tuple(map(jnp.asarray, (cls_boxes, cls_scores, labels, valid)))
  ours['batched NMS 90000 candidates -> 100'] = _compile(g, args)
  if torch is not None:
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    theirs['NMS 4000 boxes'] = lambda: torchvision.ops.nms(tb, ts, 0.7)
    assert len(torchvision.ops.nms(tb, ts, 0.7)) == kept, 'kept sets differ'
    vb, vs, vl = (torch.from_numpy(x[valid]) for x in (cls_boxes, cls_scores, labels))

    def t_batched():
      torchvision.ops.batched_nms(vb, vs, vl, 0.5)[:100]

    theirs['batched NMS 90000 candidates -> 100'] = t_batched
  return _rows(ours, theirs, repeats)


def bench_conv_grad(rng, repeats):
  ours, theirs = {}, {}
  dims = ('NHWC', 'HWIO', 'NHWC')
  for k, cout in ((3, 256), (1, 128)):
    pad = k // 2
    x = rng.standard_normal((1, 200, 304, 256)).astype(np.float32)
    w = (rng.standard_normal((k, k, 256, cout)) * 0.01).astype(np.float32)
    g = rng.standard_normal((1, 200, 304, cout)).astype(np.float32)
    name = f'conv {k}x{k} 256->{cout} kernel gradient, 200x304'
    for label, conv in (('ours', conv_ops.conv_general_dilated),
                        ("XLA's", jax.lax.conv_general_dilated)):
      kernel_grad = jax.jit(lambda x, w, g, conv=conv: jax.vjp(
          lambda w_: conv(x, w_, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=dims),
          w)[1](g)[0])
      ours[f'{name} ({label})'] = _compile(kernel_grad, tuple(map(jnp.asarray, (x, w, g))))
    if torch is not None:
      tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
      shape = (cout, 256, k, k)
      theirs[name] = (lambda tx=tx, tg=tg, shape=shape, pad=pad:
                      torch.nn.grad.conv2d_weight(tx, shape, tg, padding=pad))
  rows, timed = _rows(ours, theirs, repeats)
  return rows, {row: timed[row.rsplit(' (', 1)[0]] for row in rows if theirs}


def bench_keypoint_predictor(rng, repeats):
  """The keypoint predictor's forward+backward on 128 RoIs (64 -> 20 channels, 14 -> 56):
  the XLA:CPU form (phase convs) and the plain one (XLA's transposed conv) against torch's
  ConvTranspose2d + bilinear upsampling."""
  from maskrcnn_jax.backends import cpu, xla  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.ops import keypoints as kp_ops  # pylint: disable=g-import-not-at-top
  ours, theirs = {}, {}
  x = rng.standard_normal((128, 14, 14, 64)).astype(np.float32)
  w = (rng.standard_normal((4, 4, 20, 64)) * 0.05).astype(np.float32)
  b = np.zeros(20, np.float32)
  name = 'keypoint predictor fwd+bwd, 128 RoIs 14x14x64 -> 56x56x20'
  for label, backend in (('ours', cpu.CPU), ("XLA's", xla.PLAIN)):
    def loss(x, w, b, backend=backend):
      y = kp_ops.upsample2x_bilinear(backend.conv_transpose_4x4_stride2(x, w, b))
      return jnp.sum(y * y)
    f = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ours[f'{name} ({label})'] = _compile(f, tuple(map(jnp.asarray, (x, w, b))))
  if torch is not None:
    layer = torch.nn.ConvTranspose2d(64, 20, 4, stride=2, padding=1)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()

    def t_step():
      layer.zero_grad()
      y = torch.nn.functional.interpolate(layer(tx), scale_factor=2, mode='bilinear',
                                          align_corners=False)
      (y * y).sum().backward()

    theirs[name] = t_step
  rows, timed = _rows(ours, theirs, repeats)
  return rows, {row: timed[row.rsplit(' (', 1)[0]] for row in rows if theirs}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=11)
  parser.add_argument('--only', choices=('roi_align', 'nms', 'conv_grad', 'keypoint_predictor'),
                      help='run one group of rows')
  parser.add_argument('--backend', default='auto', choices=('auto', 'xla', 'cpu'),
                      help="RoIAlign's execution.backend ('xla': the plain program)")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores'
        + (f'; torch {torch.__version__}, torchvision {torchvision.__version__} '
           f'({torch.get_num_threads()} threads)' if torch is not None else ''))
  results = []
  print(f'RoIAlign backend: {args.backend}')
  benches = {'roi_align': functools.partial(bench_roi_align, backend=args.backend),
             'nms': bench_nms, 'conv_grad': bench_conv_grad,
             'keypoint_predictor': bench_keypoint_predictor}
  for group, bench in benches.items():
    if args.only and group != args.only:
      continue
    ours, theirs = bench(rng, args.repeats)
    for name, timings in ours.items():
      results.append((name, timings, theirs.get(name)))
  print()
  print('| op | ours: compile | ours: wall | torchvision: wall | wall ratio | ours: CPU '
        '| torchvision: CPU | CPU ratio |')
  print('|---|---|---|---|---|---|---|---|')
  for name, (compile_s, wall, cpu), tv in results:
    ms = lambda x: f'{x * 1e3:.1f} ms'  # noqa: E731
    if tv is None:
      print(f'| {name} | {compile_s:.2f} s | {ms(wall)} | n/a | n/a | {ms(cpu)} | n/a | n/a |')
    else:
      print(f'| {name} | {compile_s:.2f} s | {ms(wall)} | {ms(tv[0])} | {wall / tv[0]:.3f} '
            f'| {ms(cpu)} | {ms(tv[1])} | {cpu / tv[1]:.3f} |')
  if os.getloadavg()[0] > 1.5:
    print(f'\nnote: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores during the '
          'run (other processes); wall times are inflated, CPU times less so.')


if __name__ == '__main__':
  main()
