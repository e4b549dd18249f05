"""Parity of a converted torchvision `maskrcnn_resnet50_fpn` with torchvision itself.

    python experiments/parity/torchvision_parity.py \
        [--out experiments/parity/torchvision_parity.txt]

Needs torch + torchvision + jax + this package in one environment (`pip install -e .` into the
torch venv). Downloads nothing: the torchvision model is randomly initialised, then made
non-trivial so that a conversion bug cannot hide:

* every batch norm gets statistics calibrated on the test images (as a trained network's
  would be: O(1) activations at every depth), times random factors, plus random affine terms,
  so no BN is the identity;
* the RPN objectness and the box classifier are rescaled so their logits have standard
  deviation 2 (a freshly initialised torchvision model scores every class about 1/91, below the
  0.05 threshold, and ranks proposals by near-tied objectness); both models use the same
  rescaled weights and the unchanged score threshold 0.05.

Images (scikit-image samples when installed, otherwise drawn) at a size the resize leaves
unchanged (800x1056) and at sizes it changes (427x640 -> 800x1199, 512x512 -> 800x800). Our
bucket is torchvision's padded size. Levels reported:

  model:    torchvision's own preprocessed tensor fed to both models: FPN features, RPN
            proposals, detections (in the resized frame) and 28x28 mask probabilities.
  pipeline: raw uint8 image through `Predictor` (our resize/normalise/pad, model, box rescale,
            mask paste) vs `model(images)` in the original frame, with full-resolution masks.
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch
import torchvision

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import torchvision_maskrcnn_r50_fpn
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import weights
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.modeling import resnet as resnet_lib

LOGIT_STD = 2.0
MATCH_IOU = 0.99
SEED = 0


# ------------------------------------------------------------------------------ torchvision model


def build_torchvision(calibration: list[torch.Tensor],
                      builder=torchvision.models.detection.maskrcnn_resnet50_fpn
                      ) -> torch.nn.Module:
  """Random-init torchvision detector (`builder`, default maskrcnn_resnet50_fpn) with
  calibrated, randomised BN and spread logits."""
  torch.manual_seed(SEED)
  model = builder(weights=None, weights_backbone=None).eval()
  gen = torch.Generator().manual_seed(SEED)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]

  def set_stats(module, args):
    x = args[0]
    c = x.shape[1]
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(c, generator=gen)
    module.running_mean.copy_(x.mean((0, 2, 3)) + 0.1 * x.std((0, 2, 3)) * torch.randn(
        c, generator=gen))
    module.running_var.copy_(x.var((0, 2, 3)) * rand(0.7, 1.3))
    module.weight.copy_(rand(0.5, 1.5))
    module.bias.copy_(0.2 * torch.randn(c, generator=gen))

  hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
  with torch.no_grad():
    images, _ = model.transform(calibration)
    model.backbone(images.tensors)  # each BN calibrates on its input, then applies the stats
  for h in hooks:
    h.remove()

  with torch.no_grad():
    feats = model.backbone(images.tensors)
    _rescale(model.rpn.head.cls_logits, torch.cat(
        [o.flatten() for o in model.rpn.head(list(feats.values()))[0]]))
    proposals, _ = model.rpn(images, feats)
    rh = model.roi_heads
    x = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
    _rescale(rh.box_predictor.cls_score, rh.box_predictor(x)[0])
  return model


def _rescale(layer: torch.nn.Module, logits: torch.Tensor) -> None:
  scale = LOGIT_STD / float(logits.std())
  layer.weight.mul_(scale)
  layer.bias.mul_(scale)


# ------------------------------------------------------------------------------ images


def load_images() -> list[tuple[str, np.ndarray]]:
  """(description, uint8 [H, W, 3] RGB) test images."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top
    coffee, rocket = skimage.data.coffee(), skimage.data.rocket()
    astronaut = skimage.data.astronaut()
    source = 'scikit-image'
  except ImportError:
    rng = np.random.default_rng(SEED)
    coffee, rocket, astronaut = (draw_image(rng, *hw) for hw in ((400, 600), (427, 640),
                                                                 (512, 512)))
    source = 'drawn'
  unchanged = np.asarray(Image.fromarray(coffee).resize((1056, 800), Image.BILINEAR))
  return [(f'{source} coffee 800x1056 (resize leaves it unchanged)', unchanged),
          (f'{source} rocket 427x640 (resized to 800x1199)', rocket),
          (f'{source} astronaut 512x512 (resized to 800x800)', astronaut)]


