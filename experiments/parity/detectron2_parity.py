"""Parity of converted detectron2 Mask R-CNN R50/R101-FPN models with detectron2 itself.

    python experiments/parity/detectron2_parity.py [--model r50|r101|both] \
        [--out experiments/parity/detectron2_parity.txt]

Needs detectron2 (built from source against torch), jax and this package in one environment.
Downloads nothing: detectron2's `mask_rcnn_R_{50,101}_FPN_*` is built from the model-zoo config
with random weights, then made non-trivial so that a conversion bug cannot hide:

* every FrozenBN gets statistics calibrated on the test images (O(1) activations at every
  depth), times random factors, plus random affine terms, so no norm is the identity;
* the RPN objectness, the box classifier and the mask predictor are rescaled so that their
  logits have standard deviation 2 (detectron2 initialises the mask predictor with std 1e-3,
  which leaves every mask probability at 0.5 +- 1e-3, and scores every class about 1/81).

Each model runs twice: with both poolers at sampling ratio 2 (`POOLER_SAMPLING_RATIO = 2`) on
both sides, and with detectron2's own adaptive ratio 0 (ceil(RoI side / bins) samples per bin,
per RoI) against ours at the fixed 2 and at our adaptive ratio 0 (`model.roi.sampling_ratio = 0`,
a masked grid exact up to `max_sampling_ratio`; the preset ships the cap 4). Levels per image:

  model:    detectron2's own preprocessed tensor (BGR, Caffe means, padded to a multiple of 32)
            fed to both models: ResNet and FPN features, RPN proposals, detections in the resized
            frame, 28x28 mask probabilities, and both pastes (`paste_masks_in_image` vs
            `ops.masks.paste_masks_detectron2`) of each side's own masks at the resized size;
  pipeline: the uint8 image through `DefaultPredictor` vs our `Predictor` with the preset
            (`input.resize='detectron2'`: its rounding and PIL's uint8 bilinear resize), in the
            original frame; where detectron2 resizes, also ours with torchvision's resize, to
            show what that deviation would move.
  ratio:    the adaptive grid detectron2 uses per RoI (box head on the proposals, mask head on the
            detections).

Reading the output: with random weights a detector's top-100 is fragile (near-tied scores), so
small input differences reorder it; that is why the resize must match exactly. The preset ranks
RPN proposals by logit as detectron2 does (`model.rpn.rank_by='logit'`); "sigmoid ties" counts
the proposals an order by float32 probability (torchvision's) would have left tied.

Images (scikit-image): coffee resized to 800x1056 (detectron2's resize leaves it unchanged),
rocket 427x640 (-> 800x1199), astronaut 512x512 (-> 800x800), chelsea 300x451 (-> 800x1203 in
detectron2, 800x1202 ours: the rounding differs) and coffee enlarged to 1000x1500 (-> 800x1200,
a shrink, which PIL antialiases).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..'))
sys.path.insert(0, HERE)
# pylint: disable=g-import-not-at-top,wrong-import-position
import detectron2
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.layers import FrozenBatchNorm2d
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import build_model

import torchvision_parity as tvp  # matching, IoU and report helpers
from configs import detectron2_maskrcnn_r101_fpn
from configs import detectron2_maskrcnn_r50_fpn
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import weights
from maskrcnn_jax.data import transforms
from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.ops import roi_levels

LOGIT_STD = 2.0
MATCH_IOU = tvp.MATCH_IOU
SEED = 0
MODELS = {
    'r50': ('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml', detectron2_maskrcnn_r50_fpn),
    'r101': ('COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml',
             detectron2_maskrcnn_r101_fpn),
}


NOTES = """
"sigmoid ties": proposals whose float32 sigmoids tie (spacing 6e-8 near 1): torchvision's order
by probability would be arbitrary among them; the preset ranks by logit, as detectron2 does.
"d2 ratio 0": detectron2's adaptive sampling (ceil(RoI side / bins) per RoI and axis). "ours at
ratio 0 capped at N": our sampling_ratio=0, a masked N x N grid per bin, equal to the adaptive
one for every RoI that needs <= N (the preset's N is 4). RoIAlign times are best-of-5 on a
shared 2-core CPU.
"""


# ------------------------------------------------------------------------------ detectron2 model


def d2_cfg(name: str, ratio: int):
  cfg = get_cfg()
  cfg.merge_from_file(model_zoo.get_config_file(MODELS[name][0]))
  cfg.MODEL.DEVICE = 'cpu'
  cfg.MODEL.WEIGHTS = ''
  cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = ratio
  cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = ratio
  return cfg


def set_sampling_ratio(model, ratio: int) -> None:
  """Both poolers' RoIAligns (the attribute their forward reads)."""
  for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
    for level in pooler.level_poolers:
      level.sampling_ratio = ratio


def preprocess(model, img_rgb: np.ndarray):
  """detectron2's ImageList of one uint8 RGB image (no resize: the caller resized it)."""
  x = torch.as_tensor(np.ascontiguousarray(img_rgb[:, :, ::-1]).astype('float32')).permute(2, 0, 1)
  return model.preprocess_image([{'image': x}])


def build_detectron2(name: str, images: list) -> torch.nn.Module:
  """Random-init model with calibrated, randomised FrozenBN and spread logits (ratio 2)."""
  torch.manual_seed(SEED)
  model = build_model(d2_cfg(name, 2)).eval()
  il = calibrate_norms(model, images)
  with torch.no_grad():
    feats = model.backbone(il.tensor)
    rpn = model.proposal_generator
    logits, _ = rpn.rpn_head([feats[f] for f in rpn.in_features])
    _rescale(rpn.rpn_head.objectness_logits, torch.cat([o.flatten() for o in logits]))
    proposals, _ = rpn(il, feats)
    rh = model.roi_heads
    in_feats = [feats[f] for f in rh.box_in_features]
    x = rh.box_head(rh.box_pooler(in_feats, [p.proposal_boxes for p in proposals]))
    _rescale(rh.box_predictor.cls_score, rh.box_predictor(x)[0])
    boxes = [p.proposal_boxes[:200] for p in proposals]
    mask_x = rh.mask_head.layers(rh.mask_pooler([feats[f] for f in rh.mask_in_features], boxes))
    _rescale(rh.mask_head.predictor, mask_x)
  return model


def calibrate_norms(model: torch.nn.Module, images: list):
  """Every FrozenBN of `model` calibrated on the detectron2-resized `images` (one padded
  batch, each norm on its own input), times random factors, plus random affine terms; returns
  that batch's ImageList."""
  gen = torch.Generator().manual_seed(SEED)
  norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

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
    # One padded batch of the resized images: each BN calibrates on its input, then applies it.
    il = model.preprocess_image([{'image': torch.as_tensor(np.ascontiguousarray(
        d2_resize(img)[:, :, ::-1]).astype('float32')).permute(2, 0, 1)} for img in images])
    model.backbone(il.tensor)
  for h in hooks:
    h.remove()
  return il


def _rescale(layer: torch.nn.Module, logits: torch.Tensor) -> None:
  scale = LOGIT_STD / float(logits.std())
  layer.weight.mul_(scale)
  layer.bias.mul_(scale)


def d2_resize(img: np.ndarray) -> np.ndarray:
  """DefaultPredictor's ResizeShortestEdge(800, 1333) of a uint8 image."""
  from detectron2.data import transforms as T  # pylint: disable=g-import-not-at-top
  return T.ResizeShortestEdge([800, 800], 1333).get_transform(img).apply_image(img)


# ------------------------------------------------------------------------------ images


def load_images() -> list[tuple[str, np.ndarray]]:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  coffee = Image.fromarray(skimage.data.coffee())
  unchanged = np.asarray(coffee.resize((1056, 800), Image.BILINEAR))
  large = np.asarray(coffee.resize((1500, 1000), Image.BICUBIC))
  return [('coffee 800x1056 (resize leaves it unchanged)', unchanged),
          ('rocket 427x640 (resized to 800x1199)', skimage.data.rocket()),
          ('astronaut 512x512 (resized to 800x800)', skimage.data.astronaut()),
          ('chelsea 300x451 (resized to 800x1203 by detectron2, 800x1202 by us)',
           skimage.data.chelsea()),
          ('coffee 1000x1500 (shrunk to 800x1200; PIL antialiases)', large)]


# ------------------------------------------------------------------------------ our side


def our_config(name: str, padded_hw, ratio: int = 2, cap: int = 4):
  """The preset with one bucket and the pooler sampling ratio `ratio` (0: adaptive, capped at
  `cap`; the preset itself ships 0 capped at 4)."""
  c = MODELS[name][1].get_config()
  c.input.buckets = (tuple(int(v) for v in padded_hw),)
  c.model.roi.sampling_ratio = ratio
  c.model.roi.max_sampling_ratio = cap
  return c


def grid_sizes(boxes: np.ndarray, out: int, canonical=224.0, lo=2, hi=5):
  """detectron2's adaptive grid (ceil(side / out), aligned RoIs) per box and axis, from its own
  level assignment (floor(4 + log2(sqrt(area) / 224 + 1e-8)))."""
  b = np.asarray(boxes, np.float64)
  side = np.sqrt(np.clip((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0, None))
  level = np.clip(np.floor(4 + np.log2(side / canonical + 1e-8)), lo, hi)
  scale = 2.0 ** -level
  gy = np.ceil((b[:, 3] - b[:, 1]) * scale / out)
  gx = np.ceil((b[:, 2] - b[:, 0]) * scale / out)
  return np.maximum(gy, 1), np.maximum(gx, 1)


# ------------------------------------------------------------------------------ levels


def _run_steps(model, variables, images, image_size):
  det, state = model.apply(variables, images, image_size, mutable=['intermediates'])
  inter = state['intermediates']
  return inter['features'], inter['proposals'], inter['proposal_valid'], det


def _body(config, variables, images):
  from maskrcnn_jax.modeling import resnet as resnet_lib  # pylint: disable=g-import-not-at-top
  sub = {c: variables[c]['backbone']['body'] for c in ('params', 'constants')}
  return resnet_lib.ResNet.from_config(config).apply(sub, images)


def _paste_d2(masks: np.ndarray, boxes: np.ndarray, hw) -> np.ndarray:
  if not len(masks):
    return np.zeros((0,) + tuple(hw), bool)
  return paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), tuple(hw)).numpy()


