"""Parity of a converted detectron2 Keypoint R-CNN R50-FPN with detectron2 itself.

    python experiments/parity/detectron2_keypoint_parity.py \
        [--out experiments/parity/detectron2_keypoint_parity.txt]

Needs detectron2 (built from source against torch), jax and this package in one environment.
Downloads nothing: `COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x` is built from detectron2's
model-zoo config with random weights, made non-trivial as detectron2_parity.py makes its Mask
R-CNN (FrozenBN calibrated on the images and randomised; RPN objectness and box classifier
rescaled to logit standard deviation 2), and its keypoint predictor (`score_lowres`) rescaled
the same way, so that the heatmaps have peaks of a few logits and detectron2's softmax scores
are not all ~1/3136. It is converted with `weights.from_detectron2` for
configs/detectron2_keypointrcnn_r50_fpn.py.

Levels:
  model:    detectron2's own preprocessed tensor fed to both models: detections and keypoints in
            the input frame (`roi_heads` output before `detector_postprocess`).
  pipeline: the uint8 image through `DefaultPredictor` vs our `Predictor` with the preset
            (`input.resize='detectron2'`), in the original frame.

Sampling ratios: detectron2's box and keypoint poolers at `POOLER_SAMPLING_RATIO = 2` against
ours at 2, then at detectron2's default 0 (adaptive, ceil(RoI side / bins) per RoI) against ours
at 0 (a masked grid exact up to `model.roi.max_sampling_ratio`: 4, the preset's, and 8).

Keypoint misses: our decode of the heatmaps is exact on single-peaked maps and refines only the
best few pixels of a coarse grid (`ops.keypoints.heatmaps_to_keypoints`); random heatmaps have
several peaks, so it can settle on one slightly lower. The model level shows how close that peak
is on detectron2's own map, and runs our decode alone on detectron2's heatmaps.

Keypoint scores are compared like with like: the preset sets `model.test.keypoint_score =
'detectron2'`, so ours are detectron2's softmax-normalised scores (`pred_keypoints[..., 2]`),
exp(logit at the maximum) / sum of exp over the 56x56 heatmap, both absolute and relative to
detectron2's.

Images (scikit-image): coffee, rocket and astronaut, each first resized with detectron2's own
ResizeShortestEdge(800, 1333) so that its resize leaves them unchanged (800x1056, 800x1199,
800x800), at both levels; and rocket at its own 427x640 (resized to 800x1199 on both sides by
PIL's uint8 bilinear) at the pipeline level. Targets (issue #18, as for the mask models):
>= 99% of detectron2's detections matched (same label, IoU >= 0.99), scores within 1e-3, and
the share of matched keypoints within 1 px.
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
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

import detectron2_parity as d2p  # detectron2 model set-up, resize, our-side runners
import torchvision_parity as tvp  # matching, report
from configs import detectron2_keypointrcnn_r50_fpn
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import weights
from maskrcnn_jax.data import transforms

NAME = 'kp_r50'
D2_CONFIG = 'COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml'
d2p.MODELS[NAME] = (D2_CONFIG, detectron2_keypointrcnn_r50_fpn)
KEYPOINT_TOL_PX = 1.0
SCORE_TOL = 1e-3


def d2_cfg(ratio: int):
  cfg = d2p.d2_cfg(NAME, ratio)
  cfg.MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO = ratio
  return cfg


def set_sampling_ratio(model, ratio: int) -> None:
  """The box and keypoint poolers' RoIAligns (the attribute their forward reads)."""
  for pooler in (model.roi_heads.box_pooler, model.roi_heads.keypoint_pooler):
    for level in pooler.level_poolers:
      level.sampling_ratio = ratio


def build_detectron2(images: list) -> torch.nn.Module:
  """Random-init Keypoint R-CNN, calibrated as detectron2_parity's models, with the keypoint
  predictor's logits spread to standard deviation LOGIT_STD too (ratio 2)."""
  torch.manual_seed(d2p.SEED)
  model = build_model(d2_cfg(2)).eval()
  il = d2p.calibrate_norms(model, images)
  with torch.no_grad():
    feats = model.backbone(il.tensor)
    rpn = model.proposal_generator
    logits, _ = rpn.rpn_head([feats[f] for f in rpn.in_features])
    d2p._rescale(rpn.rpn_head.objectness_logits, torch.cat([o.flatten() for o in logits]))
    proposals, _ = rpn(il, feats)
    rh = model.roi_heads
    x = rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features],
                                  [p.proposal_boxes for p in proposals]))
    d2p._rescale(rh.box_predictor.cls_score, rh.box_predictor(x)[0])
    boxes = [p.proposal_boxes[:200] for p in proposals]
    kp = rh.keypoint_head.layers(rh.keypoint_pooler([feats[f] for f in rh.keypoint_in_features],
                                                    boxes))
    d2p._rescale(rh.keypoint_head.score_lowres, kp)  # linear up to the heatmaps
  return model


