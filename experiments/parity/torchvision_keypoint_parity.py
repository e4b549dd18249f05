"""Parity of a converted torchvision `keypointrcnn_resnet50_fpn` with torchvision itself.

    python experiments/parity/torchvision_keypoint_parity.py \
        [--out experiments/parity/torchvision_keypoint_parity.txt]

Needs torch + torchvision + jax + this package in one environment. Downloads nothing: the
torchvision model is randomly initialised (`weights=None, weights_backbone=None`), then made
non-trivial as `torchvision_parity.py` makes its Mask R-CNN (batch-norm statistics calibrated
on the images and randomised, RPN and box logits spread to standard deviation 2). Same images.

Levels:
  model:    torchvision's own preprocessed tensor fed to both: detections and keypoints in the
            resized frame.
  pipeline: the uint8 image through our `Predictor` vs `model(images)`, original frame.

Targets (issue #14): >= 99% of detections matched (IoU >= 0.99, same label), >= 99% of their
keypoints within 1 px of torchvision's, keypoint scores within 1e-2 (logit scale).
"""

import argparse
import os
import sys

import numpy as np
import torch
import torchvision

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', '..'))
sys.path.insert(0, HERE)
# pylint: disable=g-import-not-at-top,wrong-import-position
import torchvision_parity as tvp
from configs import torchvision_keypointrcnn_r50_fpn
from maskrcnn_jax import predictor as predictor_lib
from maskrcnn_jax import weights
from maskrcnn_jax.modeling import mask_rcnn

KEYPOINT_TOL_PX = 1.0


def build_torchvision(calibration):
  """Random-init keypointrcnn_resnet50_fpn, made non-trivial as torchvision_parity's model."""
  return tvp.build_torchvision(
      calibration, torchvision.models.detection.keypointrcnn_resnet50_fpn)


def our_config(padded_hw):
  c = torchvision_keypointrcnn_r50_fpn.get_config()
  c.input.buckets = (tuple(padded_hw),)
  return c


def compare(report, ref, boxes, scores, labels, kps, kp_scores, what):
  ref_b, ref_s, ref_l = ref['boxes'], ref['scores'], ref['labels']
  ref_k, ref_ks = ref['keypoints'], ref['keypoints_scores']
  pairs = tvp.match(ref_b, ref_l, boxes, labels)
  report(f'  {what}: torchvision {len(ref_b)}, ours {len(boxes)}; '
         f'{100 * len(pairs) / max(len(ref_b), 1):.2f}% matched (same label, IoU >= '
         f'{tvp.MATCH_IOU})')
  if not pairs:
    return {}
  i, j = map(np.array, zip(*pairs))
  dist = np.abs(ref_k[i][..., :2] - kps[j][..., :2]).max(-1)
  within = float((dist <= KEYPOINT_TOL_PX).mean())
  score_diff = np.abs(ref_ks[i] - kp_scores[j])
  report(f'    matched: max |score diff| {np.abs(ref_s[i] - scores[j]).max():.2e}; max |box '
         f'diff| {np.abs(ref_b[i] - boxes[j]).max():.2e} px; keypoints within '
         f'{KEYPOINT_TOL_PX:g} px: {100 * within:.2f}% of {dist.size} (max |diff| '
         f'{dist.max():.2e} px); keypoint scores max |diff| {score_diff.max():.2e} '
         f'({100 * (score_diff <= 1e-2).mean():.2f}% within 1e-2)')
  return dict(matched=len(pairs) / max(len(ref_b), 1), within=within)


def model_level(report, tv_model, variables, img):
  with torch.no_grad():
    il, _ = tv_model.transform([tvp.to_torch(img)])
    feats = tv_model.backbone(il.tensors)
    proposals, _ = tv_model.rpn(il, feats)
    dets, _ = tv_model.roi_heads(feats, proposals, il.image_sizes)
  padded = tuple(il.tensors.shape[-2:])
  model = mask_rcnn.build_model(our_config(padded))
  x = jnp.asarray(il.tensors.permute(0, 2, 3, 1).numpy())
  size = jnp.asarray(np.array(il.image_sizes, np.int32))
  det = jax.device_get(jax.jit(model.apply)(variables, x, size))
  v = det['valid'][0]
  ref = {k: t.numpy() for k, t in dets[0].items()}
  report(f'  model level, padded {padded[0]}x{padded[1]}, content {tuple(il.image_sizes[0])}')
  return compare(report, ref, det['boxes'][0][v], det['scores'][0][v], det['labels'][0][v],
                 det['keypoints'][0][v], det['keypoint_scores'][0][v], 'detections')


def pipeline_level(report, tv_model, variables, img):
  with torch.no_grad():
    il, _ = tv_model.transform([tvp.to_torch(img)])
    ref = {k: t.numpy() for k, t in tv_model([tvp.to_torch(img)])[0].items()}
  pred = predictor_lib.Predictor(our_config(tuple(il.tensors.shape[-2:])), variables)
  out = pred(img)
  return compare(report, ref, out['boxes'], out['scores'], out['labels'], out['keypoints'],
                 out['keypoint_scores'],
                 f'pipeline level (Predictor, original frame {img.shape[0]}x{img.shape[1]})')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(HERE, 'torchvision_keypoint_parity.txt'))
  parser.add_argument('--max_images', type=int, default=3)
  args = parser.parse_args(argv)
  torch.set_num_threads(2)
  report = tvp.Report([])
  images = tvp.load_images()[:args.max_images]
  tv_model = build_torchvision([tvp.to_torch(img) for _, img in images])
  state_dict = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  variables = weights.from_torchvision(
      state_dict, torchvision_keypointrcnn_r50_fpn.get_config(),
      source='random torchvision keypointrcnn_resnet50_fpn')
  report(f'torchvision {torchvision.__version__} keypointrcnn_resnet50_fpn (random init, '
         f'calibrated BN, logits std {tvp.LOGIT_STD}) vs maskrcnn_jax (jax {jax.__version__}, '
         f'{jax.devices()[0].platform}), configs/torchvision_keypointrcnn_r50_fpn.py')
  results = []
  for name, img in images:
    report(f'\n{name}')
    results.append(model_level(report, tv_model, variables, img))
    results.append(pipeline_level(report, tv_model, variables, img))
  with open(args.out, 'w') as f:
    f.write('\n'.join(report.lines) + '\n')
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