def _stats(report, ref_s, ref_b, scores, boxes, pairs, n_ref, indent='    '):
  """Matched share, score and box differences (max and 99th percentile)."""
  report(f'{indent}detections: detectron2 {n_ref}, ours {len(boxes)}; '
         f'{100 * len(pairs) / max(n_ref, 1):.2f}% matched (same label, IoU >= {MATCH_IOU})')
  if not pairs:
    return None
  i, j = map(np.array, zip(*pairs))
  ds = np.abs(ref_s[i] - scores[j])
  db = np.abs(ref_b[i] - boxes[j]).max(1)
  report(f'{indent}matched: |score diff| max {ds.max():.2e}, p99 {np.percentile(ds, 99):.2e}, '
         f'mean {ds.mean():.2e}; |box diff| max {db.max():.2e} px, p99 '
         f'{np.percentile(db, 99):.2e} px')
  return i, j, ds, db


def ours_on(name, variables, il):
  """Our model on detectron2's ImageList: (config, inputs, outputs, seconds with compile)."""
  padded = tuple(il.tensor.shape[-2:])
  hw = tuple(il.image_sizes[0])
  config = our_config(name, padded)
  model = mask_rcnn.build_model(config)
  x = jnp.asarray(il.tensor.permute(0, 2, 3, 1).numpy())
  size = jnp.asarray(np.array([hw], np.int32))
  out, seconds = _timed(jax.jit(lambda v, x, s: _run_steps(model, v, x, s)), variables, x, size)
  return config, x, size, out, seconds