def load_images():
  """(title, uint8 RGB image, levels): three photographs detectron2's resize leaves unchanged,
  and one it resizes (pipeline level only)."""
  out = []
  for title, img in d2p.load_images()[:3]:
    fixed = d2p.d2_resize(img)
    h, w = fixed.shape[:2]
    assert d2p.d2_resize(fixed).shape == fixed.shape
    out.append((f'{title.split(" ")[0]} {h}x{w} (detectron2\'s resize leaves it unchanged)',
                fixed, ('model', 'pipeline')))
  title, img = d2p.load_images()[1]
  out.append((title, img, ('pipeline',)))
  return out


def compare(report, ref_b, ref_s, ref_l, ref_k, boxes, scores, labels, kps, kp_scores,
            indent='    ', ref_maps=None):
  """Detections matched and, over the matched pairs, score, box, keypoint and keypoint-score
  differences. `*_k` / `kps`: [N, K, 3] (x, y, .); the scores: detectron2's softmax scores.
  With detectron2's heatmaps `ref_maps` [N, K, 56, 56] (input frame), also how close to its
  maximum detectron2's own resized heatmap is at each keypoint we put elsewhere."""
  pairs = tvp.match(ref_b, ref_l, boxes, labels)
  n = len(ref_b)
  report(f'{indent}detections: detectron2 {n}, ours {len(boxes)}; '
         f'{100 * len(pairs) / max(n, 1):.2f}% matched (same label, IoU >= {tvp.MATCH_IOU})')
  row = dict(n=n, matched=len(pairs) / max(n, 1))
  if not pairs:
    return row
  i, j = map(np.array, zip(*pairs))
  ds = np.abs(ref_s[i] - scores[j])
  db = np.abs(ref_b[i] - boxes[j]).max(1)
  dist = np.abs(ref_k[i][..., :2] - kps[j][..., :2]).max(-1)
  within = float((dist <= KEYPOINT_TOL_PX).mean())
  ref_ks = ref_k[i][..., 2]
  dks = np.abs(ref_ks - kp_scores[j])
  rel = dks / np.maximum(np.abs(ref_ks), 1e-12)
  agree = float((rel <= 1e-2).mean())
  report(f'{indent}matched: |score diff| max {ds.max():.2e}; |box diff| max {db.max():.2e} px; '
         f'keypoints within {KEYPOINT_TOL_PX:g} px: {100 * within:.2f}% of {dist.size} (max '
         f'|diff| {dist.max():.2e} px)')
  report(f'{indent}keypoint scores (detectron2\'s softmax score on both sides; detectron2\'s '
         f'median {np.median(ref_ks):.2e}, range {ref_ks.min():.1e}..{ref_ks.max():.1e}): '
         f'|diff| max {dks.max():.2e}, relative |diff| median {np.median(rel):.1e}, '
         f'{100 * agree:.2f}% within 1% relative')
  row.update(score=ds.max(), box=db.max(), within=within, kp_score=dks.max(), kp_agree=agree,
             num_kps=dist.size)
  missed = np.argwhere(dist > KEYPOINT_TOL_PX)
  if ref_maps is not None and len(missed):
    gaps = [_peak_gap(ref_maps[i[a], k], ref_b[i[a]], ref_k[i[a], k, :2], kps[j[a], k, :2])
            for a, k in missed]
    report(f'{indent}the {len(missed)} keypoints more than {KEYPOINT_TOL_PX:g} px off: '
           f'detectron2\'s own resized heatmap at our keypoint is {max(g[0] for g in gaps):.1e} '
           f'logits at most below its maximum (median {np.median([g[0] for g in gaps]):.1e}; '
           f'the heatmaps\' spread, max - median, is {np.median([g[1] for g in gaps]):.1f} '
           'logits): another peak of the map, nearly as high')
    row.update(peak_gap=max(g[0] for g in gaps))
  return row


