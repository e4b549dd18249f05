"""Writes tiny_maskrcnn.npz: torchvision Mask R-CNN at the 'tiny' config sizes, random weights.

Run with the torch venv (the tests only read the .npz):

    python tests/modeling/golden/make_golden.py

The network is assembled from torchvision's own classes with the widths of
`configs/maskrcnn_r50_fpn.get_config('tiny')`: ResNet bottlenecks [1, 1, 1, 1] at stem width 8
(built with `ResNet._make_layer`), FPN 16 channels + LastLevelMaxPool, RPN with anchors
8..128 x (0.5, 1, 2), MultiScaleRoIAlign (canonical scale 56), TwoMLPHead 32, two 16-channel
mask convs, 5 classes. Weights are random with O(1) activations (so scores do not tie) and are
rounded to float16, which is how they are stored; the reference runs in float32.

Training losses are recorded with samplers that draw every candidate (batch sizes above the
candidate counts, positive fraction 1), which makes torchvision's losses deterministic; the
test runs our `losses` with the same sampler settings.
"""

import json
import pathlib

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.mask_rcnn import maskrcnn_resnet50_fpn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

OUT = pathlib.Path(__file__).with_name('tiny_maskrcnn.npz')
# Names and shapes of torchvision maskrcnn_resnet50_fpn's state dict (FrozenBatchNorm2d, as with
# pretrained weights), for the parameter-naming test.
R50_KEYS = pathlib.Path(__file__).with_name('maskrcnn_resnet50_fpn_keys.json')
WIDTH, FPN_CH, FC_DIM, MASK_DIM, NUM_CLASSES = 8, 16, 32, 16, 5
PADDED_HW = (64, 96)
CONTENT_HW = (60, 90)  # the content inside the zero padding (tests clipping to image_size)
# Deterministic samplers for the loss reference: more slots than candidates, no positive cap.
RPN_SAMPLES, ROI_SAMPLES = 4096, 128
# Ground truth of the loss reference: integer boxes with box-filling masks, labels 1..K-1.
GT_BOXES = ((4, 6, 30, 40), (40, 10, 80, 28), (50, 30, 62, 58))
GT_LABELS = (1, 3, 2)


def build() -> MaskRCNN:
  body = ResNet(Bottleneck, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d)
  body.inplanes = WIDTH
  body.conv1 = nn.Conv2d(3, WIDTH, kernel_size=7, stride=2, padding=3, bias=False)
  body.bn1 = FrozenBatchNorm2d(WIDTH)
  body.layer1 = body._make_layer(Bottleneck, WIDTH, 1)
  body.layer2 = body._make_layer(Bottleneck, 2 * WIDTH, 1, stride=2)
  body.layer3 = body._make_layer(Bottleneck, 4 * WIDTH, 1, stride=2)
  body.layer4 = body._make_layer(Bottleneck, 8 * WIDTH, 1, stride=2)
  chans = [4 * WIDTH * m for m in (1, 2, 4, 8)]
  backbone = BackboneWithFPN(body, {f'layer{i + 1}': str(i) for i in range(4)}, chans, FPN_CH,
                             extra_blocks=LastLevelMaxPool())
  names = ['0', '1', '2', '3']
  return MaskRCNN(
      backbone, min_size=64, max_size=96,
      rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)),
                                           ((0.5, 1.0, 2.0),) * 5),
      rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
      rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
      rpn_batch_size_per_image=RPN_SAMPLES, rpn_positive_fraction=1.0,
      box_batch_size_per_image=ROI_SAMPLES, box_positive_fraction=1.0,
      box_roi_pool=MultiScaleRoIAlign(names, 7, 2, canonical_scale=56),
      box_head=TwoMLPHead(FPN_CH * 49, FC_DIM),
      box_predictor=FastRCNNPredictor(FC_DIM, NUM_CLASSES),
      box_detections_per_img=10,
      mask_roi_pool=MultiScaleRoIAlign(names, 14, 2, canonical_scale=56),
      mask_head=MaskRCNNHeads(FPN_CH, [MASK_DIM, MASK_DIM], 1),
      mask_predictor=MaskRCNNPredictor(MASK_DIM, MASK_DIM, NUM_CLASSES)).eval()