def _timed(fn, *args):
  """(outputs, seconds of a second call, i.e. without the compile)."""
  jax.block_until_ready(fn(*args))
  t0 = time.time()
  out = jax.device_get(fn(*args))
  return out, time.time() - t0


def model_level(report, d2_model, name, variables, img, summary, cache, capped=()):
  """Both models on detectron2's preprocessed tensor of the detectron2-resized image (ours does
  not depend on detectron2's sampling ratio: computed once per image, in `cache`)."""
  resized = d2_resize(img)
  with torch.no_grad():
    il = preprocess(d2_model, resized)
    t0 = time.time()
    body = d2_model.backbone.bottom_up(il.tensor)
    feats = d2_model.backbone(il.tensor)
    proposals, _ = d2_model.proposal_generator(il, feats, None)
    dets, _ = d2_model.roi_heads(il, feats, proposals, None)
    d2_time = time.time() - t0
  padded = tuple(il.tensor.shape[-2:])
  hw = tuple(il.image_sizes[0])
  if 'model' not in cache:
    cache['model'] = ours_on(name, variables, il)
  config, x, size, out, ours_time = cache['model']
  feats_ours, props_ours, valid_ours, det = out
  report(f'  model level, padded {padded[0]}x{padded[1]}, content {hw} (detectron2 '
         f'{d2_time:.1f}s; ours {ours_time:.1f}s after the compile)')
  if summary is not None:  # features once per image and model (they do not depend on the ratio)
    our_body = jax.device_get(jax.jit(lambda v, x: _body(config, v, x))(variables, x))
    rel = []
    for level, k in enumerate(('res2', 'res3', 'res4', 'res5')):
      ref = body[k].permute(0, 2, 3, 1).numpy()
      diff = np.abs(our_body[level] - ref).max()
      rel.append(diff / np.abs(ref).max())
      report(f'    ResNet {k}: max |diff| {diff:.2e} (max |value| {np.abs(ref).max():.2f}, '
             f'relative {rel[-1]:.1e})')
    for level, k in enumerate(('p2', 'p3', 'p4', 'p5', 'p6')):
      ref = feats[k].permute(0, 2, 3, 1).numpy()
      diff = np.abs(feats_ours[level] - ref).max()
      rel.append(diff / np.abs(ref).max())
      report(f'    FPN {k}: max |diff| {diff:.2e} (max |value| {np.abs(ref).max():.2f}, relative '
             f'{rel[-1]:.1e})')
    ref_p = proposals[0].proposal_boxes.tensor.numpy()
    ours_p = props_ours[0][valid_ours[0]]
    matched = (tvp.iou_matrix(ref_p, ours_p).max(1) > MATCH_IOU).mean() if len(ours_p) else 0.0
    report(f'    RPN proposals: detectron2 {len(ref_p)}, ours {len(ours_p)}; {100 * matched:.2f}% '
           f'of detectron2\'s matched at IoU > {MATCH_IOU}')
    # detectron2 ranks proposals by logit, our RPN by float32 sigmoid: equal logits aside, the
    # orders differ only where sigmoids tie, i.e. for large logits.
    logits = proposals[0].objectness_logits.numpy()
    sig = torch.sigmoid(proposals[0].objectness_logits).numpy()
    tied = len(sig) - len(np.unique(sig)) - (len(logits) - len(np.unique(logits)))
    report(f'    RPN ranking: objectness logits {logits.min():.1f}..{logits.max():.1f}; '
           f'{tied} of detectron2\'s proposals tie with another in float32 sigmoid (not in '
           f'logit; ranked by logit on both sides)')
    gy, gx = grid_sizes(ref_p, 7)
    gmy, gmx = grid_sizes(dets[0].pred_boxes.tensor.numpy(), 14)
    g, gm = np.maximum(gy, gx), np.maximum(gmy, gmx)
    report(f'    adaptive grid (ratio 0) per RoI, max over axes: box head on the proposals '
           f'{_hist(g)}; mask head on the detections {_hist(gm)}')
    summary.update(feature_rel=max(rel), proposals=matched, tied=tied)
  inst = dets[0]
  ref_b = inst.pred_boxes.tensor.numpy()
  ref_s = inst.scores.numpy()
  ref_l = inst.pred_classes.numpy() + 1  # detectron2 class c is our label c + 1
  ref_m = inst.pred_masks[:, 0].numpy()
  v = det['valid'][0]
  boxes, scores, labels, masks = (det['boxes'][0][v], det['scores'][0][v], det['labels'][0][v],
                                  det['masks'][0][v])
  pairs = tvp.match(ref_b, ref_l, boxes, labels)
  res = _stats(report, ref_s, ref_b, scores, boxes, pairs, len(ref_b))
  row = dict(n=len(ref_b), matched=len(pairs) / max(len(ref_b), 1))
  ref_full = _paste_d2(ref_m, ref_b, hw)  # detectron2's own paste, shared by every comparison
  if res is not None:
    i, j, ds, db = res
    ours_full = np.asarray(mask_ops.paste_and_threshold(masks, boxes, hw[0], hw[1], 0.5,
                                                        'detectron2'))
    m28 = [tvp.mask_iou(ref_m[a] >= 0.5, masks[b] >= 0.5) for a, b in pairs]
    full = [tvp.mask_iou(ref_full[a], ours_full[b]) for a, b in pairs]
    # The paste alone: ours applied to detectron2's own masks and boxes.
    same_in = np.asarray(mask_ops.paste_and_threshold(ref_m, ref_b, hw[0], hw[1], 0.5,
                                                      'detectron2'))
    paste_only = [tvp.mask_iou(a, b) for a, b in zip(ref_full, same_in)]
    pix = np.mean([np.mean(a != b) for a, b in zip(ref_full, same_in)])
    report(f'    28x28 mask probs max |diff| {np.abs(ref_m[i] - masks[j]).max():.2e}; mask IoU '
           f'mean 28x28 {np.mean(m28):.4f}, full resolution {np.mean(full):.4f} (min '
           f'{np.min(full):.4f}); our paste of detectron2\'s own masks: IoU mean '
           f'{np.mean(paste_only):.6f}, min {np.min(paste_only):.6f}, pixels differing {pix:.1e}')
    row.update(score=ds.max(), box=db.max(), mask=np.mean(full), paste=np.min(paste_only))
  for cap in capped:
    # The package's adaptive ratio (model.roi.sampling_ratio = 0) capped at `cap`.
    config_c = our_config(name, padded, ratio=0, cap=cap)
    model_c = mask_rcnn.build_model(config_c)
    out_c = jax.device_get(jax.jit(lambda v, x, s, m=model_c: _run_steps(m, v, x, s))(
        variables, x, size))[3]
    pool_times = _time_pooling(feats_ours, props_ours[0], det['boxes'][0], 0, cap)
    if 'pool_ratio2' not in cache:
      cache['pool_ratio2'] = _time_pooling(feats_ours, props_ours[0], det['boxes'][0], 2)
    base = cache['pool_ratio2']
    vc = out_c['valid'][0]
    pc = tvp.match(ref_b, ref_l, out_c['boxes'][0][vc], out_c['labels'][0][vc])
    report(f'    ours at sampling_ratio 0, max_sampling_ratio {cap} ({4 * cap * cap} taps a bin; '
           f'RoIAlign of the 1000 proposals at 7x7 {1e3 * pool_times[0]:.0f} ms vs '
           f'{1e3 * base[0]:.0f} ms at ratio 2, of the detections at 14x14 '
           f'{1e3 * pool_times[1]:.0f} ms vs {1e3 * base[1]:.0f} ms, best of 5 on this CPU):')
    rc = _stats(report, ref_s, ref_b, out_c['scores'][0][vc], out_c['boxes'][0][vc], pc,
                len(ref_b), indent='      ')
    if rc is not None:
      ours_full = np.asarray(mask_ops.paste_and_threshold(
          out_c['masks'][0][vc], out_c['boxes'][0][vc], hw[0], hw[1], 0.5, 'detectron2'))
      full = [tvp.mask_iou(ref_full[a], ours_full[b]) for a, b in pc]
      report(f'      full-resolution mask IoU mean {np.mean(full):.4f}, min {np.min(full):.4f}')
      row[f'capped{cap}'] = (len(pc) / max(len(ref_b), 1), rc[2].max(), rc[3].max(),
                             pool_times[0], base[0], np.mean(full))
  return row