def draw_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3]: smooth background with filled rectangles and ellipses."""
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  img = rng.uniform(40, 200, 3) + 40 * np.stack(
      [np.sin(xx / w * 3 + p) * np.cos(yy / h * 2 + p) for p in rng.uniform(0, 6, 3)], -1)
  for _ in range(12):
    cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(10, h / 4), rng.uniform(
        10, w / 4)
    inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 if rng.random() < 0.5 else
              (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx))
    img[inside] = rng.uniform(0, 255, 3)
  return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def to_torch(img: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------ metrics


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), -1)
  union = area(a)[:, None] + area(b)[None] - inter
  iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
  # Degenerate (zero-area) boxes match only an identical box.
  same = np.all(np.abs(a[:, None] - b[None]) < 1e-3, -1)
  return np.where(same, 1.0, iou)


def match(ref_boxes, ref_labels, boxes, labels, iou_thresh=MATCH_IOU):
  """Greedy one-to-one matching of reference detections (in their order) to ours with the
  same label and IoU >= iou_thresh. Returns [(ref index, our index)]."""
  iou = iou_matrix(ref_boxes, boxes)
  iou[np.asarray(ref_labels)[:, None] != np.asarray(labels)[None]] = -1
  taken, pairs = set(), []
  for i in range(len(ref_boxes)):
    order = [j for j in np.argsort(-iou[i]) if j not in taken and iou[i, j] >= iou_thresh]
    if order:
      taken.add(order[0])
      pairs.append((i, order[0]))
  return pairs


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclasses.dataclass
class Report:
  lines: list

  def __call__(self, text=''):
    print(text, flush=True)
    self.lines.append(text)


# ------------------------------------------------------------------------------ our side


def our_config(padded_hw):
  """The torchvision preset (grid-derived anchor strides included) at torchvision's padding."""
  c = torchvision_maskrcnn_r50_fpn.get_config()
  c.input.buckets = (tuple(padded_hw),)
  return c


def _body(config, variables, images):
  """Our ResNet body alone: [C2, C3, C4, C5]."""
  sub = {c: variables[c]['backbone']['body'] for c in ('params', 'constants')}
  return resnet_lib.ResNet.from_config(config).apply(sub, images)


def _run_steps(model, variables, images, image_size):
  """Features, proposals and detections: `MaskRCNN.__call__` with its sown intermediates."""
  det, state = model.apply(variables, images, image_size, mutable=['intermediates'])
  inter = state['intermediates']
  return inter['features'], inter['proposals'], inter['proposal_valid'], det


def model_level(report, tv_model, variables, name, img):
  """Both models on torchvision's preprocessed tensor."""
  with torch.no_grad():
    il, _ = tv_model.transform([to_torch(img)])
    t0 = time.time()
    body = list(tv_model.backbone.body(il.tensors).values())
    feats = tv_model.backbone(il.tensors)
    proposals, _ = tv_model.rpn(il, feats)
    dets, _ = tv_model.roi_heads(feats, proposals, il.image_sizes)
    tv_time = time.time() - t0
  padded = tuple(il.tensors.shape[-2:])
  config = our_config(padded)
  model = mask_rcnn.build_model(config)
  run = jax.jit(lambda v, x, s: _run_steps(model, v, x, s))
  # (p/255 - mean/255) / (std/255) is our (p - mean) / std: the same normalised numbers.
  x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
  size = jnp.asarray(np.array(il.image_sizes, np.int32))
  t0 = time.time()
  out = jax.device_get(run(variables, x, size))
  first = time.time() - t0
  t0 = time.time()
  out = jax.device_get(run(variables, x, size))
  ours_time = time.time() - t0
  our_body = jax.device_get(jax.jit(lambda v, x: _body(config, v, x))(variables, x))
  our_feats, our_props, our_valid, det = out
  report(f'  model level, padded {padded[0]}x{padded[1]}, content {tuple(il.image_sizes[0])}'
         f'  (torchvision {tv_time:.1f}s; ours {ours_time:.1f}s after a {first:.0f}s '
         'compile)')
  for level, f in enumerate(body):
    ref = f.permute(0, 2, 3, 1).numpy()
    diff = np.abs(our_body[level] - ref).max()
    report(f'    ResNet C{level + 2}: max |diff| {diff:.2e} (max |value| {np.abs(ref).max():.2f}, '
           f'relative {diff / np.abs(ref).max():.1e})')
  for level, (k, f) in enumerate(feats.items()):
    ref = f.permute(0, 2, 3, 1).numpy()
    diff = np.abs(our_feats[level] - ref).max()
    report(f'    FPN P{level + 2}: max |diff| {diff:.2e} (max |value| {np.abs(ref).max():.2f}, '
           f'relative {diff / np.abs(ref).max():.1e})')
  ref_p = proposals[0].numpy()
  ours_p = our_props[0][our_valid[0]]
  matched = (iou_matrix(ref_p, ours_p).max(1) > MATCH_IOU).mean() if len(ours_p) else 0.0
  report(f'    RPN proposals: torchvision {len(ref_p)}, ours {len(ours_p)}; '
         f'{100 * matched:.2f}% of torchvision\'s matched at IoU > {MATCH_IOU}')
  ref_b, ref_s = dets[0]['boxes'].numpy(), dets[0]['scores'].numpy()
  ref_l, ref_m = dets[0]['labels'].numpy(), dets[0]['masks'][:, 0].numpy()
  v = det['valid'][0]
  boxes, scores, labels, masks = (det['boxes'][0][v], det['scores'][0][v], det['labels'][0][v],
                                  det['masks'][0][v])
  pairs = match(ref_b, ref_l, boxes, labels)
  report(f'    detections: torchvision {len(ref_b)}, ours {len(boxes)}; '
         f'{100 * len(pairs) / max(len(ref_b), 1):.2f}% matched (same label, IoU >= '
         f'{MATCH_IOU})')
  if pairs:
    i, j = map(np.array, zip(*pairs))
    report(f'    matched: max |score diff| {np.abs(ref_s[i] - scores[j]).max():.2e}; max |box '
           f'diff| {np.abs(ref_b[i] - boxes[j]).max():.2e} px; 28x28 mask probs max |diff| '
           f'{np.abs(ref_m[i] - masks[j]).max():.2e}; mean 28x28 mask IoU '
           f'{np.mean([mask_iou(ref_m[a] > 0.5, masks[b] > 0.5) for a, b in pairs]):.4f}')


