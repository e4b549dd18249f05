"""Writes the golden files of tests/weights: a tiny torchvision Mask R-CNN and its outputs.

Run with the torch venv (CI reads only the files written here and needs no torch):

    python tests/weights/golden/make_golden.py

Files:
  tv_tiny_maskrcnn.pth   the model's state dict saved by `torch.save` (float16 tensors, zip
                         format): the test reads it with the torch-free reader, converts it with
                         `weights.from_torchvision` and runs our model.
  tv_tiny_golden.npz     inputs (two drawn images in one padded batch with different content
                         sizes) and torchvision's outputs: FPN features, RPN proposals,
                         final detections (boxes, scores, labels, 28x28 mask probabilities).
  reader_cases.pth       odd tensors (non-contiguous, storage offsets, shared storage, bf16,
                         int64, bool, 0-d) with their values in tv_tiny_golden.npz.

The network is torchvision's own `MaskRCNN` with the widths of
`configs/torchvision_maskrcnn_r50_fpn.get_config('tiny')` (test_golden.py checks the config still
has them): a ResNet body of four single-bottleneck stages (stem width 8) built from
torchvision's `Bottleneck` with `FrozenBatchNorm2d`, FPN 16 + max-pool P6, anchors 8..128, RoIAlign
(aligned=False, ratio 2, canonical scale 56), 32-wide box head, two 16-channel mask convs and 5
classes. Weights are random but scaled so that activations stay O(1), batch-norm statistics are
far from the identity, and class logits are spread enough that detections pass the 0.05 score
threshold (a default-initialised model scores every class about 1/K).
"""

import pathlib
import sys

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

HERE = pathlib.Path(__file__).parent
PTH = HERE / 'tv_tiny_maskrcnn.pth'
NPZ = HERE / 'tv_tiny_golden.npz'
READER_PTH = HERE / 'reader_cases.pth'

# The 'tiny' config's sizes (configs/maskrcnn_r50_fpn.py::_make_tiny).
STEM, FPN_CH, FC_DIM, MASK_DIM, MASK_CONVS, NUM_CLASSES = 8, 16, 32, 16, 2, 5
ANCHOR_SIZES = (8, 16, 32, 64, 128)
CANONICAL_SCALE = 56
PRE_NMS_TEST, POST_NMS_TEST, DETECTIONS = 100, 50, 10
PADDED_HW = (128, 192)  # multiples of 64, so every level's anchor stride is nominal
CONTENT_HW = ((128, 192), (112, 150))
LOGIT_STD = 1.0
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class TinyBody(nn.Module):
  """torchvision ResNet layout (conv1/bn1/layer1..4) with one Bottleneck per stage."""

  def __init__(self, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = FrozenBatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = width
    for i in range(4):
      planes, stride = width * 2**i, 1 if i == 0 else 2
      down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                           FrozenBatchNorm2d(planes * 4))
      block = Bottleneck(inplanes, planes, stride, down, norm_layer=FrozenBatchNorm2d)
      setattr(self, f'layer{i + 1}', nn.Sequential(block))
      inplanes = planes * 4

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def build() -> MaskRCNN:
  body = TinyBody(STEM)
  backbone = BackboneWithFPN(body, {f'layer{i + 1}': str(i) for i in range(4)},
                             [STEM * 4 * 2**i for i in range(4)], FPN_CH,
                             extra_blocks=LastLevelMaxPool())
  levels = ['0', '1', '2', '3']
  return MaskRCNN(
      backbone,
      rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in ANCHOR_SIZES),
                                           ((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES)),
      rpn_pre_nms_top_n_test=PRE_NMS_TEST, rpn_post_nms_top_n_test=POST_NMS_TEST,
      box_roi_pool=MultiScaleRoIAlign(levels, 7, 2, canonical_scale=CANONICAL_SCALE),
      box_head=TwoMLPHead(FPN_CH * 49, FC_DIM),
      box_predictor=FastRCNNPredictor(FC_DIM, NUM_CLASSES),
      box_detections_per_img=DETECTIONS,
      mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2, canonical_scale=CANONICAL_SCALE),
      mask_head=MaskRCNNHeads(FPN_CH, [MASK_DIM] * MASK_CONVS, 1),
      mask_predictor=MaskRCNNPredictor(MASK_DIM, MASK_DIM, NUM_CLASSES)).eval()


def randomise(model: nn.Module, gen: torch.Generator) -> None:
  """Random weights with O(1) activations, rounded to float16 (the stored precision)."""
  sd = model.state_dict()
  for k, v in sd.items():
    if not v.dtype.is_floating_point:
      continue
    if k.endswith('running_var'):
      new = 0.5 + torch.rand(v.shape, generator=gen)
    elif k.endswith('running_mean') or k.endswith('.bias'):
      new = 0.2 * torch.randn(v.shape, generator=gen)
    elif v.ndim == 1:  # frozen-BN weight
      new = 0.8 + 0.4 * torch.rand(v.shape, generator=gen)
    else:
      fan_in = v[0].numel() if 'conv5_mask' not in k else v.shape[0] * v.shape[2] * v.shape[3] // 4
      new = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
      if 'bbox_pred' in k:
        new *= 0.1  # boxes stay near their anchors / proposals
    sd[k] = new.half().float()
  model.load_state_dict(sd)