def _time_pooling(feats, proposals, detections, ratio: int, cap: int = 4, repeats: int = 5):
  """Best-of-`repeats` seconds of the multilevel RoIAlign (P2..P5) of the box head (7x7) on
  `proposals` and of the mask head (14x14) on `detections`, one image."""
  levels = [jnp.asarray(f[0]) for f in feats[:4]]
  out = []
  for boxes, size in ((proposals, 7), (detections, 14)):
    fn = jax.jit(lambda f, b, size=size: roi_levels.multilevel_roi_align(
        f, b, output_size=size, sampling_ratio=ratio, aligned=True, canonical_scale=224.0,
        max_sampling_ratio=cap))
    b = jnp.asarray(boxes)
    jax.block_until_ready(fn(levels, b))
    best = np.inf
    for _ in range(repeats):
      t0 = time.time()
      jax.block_until_ready(fn(levels, b))
      best = min(best, time.time() - t0)
    out.append(best)
  return out


def _hist(g: np.ndarray) -> str:
  g = np.asarray(g, int)
  parts = [f'{k}: {100 * np.mean(g == k):.0f}%' for k in range(1, 5) if np.mean(g == k) >= 0.005]
  return (f'{", ".join(parts)}, > 4: {100 * np.mean(g > 4):.1f}% (max {g.max()})' if len(g)
          else 'none')


