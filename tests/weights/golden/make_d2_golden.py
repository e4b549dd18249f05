"""Writes the detectron2 golden files of tests/weights: a tiny detectron2 Mask R-CNN, its outputs.

Run with a detectron2 environment (CI reads only the files written here, without torch):

    python tests/weights/golden/make_d2_golden.py

Files:
  d2_tiny_maskrcnn.pkl  the model in detectron2's checkpoint format: a pickle of
                        `{'model': {name: float16 ndarray}, '__author__': ...}`, read by the
                        test with the restricted unpickler and converted by
                        `weights.from_detectron2`.
  d2_tiny_golden.npz    inputs (two drawn images in one padded batch, BGR minus Caffe means,
                        float16-exact, different content sizes) and detectron2's outputs:
                        FPN features P2..P6, RPN proposals, detections (boxes, scores, labels
                        in our label space = detectron2's class + 1, float16-exact 28x28 mask
                        probabilities), `paste_masks_in_image` of those masks at the content size,
                        and `detector_postprocess` to an "original" size other than the input
                        (which detections it keeps, their rescaled boxes and pasted masks), the
                        masks bit-packed.

The network is detectron2's own `GeneralizedRCNN` (ResNet of `BottleneckBlock`s with FrozenBN,
stride in the 1x1, FPN with `LastLevelMaxPool`, `StandardRPNHead`, `StandardROIHeads` with
ROIAlignV2 poolers, `FastRCNNConvFCHead`, `MaskRCNNConvUpsampleHead`) at the sizes of
`configs/detectron2_maskrcnn_r50_fpn.get_config('tiny')` (test_d2_golden.py checks the config
still has them): one bottleneck per stage (stem width 8), FPN 16, anchors 8..128, canonical box
size 56, 32-wide box head, two 16-channel mask convs, 4 classes (+ background), both poolers at
detectron2's adaptive sampling ratio 0 (at these sizes no RoI needs more than the preset's cap
of 4 samples per axis; the script checks it). Weights are random, scaled for O(1) activations, FrozenBN statistics far from
the identity, objectness and class logits of std 1 (detections pass the 0.05 threshold).
"""

import pathlib
import pickle
import sys

import numpy as np
import torch

from detectron2.config import get_cfg
from detectron2 import model_zoo
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList, Instances

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from make_golden import draw_image  # pylint: disable=g-import-not-at-top,wrong-import-position

PKL = HERE / 'd2_tiny_maskrcnn.pkl'
NPZ = HERE / 'd2_tiny_golden.npz'

# The 'tiny' config's sizes (configs/maskrcnn_r50_fpn.py::_make_tiny, detectron2 preset).
STEM, FPN_CH, FC_DIM, MASK_DIM, MASK_CONVS, NUM_CLASSES = 8, 16, 32, 16, 2, 5
ANCHOR_SIZES = (8, 16, 32, 64, 128)
CANONICAL_SCALE = 56
PRE_NMS_TEST, POST_NMS_TEST, DETECTIONS = 100, 50, 10
PADDED_HW = (64, 96)  # the tiny config's first bucket
CONTENT_HW = ((64, 96), (50, 75))
ORIGINAL_HW = ((80, 120), (37, 55))  # detector_postprocess sizes: one upscale, one downscale
LOGIT_STD = 1.0
# Small box regressions keep boxes near their anchors (a few to ~40 px on these images).
DELTA_SCALE = 0.03
SEED = 5  # the first seed whose detections are neither slivers nor all of one class
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_SPREAD = 58.0  # about the ImageNet pixel std, in grey levels


