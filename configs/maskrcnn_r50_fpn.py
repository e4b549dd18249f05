"""Mask R-CNN, ResNet-50-FPN, COCO 1x schedule, torchvision-style defaults (91 labels).

    maskrcnn-jax train --config=configs/maskrcnn_r50_fpn.py --workdir=runs/r50 \
        --config.data.train_json=instances_train2017.json --config.data.train_images=train2017 \
        --config.data.val_json=instances_val2017.json --config.data.val_images=val2017

Expected: about 37.9 box AP / 34.6 mask AP on COCO val2017 after the 1x schedule (the
torchvision v1 reference). The COCO paths have no default: `train` and `evaluate` stop at
start-up naming the missing field. `get_config('tiny')` is the same code path at toy sizes on
the built-in shapes data, for tests.
"""

import ml_collections

from maskrcnn_jax import structures


def get_config(mode: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'  # 'bfloat16': convs and matmuls in bf16, params/opt state/losses in f32.

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.num_classes = 91  # includes background at label 0 (torchvision's COCO label space)
  m.mask_on = True
  m.keypoint_on = False  # Keypoint R-CNN's head (configs/keypointrcnn_r50_fpn.py)
  m.roi_op = 'align'  # 'align' | 'pool' | 'warp' (ops/roi_warp.py)

  m.backbone = ml_collections.ConfigDict()
  # 18 | 34 | 50 | 101 | 'tiny' (an int or a string, hence the untyped reference)
  m.backbone.depth = ml_collections.FieldReference(50, field_type=object)
  m.backbone.width = 64  # stem width; stage widths are width * (1, 2, 4, 8) (x4 for bottlenecks)
  m.backbone.freeze_at = 2  # 0: nothing frozen, 1: stem, 2: stem + res2 (torchvision trainable_layers=3)
  m.backbone.stride_in_1x1 = False  # True for detectron2's MSRA weights
  m.backbone.norm = 'frozen_bn'  # 'frozen_bn' | 'none'
  m.backbone.bn_eps = 1e-5  # torchvision and detectron2 FrozenBatchNorm2d

  m.fpn = ml_collections.ConfigDict()
  m.fpn.channels = 256
  m.fpn.min_level = 2
  m.fpn.max_level = 6  # P6 is a stride-2 max-pool of P5 (torchvision LastLevelMaxPool)

  m.anchors = ml_collections.ConfigDict()
  m.anchors.sizes = (32, 64, 128, 256, 512)  # one size per level P2..P6
  m.anchors.aspect_ratios = (0.5, 1.0, 2.0)  # height / width
  m.anchors.offset = 0.0  # grid offset in units of stride; torchvision and detectron2 use 0.0
  m.anchors.round_base = True  # torchvision rounds base anchors to integers; detectron2 does not
  # torchvision spaces anchors by padded_size // feature_size (61 px, not 64, for P6 at 800 px)
  m.anchors.stride_from_grid = False

  m.rpn = ml_collections.ConfigDict()
  m.rpn.pre_nms_topk_train = 2000  # per level (torchvision rpn_pre_nms_top_n_train)
  m.rpn.pre_nms_topk_test = 1000
  m.rpn.post_nms_topk_train = 2000  # over all levels, per image
  m.rpn.post_nms_topk_test = 1000
  m.rpn.nms_thresh = 0.7
  m.rpn.min_size = 1e-3  # torchvision RegionProposalNetwork.min_size
  m.rpn.rank_by = 'probability'  # torchvision's NMS order (float32 sigmoid); detectron2: 'logit'
  m.rpn.score_thresh = 0.0
  m.rpn.fg_iou_thresh = 0.7
  m.rpn.bg_iou_thresh = 0.3
  m.rpn.allow_low_quality_matches = True
  m.rpn.batch_size_per_image = 256
  m.rpn.positive_fraction = 0.5
  m.rpn.box_loss = 'smooth_l1'  # 'smooth_l1' | 'l1'
  m.rpn.smooth_l1_beta = 1.0 / 9  # torchvision rpn.py
  m.rpn.bbox_reg_weights = (1.0, 1.0, 1.0, 1.0)

  m.roi = ml_collections.ConfigDict()
  m.roi.box_output_size = 7
  m.roi.mask_output_size = 14
  m.roi.keypoint_output_size = 14  # torchvision keypoint_roi_pool MultiScaleRoIAlign(14)
  m.roi.sampling_ratio = 2  # torchvision MultiScaleRoIAlign(sampling_ratio=2); 0 = adaptive
  m.roi.max_sampling_ratio = 4  # the adaptive ratio's cap (static grid of 4 * cap**2 taps a bin)
  m.roi.aligned = False  # torchvision v1 uses the legacy (non half-pixel) RoIAlign
  m.roi.canonical_level = 4  # FPN paper eq. (1)
  m.roi.canonical_scale = 224
  m.roi.min_level = 2
  m.roi.max_level = 5
  # 0: each RoI from its FPN level (min_level..max_level); k: every RoI from P_k alone (stride
  # 2**k), as the paper's single-map C4 / C5 rows (Table 2c-d; experiments/ablations/roi_op.py).
  m.roi.pool_level = 0
  m.roi.warp_reduce = 'max'  # roi_op='warp': 'max' (the paper's Table 2c RoIWarp row) | 'avg'
  m.roi.fg_iou_thresh = 0.5
  m.roi.bg_iou_thresh = 0.5
  m.roi.batch_size_per_image = 512
  m.roi.positive_fraction = 0.25
  m.roi.bbox_reg_weights = (10.0, 10.0, 5.0, 5.0)
  m.roi.box_loss = 'smooth_l1'
  m.roi.smooth_l1_beta = 1.0 / 9  # torchvision roi_heads.fastrcnn_loss
  m.roi.ignore_crowd = True  # RoIs/anchors overlapping a crowd region (IoA >= crowd_ioa) are ignored
  m.roi.crowd_ioa_thresh = 0.7

  m.box_head = ml_collections.ConfigDict()
  m.box_head.fc_dim = 1024
  m.box_head.num_fc = 2

  m.mask_head = ml_collections.ConfigDict()
  m.mask_head.conv_dim = 256
  m.mask_head.num_convs = 4
  m.mask_head.resolution = 28  # 2 x mask_output_size after the deconv

  # torchvision KeypointRCNNHeads (8 x 512 3x3 convs) and KeypointRCNNPredictor (4x4 stride-2
  # deconv, then 2x bilinear: 56 x 56 heatmaps).
  m.keypoint_head = ml_collections.ConfigDict()
  m.keypoint_head.conv_dim = 512
  m.keypoint_head.num_convs = 8
  m.keypoint_head.resolution = 56  # 4 x keypoint_output_size
  # Keypoints of each label's own set, background (label 0) first, e.g. (0, 17) for COCO
  # person; () when keypoint_on is False. A category's names come from the dataset.
  m.keypoint_head.num_keypoints = ml_collections.FieldReference((), field_type=tuple)
  # 'visible': divide by the batch's valid keypoints (torchvision); 'fixed': by images x
  # keypoints x foreground slots (detectron2 NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS=False).
  m.keypoint_head.loss_normalizer = 'visible'

  m.test = ml_collections.ConfigDict()
  m.test.score_thresh = 0.05
  m.test.nms_thresh = 0.5
  m.test.detections_per_img = 100
  m.test.min_box_size = 1e-2  # torchvision roi_heads.postprocess_detections
  m.test.drop_empty_boxes = False  # detectron2 detector_postprocess: clip, drop sides <= 0
  m.test.mask_thresh = 0.5
  # 'torchvision' (integer expanded box, resize, prob > thresh) | 'detectron2' (grid_sample
  # at pixel centres in the float box, prob >= thresh): ops/masks.py
  m.test.mask_paste = 'torchvision'
  # Keypoint scores: 'logit' (the heatmap logit at the maximum, torchvision) | 'detectron2'
  # (exp(that logit) / sum of exp over the 56x56 heatmap, heatmaps_to_keypoints' softmax score).
  m.test.keypoint_score = 'logit'

  # ---------------------------------------------------------------- input
  i = c.input = ml_collections.ConfigDict()
  i.min_size = 800
  i.max_size = 1333
  i.train_min_sizes = (800,)  # multi-scale jitter: one is drawn per image
  i.channel_order = 'RGB'  # 'BGR' for detectron2 MSRA weights
  i.resize = 'torchvision'  # whose resize: 'torchvision' (float, floor) | 'detectron2' (PIL uint8)
  i.pixel_mean = structures.TORCHVISION_PIXEL_MEAN
  i.pixel_std = structures.TORCHVISION_PIXEL_STD
  # Padded (height, width) size buckets, each divisible by 32; one compile per bucket.
  i.buckets = ((800, 1344), (1344, 800), (800, 800))
  i.max_instances = 100
  i.gt_mask_size = 112  # ground-truth masks are pre-cropped to their box at this size
  i.hflip_prob = 0.5
  i.batch_size = 16  # global batch
  i.num_workers = 4
  i.prefetch = 2
  i.skip_empty_train = True

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  # 'coco' (a JSON and an images folder) | 'tfds' (a built coco_instances dataset, docs/tfds.md)
  # | 'shapes' | 'shapes_keypoints' (synthetic, generated under data.root)
  d.source = 'coco'
  # 'contiguous': labels 1..K in ascending category id; 'category_id': the raw COCO id is the
  # label (torchvision's 91-class space, for converted torchvision weights).
  d.label_space = 'category_id'  # num_classes = 91 is torchvision's COCO label space
  d.root = 'data/shapes'  # the synthetic sources only; each kind needs a folder of its own
  d.train_images = ''
  d.train_json = ''
  d.val_images = ''
  d.val_json = ''
  # data.source='tfds': a dataset built by `python -m maskrcnn_jax.data.build_tfds`, its
  # folder ('': TFDS's default, $TFDS_DATA_DIR) and its splits (any TFDS split expression).
  d.tfds_name = 'coco_instances/coco2017'
  d.tfds_data_dir = ''
  d.tfds_train_split = 'train'
  d.tfds_val_split = 'validation'
  d.shapes_num_train = 1000
  d.shapes_num_val = 100
  d.shapes_size = 256
  # Decode every training image before training and fail listing the bad ones (slow: opt-in).
  d.verify_images = False
  # Default 10: undecodable training images skipped at run time, each replaced by another image
  # of its size bucket, before training stops listing them (counted per loader process).
  d.max_bad_images = 10
  # ---- keypoints (read only with model.keypoint_on). Per-label fields are () or one entry per
  # label, background first (the layout of model.keypoint_head.num_keypoints).
  # Each keypoint's mirror under a horizontal flip. (): derived from the names (left_* <->
  # right_*); an entry () keeps a label's derived map, else a permutation of 0..K_c-1 that is
  # its own inverse, e.g. ((), (0, 2, 1)) for keypoints (apex, left_base, right_base).
  d.keypoint_flip_map = ()
  # OKS sigmas per label for keypoint AP. (): COCO's person sigmas (pycocotools), which fit
  # only 17-keypoint sets; an entry holds K_c positive sigmas, e.g. ((), (0.05, 0.05, 0.05)).
  d.keypoint_oks_sigmas = ()
  # Training drops images with fewer labelled (v > 0) keypoints; 0: off. torchvision's person
  # keypoint reference uses 10 (coco_utils._coco_remove_images_without_annotations),
  # detectron2 1 (DATALOADER.MIN_KEYPOINTS_PER_IMAGE).
  d.min_keypoints_per_image = 0
  # Added to labelled keypoints' x, y when the COCO file is read and subtracted from predicted
  # keypoints written as COCO results. 0: COCO's integer pixel indices as they are
  # (torchvision); 0.5: pixel centres in continuous coordinates (detectron2, datasets/coco.py
  # and coco_evaluation.py), so that a flip maps pixel x to pixel W - 1 - x.
  d.keypoint_offset = 0.0

  # ---------------------------------------------------------------- optimisation
  o = c.optim = ml_collections.ConfigDict()
  o.base_lr = 0.02  # at base_batch_size; scaled linearly with the global batch (Goyal et al.)
  o.base_batch_size = 16
  o.momentum = 0.9
  o.weight_decay = 1e-4
  o.wd_exclude_norm_and_bias = False  # torchvision references decay every parameter
  o.warmup_steps = 1000
  o.warmup_factor = 1e-3
  o.num_steps = 90_000
  o.decay_steps = (60_000, 80_000)
  o.decay_factor = 0.1
  o.grad_clip_norm = 0.0  # 0 disables

  # ---------------------------------------------------------------- run
  r = c.run = ml_collections.ConfigDict()
  r.log_every = 20
  r.eval_every = 10_000  # 0: no periodic evaluation
  r.eval_at_end = True
  r.checkpoint_every = 5_000
  r.keep_checkpoints = 3
  r.num_eval_pictures = 4
  # A torchvision .pth, a detectron2/MSRA .pkl or a checkpoint directory; only backbone/body is
  # loaded, and the stem is adapted to this config's channel order and pixel statistics.
  r.pretrained_backbone = ''
  r.init_checkpoint = ''  # explicit checkpoint; a checkpoint in the workdir takes precedence
  # Use a checkpoint whose stored model structure or input normalisation differs from this
  # config (refused otherwise; shape differences are always refused). It warns naming the fields.
  r.allow_config_mismatch = False
  # Multi-process runs (docs/pods.md): join the processes through jax.distributed. Each of the
  # three below, when unset, comes from the environment (JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID), else from JAX's cluster detection (SLURM, Cloud TPU,
  # Kubernetes, Open MPI).
  r.distributed = False
  r.coordinator_address = ''  # host:port of process 0
  r.num_processes = 0  # 0: from the environment or the cluster
  r.process_id = -1  # -1: from the environment or the cluster
  # A process that stops responding (or fails) stops the others within this many seconds,
  # naming it, instead of leaving them blocked in a collective.
  r.distributed_timeout_s = 120

  # ---------------------------------------------------------------- execution
  # How the model is computed, not what it computes: never stored as part of the model's
  # structure, free to change between runs and on resume.
  e = c.execution = ml_collections.ConfigDict()
  # 'auto' | 'xla' | 'cpu': 'cpu' are the XLA:CPU forms of maskrcnn_jax/backends, 'xla' the
  # plain JAX program (GPUs and TPUs); 'auto' picks 'cpu' when JAX's default backend is the CPU.
  e.backend = 'auto'
  # With the 'cpu' backend the mask loss runs the head only on the chunks of this many
  # foreground slots per image that hold a real RoI (torchvision runs it on exactly the
  # foreground RoIs); 0 runs all static slots at once, as the 'xla' backend always does.
  e.mask_loss_chunk = 16

  if mode == 'tiny':
    _make_tiny(c)
  elif mode:
    raise ValueError(f'unknown config mode {mode!r}; expected "" or "tiny"')
  return c


def _make_tiny(c: ml_collections.ConfigDict) -> None:
  """Toy sizes on the same code path: small images, narrow widths, few RoIs."""
  m = c.model
  m.num_classes = 5
  m.backbone.depth = 'tiny'
  m.backbone.width = 8
  m.backbone.freeze_at = 0
  m.fpn.channels = 16
  m.anchors.sizes = (8, 16, 32, 64, 128)
  m.rpn.pre_nms_topk_train = 200
  m.rpn.pre_nms_topk_test = 100
  m.rpn.post_nms_topk_train = 100
  m.rpn.post_nms_topk_test = 50
  m.rpn.batch_size_per_image = 64
  m.roi.batch_size_per_image = 32
  m.roi.canonical_scale = 56
  m.box_head.fc_dim = 32
  m.mask_head.conv_dim = 16
  m.mask_head.num_convs = 2
  c.execution.mask_loss_chunk = 4
  m.test.detections_per_img = 10
  c.input.min_size = 64
  c.input.max_size = 96
  c.input.train_min_sizes = (64,)
  c.input.buckets = ((64, 96), (96, 64), (64, 64))
  c.input.max_instances = 8
  c.input.gt_mask_size = 28
  c.input.batch_size = 2
  c.input.num_workers = 0
  c.data.source = 'shapes'
  c.data.label_space = 'contiguous'
  c.data.shapes_num_train = 16
  c.data.shapes_num_val = 8
  c.data.shapes_size = 64
  c.optim.base_lr = 0.02
  c.optim.base_batch_size = 2
  c.optim.warmup_steps = 5
  c.optim.num_steps = 10
  c.optim.decay_steps = (8,)
  c.run.log_every = 1
  c.run.eval_every = 0
  c.run.eval_at_end = False
  c.run.checkpoint_every = 5
