"""R50-FPN Mask R-CNN inference and train-step speed and peak memory, ours vs torchvision.

    python experiments/benchmarks/bench_model.py            # every case, markdown table
    python experiments/benchmarks/bench_model.py --only=jax-infer   # one case, JSON line

Each case runs in its own subprocess so that its peak memory (process RSS on CPU, device memory
on a GPU) is its own. Cases: inference on one 800x1216 image (end to end: our Predictor from the
uint8 image to pasted masks; torchvision's model(list of tensors), which also resizes,
normalises and pastes), and a train step at 800x1216 with batch 1 and 2 (SGD + momentum; ours the
jitted step with the state donated, torchvision forward + backward + optimizer.step()).
Compile time (our first call) is reported separately from the steady-state median. Peak memory
is reported twice: over the whole process (compilation and first step included) and over the
timed steps only (the kernel's VmHWM, restarted after the first call). After the first call both
train cases return the C heap's free pages to the OS (glibc malloc_trim), as our train loop
does after every step that compiled (`backends.host.release_host_memory`).
`--cpu_memory_scheduler` runs our cases with XLA:CPU's memory-minimising op order (less memory,
slower on 2 cores). The
script restarts itself with glibc's huge-page malloc as the `maskrcnn-jax` CLI does, for both
frameworks' cases; `MASKRCNN_JAX_MALLOC=default` keeps the C library's default allocator.

Both models are torchvision's `maskrcnn_resnet50_fpn` layout with FrozenBatchNorm and
trainable_layers=3 (the COCO fine-tuning setting). When torch imports, our variables are
converted from the same randomly initialised torchvision model (in a child process, so that the
JAX process never imports torch), so both run identical weights and produce the same number of
detections; otherwise ours are randomly initialised. torchvision's SGD runs at lr 2e-5, about our
config's warm-up rate in these first steps (lr 0.02 diverges to NaN on random weights).

The last column counts foreground RoIs. torchvision runs its mask head on exactly those; with
random weights on this input they are only the 8 ground-truth boxes per image (a trained RPN
yields many more, up to 128). Ours has 128 static foreground slots per image (512 sampled x
0.25) and, with the CPU backend, runs the head on the chunks of `execution.mask_loss_chunk`
(16) slots that hold one (`backends/cpu_rows.py`): here one chunk per image. `--backend=xla`
times our plain JAX program (what GPUs and TPUs run) instead of the XLA:CPU forms.
"""

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HEIGHT, WIDTH = 800, 1216
CASES = ('jax-infer', 'torch-infer', 'jax-train-1', 'torch-train-1', 'jax-train-2',
         'torch-train-2')