def _peak_gap(heatmap, box, ref_xy, our_xy):
  """(detectron2's resized heatmap at its keypoint minus at ours, its max - median): the map
  as `heatmaps_to_keypoints` resizes it (bicubic to ceil(box size)), each keypoint's pixel
  recovered from x = x1 + (pixel + 0.5) * w / ceil(w)."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  x1, y1 = float(box[0]), float(box[1])
  w, h = max(float(box[2]) - x1, 1.0), max(float(box[3]) - y1, 1.0)
  out_w, out_h = int(np.ceil(w)), int(np.ceil(h))
  roi_map = F.interpolate(torch.from_numpy(np.asarray(heatmap, np.float32))[None, None],
                          size=(out_h, out_w), mode='bicubic', align_corners=False)[0, 0].numpy()

  def value(xy):
    px = int(np.clip(np.round((xy[0] - x1) * out_w / w - 0.5), 0, out_w - 1))
    py = int(np.clip(np.round((xy[1] - y1) * out_h / h - 0.5), 0, out_h - 1))
    return roi_map[py, px]

  return float(value(ref_xy) - value(our_xy)), float(roi_map.max() - np.median(roi_map))


def model_level(report, d2_model, variables, img, cache, ratio, caps):
  """Both models on detectron2's preprocessed tensor; ours at `ratio` or, with caps, at 0 and
  each cap."""
  with torch.no_grad():
    il = d2p.preprocess(d2_model, img)
    t0 = time.time()
    feats = d2_model.backbone(il.tensor)
    proposals, _ = d2_model.proposal_generator(il, feats, None)
    dets, _ = d2_model.roi_heads(il, feats, proposals, None)
    d2_time = time.time() - t0
  inst = dets[0]
  ref = (inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy() + 1,
         inst.pred_keypoints.numpy())
  ref_maps = inst.pred_keypoint_heatmaps.numpy()
  report(f'  model level, padded {tuple(il.tensor.shape[-2:])}, content '
         f'{tuple(il.image_sizes[0])} (detectron2 {d2_time:.1f}s)')
  if not caps:
    _decode_only(report, ref_maps, ref[0], ref[3], max(il.tensor.shape[-2:]))
  rows = {}
  for our_ratio, cap in ([(2, 4)] if not caps else [(0, c) for c in caps]):
    key = ('model', our_ratio, cap)
    if key not in cache:
      cache[key] = _ours_model(variables, il, our_ratio, cap)
    det, seconds = cache[key]
    v = det['valid'][0]
    report(f'   ours at sampling_ratio {our_ratio}'
           f'{f", max_sampling_ratio {cap}" if our_ratio == 0 else ""} ({seconds:.1f}s after '
           'the compile):')
    rows[(our_ratio, cap)] = compare(
        report, *ref, det['boxes'][0][v], det['scores'][0][v], det['labels'][0][v],
        det['keypoints'][0][v], det['keypoint_scores'][0][v], ref_maps=ref_maps)
  return rows


def _decode_only(report, maps, boxes, ref_kps, max_box_size):
  """Our `heatmaps_to_keypoints` on detectron2's own heatmaps and boxes: what the static-shape
  decode alone (coarse grid, then full resolution around its DECODE_CANDIDATES best pixels)
  moves, with the package's candidate count and with more."""
  from maskrcnn_jax.ops import keypoints as kp_ops  # pylint: disable=g-import-not-at-top
  package = kp_ops.DECODE_CANDIDATES
  parts = []
  for candidates in (package, 4 * package):
    kp_ops.DECODE_CANDIDATES = candidates  # read when the decode is traced
    try:
      kps, _ = jax.device_get(jax.jit(lambda m, b: kp_ops.heatmaps_to_keypoints(
          m, b, max_box_size))(maps, boxes))
    finally:
      kp_ops.DECODE_CANDIDATES = package
    dist = np.abs(kps[..., :2] - ref_kps[..., :2]).max(-1)
    parts.append(f'{100 * (dist <= KEYPOINT_TOL_PX).mean():.2f}% with {candidates} candidates')
  report(f'   our decode on detectron2\'s own heatmaps and boxes: keypoints within '
         f'{KEYPOINT_TOL_PX:g} px of its {", ".join(parts)} (the package uses {package})')


def _ours_model(variables, il, ratio, cap):
  """Our model on detectron2's ImageList at a sampling ratio: (outputs, seconds)."""
  padded = tuple(il.tensor.shape[-2:])
  config = d2p.our_config(NAME, padded, ratio=ratio, cap=cap)
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  model = mask_rcnn.build_model(config)
  x = jnp.asarray(il.tensor.permute(0, 2, 3, 1).numpy())
  size = jnp.asarray(np.array([tuple(il.image_sizes[0])], np.int32))
  return d2p._timed(jax.jit(model.apply), variables, x, size)


