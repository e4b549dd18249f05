"""detectron2 `mask_rcnn_R_50_FPN_{1x,3x}` inference semantics, for converted detectron2 weights.

    maskrcnn-jax convert --from=detectron2 --checkpoint=model_final_f10217.pkl \
        --out=runs/d2_r50 --config=configs/detectron2_maskrcnn_r50_fpn.py
    maskrcnn-jax evaluate --config=configs/detectron2_maskrcnn_r50_fpn.py --workdir=runs/d2_r50 \
        --config.data.source=coco --config.data.val_json=... --config.data.val_images=...

Expected: close to detectron2's model-zoo figures (1x: 38.6 box / 35.2 mask AP; 3x: 41.0 / 37.2
on COCO val2017), minus the small deviations listed below. Labels: detectron2's 80 contiguous
COCO classes are our labels 1..80 (0 = background), so num_classes = 81.

What differs from the (torchvision-style) base config, as detectron2 does it:
* input: BGR channel order, Caffe pixel means (103.530, 116.280, 123.675), std 1 (MSRA weights);
* backbone: stride on the first 1x1 conv of each bottleneck (`STRIDE_IN_1X1`);
* anchors: base anchors not rounded, offset 0.0, nominal strides (P6 anchors 64 px apart);
* RoIAlign: `ROIAlignV2`, i.e. aligned=True (half-pixel offset);
* RPN: empty proposals (side 0) are dropped (we use a tiny positive min_size since ours keeps
  `side >= min_size`); 1000 proposals per image after NMS in training too; L1 box losses
  (`SMOOTH_L1_BETA = 0`);
* detections: no minimum box size;
* mask pasting: `grid_sample` of the 28x28 mask at every pixel centre in the float box,
  foreground where the probability is >= 0.5 (`model.test.mask_paste = 'detectron2'`,
  `ops.masks.paste_masks_detectron2`);
* multi-scale training sizes 640..800 (`INPUT.MIN_SIZE_TRAIN`).

Known deviations (static shapes or other stages, not fixable here):
* sampling ratio: detectron2 uses `POOLER_SAMPLING_RATIO = 0`, i.e. ceil(RoI side / output
  size) samples per bin, a per-RoI, data-dependent count. We use a fixed 2 (what a canonical
  224-px RoI gets on its level P4 in the box head). Measured on the parity images, detectron2's
  grid is 1..4 for 95-99.9% of the proposals (box head; up to 7) and 1..3 for the detections
  (mask head), so pooled features differ for most RoIs. A masked grid exact up to a cap of 4
  (8) matched the random R50 to 3e-2 (1.3e-4) in score, at 1.5x (12-20x) the box head's
  RoIAlign time (the prototype in experiments/parity/detectron2_parity.py).
* level assignment: detectron2 computes floor(4 + log2(sqrt(area) / 224 + 1e-8)), we (like
  torchvision) floor(4 + log2(sqrt(area) / 224) + 1e-6): differs only for boxes within ~1e-6
  of a level boundary.
* RPN NMS ranks by logits in detectron2 and by sigmoid probabilities here: the same order
  except among logits whose float32 sigmoids tie (spaced 6e-8 apart near 1, so ties start near
  logit 10 and every logit above ~17 gives 1.0); measured on a random R101 whose proposals all
  had logits of 14..26, 1% of proposals and 2% of detections differed.
* resizing (data pipeline): detectron2 rounds the resized side (int(x + 0.5)) and resizes
  uint8 images with PIL bilinear (antialiased when shrinking); ours floors and uses
  torch-style bilinear without antialiasing.
* empty detections: detectron2's `detector_postprocess` drops boxes with a side <= 0 after
  clipping to the original image; ours keep them (an empty box pastes an empty mask).

Measured (random weights, detectron2's preprocessed input, `experiments/parity/
detectron2_parity.txt`): with detectron2's poolers at sampling ratio 2 too, 100% of its
detections matched (same label, IoU >= 0.99) on five images, scores within 1.4e-4, pasted masks
at mean IoU >= 0.9996; against its default adaptive ratio 94-97% matched, scores off by up to
0.1, mask IoU 0.96-0.98 (on random weights, which magnify every difference).
"""

from configs import maskrcnn_r50_fpn
from configs import torchvision_maskrcnn_r50_fpn

# detectron2 defaults (config/defaults.py) for MSRA-initialised ResNets.
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD = (1.0, 1.0, 1.0)
COCO_NUM_CLASSES = 81  # 80 classes + background at label 0


def get_config(mode: str = ''):
  c = maskrcnn_r50_fpn.get_config(mode)
  m = c.model
  m.backbone.stride_in_1x1 = True
  m.anchors.round_base = False
  m.anchors.offset = 0.0
  m.roi.aligned = True
  m.roi.sampling_ratio = 2  # approximates detectron2's adaptive ratio 0, see the docstring
  m.rpn.min_size = 1e-6  # detectron2 keeps boxes with sides > 0
  m.rpn.box_loss = 'l1'  # MODEL.RPN.SMOOTH_L1_BETA = 0.0
  m.roi.box_loss = 'l1'  # MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
  m.test.min_box_size = 0.0  # fast_rcnn_inference_single_image filters by score only
  m.test.mask_paste = 'detectron2'  # layers/mask_ops.py paste_masks_in_image, prob >= 0.5
  i = c.input
  i.channel_order = 'BGR'
  i.pixel_mean = DETECTRON2_PIXEL_MEAN_BGR
  i.pixel_std = DETECTRON2_PIXEL_STD
  if mode != 'tiny':
    m.num_classes = COCO_NUM_CLASSES
    m.rpn.post_nms_topk_train = 1000  # detectron2 POST_NMS_TOPK_TRAIN (per image)
    i.train_min_sizes = (640, 672, 704, 736, 768, 800)  # INPUT.MIN_SIZE_TRAIN, 1x/3x schedules
    i.buckets = torchvision_maskrcnn_r50_fpn.TORCHVISION_COCO_BUCKETS
  return c