def calibrate_class_logits(model: MaskRCNN, images: ImageList, target_std: float) -> None:
  """Rescales `cls_score` so the class logits of the RPN proposals have std `target_std`:
  peaked enough for scores above the 0.05 threshold, spread enough that scores do not tie."""
  with torch.no_grad():
    feats = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, feats)
    rh = model.roi_heads
    x = rh.box_head(rh.box_roi_pool(feats, proposals, images.image_sizes))
    logits, _ = rh.box_predictor(x)
    scale = target_std / float(logits.std())
    predictor = rh.box_predictor.cls_score
    predictor.weight.copy_((predictor.weight * scale).half().float())
    predictor.bias.copy_((predictor.bias * scale).half().float())


def draw_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """uint8 [h, w, 3] RGB: a smooth background and a few filled rectangles and ellipses."""
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  base = rng.uniform(40, 200, 3)
  img = base + 40 * np.stack([np.sin(xx / w * 3 + p) * np.cos(yy / h * 2 + p)
                              for p in rng.uniform(0, 6, 3)], -1)
  for _ in range(6):
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(6, h / 3), rng.uniform(6, w / 3)
    colour = rng.uniform(0, 255, 3)
    if rng.random() < 0.5:
      inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
    else:
      inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    img[inside] = colour
  return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def make_batch(rng: np.random.Generator) -> torch.Tensor:
  """Normalised float16-exact NCHW batch, zero-padded at the bottom/right like torchvision."""
  x = torch.zeros(len(CONTENT_HW), 3, *PADDED_HW)
  mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
  for i, (h, w) in enumerate(CONTENT_HW):
    img = torch.from_numpy(draw_image(rng, h, w)).permute(2, 0, 1).float()
    x[i, :, :h, :w] = (img - mean) / std
  return x.half().float()


def reader_cases() -> dict:
  """Tensors whose storage layout exercises every branch of the torch-free reader."""
  gen = torch.Generator().manual_seed(1)
  base = torch.randn(4, 6, generator=gen)
  return {
      'transposed': base.t(),  # non-contiguous view
      'offset_view': base[1:3, 2:],  # storage offset + strides
      'shares_storage': base,  # same storage as the two above
      'bf16': torch.randn(3, 2, generator=gen).bfloat16(),
      'half': torch.randn(5, generator=gen).half(),
      'int64': torch.arange(7, dtype=torch.int64) - 3,
      'bool': torch.tensor([True, False, True]),
      'scalar': torch.tensor(2.5),
      'empty': torch.zeros(0, 3),
  }


def cross_check_reader() -> None:
  """If this package imports here, its torch-free reader must agree with torch.load."""
  try:
    sys.path.insert(0, str(HERE.parents[2]))
    from maskrcnn_jax.weights import safe_io  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'skipping the reader cross-check ({e})')
    return
  for path in (PTH, READER_PTH):
    ours = safe_io.load_torch(str(path), use_torch=False)
    ref = safe_io.load_torch(str(path), use_torch=True)
    assert sorted(ours) == sorted(ref), path
    for k in ref:
      assert ours[k].dtype == ref[k].dtype or ref[k].dtype == np.float32, (k, ours[k].dtype)
      np.testing.assert_array_equal(np.asarray(ours[k], np.float64),
                                    np.asarray(ref[k], np.float64), err_msg=k)
  print('torch-free reader agrees with torch.load')


def main() -> None:
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)
  model = build()
  randomise(model, gen)
  x = make_batch(np.random.default_rng(0))
  images = ImageList(x, [tuple(hw) for hw in CONTENT_HW])
  calibrate_class_logits(model, images, LOGIT_STD)
  out = {'images': x.permute(0, 2, 3, 1).numpy().astype(np.float16),
         'image_size': np.array(CONTENT_HW, np.int32)}
  with torch.no_grad():
    feats = model.backbone(x)
    for i, f in enumerate(feats.values()):
      out[f'feature{i}'] = f.permute(0, 2, 3, 1).numpy()  # NHWC, P2..P6
    proposals, _ = model.rpn(images, feats)
    det, _ = model.roi_heads(feats, proposals, images.image_sizes)
  for b in range(len(CONTENT_HW)):
    out[f'proposals{b}'] = proposals[b].numpy()
    out[f'boxes{b}'] = det[b]['boxes'].numpy()
    out[f'scores{b}'] = det[b]['scores'].numpy()
    out[f'labels{b}'] = det[b]['labels'].numpy().astype(np.int32)
    out[f'masks{b}'] = det[b]['masks'][:, 0].numpy()
  cases = reader_cases()
  for k, v in cases.items():
    out[f'reader/{k}'] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  torch.save({k: v.half() for k, v in model.state_dict().items()}, PTH)
  torch.save(cases, READER_PTH)
  np.savez_compressed(NPZ, **out)
  cross_check_reader()
  counts = [len(det[b]['boxes']) for b in range(len(CONTENT_HW))]
  scores = [det[b]['scores'].numpy().round(3).tolist() for b in range(len(counts))]
  print(f'wrote {PTH.name} ({PTH.stat().st_size} B), {NPZ.name} ({NPZ.stat().st_size} B), '
        f'{READER_PTH.name}; detections per image {counts}, proposals '
        f'{[len(p) for p in proposals]}, scores {scores}')


if __name__ == '__main__':
  main()