def pipeline_level(report, d2_pred, variables, img, ratio):
  """DefaultPredictor on the BGR uint8 image vs our Predictor (the preset, our ratio `ratio`:
  0 is the preset's adaptive grid capped at 4), original frame."""
  with torch.no_grad():
    ref = d2_pred(np.ascontiguousarray(img[:, :, ::-1]))['instances']
  hw = transforms.resize_shape(img.shape[0], img.shape[1], 800, 1333, 'detectron2')
  c = d2p.our_config(NAME, [int(np.ceil(v / 32) * 32) for v in hw], ratio=ratio, cap=4)
  out = predictor_lib.Predictor(c, variables)(img)
  report(f'  pipeline level (DefaultPredictor vs Predictor on the uint8 image, original frame '
         f'{img.shape[0]}x{img.shape[1]}, resized to {hw[0]}x{hw[1]}; ours at ratio {ratio}'
         f'{" capped at 4" if ratio == 0 else ""}):')
  return compare(report, ref.pred_boxes.tensor.numpy(), ref.scores.numpy(),
                 ref.pred_classes.numpy() + 1, ref.pred_keypoints.numpy(),
                 *(np.asarray(out[k]) for k in ('boxes', 'scores', 'labels', 'keypoints',
                                                'keypoint_scores')))


def parameter_counts(report, d2_model, config):
  from maskrcnn_jax.modeling import mask_rcnn  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: mask_rcnn.init_variables(config, jax.random.key(0)))
  ours = mask_rcnn.count_params(shapes['params'])
  theirs = sum(p.numel() for p in d2_model.parameters())
  report(f'parameters: detectron2 {theirs:,} (FrozenBN statistics are buffers), ours {ours:,} '
         f'(+{ours - theirs:,}: the zero background row of bbox_pred, 4 x 1024 + 4)')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(HERE, 'detectron2_keypoint_parity.txt'))
  parser.add_argument('--max_images', type=int, default=4)
  parser.add_argument('--capped', default='4,8')
  args = parser.parse_args(argv)
  caps = tuple(int(c) for c in args.capped.split(',') if c)
  torch.set_num_threads(2)
  report = tvp.Report([])
  report(f'detectron2 {detectron2.__version__} (torch {torch.__version__}) {D2_CONFIG} (random '
         f'init, calibrated FrozenBN, logits std {d2p.LOGIT_STD}, keypoint logits too) vs '
         f'maskrcnn_jax (jax {jax.__version__}, {jax.devices()[0].platform}), '
         'configs/detectron2_keypointrcnn_r50_fpn.py')
  images = load_images()[:args.max_images]
  d2_model = build_detectron2([img for _, img, _ in images])
  sd = {k: v.numpy() for k, v in d2_model.state_dict().items()}
  config = detectron2_keypointrcnn_r50_fpn.get_config()
  variables = weights.from_detectron2(sd, config, source=f'random detectron2 {D2_CONFIG}')
  parameter_counts(report, d2_model, config)
  d2_pred = DefaultPredictor(d2_cfg(2))
  d2_pred.model = d2_model  # the poolers' ratio is switched on this model
  table = []
  for title, img, levels in images:
    report(f'\n{title}')
    cache = {}
    for ratio in (2, 0):
      set_sampling_ratio(d2_model, ratio)
      report(f' detectron2 POOLER_SAMPLING_RATIO={ratio}')
      if 'model' in levels:
        for (r, cap), row in model_level(report, d2_model, variables, img, cache, ratio,
                                         caps if ratio == 0 else ()).items():
          table.append((title.split(' (')[0], 'model', ratio, r, cap, row))
      if 'pipeline' in levels:
        row = pipeline_level(report, d2_pred, variables, img, ratio)
        table.append((title.split(' (')[0], 'pipeline', ratio, ratio, 4, row))
  set_sampling_ratio(d2_model, 2)
  report('\nsummary: image | level | d2 ratio | ours | matched | max score diff | keypoints '
         'within 1 px | max keypoint score diff (softmax) | keypoint scores within 1% relative')
  for title, level, ratio, r, cap, row in table:
    ours = f'{r}' + (f' cap {cap}' if r == 0 else '')
    if 'score' not in row:
      report(f'  {title} | {level} | {ratio} | {ours} | {100 * row["matched"]:.1f}% of '
             f'{row["n"]} | - | - | - | -')
      continue
    report(f'  {title} | {level} | {ratio} | {ours} | {100 * row["matched"]:.1f}% of {row["n"]} '
           f'| {row["score"]:.1e} | {100 * row["within"]:.2f}% of {row["num_kps"]} | '
           f'{row["kp_score"]:.1e} | {100 * row["kp_agree"]:.2f}%')
  with open(args.out, 'w') as f:
    f.write('\n'.join(report.lines) + '\n')
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
