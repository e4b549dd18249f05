"""Writes the keypoint golden files of tests/weights: a tiny torchvision Keypoint R-CNN, its
outputs, and a `keypointrcnn_loss` case.

Run with the torch venv (CI reads only the files written here and needs no torch):

    python tests/weights/golden/make_keypoint_golden.py

Files:
  tv_tiny_keypointrcnn.pth   the state dict (float16 tensors, torch.save zip format)
  tv_tiny_keypoint_golden.npz
      inputs (the same two drawn images as make_golden.py) and torchvision's outputs: final
      detections (boxes, scores, labels), keypoints [N, K, 3] and keypoint scores [N, K]; and
      `loss/*`: random heatmap logits, proposals, ground-truth keypoints (on the edges, outside
      the box, invisible included) and matches with torchvision's `keypointrcnn_loss` of them.

The network is torchvision's `KeypointRCNN` with make_golden.py's tiny ResNet-FPN body and the
widths of `configs/torchvision_keypointrcnn_r50_fpn.get_config('tiny')` with 2 labels: two
16-channel keypoint convs and 3 keypoints (test_keypoint_golden.py sets the same).
"""

import pathlib
import sys

import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.keypoint_rcnn import (KeypointRCNN, KeypointRCNNHeads,
                                                         KeypointRCNNPredictor)
from torchvision.models.detection.roi_heads import keypointrcnn_loss
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import make_golden as mg  # pylint: disable=g-import-not-at-top,wrong-import-position

PTH = HERE / 'tv_tiny_keypointrcnn.pth'
NPZ = HERE / 'tv_tiny_keypoint_golden.npz'
NUM_CLASSES, NUM_KEYPOINTS, KP_DIM, KP_CONVS = 2, 3, 16, 2


def build() -> KeypointRCNN:
  body = mg.TinyBody(mg.STEM)
  backbone = BackboneWithFPN(body, {f'layer{i + 1}': str(i) for i in range(4)},
                             [mg.STEM * 4 * 2**i for i in range(4)], mg.FPN_CH,
                             extra_blocks=LastLevelMaxPool())
  levels = ['0', '1', '2', '3']
  return KeypointRCNN(
      backbone,
      rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in mg.ANCHOR_SIZES),
                                           ((0.5, 1.0, 2.0),) * len(mg.ANCHOR_SIZES)),
      rpn_pre_nms_top_n_test=mg.PRE_NMS_TEST, rpn_post_nms_top_n_test=mg.POST_NMS_TEST,
      box_roi_pool=MultiScaleRoIAlign(levels, 7, 2, canonical_scale=mg.CANONICAL_SCALE),
      box_head=TwoMLPHead(mg.FPN_CH * 49, mg.FC_DIM),
      box_predictor=FastRCNNPredictor(mg.FC_DIM, NUM_CLASSES),
      box_detections_per_img=mg.DETECTIONS,
      keypoint_roi_pool=MultiScaleRoIAlign(levels, 14, 2, canonical_scale=mg.CANONICAL_SCALE),
      keypoint_head=KeypointRCNNHeads(mg.FPN_CH, [KP_DIM] * KP_CONVS),
      keypoint_predictor=KeypointRCNNPredictor(KP_DIM, NUM_KEYPOINTS)).eval()


def loss_case(gen: torch.Generator) -> dict:
  """Heatmap logits of 7 RoIs (two images) and their matched gt keypoints, some on the RoI's
  right/bottom edge, some outside it, some invisible; torchvision's loss of them."""
  n, k, s = 7, NUM_KEYPOINTS, 56
  logits = torch.randn(n, k, s, s, generator=gen) * 2
  x1y1 = torch.rand(n, 2, generator=gen) * 40
  wh = 4 + torch.rand(n, 2, generator=gen) * 60
  rois = torch.cat([x1y1, x1y1 + wh], 1)
  gt = torch.zeros(n, k, 3)
  gt[..., :2] = x1y1[:, None] + (torch.rand(n, k, 2, generator=gen) * 1.3 - 0.15) * wh[:, None]
  gt[..., 2] = torch.randint(0, 3, (n, k), generator=gen).float()
  gt[0, 0, :2] = rois[0, 2:]  # exactly on the right/bottom edge: the last cell
  props = [rois[:4], rois[4:]]
  kps = [gt[:4], gt[4:]]
  matched = [torch.arange(4), torch.arange(3)]
  loss = keypointrcnn_loss(logits, props, kps, matched)
  return {'loss/logits': logits.numpy(), 'loss/rois': rois.numpy(), 'loss/gt': gt.numpy(),
          'loss/value': np.float32(loss.item())}


def main() -> None:
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)
  model = build()
  mg.randomise(model, gen)
  x = mg.make_batch(np.random.default_rng(0))
  images = ImageList(x, [tuple(hw) for hw in mg.CONTENT_HW])
  mg.calibrate_class_logits(model, images, mg.LOGIT_STD)
  out = {'images': x.permute(0, 2, 3, 1).numpy().astype(np.float16),
         'image_size': np.array(mg.CONTENT_HW, np.int32)}
  with torch.no_grad():
    feats = model.backbone(x)
    proposals, _ = model.rpn(images, feats)
    det, _ = model.roi_heads(feats, proposals, images.image_sizes)
  for b in range(len(mg.CONTENT_HW)):
    out[f'boxes{b}'] = det[b]['boxes'].numpy()
    out[f'scores{b}'] = det[b]['scores'].numpy()
    out[f'labels{b}'] = det[b]['labels'].numpy().astype(np.int32)
    out[f'keypoints{b}'] = det[b]['keypoints'].numpy()
    out[f'keypoint_scores{b}'] = det[b]['keypoints_scores'].numpy()
  out.update(loss_case(gen))
  torch.save({k: v.half() for k, v in model.state_dict().items()}, PTH)
  np.savez_compressed(NPZ, **out)
  counts = [len(det[b]['boxes']) for b in range(len(mg.CONTENT_HW))]
  print(f'wrote {PTH.name} ({PTH.stat().st_size} B), {NPZ.name} ({NPZ.stat().st_size} B); '
        f'detections per image {counts}; loss {out["loss/value"]:.5f}')


if __name__ == '__main__':
  main()