def randomise(model: nn.Module, gen: torch.Generator) -> None:
  """O(1)-activation random weights and frozen-BN statistics, rounded to float16."""
  sd = model.state_dict()
  for k, v in sd.items():
    if not v.dtype.is_floating_point:
      continue
    if k.endswith('running_var'):
      new = torch.rand(v.shape, generator=gen) + 0.5
    elif k.endswith('running_mean') or (v.ndim == 1 and not k.endswith('weight')):
      new = 0.1 * torch.randn(v.shape, generator=gen)
    elif v.ndim == 1:  # BN weight
      new = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
    else:
      fan_in = v[0].numel() if 'conv5_mask' not in k else v.shape[0] * 4
      new = torch.randn(v.shape, generator=gen) * (1.0 / fan_in) ** 0.5
      if 'bbox_pred' in k:
        new = new * 0.1  # boxes near their anchors / proposals, no size clamping
    sd[k] = new.half().float()
  model.load_state_dict(sd)


def main() -> None:
  gen = torch.Generator().manual_seed(0)
  model = build()
  randomise(model, gen)
  x = torch.zeros(1, 3, *PADDED_HW)
  x[:, :, :CONTENT_HW[0], :CONTENT_HW[1]] = torch.randn(1, 3, *CONTENT_HW, generator=gen)
  x = x.half().float()
  images = ImageList(x, [CONTENT_HW])
  out = {'image': x.numpy(), 'content_hw': np.array(CONTENT_HW, np.int32)}
  with torch.no_grad():
    feats = model.backbone(x)
    for i, f in enumerate(feats.values()):
      out[f'feat{i}'] = f.numpy()
    obj, deltas = model.rpn.head(list(feats.values()))
    for i, (o, d) in enumerate(zip(obj, deltas)):
      out[f'objectness{i}'] = o.numpy()
      out[f'rpn_deltas{i}'] = d.numpy()
    proposals, _ = model.rpn(images, feats)
    out['proposals'] = proposals[0].numpy()
    det, _ = model.roi_heads(feats, proposals, images.image_sizes)
    for k in ('boxes', 'scores', 'labels', 'masks'):
      out[f'det_{k}'] = det[0][k].numpy()
  masks = torch.zeros(len(GT_BOXES), *PADDED_HW, dtype=torch.uint8)
  for i, (x1, y1, x2, y2) in enumerate(GT_BOXES):
    masks[i, y1:y2, x1:x2] = 1
  targets = [{'boxes': torch.tensor(GT_BOXES, dtype=torch.float32),
              'labels': torch.tensor(GT_LABELS, dtype=torch.int64), 'masks': masks}]
  model.train()
  with torch.no_grad():
    feats = model.backbone(x)
    proposals, rpn_losses = model.rpn(images, feats, targets)
    _, roi_losses = model.roi_heads(feats, proposals, images.image_sizes, targets)
  for k, v in {**rpn_losses, **roi_losses}.items():
    out[f'loss/{k}'] = v.numpy()
  out['gt_boxes'] = np.array(GT_BOXES, np.float32)
  out['gt_labels'] = np.array(GT_LABELS, np.int32)
  out['gt_masks_full'] = masks.numpy()
  for k, v in model.state_dict().items():
    out['sd/' + k] = v.numpy().astype(np.float16) if v.dtype.is_floating_point else v.numpy()
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({OUT.stat().st_size} bytes); {len(det[0]["boxes"])} detections, '
        f'{len(out["proposals"])} proposals; losses {rpn_losses} {roi_losses}')

  r50 = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
  # Randomly initialised torchvision models use BatchNorm2d; drop its step counters so the keys
  # are those of the pretrained (FrozenBatchNorm2d) model.
  keys = {k: list(v.shape) for k, v in r50.state_dict().items()
          if not k.endswith('num_batches_tracked')}
  R50_KEYS.write_text('{\n' + ',\n'.join(f'{json.dumps(k)}: {json.dumps(v)}'
                                           for k, v in keys.items()) + '\n}\n')
  print(f'wrote {R50_KEYS} ({len(keys)} entries)')


if __name__ == '__main__':
  main()