def pipeline_level(report, d2_pred, name, variables, img, cache, ratio: int):
  """DefaultPredictor on the BGR uint8 image vs our Predictor on the RGB one, with the preset's
  `input.resize='detectron2'` and our sampling ratio `ratio` (0: the preset's capped adaptive
  grid). Where detectron2 resizes the image, also ours with torchvision's resize: what that
  deviation would move."""
  with torch.no_grad():
    ref = d2_pred(np.ascontiguousarray(img[:, :, ::-1]))['instances']
  resized = d2_resize(img)
  ref_b, ref_s = ref.pred_boxes.tensor.numpy(), ref.scores.numpy()
  ref_l, ref_m = ref.pred_classes.numpy() + 1, ref.pred_masks.numpy()

  def ours(resize: str):
    key = ('pipeline', ratio, resize)
    if key not in cache:
      hw = transforms.resize_shape(img.shape[0], img.shape[1], 800, 1333, resize)
      c = our_config(name, [int(np.ceil(v / 32) * 32) for v in hw], ratio=ratio)
      c.input.resize = resize
      cache[key] = hw, predictor_lib.Predictor(c, variables)(img)
    return cache[key]

  ours_hw, out = ours('detectron2')
  boxes, scores, labels, masks = (np.asarray(out[k]) for k in ('boxes', 'scores', 'labels',
                                                               'masks'))
  pairs = tvp.match(ref_b, ref_l, boxes, labels)
  report(f'  pipeline level (DefaultPredictor vs Predictor on the uint8 image, original frame '
         f'{img.shape[0]}x{img.shape[1]}; resized {resized.shape[0]}x{resized.shape[1]} by '
         f'detectron2, {ours_hw[0]}x{ours_hw[1]} by us with input.resize=detectron2; our ratio '
         f'{ratio}{" capped at 4" if ratio == 0 else ""}):')
  res = _stats(report, ref_s, ref_b, scores, boxes, pairs, len(ref_b))
  row = dict(n=len(ref_b), matched=len(pairs) / max(len(ref_b), 1))
  if res is not None:
    i, j, ds, db = res
    ious = [tvp.mask_iou(ref_m[a], masks[b]) for a, b in pairs]
    report(f'    full-resolution mask IoU mean {np.mean(ious):.4f}, min {np.min(ious):.4f}')
    row.update(score=ds.max(), box=db.max(), mask=np.mean(ious))
  if tuple(resized.shape[:2]) != tuple(img.shape[:2]) and ratio == 2:
    # The deviation input.resize='detectron2' removes: torchvision's float, floored resize.
    tv_px = transforms.resize_image(img, *resized.shape[:2])
    dpx = np.abs(tv_px - resized.astype(np.float32))
    tv_hw, o = ours('torchvision')
    report(f'    with input.resize=torchvision instead ({tv_hw[0]}x{tv_hw[1]}; at detectron2\'s '
           f'size its pixels differ from PIL\'s uint8 resize by mean {dpx.mean():.2f}, max '
           f'{dpx.max():.1f} grey levels):')
    p2 = tvp.match(ref_b, ref_l, o['boxes'], o['labels'])
    _stats(report, ref_s, ref_b, o['scores'], o['boxes'], p2, len(ref_b), indent='      ')
    anyl = tvp.match(ref_b, np.zeros_like(ref_l), o['boxes'], np.zeros_like(o['labels']),
                     iou_thresh=0.5)
    if anyl:
      a, b = map(np.array, zip(*anyl))
      iou = np.array([tvp.iou_matrix(ref_b[u], o['boxes'][v])[0, 0] for u, v in anyl])
      dbox = np.abs(ref_b[a] - o['boxes'][b]).max(1)
      report(f'      boxes it moves (any label, greedy IoU >= 0.5): '
             f'{100 * len(anyl) / max(len(ref_b), 1):.0f}% paired; their IoU median '
             f'{np.median(iou):.3f}, |box diff| median {np.median(dbox):.2f} px, p90 '
             f'{np.percentile(dbox, 90):.2f} px; same label '
             f'{100 * np.mean(ref_l[a] == o["labels"][b]):.0f}%')
    row.update(tv_matched=len(p2) / max(len(ref_b), 1))
  return row


