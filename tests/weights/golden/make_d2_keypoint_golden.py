"""Writes the detectron2 keypoint golden files of tests/weights: a tiny detectron2 Keypoint
R-CNN, its outputs, and a `keypoint_rcnn_loss` case.

Run with a detectron2 environment (CI reads only the files written here, without torch):

    python tests/weights/golden/make_d2_keypoint_golden.py

Files:
  d2_tiny_keypointrcnn.pkl  the model in detectron2's checkpoint format (`{'model': {name:
                            float16 ndarray}, ...}`), converted by the test with
                            `weights.from_detectron2`.
  d2_tiny_keypoint_golden.npz
      inputs (make_d2_golden.py's two drawn images in one padded batch, BGR minus Caffe means,
      float16-exact) and detectron2's outputs: detections (boxes, scores, labels in our label
      space), `pred_keypoints` [N, 3, 3] (x, y, detectron2's softmax score), the heatmap logit
      at each keypoint (`heatmaps_to_keypoints`' third column, torchvision's score), the
      largest adaptive sample grid its poolers used, and `detector_postprocess`'s keypoints at
      an "original" size other than the input; and `loss/*`: float16-exact heatmap logits of 7
      RoIs in two images, their proposals and matched ground-truth keypoints (on edges, outside
      the box, invisible, and RoIs with no visible keypoint inside), which RoIs
      `select_proposals_with_visible_keypoints` keeps, and `keypoint_rcnn_loss` of the kept ones
      with both normalisers (visible count; images x keypoints x 512 x 0.25).

The network: make_d2_golden.py's tiny backbone and RPN (one bottleneck per stage, stem 8, FPN
16, anchors 8..128) with the `StandardROIHeads` of `COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x`
at the sizes of `configs/detectron2_keypointrcnn_r50_fpn.get_config('tiny')` with one class
(test_d2_keypoint_golden.py sets num_classes 2 and 3 keypoints): 32-wide box head, two 16-channel
keypoint convs, 3 keypoints, canonical box size 56, both poolers ROIAlignV2 at detectron2's
default adaptive sampling ratio 0 (this script checks that no RoI needed more than 4 samples a
bin, the preset's cap, so that the comparison is exact). Weights as make_d2_golden.py's, with the
keypoint predictor's logits spread to std 2 (peaked heatmaps).
"""

import pathlib
import pickle
import sys

import numpy as np
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.modeling.roi_heads.keypoint_head import keypoint_rcnn_loss
from detectron2.modeling.roi_heads.roi_heads import select_proposals_with_visible_keypoints
from detectron2.structures import Boxes, ImageList, Instances, Keypoints, heatmaps_to_keypoints
from detectron2.utils.events import EventStorage

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
import make_d2_golden as mdg  # pylint: disable=g-import-not-at-top,wrong-import-position

PKL = HERE / 'd2_tiny_keypointrcnn.pkl'
NPZ = HERE / 'd2_tiny_keypoint_golden.npz'
NUM_KEYPOINTS, KP_DIM, KP_CONVS = 3, 16, 2
KEYPOINT_LOGIT_STD = 2.0
MAX_GRID = 4  # the preset's model.roi.max_sampling_ratio
BATCH_SIZE_PER_IMAGE, POSITIVE_FRACTION = 512, 0.25  # ROI_HEADS defaults ('fixed' normaliser)
SEED = 4  # the first seed whose detections are not slivers (sides 6..64 px)


def build():
  model = mdg.build()
  cfg = get_cfg()
  cfg.merge_from_file(model_zoo.get_config_file('COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml'))
  cfg.MODEL.DEVICE = 'cpu'
  cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
  cfg.MODEL.ROI_BOX_HEAD.FC_DIM = mdg.FC_DIM
  cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (KP_DIM,) * KP_CONVS
  cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = NUM_KEYPOINTS
  cfg.TEST.DETECTIONS_PER_IMAGE = mdg.DETECTIONS
  assert cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO == 0
  assert cfg.MODEL.ROI_KEYPOINT_HEAD.POOLER_SAMPLING_RATIO == 0
  model.roi_heads = build_roi_heads(cfg, model.backbone.output_shape())
  for pooler in (model.roi_heads.box_pooler, model.roi_heads.keypoint_pooler):
    pooler.canonical_box_size = mdg.CANONICAL_SCALE  # not a detectron2 config key
  return model.eval()


