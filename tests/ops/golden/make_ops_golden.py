"""Writes ops_golden.npz: random inputs and torchvision's outputs for the ops tests.

  python tests/ops/golden/make_ops_golden.py   # needs torch + torchvision (CPU)

The tests read only the .npz, so CI never needs torch. Arrays are small (< 1 MiB in all).
Layout conversions: torchvision feature maps are NCHW; the npz stores HWC like our ops.
"""

import pathlib

import numpy as np
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

OUT = pathlib.Path(__file__).with_name('ops_golden.npz')
SEED = 20240601


def odd_boxes(rng, n, h, w):
  """Boxes in image pixels: inside, leaving the map, sub-pixel, empty and inverted ones."""
  xy = rng.uniform([-0.3 * w, -0.3 * h], [1.1 * w, 1.1 * h], (n, 2))
  wh = rng.uniform(-0.1 * w, 0.6 * w, (n, 2))
  wh[: n // 8] = 0.0  # empty
  wh[n // 8: n // 4] *= 0.02  # sub-pixel
  boxes = np.concatenate([xy, xy + wh], 1)
  boxes[-4:] = [[-30, -30, -20, -20], [w + 5, h + 5, w + 40, h + 30],
                [-5, -5, w + 5, h + 5], [2, 2, 2.5, 2.5]]
  return boxes.astype(np.float32)


def main():
  rng = np.random.default_rng(SEED)
  out = {}

  # RoIAlign / RoIPool on one 9 x 11 x 3 map; boxes given in pixels of a 4x larger image.
  feat = rng.standard_normal((9, 11, 3)).astype(np.float32)
  boxes = odd_boxes(rng, 48, 36, 44)
  cot = rng.standard_normal((48, 3, 4, 3)).astype(np.float32)  # torchvision NCHW [N,C,oh,ow]
  tf = torch.from_numpy(feat.transpose(2, 0, 1)[None].copy())
  rois = torch.from_numpy(np.concatenate([np.zeros((48, 1), np.float32), boxes], 1))
  out['align_features'], out['align_boxes'] = feat, boxes
  out['align_cotangent'] = cot.transpose(0, 2, 3, 1)
  for aligned in (False, True):
    for ratio in (1, 2, 3, 4):
      for scale in (0.25, 0.5):
        f = tf.clone().requires_grad_(True)
        res = torchvision.ops.roi_align(f, rois, (4, 3), scale, ratio, aligned)
        (res * torch.from_numpy(cot)).sum().backward()
        key = f'align_{int(aligned)}_{ratio}_{scale}'
        out[key] = res.detach().numpy().transpose(0, 2, 3, 1)
        out[key + '_grad'] = f.grad.numpy()[0].transpose(1, 2, 0)
  for scale in (0.25, 0.5, 1.0):
    res = torchvision.ops.roi_pool(tf, rois, (4, 3), scale)
    out[f'pool_{scale}'] = res.numpy().transpose(0, 2, 3, 1)

  # MultiScaleRoIAlign over P2..P5 of a 64 x 96 image.
  levels = [rng.standard_normal((64 // s, 96 // s, 4)).astype(np.float32) for s in (4, 8, 16, 32)]
  ctr = rng.uniform(0, [96, 64], (40, 2))
  wh = np.exp(rng.uniform(np.log(4), np.log(120), (40, 2)))
  ml_boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  pooler = MultiScaleRoIAlign(['p2', 'p3', 'p4', 'p5'], 5, 2, canonical_scale=56)
  feats = {f'p{i + 2}': torch.from_numpy(l.transpose(2, 0, 1)[None].copy())
           for i, l in enumerate(levels)}
  res = pooler(feats, [torch.from_numpy(ml_boxes)], [(64, 96)])
  for i, l in enumerate(levels):
    out[f'ml_level{i + 2}'] = l
  out['ml_boxes'] = ml_boxes
  out['ml_align'] = res.numpy().transpose(0, 2, 3, 1)

  # NMS: continuous random scores (torch's sort is not stable, so no ties here).
  xy = rng.uniform(0, 100, (300, 2))
  wh = rng.uniform(5, 40, (300, 2))
  nboxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  nscores = rng.permutation(300).astype(np.float32) / 300 + 0.001
  nlabels = rng.integers(0, 4, 300).astype(np.int32)
  out['nms_boxes'], out['nms_scores'], out['nms_labels'] = nboxes, nscores, nlabels
  tb, ts = torch.from_numpy(nboxes), torch.from_numpy(nscores)
  for thr in (0.3, 0.5, 0.7):
    out[f'nms_keep_{thr}'] = torchvision.ops.nms(tb, ts, thr).numpy().astype(np.int32)
    out[f'batched_nms_keep_{thr}'] = torchvision.ops.batched_nms(
        tb, ts, torch.from_numpy(nlabels).long(), thr).numpy().astype(np.int32)

  # Anchors for a 64 x 96 padded batch with P2..P6 shapes (ceil(H / stride)).
  sizes = ((32,), (64,), (128,), (256,), (512,))
  gen = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
  image_list = ImageList(torch.zeros(1, 3, 64, 96), [(64, 96)])
  fmaps = [torch.zeros(1, 1, -(-64 // s), -(-96 // s)) for s in (4, 8, 16, 32, 64)]
  anchors = gen(image_list, fmaps)[0].numpy()
  out['anchors_64x96'] = anchors

  # Box coder and IoU.
  ref = rng.uniform(0, 50, (64, 2))
  ref = np.concatenate([ref, ref + rng.uniform(1, 40, (64, 2))], 1).astype(np.float32)
  tgt = rng.uniform(0, 50, (64, 2))
  tgt = np.concatenate([tgt, tgt + rng.uniform(1, 40, (64, 2))], 1).astype(np.float32)
  deltas = rng.normal(0, 1, (64, 4)).astype(np.float32)
  deltas[:4, 2:] = 8.0  # beyond the log(1000/16) clamp
  out['coder_ref'], out['coder_tgt'], out['coder_deltas'] = ref, tgt, deltas
  for name, weights in (('rpn', (1.0, 1.0, 1.0, 1.0)), ('roi', (10.0, 10.0, 5.0, 5.0))):
    coder = det_utils.BoxCoder(weights)
    out[f'encode_{name}'] = coder.encode_single(torch.from_numpy(tgt),
                                                torch.from_numpy(ref)).numpy()
    out[f'decode_{name}'] = coder.decode_single(torch.from_numpy(deltas),
                                                torch.from_numpy(ref)).numpy()
  out['iou'] = torchvision.ops.box_iou(torch.from_numpy(ref), torch.from_numpy(tgt)).numpy()

  # Mask pasting on a 48 x 64 canvas (boxes overlap the canvas: torchvision's slicing breaks
  # for boxes entirely outside it).
  masks = rng.uniform(size=(12, 28, 28)).astype(np.float32)
  mxy = rng.uniform(-8, 40, (12, 2))
  mwh = rng.uniform(0, 40, (12, 2))
  mwh[0] = 0
  mboxes = np.concatenate([mxy, mxy + mwh], 1).astype(np.float32)
  mboxes[:, 2:] = np.maximum(mboxes[:, 2:], 1.0)
  out['paste_masks'], out['paste_boxes'] = masks, mboxes
  out['paste_out'] = paste_masks_in_image(torch.from_numpy(masks[:, None]),
                                          torch.from_numpy(mboxes), (48, 64)).numpy()[:, 0]

  out['versions'] = np.array([torch.__version__, torchvision.__version__])
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(out)} arrays)')


if __name__ == '__main__':
  main()