def build() -> GeneralizedRCNN:
  cfg = get_cfg()
  cfg.merge_from_file(model_zoo.get_config_file(
      'COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml'))
  cfg.MODEL.DEVICE = 'cpu'
  cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in ANCHOR_SIZES]
  cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = PRE_NMS_TEST
  cfg.MODEL.RPN.POST_NMS_TOPK_TEST = POST_NMS_TEST
  cfg.MODEL.ROI_HEADS.NUM_CLASSES = NUM_CLASSES - 1
  cfg.MODEL.ROI_BOX_HEAD.FC_DIM = FC_DIM
  cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0  # detectron2's default: adaptive
  cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = MASK_DIM
  cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = MASK_CONVS
  cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
  cfg.TEST.DETECTIONS_PER_IMAGE = DETECTIONS
  stem = BasicStem(3, STEM, norm='FrozenBN')
  stages, channels = [], STEM
  for i in range(4):
    width = STEM * 2**i
    stages.append(ResNet.make_stage(
        BottleneckBlock, 1, in_channels=channels, out_channels=width * 4,
        bottleneck_channels=width, stride_per_block=[1 if i == 0 else 2], norm='FrozenBN',
        stride_in_1x1=True))
    channels = width * 4
  body = ResNet(stem, stages, out_features=['res2', 'res3', 'res4', 'res5'])
  backbone = FPN(bottom_up=body, in_features=['res2', 'res3', 'res4', 'res5'],
                 out_channels=FPN_CH, top_block=LastLevelMaxPool())
  shapes = backbone.output_shape()
  model = GeneralizedRCNN(backbone=backbone, proposal_generator=build_proposal_generator(
      cfg, shapes), roi_heads=build_roi_heads(cfg, shapes), pixel_mean=PIXEL_MEAN_BGR,
                          pixel_std=(1.0, 1.0, 1.0), input_format='BGR').eval()
  for pooler in (model.roi_heads.box_pooler, model.roi_heads.mask_pooler):
    pooler.canonical_box_size = CANONICAL_SCALE  # not a detectron2 config key
  return model


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Random weights with O(1) activations, rounded to float16 (the stored precision)."""
  sd = model.state_dict()
  for k, v in sd.items():
    if not v.dtype.is_floating_point:
      continue
    if k.endswith('running_var'):
      new = 0.5 + torch.rand(v.shape, generator=gen)
    elif k.endswith('running_mean') or k.endswith('.bias'):
      new = 0.2 * torch.randn(v.shape, generator=gen)
    elif v.ndim == 1:  # FrozenBN weight
      new = 0.8 + 0.4 * torch.rand(v.shape, generator=gen)
    else:  # conv [out, in, kh, kw], linear [out, in], deconv [in, out, 2, 2]
      fan_in = v.shape[0] if 'deconv' in k else v[0].numel()
      new = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5
      if 'bbox_pred' in k or 'anchor_deltas' in k:
        new *= DELTA_SCALE  # boxes stay near their anchors / proposals
      if k == 'backbone.bottom_up.stem.conv1.weight':
        new /= PIXEL_SPREAD  # Caffe inputs are in 0..255 units (std 1): O(1) stem outputs
    sd[k] = new.half().float()
  model.load_state_dict(sd)


def _scale_layer(layer: torch.nn.Module, scale: float) -> None:
  layer.weight.copy_((layer.weight * scale).half().float())
  layer.bias.copy_((layer.bias * scale).half().float())


def calibrate_logits(model: GeneralizedRCNN, images: ImageList, target_std: float) -> None:
  """Rescales the RPN objectness and `cls_score` so that their logits have std `target_std`.

  The objectness matters beyond spreading the scores: detectron2 ranks proposals by logits, we
  rank by float32 sigmoids, which tie above ~17 (a documented deviation); O(1) logits keep
  this golden file about the conversion, not about that."""
  with torch.no_grad():
    feats = model.backbone(images.tensor)
    rpn = model.proposal_generator
    obj, _ = rpn.rpn_head([feats[f] for f in rpn.in_features])
    _scale_layer(rpn.rpn_head.objectness_logits,
                 target_std / float(torch.cat([o.flatten() for o in obj]).std()))
    obj, _ = rpn.rpn_head([feats[f] for f in rpn.in_features])
    assert max(float(o.abs().max()) for o in obj) < 12, 'objectness logits near saturation'
    proposals, _ = model.proposal_generator(images, feats, None)
    rh = model.roi_heads
    x = rh.box_head(rh.box_pooler([feats[f] for f in rh.box_in_features],
                                  [p.proposal_boxes for p in proposals]))
    logits, _ = rh.box_predictor(x)
    _scale_layer(rh.box_predictor.cls_score, target_std / float(logits.std()))


def make_batch(rng: np.random.Generator) -> torch.Tensor:
  """BGR minus Caffe means, float16-exact, NCHW, zero-padded at the bottom/right."""
  x = torch.zeros(len(CONTENT_HW), 3, *PADDED_HW)
  mean = torch.tensor(PIXEL_MEAN_BGR)[:, None, None]
  for i, (h, w) in enumerate(CONTENT_HW):
    rgb = draw_image(rng, h, w)
    x[i, :, :h, :w] = torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1).float() - mean
  return x.half().float()


def _max_grid(pooler, box_lists) -> int:
  """The largest ceil(RoI side / output size) any RoI gets on its level (ratio 0)."""
  from detectron2.modeling.poolers import assign_boxes_to_levels  # pylint: disable=g-import-not-at-top
  levels = assign_boxes_to_levels(box_lists, pooler.min_level, pooler.max_level,
                                  pooler.canonical_box_size, pooler.canonical_level)
  boxes = torch.cat([b.tensor for b in box_lists])
  scale = 2.0 ** -(levels.double() + pooler.min_level)
  sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1).double()
  out = pooler.output_size[0] if isinstance(pooler.output_size, tuple) else pooler.output_size
  return int(torch.ceil(sides * scale[:, None] / out).max()) if len(boxes) else 0


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  model = build()
  randomise(model, gen)
  x = make_batch(np.random.default_rng(SEED))
  images = ImageList(x, [tuple(hw) for hw in CONTENT_HW])
  calibrate_logits(model, images, LOGIT_STD)
  out = {'images': x.permute(0, 2, 3, 1).numpy().astype(np.float16),
         'image_size': np.array(CONTENT_HW, np.int32),
         'original_size': np.array(ORIGINAL_HW, np.int32)}
  with torch.no_grad():
    feats = model.backbone(x)
    for i, k in enumerate(('p2', 'p3', 'p4', 'p5', 'p6')):
      out[f'feature{i}'] = feats[k].permute(0, 2, 3, 1).numpy()  # NHWC
    proposals, _ = model.proposal_generator(images, feats, None)
    # Mask probabilities are made float16-exact before anything pastes them, so the stored
    # values are exactly what detectron2 pasted.
    det, _ = model.roi_heads(images, feats, proposals, None)
    # The preset caps the adaptive grid at 4 samples per axis: the golden must not need more.
    need = max(_max_grid(model.roi_heads.box_pooler, [p.proposal_boxes for p in proposals]),
               _max_grid(model.roi_heads.mask_pooler, [d.pred_boxes for d in det]))
    assert need <= 4, f'a RoI needs {need} samples per axis, more than the preset cap of 4'
    print(f'largest adaptive grid: {need} samples per axis')
    for b, inst in enumerate(det):
      inst.pred_masks = inst.pred_masks.half().float()
      hw = CONTENT_HW[b]
      out[f'proposals{b}'] = proposals[b].proposal_boxes.tensor.numpy().copy()
      out[f'boxes{b}'] = inst.pred_boxes.tensor.numpy().copy()
      out[f'scores{b}'] = inst.scores.numpy()
      out[f'labels{b}'] = inst.pred_classes.numpy().astype(np.int32) + 1
      out[f'masks{b}'] = inst.pred_masks[:, 0].numpy().astype(np.float16)
      pasted = paste_masks_in_image(inst.pred_masks[:, 0], inst.pred_boxes, hw)
      out[f'pasted{b}'] = np.packbits(pasted.numpy(), axis=-1)
      # detector_postprocess drops boxes that are empty after clipping (ours keeps them, with an
      # empty mask): `kept` says which detections it returned.
      scale = np.array(ORIGINAL_HW[b], np.float64) / np.array(hw, np.float64)
      clipped = inst.pred_boxes.clone()
      clipped.scale(scale[1], scale[0])
      clipped.clip(ORIGINAL_HW[b])
      kept = clipped.nonempty()
      # (detector_postprocess scales the Boxes it is given in place: hand it a copy.)
      post = detector_postprocess(Instances(inst.image_size, pred_boxes=inst.pred_boxes.clone(),
                                            pred_masks=inst.pred_masks), *ORIGINAL_HW[b])
      assert len(post) == int(kept.sum())
      out[f'original_kept{b}'] = kept.numpy()
      out[f'original_boxes{b}'] = post.pred_boxes.tensor.numpy()
      out[f'original_pasted{b}'] = np.packbits(post.pred_masks.numpy(), axis=-1)
  state = {k: v.numpy().astype(np.float16) for k, v in model.state_dict().items()}
  with open(PKL, 'wb') as f:
    pickle.dump({'model': state, '__author__': 'maskrcnn_jax make_d2_golden.py'}, f, protocol=4)
  np.savez_compressed(NPZ, **out)
  counts = [len(d) for d in det]
  sides = [(d.pred_boxes.tensor[:, 2:] - d.pred_boxes.tensor[:, :2]).round().int().tolist()
           for d in det]
  print(f'wrote {PKL.name} ({PKL.stat().st_size} B), {NPZ.name} ({NPZ.stat().st_size} B); '
        f'detections per image {counts}, proposals {[len(p) for p in proposals]}, scores '
        f'{[d.scores.numpy().round(3).tolist() for d in det]}, mask probability range '
        f'{[(float(d.pred_masks.min()), float(d.pred_masks.max())) for d in det]}, labels '
        f'{[d.pred_classes.tolist() for d in det]}, box sides {sides}')


if __name__ == '__main__':
  main()