def run_model(report, name, images, args):
  d2_model = build_detectron2(name, [img for _, img in images])
  sd = {k: v.numpy() for k, v in d2_model.state_dict().items()}
  preset = MODELS[name][1]
  variables = weights.from_detectron2(sd, preset.get_config(),
                                      source=f'random detectron2 {MODELS[name][0]}')
  report(f'\n================ {MODELS[name][0]} (random init, calibrated FrozenBN, logits std '
         f'{LOGIT_STD}) vs configs/{preset.__name__.split(".")[-1]}.py')
  d2_pred = DefaultPredictor(d2_cfg(name, 2))
  d2_pred.model = d2_model  # the poolers' ratio is switched on this model
  table = []
  for title, img in images:
    report(f'\n{title}')
    cache = {}
    for ratio in (2, 0):
      set_sampling_ratio(d2_model, ratio)
      report(f' detectron2 POOLER_SAMPLING_RATIO={ratio} (model level: ours 2'
             f'{", and 0 capped at " + "/".join(map(str, args.capped)) if ratio == 0 else ""}; '
             f'pipeline level: ours {ratio})')
      summary = {} if ratio == 2 else None
      m = model_level(report, d2_model, name, variables, img, summary, cache,
                      capped=args.capped if ratio == 0 else ())
      p = (pipeline_level(report, d2_pred, name, variables, img, cache, ratio)
           if args.pipeline else {})
      table.append((title.split(' (')[0], ratio, summary, m, p))
  set_sampling_ratio(d2_model, 2)
  return table


