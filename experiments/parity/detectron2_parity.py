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

Each model runs twice: with both poolers at sampling ratio 2 (`POOLER_SAMPLING_RATIO = 2`, what
our static-shape RoIAlign does), and with detectron2's own adaptive ratio 0 (ceil(RoI side /
bins) samples per bin, per RoI) against our fixed 2. Levels reported per image:

  model:    detectron2's own preprocessed tensor (BGR, Caffe means, padded to a multiple of 32)
            fed to both models: ResNet and FPN features, RPN proposals, detections in the resized
            frame, 28x28 mask probabilities, and both pastes (`paste_masks_in_image` vs
            `ops.masks.paste_masks_detectron2`) of each side's own masks at the resized size;
  pipeline: the uint8 image through `DefaultPredictor` vs our `Predictor`, in the original frame.
            The resizes differ (detectron2 rounds the side and uses PIL's bilinear on uint8,
            antialiased when shrinking; ours floors and interpolates float pixels), so this level
            measures what that deviation moves.
  ratio:    the adaptive grid detectron2 uses per RoI (box head on the proposals, mask head on the
            detections) and, with `--capped`, our RoIAlign with a masked-sample grid exact up to
            a cap (a prototype patched in here, not part of the package).

Reading the output: with random weights a detector's top-100 is fragile, so the pipeline level
at sizes the resizes change matches almost nothing (0.2 grey levels of input difference reorder
the near-tied scores); the line "ours on detectron2's resized pixels" is the same pipeline minus
the resize, and matches. Where detectron2's proposals have logits above ~15, float32 sigmoids
tie and our RPN (which ranks by sigmoid) may keep a few other proposals ("sigmoid ties").

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
from maskrcnn_jax.ops import boxes as box_ops
from maskrcnn_jax.ops import masks as mask_ops
from maskrcnn_jax.ops import roi_align as roi_ops

LOGIT_STD = 2.0
MATCH_IOU = tvp.MATCH_IOU
SEED = 0
MODELS = {
    'r50': ('COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml', detectron2_maskrcnn_r50_fpn),
    'r101': ('COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml',
             detectron2_maskrcnn_r101_fpn),
}