def pipeline_level(report, tv_model, variables, name, img):
  """uint8 image through Predictor vs torchvision's model(images) in the original frame."""
  with torch.no_grad():
    il, _ = tv_model.transform([to_torch(img)])
    ref = tv_model([to_torch(img)])[0]
  padded = tuple(il.tensors.shape[-2:])
  pred = predictor_lib.Predictor(our_config(padded), variables)
  out = pred(img)
  ref_b, ref_s, ref_l = ref['boxes'].numpy(), ref['scores'].numpy(), ref['labels'].numpy()
  ref_m = ref['masks'][:, 0].numpy() > 0.5
  boxes, scores, labels = (np.asarray(out[k]) for k in ('boxes', 'scores', 'labels'))
  masks = np.asarray(out['masks']) if 'masks' in out else None
  pairs = match(ref_b, ref_l, boxes, labels)
  report(f'  pipeline level (Predictor on the uint8 image, original frame '
         f'{img.shape[0]}x{img.shape[1]}): torchvision {len(ref_b)}, ours {len(boxes)}; '
         f'{100 * len(pairs) / max(len(ref_b), 1):.2f}% matched (same label, IoU >= {MATCH_IOU})')
  if pairs:
    i, j = map(np.array, zip(*pairs))
    line = (f'    matched: max |score diff| {np.abs(ref_s[i] - scores[j]).max():.2e}; '
            f'max |box diff| {np.abs(ref_b[i] - boxes[j]).max():.2e} px')
    if masks is not None:
      ious = [mask_iou(ref_m[a], masks[b] > 0.5 if masks.dtype != bool else masks[b])
              for a, b in pairs]
      line += (f'; full-resolution mask IoU mean {np.mean(ious):.4f}, min {np.min(ious):.4f}')
    report(line)
  return dict(matched=len(pairs) / max(len(ref_b), 1))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__),
                                                    'torchvision_parity.txt'))
  parser.add_argument('--no_pipeline', action='store_true', help='skip the Predictor level')
  parser.add_argument('--max_images', type=int, default=3)
  args = parser.parse_args(argv)
  torch.set_num_threads(2)
  report = Report([])
  images = load_images()[:args.max_images]
  tv_model = build_torchvision([to_torch(img) for _, img in images])
  state_dict = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  variables = weights.from_torchvision(state_dict, torchvision_maskrcnn_r50_fpn.get_config(),
                                       source='random torchvision maskrcnn_resnet50_fpn')
  report(f'torchvision {torchvision.__version__} maskrcnn_resnet50_fpn (random init, calibrated '
         f'BN, logits std {LOGIT_STD}) vs maskrcnn_jax (jax {jax.__version__}, '
         f'{jax.devices()[0].platform}), configs/torchvision_maskrcnn_r50_fpn.py')
  for name, img in images:
    report(f'\n{name}')
    model_level(report, tv_model, variables, name, img)
    if not args.no_pipeline:
      pipeline_level(report, tv_model, variables, name, img)
  with open(args.out, 'w') as f:
    f.write('\n'.join(report.lines) + '\n')
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