def write_table(report, name, table):
  report(f'\nsummary {name}: image | d2 ratio | features rel | proposals | model (ours at ratio '
         '2): matched, max score diff, max box diff, mask IoU full-res | pipeline (ours at the d2 '
         'ratio, input.resize=detectron2): matched, max score diff, mask IoU')
  for title, ratio, summary, m, p in table:
    f = (f'{summary["feature_rel"]:.1e} | {100 * summary["proposals"]:.1f}% ({summary["tied"]} '
         'sigmoid ties)' if summary else '  | ')
    mm = (f'{100 * m["matched"]:.1f}% of {m["n"]}, {m.get("score", np.nan):.1e}, '
          f'{m.get("box", np.nan):.1e} px, {m.get("mask", np.nan):.4f}')
    pp = (f'{100 * p["matched"]:.1f}% of {p["n"]}, {p.get("score", np.nan):.1e}, '
          f'{p.get("mask", np.nan):.4f}' if p else '-')
    if 'tv_matched' in p:
      pp += f' (with torchvision\'s resize: {100 * p["tv_matched"]:.1f}% matched)'

    report(f'  {title} | {ratio} | {f} | {mm} | {pp}')
    for k in sorted(k for k in m if k.startswith('capped')):
      matched, score, box, sec, base, miou = m[k]
      report(f'    ours at ratio 0 capped at {k[6:]}: {100 * matched:.1f}% matched, max score diff '
             f'{score:.1e}, max box diff {box:.1e} px, mask IoU {miou:.4f}; box RoIAlign '
             f'{1e3 * sec:.0f} ms vs {1e3 * base:.0f} ms at ratio 2')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(HERE, 'detectron2_parity.txt'))
  parser.add_argument('--model', default='both', choices=('r50', 'r101', 'both'))
  parser.add_argument('--max_images', type=int, default=5)
  parser.add_argument('--no_pipeline', dest='pipeline', action='store_false')
  parser.add_argument('--capped', default='4,8',
                      help='max_sampling_ratio values of our adaptive ratio 0 to run against '
                           'detectron2 ratio 0 ("": none)')
  args = parser.parse_args(argv)
  args.capped = tuple(int(c) for c in args.capped.split(',') if c)
  torch.set_num_threads(2)
  report = tvp.Report([])
  report(f'detectron2 {detectron2.__version__} (torch {torch.__version__}) vs maskrcnn_jax '
         f'(jax {jax.__version__}, {jax.devices()[0].platform})')
  images = load_images()[:args.max_images]
  names = ('r50', 'r101') if args.model == 'both' else (args.model,)
  tables = {n: run_model(report, n, images, args) for n in names}
  for n, t in tables.items():
    write_table(report, n, t)
  report('\nnotes:\n' + '\n'.join('  ' + line for line in NOTES.strip().splitlines()))
  with open(args.out, 'w') as f:
    f.write('\n'.join(report.lines) + '\n')
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