def loss_case(gen: torch.Generator) -> dict:
  """Heatmap logits of 7 RoIs (4 + 3 in two images) and their matched gt keypoints; RoIs 2 and
  5 have no visible keypoint inside their box (one only invisible, one only outside), so
  detectron2's proposal filter drops them; detectron2's loss of what it keeps, both
  normalisers."""
  n, k, s = 7, NUM_KEYPOINTS, 56
  logits = (torch.randn(n, k, s, s, generator=gen) * 2).half().float()
  x1y1 = torch.rand(n, 2, generator=gen) * 40
  wh = 4 + torch.rand(n, 2, generator=gen) * 60
  rois = torch.cat([x1y1, x1y1 + wh], 1)
  gt = torch.zeros(n, k, 3)
  gt[..., :2] = x1y1[:, None] + (torch.rand(n, k, 2, generator=gen) * 1.3 - 0.15) * wh[:, None]
  gt[..., 2] = torch.randint(1, 3, (n, k), generator=gen).float()
  gt[0, 0, :2] = rois[0, 2:]  # exactly on the right/bottom edge: kept, the last cell
  gt[1, 1, 2] = 0  # one invisible keypoint
  gt[2, :, 2] = 0  # RoI 2: its keypoints inside but none visible
  gt[2, 0, :2] = (rois[2, :2] + rois[2, 2:]) / 2
  gt[5, :, :2] = rois[5, 2:] + torch.tensor([3.0, 1.0])  # RoI 5: all visible, all outside
  split = [4, 3]
  proposals = []
  for b, (lo, hi) in enumerate(((0, 4), (4, 7))):
    inst = Instances((100, 100), proposal_boxes=Boxes(rois[lo:hi]),
                     gt_keypoints=Keypoints(gt[lo:hi]))
    proposals.append(inst)
  with EventStorage(0):
    kept = select_proposals_with_visible_keypoints(proposals)
    selection = np.zeros(n, bool)
    start = 0
    for b, (inst, kept_inst) in enumerate(zip(proposals, kept)):
      boxes = inst.proposal_boxes.tensor
      for row in kept_inst.proposal_boxes.tensor:
        selection[start + int(torch.nonzero((boxes == row).all(1))[0])] = True
      start += split[b]
    kept_logits = logits[torch.from_numpy(selection)]
    visible = keypoint_rcnn_loss(kept_logits, kept, normalizer=None)
    fixed_normaliser = len(kept) * NUM_KEYPOINTS * BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION
    fixed = keypoint_rcnn_loss(kept_logits, kept, normalizer=fixed_normaliser)
  assert list(np.flatnonzero(~selection)) == [2, 5], selection
  return {'loss/logits': logits.numpy().astype(np.float16), 'loss/rois': rois.numpy(),
          'loss/gt': gt.numpy(), 'loss/kept': selection,
          'loss/visible': np.float32(visible.item()), 'loss/fixed': np.float32(fixed.item())}


def main() -> None:
  torch.manual_seed(SEED)
  gen = torch.Generator().manual_seed(SEED)
  model = build()
  mdg.randomise(model, gen)
  x = mdg.make_batch(np.random.default_rng(SEED))
  images = ImageList(x, [tuple(hw) for hw in mdg.CONTENT_HW])
  mdg.calibrate_logits(model, images, mdg.LOGIT_STD)
  rh = model.roi_heads
  with torch.no_grad():
    feats = model.backbone(x)
    proposals, _ = model.proposal_generator(images, feats, None)
    boxes = [p.proposal_boxes for p in proposals]
    maps = rh.keypoint_head.layers(rh.keypoint_pooler([feats[f] for f in rh.keypoint_in_features],
                                                      boxes))
    mdg._scale_layer(rh.keypoint_head.score_lowres, KEYPOINT_LOGIT_STD / float(maps.std()))
    det, _ = rh(images, feats, proposals, None)
  out = {'images': x.permute(0, 2, 3, 1).numpy().astype(np.float16),
         'image_size': np.array(mdg.CONTENT_HW, np.int32),
         'original_size': np.array(mdg.ORIGINAL_HW, np.int32)}
  grids = []
  for b, inst in enumerate(det):
    grids.append(mdg._max_grid(rh.box_pooler, [proposals[b].proposal_boxes]))
    grids.append(mdg._max_grid(rh.keypoint_pooler, [inst.pred_boxes]))
    out[f'boxes{b}'] = inst.pred_boxes.tensor.numpy().copy()
    out[f'scores{b}'] = inst.scores.numpy()
    out[f'labels{b}'] = inst.pred_classes.numpy().astype(np.int32) + 1
    out[f'keypoints{b}'] = inst.pred_keypoints.numpy().copy()
    out[f'keypoint_logits{b}'] = heatmaps_to_keypoints(
        inst.pred_keypoint_heatmaps, inst.pred_boxes.tensor)[..., 2].numpy()
    post = detector_postprocess(Instances(inst.image_size, pred_boxes=inst.pred_boxes.clone(),
                                          pred_keypoints=inst.pred_keypoints.clone()),
                                *mdg.ORIGINAL_HW[b])
    assert len(post) == len(inst)  # no box is empty once clipped
    out[f'original_keypoints{b}'] = post.pred_keypoints.numpy()
  assert max(grids) <= MAX_GRID, grids
  out['max_grid'] = np.int32(max(grids))
  out.update(loss_case(gen))
  state = {k: v.numpy().astype(np.float16) for k, v in model.state_dict().items()}
  with open(PKL, 'wb') as f:
    pickle.dump({'model': state, '__author__': 'maskrcnn_jax make_d2_keypoint_golden.py'}, f,
                protocol=4)
  np.savez_compressed(NPZ, **out)
  sides = [(d.pred_boxes.tensor[:, 2:] - d.pred_boxes.tensor[:, :2]).round().int().tolist()
           for d in det]
  print(f'wrote {PKL.name} ({PKL.stat().st_size} B), {NPZ.name} ({NPZ.stat().st_size} B); '
        f'detections per image {[len(d) for d in det]}, scores '
        f'{[d.scores.numpy().round(3).tolist() for d in det]}, box sides {sides}, keypoint '
        f'scores {[d.pred_keypoints[..., 2].numpy().round(3).tolist() for d in det]}, largest '
        f'sample grid {max(grids)}; loss visible {out["loss/visible"]:.5f}, fixed '
        f'{out["loss/fixed"]:.5f}')


if __name__ == '__main__':
  main()
