"""detectron2 `COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x` semantics, for converted detectron2
weights and for training with detectron2's Keypoint R-CNN conventions.

    maskrcnn-jax convert --from=detectron2 --checkpoint=model_final_04e291.pkl \
        --out=runs/d2_kp_r50 --config=configs/detectron2_keypointrcnn_r50_fpn.py
    maskrcnn-jax evaluate --config=configs/detectron2_keypointrcnn_r50_fpn.py \
        --workdir=runs/d2_kp_r50 --config.data.val_json=person_keypoints_val2017.json \
        --config.data.val_images=val2017

Expected: close to detectron2's model-zoo figures for the converted 1x model (53.6 box AP, 64.0
keypoint AP on COCO val2017), minus the deviations of configs/detectron2_maskrcnn_r50_fpn.py
(the capped adaptive sampling ratio above all). A diff of that preset, with what
`Base-Keypoint-RCNN-FPN.yaml` and detectron2's defaults (`config/defaults.py`) add:

* 2 labels: detectron2's `ROI_HEADS.NUM_CLASSES = 1` (person) plus our background label 0;
  its one class-agnostic set of `ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = 17` heatmaps is label 1's;
* no mask head; the keypoint head `KRCNNConvDeconvUpsampleHead`: `CONV_DIMS` 8 x 512 3x3 convs,
  a 4x4 stride-2 deconv and 2x bilinear upsampling (our default head, 56x56 heatmaps), on
  `POOLER_RESOLUTION = 14` features from `ROIAlignV2` (aligned) at `POOLER_SAMPLING_RATIO = 0`
  (our capped adaptive ratio, shared with the box head);
* keypoint coordinates: detectron2 adds 0.5 to COCO's integer keypoint coordinates when it
  reads a dataset (`datasets/coco.py`: pixel indices -> pixel centres) and subtracts 0.5 when
  it writes results (`evaluation/coco_evaluation.py`): `data.keypoint_offset = 0.5` does both;
* keypoint scores: detectron2's softmax-normalised score (`model.test.keypoint_score`);
* loss: `NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = True`, i.e. the cross-entropy summed over the
  batch's valid keypoints divided by their count (`loss_normalizer='visible'`), with
  `LOSS_WEIGHT = 1.0` (our losses are summed unweighted). The alternative,
  `NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = False`, divides by images x 17 x 512 x 0.25 instead
  (`loss_normalizer='fixed'`); detectron2 recommends `LOSS_WEIGHT = 4.0` with it, which has no
  field here;
* `select_proposals_with_visible_keypoints` (the head trains only on foreground proposals with
  a visible keypoint inside): not needed, it changes neither the loss nor its gradient with
  either normaliser, since a RoI without a visible keypoint in its box has no valid target and
  the 'fixed' denominator does not count RoIs (tests/modeling/test_keypoint_proposal_filter.py);
* `ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.5` (smooth L1 box loss; the RPN stays L1), RPN
  `POST_NMS_TOPK_TRAIN = 1500` per image, images with fewer than
  `ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = 1` visible keypoints dropped from training;
* flips swap `left_*` / `right_*` keypoints (derived from the names; for COCO person exactly
  detectron2's `COCO_PERSON_KEYPOINT_FLIP_MAP`), keypoint AP with pycocotools' COCO person OKS
  sigmas (detectron2's empty `TEST.KEYPOINT_OKS_SIGMAS`);
* the schedule, input sizes (640..800 training), BGR Caffe input and the rest: the mask preset's
  (`Base-RCNN-FPN.yaml`: 90k steps of batch 16, lr 0.02, x0.1 at 60k and 80k).

Measured against detectron2 itself (random weights, three photographs, model and pipeline
level; experiments/parity/detectron2_keypoint_parity.py and its .txt): with both sides' poolers
at sampling ratio 2, 100% of detectron2's detections matched (same label, IoU >= 0.99), scores
within 1.0e-4, 99.71-99.94% of keypoints within 1 px and as many keypoint scores within 1% of
detectron2's (the misses: our static-shape decode settles on another peak of a random,
many-peaked heatmap, a few tenths of a logit below its maximum); against its adaptive ratio 0,
ours at 0 capped at 8 matched 100% (scores within 1.1e-4), the preset's cap of 4 99-100%
(scores within 9e-3).
"""

from configs import detectron2_maskrcnn_r50_fpn

COCO_PERSON_KEYPOINTS = 17  # ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
KEYPOINT_OFFSET = 0.5  # detectron2 datasets/coco.py: pixel index + 0.5
BOX_SMOOTH_L1_BETA = 0.5  # Base-Keypoint-RCNN-FPN.yaml ROI_BOX_HEAD.SMOOTH_L1_BETA
RPN_POST_NMS_TOPK_TRAIN = 1500  # Base-Keypoint-RCNN-FPN.yaml RPN.POST_NMS_TOPK_TRAIN
MIN_KEYPOINTS_PER_IMAGE = 1  # ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE


def get_config(mode: str = ''):
  c = detectron2_maskrcnn_r50_fpn.get_config(mode)
  m = c.model
  m.mask_on = False
  m.keypoint_on = True
  m.roi.keypoint_output_size = 14  # ROI_KEYPOINT_HEAD.POOLER_RESOLUTION
  m.keypoint_head.resolution = 56
  m.keypoint_head.loss_normalizer = 'visible'  # NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS = True
  m.test.keypoint_score = 'detectron2'  # heatmaps_to_keypoints' softmax-normalised score
  m.roi.box_loss = 'smooth_l1'
  m.roi.smooth_l1_beta = BOX_SMOOTH_L1_BETA
  d = c.data
  d.keypoint_offset = KEYPOINT_OFFSET
  d.min_keypoints_per_image = MIN_KEYPOINTS_PER_IMAGE
  d.label_space = 'contiguous'
  d.keypoint_flip_map = ()  # derived from the names: detectron2's COCO person flip map
  d.keypoint_oks_sigmas = ()  # pycocotools' COCO person sigmas
  if mode != 'tiny':
    m.num_classes = 2
    m.keypoint_head.conv_dim = 512  # ROI_KEYPOINT_HEAD.CONV_DIMS = (512,) * 8
    m.keypoint_head.num_convs = 8
    m.keypoint_head.num_keypoints = (0, COCO_PERSON_KEYPOINTS)
    m.rpn.post_nms_topk_train = RPN_POST_NMS_TOPK_TRAIN
  else:
    # configs/keypointrcnn_r50_fpn.py's toy head: 3 keypoints on label 1.
    m.keypoint_head.conv_dim = 16
    m.keypoint_head.num_convs = 2
    m.keypoint_head.num_keypoints = (0, 3) + (0,) * (int(m.num_classes) - 2)
  return c