# XLA:CPU schedules independent ops for concurrency by default; this flag selects its
# memory-minimising order instead (it is read only from XLA_FLAGS, when the backend starts).
MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _reset_peak_rss() -> bool:
  """Restarts the kernel's peak-RSS counter (VmHWM) at the current RSS; False where it can't."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _steady_peak_rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024.0
  return float('nan')


def _malloc_trim() -> None:
  try:
    ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _image(seed=0) -> np.ndarray:
  """A natural-ish uint8 image: smooth colour gradients plus a few filled shapes."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
  img = np.stack([128 + 60 * np.sin(xx / 97 + c) * np.cos(yy / 53 - c) for c in range(3)], -1)
  for _ in range(12):
    cy, cx, r = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH), rng.uniform(30, 200)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
  return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _targets(batch: int, seed=0):
  """Ground truth for a train step: 8 boxes per image with rectangular masks."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(batch):
    n = 8
    wh = rng.uniform(40, 400, (n, 2))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([WIDTH, HEIGHT]) - wh)
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    labels = rng.integers(1, 91, n).astype(np.int64)
    out.append((boxes, labels))
  return out


def _torch_model():
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import backbone_utils, mask_rcnn  # pylint: disable=g-import-not-at-top
  from torchvision.ops import misc  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  body = torchvision.models.resnet50(weights=None, norm_layer=misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(body, 3)  # pylint: disable=protected-access
  return mask_rcnn.MaskRCNN(backbone, num_classes=91)


def _jax_setup(backend: str = 'auto'):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import maskrcnn_r50_fpn  # pylint: disable=g-import-not-at-top
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  config = maskrcnn_r50_fpn.get_config()
  config.input.buckets = ((HEIGHT, WIDTH),)
  config.execution.backend = backend
  variables = None
  # The torchvision weights come from a child process, so that this process never imports
  # torch: its peak RSS is then ours alone (torch and its state dict add ~1.4 GB).
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'state.npz')
    proc = subprocess.run([sys.executable, __file__, '--dump_torch_state', path],
                          capture_output=True, text=True, check=False)
    if proc.returncode == 0:
      from maskrcnn_jax import weights  # pylint: disable=g-import-not-at-top
      with np.load(path) as state:
        variables = weights.from_torchvision(dict(state), config)
      source = 'converted from the torchvision model'
    else:
      source = 'random init (torch not importable)'
  if variables is None:
    variables = mask_rcnn.init_variables(config, jax.random.key(0), (HEIGHT, WIDTH))
  return config, variables, source


def run_case(case: str, repeats: int, backend: str = 'auto') -> dict:
  result = {'case': case}
  if case == 'jax-infer':
    import jax  # pylint: disable=g-import-not-at-top
    from maskrcnn_jax import predictor  # pylint: disable=g-import-not-at-top
    config, variables, result['weights'] = _jax_setup(backend)
    pred = predictor.Predictor(config, variables)
    image = _image()
    t0 = time.perf_counter()
    out = pred(image)
    result['first_call_s'] = time.perf_counter() - t0
    steady = _reset_peak_rss()  # the steps' own peak, without compilation and first call
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = pred(image)
      times.append(time.perf_counter() - t0)
    result['detections'] = int(len(out['scores']))
    result['device'] = str(jax.devices()[0].device_kind)
  elif case == 'torch-infer':
    import torch  # pylint: disable=g-import-not-at-top
    model = _torch_model().eval()
    x = torch.from_numpy(_image()).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
      t0 = time.perf_counter()
      out = model([x])[0]
      result['first_call_s'] = time.perf_counter() - t0
      steady = _reset_peak_rss()  # the steps' own peak, without compilation and first call
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = model([x])[0]
        times.append(time.perf_counter() - t0)
    result['detections'] = int(len(out['scores']))
    result['threads'] = torch.get_num_threads()
  elif case.startswith('jax-train'):
    import jax  # pylint: disable=g-import-not-at-top
    from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top
    from maskrcnn_jax.backends import host  # pylint: disable=g-import-not-at-top
    from maskrcnn_jax.data import transforms  # pylint: disable=g-import-not-at-top
    from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
    batch_size = int(case.rsplit('-', 1)[1])
    config, variables, result['weights'] = _jax_setup(backend)
    config.input.batch_size = batch_size
    mesh = train.make_mesh(jax.devices()[:1])
    model = mask_rcnn.build_model(config)
    state, shardings, optimizer = train.init_state(config, model, mesh, (HEIGHT, WIDTH))
    state = state.replace(params=variables['params'], constants=variables['constants'])
    state = jax.device_put(state, shardings)
    del variables  # the host copy: the train state holds the only weights, as in torchvision
    step = train.make_jitted_train_step(config, model, optimizer, mesh, shardings)
    gbatch = train.global_batch(_jax_batch(config, batch_size, transforms), mesh)
    result['rss_before_mb'] = _peak_rss_mb()
    t0 = time.perf_counter()
    state, metrics = step(state, gbatch)
    jax.block_until_ready(metrics)
    result['first_call_s'] = time.perf_counter() - t0
    host.release_host_memory()  # as the train loop does after a step that compiled
    steady = _reset_peak_rss()  # the steps' own peak, without compilation and first call
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, metrics = step(state, gbatch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    result['loss'] = float(metrics['loss'])
    if 'num_roi_foreground' in metrics:
      result['foreground_rois'] = round(float(metrics['num_roi_foreground']) * batch_size)
  elif case.startswith('torch-train'):
    import torch  # pylint: disable=g-import-not-at-top
    batch_size = int(case.rsplit('-', 1)[1])
    model = _torch_model().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                          momentum=0.9, weight_decay=1e-4)
    images = [torch.from_numpy(_image(s)).permute(2, 0, 1).float() / 255.0
              for s in range(batch_size)]
    targets = []
    for boxes, labels in _targets(batch_size):
      masks = np.zeros((len(boxes), HEIGHT, WIDTH), np.uint8)
      for j, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[j, y0:y1, x0:x1] = 1
      targets.append({'boxes': torch.from_numpy(boxes), 'labels': torch.from_numpy(labels),
                      'masks': torch.from_numpy(masks)})
    result['rss_before_mb'] = _peak_rss_mb()
    select = model.roi_heads.select_training_samples
    counts = []

    def counting_select(*args, **kwargs):  # torchvision's mask head runs on exactly these RoIs
      out = select(*args, **kwargs)
      counts.append(sum(int((labels > 0).sum()) for labels in out[2]))
      return out

    model.roi_heads.select_training_samples = counting_select

    def step():
      losses = model(images, targets)
      loss = sum(losses.values())
      opt.zero_grad()
      loss.backward()
      opt.step()
      return float(loss)

    t0 = time.perf_counter()
    step()
    result['first_call_s'] = time.perf_counter() - t0
    _malloc_trim()  # the same treatment as ours: freed heap pages go back to the OS
    steady = _reset_peak_rss()  # the steps' own peak, without compilation and first call
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      result['loss'] = step()
      times.append(time.perf_counter() - t0)
    result['foreground_rois'] = counts[-1]
  else:
    raise ValueError(case)
  result['median_s'] = statistics.median(times)
  result['min_s'] = min(times)
  result['peak_rss_mb'] = _peak_rss_mb()
  if steady:
    result['step_peak_rss_mb'] = _steady_peak_rss_mb()
  result.update(_gpu_memory())
  return result


def _jax_batch(config, batch_size, transforms):
  images = []
  for s in range(batch_size):
    img = transforms.normalize(_image(s).astype(np.float32), config.input.pixel_mean,
                               config.input.pixel_std, config.input.channel_order)
    images.append(img)
  m, s = config.input.max_instances, config.input.gt_mask_size
  gt_boxes = np.zeros((batch_size, m, 4), np.float32)
  gt_labels = np.zeros((batch_size, m), np.int32)
  gt_valid = np.zeros((batch_size, m), bool)
  for b, (boxes, labels) in enumerate(_targets(batch_size)):
    gt_boxes[b, :len(boxes)] = boxes
    gt_labels[b, :len(boxes)] = labels
    gt_valid[b, :len(boxes)] = True
  return {'images': np.stack(images).astype(np.float32),
          'image_size': np.tile(np.array([[HEIGHT, WIDTH]], np.int32), (batch_size, 1)),
          'gt_boxes': gt_boxes, 'gt_labels': gt_labels,
          'gt_masks': np.ones((batch_size, m, s, s), np.uint8),  # rectangles fill their box
          'gt_crowd': np.zeros((batch_size, m), bool), 'gt_valid': gt_valid}


def _gpu_memory() -> dict:
  out = {}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.devices()[0].platform == 'gpu':
      stats = jax.devices()[0].memory_stats() or {}
      out['device_peak_mb'] = stats.get('peak_bytes_in_use', 0) / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  if 'torch' in sys.modules:
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available():
      out['device_peak_mb'] = torch.cuda.max_memory_allocated() / 2**20
  return out


def main() -> None:
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from maskrcnn_jax.backends import host  # pylint: disable=g-import-not-at-top
  host.reexec_with_huge_page_malloc()  # as the CLI does; the cases' subprocesses inherit it
  parser = argparse.ArgumentParser()
  parser.add_argument('--only', choices=CASES)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--cpu_memory_scheduler', action='store_true',
                      help='run our cases with XLA:CPU\'s memory-minimising scheduler '
                      f'(XLA_FLAGS={MEMORY_SCHEDULER_FLAG})')
  parser.add_argument('--backend', default='auto', choices=('auto', 'xla', 'cpu'),
                      help="our cases' execution.backend ('xla': the plain program)")
  parser.add_argument('--dump_torch_state', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.dump_torch_state:  # child of _jax_setup: the random torchvision model's weights
    np.savez(args.dump_torch_state,
             **{k: v.detach().numpy() for k, v in _torch_model().state_dict().items()})
    return
  if args.only:
    print(json.dumps(run_case(args.only, args.repeats, args.backend)))
    return
  results = {}
  for case in args.cases.split(','):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    if args.cpu_memory_scheduler and case.startswith('jax'):
      env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {MEMORY_SCHEDULER_FLAG}'.strip()
    proc = subprocess.run([sys.executable, __file__, '--only', case, '--repeats',
                           str(args.repeats), '--backend', args.backend],
                          capture_output=True, text=True, env=env, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
    if proc.returncode or not lines:
      print(f'{case}: failed\n{proc.stderr[-3000:]}', file=sys.stderr)
      continue
    results[case] = json.loads(lines[-1])
    print(f'{case}: {results[case]}', file=sys.stderr, flush=True)
  print(_table(results))


def _table(results: dict) -> str:
  rows = ['| case | ours median (s) | ours first call (s) | torchvision median (s) | ratio '
          '(ours / tv) | peak RSS during the steps, ours / tv (MB) | peak RSS of the process, '
          'ours / tv (MB) | foreground RoIs, ours / tv |',
          '|---|---|---|---|---|---|---|---|']
  nan = float('nan')
  for name, (ours, theirs) in {
      'inference, 1 image 800x1216': ('jax-infer', 'torch-infer'),
      'train step, batch 1': ('jax-train-1', 'torch-train-1'),
      'train step, batch 2': ('jax-train-2', 'torch-train-2')}.items():
    a, b = results.get(ours), results.get(theirs)
    if a is None:
      continue
    b = b or {}
    ratio = f'{a["median_s"] / b["median_s"]:.2f}' if b else 'n/a'
    rows.append(f'| {name} | {a["median_s"]:.3f} | {a["first_call_s"]:.1f} | '
                f'{b.get("median_s", nan):.3f} | {ratio} | '
                f'{a.get("step_peak_rss_mb", nan):.0f} / {b.get("step_peak_rss_mb", nan):.0f} | '
                f'{a["peak_rss_mb"]:.0f} / {b.get("peak_rss_mb", nan):.0f} | '
                f'{a.get("foreground_rois", "-")} / {b.get("foreground_rois", "-")} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  main()
