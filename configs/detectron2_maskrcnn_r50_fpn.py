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
  `side >= min_size`); proposals ranked by logit (`model.rpn.rank_by`), not by float32
  probability, which ties for large logits; 1000 proposals per image after NMS in training too;
  L1 box losses (`SMOOTH_L1_BETA = 0`);
* RoIAlign sampling: `POOLER_SAMPLING_RATIO = 0`, ceil(RoI side / output size) samples per bin
  and RoI: our `sampling_ratio = 0`, a static grid of `max_sampling_ratio` (4) slots per axis
  whose unused slots weigh 0, so it is exact for every RoI that needs <= 4 and capped beyond
  (measured on the parity images: 95-99.9% of the box head's proposals need <= 4 (up to 7), all
  of the mask head's detections need <= 3). The gather reads 4x the taps of a fixed ratio 2;
* detections: no minimum box size; `detector_postprocess` clips the boxes to the original image
  and drops the empty ones (`model.test.drop_empty_boxes`);
* mask pasting: `grid_sample` of the 28x28 mask at every pixel centre in the float box,
  foreground where the probability is >= 0.5 (`model.test.mask_paste = 'detectron2'`,
  `ops.masks.paste_masks_detectron2`);
* resizing (`input.resize = 'detectron2'`): `ResizeShortestEdge` rounds each side half up and
  resizes the uint8 image with PIL's bilinear filter (antialiased when shrinking), then
  normalises; torchvision normalises first and floors;
* multi-scale training sizes 640..800 (`INPUT.MIN_SIZE_TRAIN`).

Known deviations:
* RoIs that need more than `max_sampling_ratio` samples per axis (very elongated or very large
  boxes) get that many; raise the cap to cover them, at 4 * cap**2 taps a bin.
* level assignment: detectron2 computes floor(4 + log2(sqrt(area) / 224 + 1e-8)), we (like
  torchvision) floor(4 + log2(sqrt(area) / 224) + 1e-6): differs only for boxes within ~1e-6
  of a level boundary.

Measured: `experiments/parity/detectron2_parity.txt` (random weights made non-trivial, five
photographs, R50 and R101; summary in README.md).
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
  m.rpn.min_size = 1e-6  # detectron2 keeps boxes with sides > 0
  m.rpn.rank_by = 'logit'  # find_top_rpn_proposals: batched_nms on the logits
  m.rpn.box_loss = 'l1'  # MODEL.RPN.SMOOTH_L1_BETA = 0.0
  m.roi.box_loss = 'l1'  # MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
  m.test.min_box_size = 0.0  # fast_rcnn_inference_single_image filters by score only
  m.test.mask_paste = 'detectron2'  # layers/mask_ops.py paste_masks_in_image, prob >= 0.5
  m.test.drop_empty_boxes = True  # detector_postprocess: clip to the image, drop empty boxes
  m.roi.sampling_ratio = 0  # POOLER_SAMPLING_RATIO = 0: ceil(RoI side / bins) per RoI
  m.roi.max_sampling_ratio = 4  # static cap of that grid; see the docstring
  i = c.input
  i.channel_order = 'BGR'
  i.resize = 'detectron2'  # ResizeShortestEdge's rounding, PIL bilinear on the uint8 image
  i.pixel_mean = DETECTRON2_PIXEL_MEAN_BGR
  i.pixel_std = DETECTRON2_PIXEL_STD
  if mode != 'tiny':
    m.num_classes = COCO_NUM_CLASSES
    m.rpn.post_nms_topk_train = 1000  # detectron2 POST_NMS_TOPK_TRAIN (per image)
    i.train_min_sizes = (640, 672, 704, 736, 768, 800)  # INPUT.MIN_SIZE_TRAIN, 1x/3x schedules
    i.buckets = torchvision_maskrcnn_r50_fpn.TORCHVISION_COCO_BUCKETS
  return c