NOTES = """
Random weights make a detector's top 100 fragile: at sizes the two resizes change, 0.2-0.35 grey
levels of input difference (PIL's uint8 output; up to 8.6 where PIL antialiases a shrink) reorder
the near-tied scores, so the pipeline level matches almost nothing there ("0.0%"); "ours on
detectron2's resized pixels" is the same pipeline minus the resize and matches as the model level
does. How far the resize moves trained detections needs trained weights (none offline here).
"sigmoid ties": detectron2 ranks RPN proposals by logit, our RPN by float32 sigmoid, which ties
for large logits (spacing 6e-8 near 1); where hundreds tie, NMS may keep a few other proposals
(R101 astronaut: 99.0% of proposals, 98% of detections; ranking by logit in
rpn.generate_proposals gives 100% / 100% there, checked separately).
"d2 ratio 0": detectron2's adaptive sampling (ceil(RoI side / bins) per RoI) against our fixed
ratio 2. "prototype cap N": a masked N x N sample grid per bin that equals the adaptive one for
every RoI needing <= N (patched into ops.roi_align._bin_taps by this script, not in the package);
its RoIAlign times are best-of-5 on a shared 2-core CPU.
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


def our_config(name: str, padded_hw):
  c = MODELS[name][1].get_config()
  c.input.buckets = (tuple(int(v) for v in padded_hw),)
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


# ------------------------------------------------------------------------------ capped adaptive


def capped_adaptive_bin_taps(cap: int):
  """A `_bin_taps` whose grid per RoI is detectron2's adaptive one, ceil(side / bins) per axis,
  clipped to `cap`: `cap x cap` sample slots per bin, those past the RoI's own grid weighted 0,
  the rest weighted 1 / (gy * gx). Exact (up to float) while no RoI needs more than `cap`."""
  original = roi_ops._bin_taps  # pylint: disable=protected-access

  def taps(boxes, scale, heights, widths, offsets, output_size, sampling_ratio, aligned):
    del sampling_ratio
    oh, ow = roi_ops._pair(output_size)  # pylint: disable=protected-access
    boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
    scale = jnp.asarray(scale, jnp.float32)
    off = 0.5 if aligned else 0.0

    def axis(lo, hi, size, pooled):
      start, end = lo * scale - off, hi * scale - off
      extent = end - start if aligned else jnp.maximum(end - start, 1.0)
      bin_size = box_ops.true_divide(extent, pooled)
      # torchvision: grid = ceil(side / bins) (0 for an empty RoI: no samples, output 0).
      g = jnp.minimum(jnp.ceil(bin_size), cap)
      gs = jnp.maximum(g, 1.0)[:, None, None]
      p = jnp.arange(pooled, dtype=jnp.float32)[None, :, None]
      i = jnp.arange(cap, dtype=jnp.float32)[None, None, :] + 0.5
      step, gs = jax.lax.optimization_barrier((i * bin_size[:, None, None], gs))
      pos = (start[:, None, None] + p * bin_size[:, None, None]) + step / gs
      used = (jnp.arange(cap)[None, None, :] < g[:, None, None])
      size = jnp.asarray(size)
      size_b = (size[:, None, None] if size.ndim else size)
      inside = (pos >= -1.0) & (pos <= size_b.astype(jnp.float32)) & jnp.isfinite(pos) & used
      pos = jnp.where(inside, jnp.maximum(pos, 0.0), 0.0)
      low = jnp.floor(pos).astype(jnp.int32)
      edge = low >= size_b - 1
      low = jnp.where(edge, size_b - 1, low)
      pos = jnp.where(edge, low.astype(jnp.float32), pos)
      high = jnp.where(edge, low, low + 1)
      frac = pos - low.astype(jnp.float32)
      return low, high, jnp.where(inside, 1 - frac, 0.0), jnp.where(inside, frac, 0.0), g

    yl, yh, wyl, wyh, gy = axis(boxes[:, 1], boxes[:, 3], heights, oh)
    xl, xh, wxl, wxh, gx = axis(boxes[:, 0], boxes[:, 2], widths, ow)
    n = boxes.shape[0]
    w_ = jnp.asarray(widths)
    row_stride = w_.reshape((-1,) + (1,) * 6) if w_.ndim else w_
    o_ = jnp.asarray(offsets)
    base = o_.reshape((-1,) + (1,) * 6) if o_.ndim else o_
    rows = jnp.stack([yl, yh], -1)[:, :, None, :, None, :, None]
    cols = jnp.stack([xl, xh], -1)[:, None, :, None, :, None, :]
    wy = jnp.stack([wyl, wyh], -1)[:, :, None, :, None, :, None]
    wx = jnp.stack([wxl, wxh], -1)[:, None, :, None, :, None, :]
    inv = (1.0 / jnp.maximum(gy * gx, 1.0)).reshape((-1,) + (1,) * 6)
    idx = (base + rows * row_stride + cols).reshape(n, oh, ow, 4 * cap * cap)
    wts = (wy * wx * inv).reshape(n, oh, ow, 4 * cap * cap)
    return idx, wts

  return original, taps


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
           f'logit){" (our RPN ranks by sigmoid: see the notes at the end)" if tied else ""}')
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
  if res is not None:
    i, j, ds, db = res
    ref_full = _paste_d2(ref_m, ref_b, hw)
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
    original, taps = capped_adaptive_bin_taps(cap)
    roi_ops._bin_taps = taps  # pylint: disable=protected-access
    try:
      # A ratio no other call uses: the jitted RoIAlign is traced afresh, with the patch.
      config_c = config.copy_and_resolve_references()
      config_c.model.roi.sampling_ratio = cap
      model_c = mask_rcnn.build_model(config_c)
      out_c = jax.device_get(jax.jit(lambda v, x, s, m=model_c: _run_steps(m, v, x, s))(
          variables, x, size))[3]
      pool_times = _time_pooling(feats_ours, props_ours[0], det['boxes'][0], cap)
    finally:
      roi_ops._bin_taps = original  # pylint: disable=protected-access
    if 'pool_ratio2' not in cache:
      cache['pool_ratio2'] = _time_pooling(feats_ours, props_ours[0], det['boxes'][0], 2)
    base = cache['pool_ratio2']
    vc = out_c['valid'][0]
    pc = tvp.match(ref_b, ref_l, out_c['boxes'][0][vc], out_c['labels'][0][vc])
    report(f'    prototype: our RoIAlign with the adaptive grid capped at {cap} ({4 * cap * cap} '
           f'taps a bin; RoIAlign of the 1000 proposals at 7x7 {1e3 * pool_times[0]:.0f} ms vs '
           f'{1e3 * base[0]:.0f} ms at ratio 2, of the detections at 14x14 '
           f'{1e3 * pool_times[1]:.0f} ms vs {1e3 * base[1]:.0f} ms, best of 5 on this CPU):')
    rc = _stats(report, ref_s, ref_b, out_c['scores'][0][vc], out_c['boxes'][0][vc], pc,
                len(ref_b), indent='      ')
    if rc is not None:
      row[f'capped{cap}'] = (len(pc) / max(len(ref_b), 1), rc[2].max(), rc[3].max(),
                             pool_times[0], base[0])
  return row


def _time_pooling(feats, proposals, detections, ratio: int, repeats: int = 5):
  """Best-of-`repeats` seconds of the multilevel RoIAlign (P2..P5) of the box head (7x7) on
  `proposals` and of the mask head (14x14) on `detections`, one image."""
  levels = [jnp.asarray(f[0]) for f in feats[:4]]
  out = []
  for boxes, size in ((proposals, 7), (detections, 14)):
    fn = jax.jit(lambda f, b, size=size: roi_ops.multilevel_roi_align(
        f, b, output_size=size, sampling_ratio=ratio, aligned=True, canonical_scale=224.0))
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


def pipeline_level(report, d2_pred, name, variables, img, cache):
  """DefaultPredictor on the BGR uint8 image vs our Predictor on the RGB one (ours computed
  once per image, in `cache`)."""
  with torch.no_grad():
    ref = d2_pred(np.ascontiguousarray(img[:, :, ::-1]))['instances']
  resized = d2_resize(img)
  ours_hw = transforms.resize_shape(img.shape[0], img.shape[1], 800, 1333)
  if 'pipeline' not in cache:
    padded = [int(np.ceil(s / 32) * 32) for s in ours_hw]
    cache['pipeline'] = predictor_lib.Predictor(our_config(name, padded), variables)(img)
  out = cache['pipeline']
  ref_b, ref_s = ref.pred_boxes.tensor.numpy(), ref.scores.numpy()
  ref_l, ref_m = ref.pred_classes.numpy() + 1, ref.pred_masks.numpy()
  boxes, scores, labels, masks = (np.asarray(out[k]) for k in ('boxes', 'scores', 'labels',
                                                               'masks'))
  pairs = tvp.match(ref_b, ref_l, boxes, labels)
  report(f'  pipeline level (DefaultPredictor vs Predictor on the uint8 image, original frame '
         f'{img.shape[0]}x{img.shape[1]}; resized {resized.shape[0]}x{resized.shape[1]} by '
         f'detectron2, {ours_hw[0]}x{ours_hw[1]} by us):')
  res = _stats(report, ref_s, ref_b, scores, boxes, pairs, len(ref_b))
  row = dict(n=len(ref_b), matched=len(pairs) / max(len(ref_b), 1))
  if res is not None:
    i, j, ds, db = res
    ious = [tvp.mask_iou(ref_m[a], masks[b]) for a, b in pairs]
    report(f'    full-resolution mask IoU mean {np.mean(ious):.4f}, min {np.min(ious):.4f}')
    row.update(score=ds.max(), box=db.max(), mask=np.mean(ious))
  if tuple(resized.shape[:2]) != tuple(img.shape[:2]):
    # What the resize deviation is: the two resized images, and how far it moves the boxes.
    ours_px = transforms.resize_image(img, *resized.shape[:2])  # our interpolation, d2's size
    dpx = np.abs(ours_px - resized.astype(np.float32))
    report(f'    input: our bilinear resize to detectron2\'s {resized.shape[0]}x'
           f'{resized.shape[1]} differs from its PIL uint8 resize by mean {dpx.mean():.2f}, max '
           f'{dpx.max():.1f} grey levels')
    if tuple(ours_hw) != resized.shape[:2]:
      # Each pipeline maps its boxes back with its own ratio, so the rounding moves a point of
      # the original image by nothing; in the resized frames the content differs by the size
      # difference at the far edge, which is what the network sees.
      d = max(abs(a - b) for a, b in zip(ours_hw, resized.shape[:2]))
      far = d * max(img.shape[0] / resized.shape[0], img.shape[1] / resized.shape[1])
      report(f'    resize rounding: {ours_hw[0]}x{ours_hw[1]} ours vs {resized.shape[0]}x'
             f'{resized.shape[1]}: content moves by up to {d} px in the resized frame (at the far '
             f'edge), {far:.2f} px of the original image; none in the original frame for a '
             'detector that follows the content')
    anyl = tvp.match(ref_b, np.zeros_like(ref_l), boxes, np.zeros_like(labels), iou_thresh=0.5)
    if anyl:
      a, b = map(np.array, zip(*anyl))
      iou = np.array([tvp.iou_matrix(ref_b[u], boxes[v])[0, 0] for u, v in anyl])
      db = np.abs(ref_b[a] - boxes[b]).max(1)
      report(f'    boxes moved by the resize (any label, greedy IoU >= 0.5): '
             f'{100 * len(anyl) / max(len(ref_b), 1):.0f}% paired; their IoU median '
             f'{np.median(iou):.3f}, |box diff| median {np.median(db):.2f} px, p90 '
             f'{np.percentile(db, 90):.2f} px; same label '
             f'{100 * np.mean(ref_l[a] == labels[b]):.0f}%')
    # Our pipeline fed detectron2's resized pixels (which our resize leaves unchanged), boxes and
    # masks mapped to the original frame by our Predictor's own code: all but the resize.
    key = 'pipeline_d2_pixels'
    if key not in cache:
      padded = [int(np.ceil(v / 32) * 32) for v in resized.shape[:2]]
      pred = predictor_lib.Predictor(our_config(name, padded), variables)
      x, rhw, _ = pred.preprocess(resized)
      assert tuple(rhw) == resized.shape[:2]
      det = pred.detect(x[None], np.array([rhw], np.int32))
      cache[key] = pred._finish(det, 0, img.shape[:2], rhw)  # pylint: disable=protected-access
    o = cache[key]
    p2 = tvp.match(ref_b, ref_l, o['boxes'], o['labels'])
    report('    ours on detectron2\'s resized pixels, mapped to the original frame by our '
           'Predictor:')
    r2 = _stats(report, ref_s, ref_b, o['scores'], o['boxes'], p2, len(ref_b), indent='      ')
    if r2 is not None:
      ious = [tvp.mask_iou(ref_m[a], o['masks'][b]) for a, b in p2]
      report(f'      full-resolution mask IoU mean {np.mean(ious):.4f}, min {np.min(ious):.4f}')
      row.update(d2px_matched=len(p2) / max(len(ref_b), 1), d2px_score=r2[2].max(),
                 d2px_mask=np.mean(ious))
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
      report(f' detectron2 POOLER_SAMPLING_RATIO={ratio} (ours: 2)')
      summary = {} if ratio == 2 else None
      m = model_level(report, d2_model, name, variables, img, summary, cache,
                      capped=args.capped if ratio == 0 else ())
      p = pipeline_level(report, d2_pred, name, variables, img, cache) if args.pipeline else {}
      table.append((title.split(' (')[0], ratio, summary, m, p))
  set_sampling_ratio(d2_model, 2)
  return table


def write_table(report, name, table):
  report(f'\nsummary {name}: image | d2 ratio | features rel | proposals | model: matched, max '
         'score diff, max box diff, mask IoU full-res | pipeline: matched, max score diff, mask '
         'IoU (and on detectron2\'s resized pixels)')
  for title, ratio, summary, m, p in table:
    f = (f'{summary["feature_rel"]:.1e} | {100 * summary["proposals"]:.1f}% ({summary["tied"]} '
         'sigmoid ties)' if summary else '  | ')
    mm = (f'{100 * m["matched"]:.1f}% of {m["n"]}, {m.get("score", np.nan):.1e}, '
          f'{m.get("box", np.nan):.1e} px, {m.get("mask", np.nan):.4f}')
    pp = (f'{100 * p["matched"]:.1f}% of {p["n"]}, {p.get("score", np.nan):.1e}, '
          f'{p.get("mask", np.nan):.4f}' if p else '-')
    if 'd2px_matched' in p:
      pp += (f' (on detectron2\'s resized pixels: {100 * p["d2px_matched"]:.1f}%, '
             f'{p["d2px_score"]:.1e}, {p["d2px_mask"]:.4f})')
    report(f'  {title} | {ratio} | {f} | {mm} | {pp}')
    for k in sorted(k for k in m if k.startswith('capped')):
      matched, score, box, sec, base = m[k]
      report(f'    prototype cap {k[6:]}: {100 * matched:.1f}% matched, max score diff '
             f'{score:.1e}, max box diff {box:.1e} px; box RoIAlign {1e3 * sec:.0f} ms vs '
             f'{1e3 * base:.0f} ms at ratio 2')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(HERE, 'detectron2_parity.txt'))
  parser.add_argument('--model', default='both', choices=('r50', 'r101', 'both'))
  parser.add_argument('--max_images', type=int, default=5)
  parser.add_argument('--no_pipeline', dest='pipeline', action='store_false')
  parser.add_argument('--capped', default='3,4,8',
                      help='caps of the adaptive-grid prototype to run against ratio 0 ("": none)')
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
