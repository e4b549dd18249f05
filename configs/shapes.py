"""CPU demo: a small ResNet-FPN Mask R-CNN on the built-in synthetic shapes dataset.

    maskrcnn-jax train --config=configs/shapes.py --workdir=runs/shapes

Generates the dataset under data/shapes when missing, trains, evaluates (COCO bbox and segm AP
on the validation split) and writes prediction pictures into the workdir. Expected: about
0.70 segm AP / 0.79 bbox AP in 8-11 minutes on a 2-core CPU, depending on the machine's load
(measured; see README.md).
"""

from configs import maskrcnn_r50_fpn

# A diff of the base: only the fields below differ from configs/maskrcnn_r50_fpn.py.


def get_config(mode: str = ''):
  c = maskrcnn_r50_fpn.get_config()
  m = c.model
  m.num_classes = 5  # background + circle, square, triangle, star
  m.backbone.depth = 'tiny'
  m.backbone.width = 16
  m.backbone.freeze_at = 0
  m.fpn.channels = 64
  m.anchors.sizes = (16, 32, 64, 128, 256)
  m.rpn.pre_nms_topk_train = 600
  m.rpn.pre_nms_topk_test = 300
  m.rpn.post_nms_topk_train = 300
  m.rpn.post_nms_topk_test = 100
  m.rpn.batch_size_per_image = 128
  m.roi.batch_size_per_image = 64
  m.roi.canonical_scale = 112  # image side 128 instead of COCO's ~800
  m.box_head.fc_dim = 256
  m.mask_head.conv_dim = 64
  m.mask_head.num_convs = 2
  m.test.detections_per_img = 20

  i = c.input
  i.min_size = 128
  i.max_size = 128
  i.train_min_sizes = (128,)
  i.buckets = ((128, 128),)
  i.max_instances = 8
  i.gt_mask_size = 56
  i.batch_size = 8
  i.num_workers = 0  # in-process loading with a prefetch thread: 15 ms a batch, and 2 cores

  d = c.data
  d.source = 'shapes'
  d.label_space = 'contiguous'
  d.shapes_num_train = 2000
  d.shapes_num_val = 100
  d.shapes_size = 128

  o = c.optim
  o.base_batch_size = 8
  o.warmup_steps = 100
  o.num_steps = 1600
  o.decay_steps = (1300,)
  o.grad_clip_norm = 10.0

  r = c.run
  r.log_every = 100
  r.eval_every = 0  # evaluate once at the end
  r.checkpoint_every = 500

  if mode == 'tiny':
    maskrcnn_r50_fpn._make_tiny(c)  # pylint: disable=protected-access
  elif mode:
    raise ValueError(f'unknown config mode {mode!r}; expected "" or "tiny"')
  return c
