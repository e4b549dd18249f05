"""torchvision `maskrcnn_resnet50_fpn` (v1) inference semantics, for converted torchvision weights.

    maskrcnn-jax convert --from=torchvision --checkpoint=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth \
        --out=runs/tv_r50 --config=configs/torchvision_maskrcnn_r50_fpn.py
    maskrcnn-jax evaluate --config=configs/torchvision_maskrcnn_r50_fpn.py --workdir=runs/tv_r50 \
        --config.data.source=coco --config.data.val_json=... --config.data.val_images=...

Expected: torchvision's published 37.9 box AP / 34.6 mask AP on COCO val2017 (the converted
model matches torchvision detection by detection, see experiments/parity/).

The base config already holds torchvision's inference settings (RoIAlign aligned=False with
sampling ratio 2, rounded base anchors at offset 0, RPN top-n 1000/1000 at test, RPN NMS 0.7,
score threshold 0.05, detection NMS 0.5, 100 detections, 800/1333 bilinear resize without
antialiasing, ImageNet RGB statistics); this file changes only:

* buckets: torchvision pads each batch to a multiple of 32, and the padded size changes results
  slightly (anchors in the padding reach the RPN's top-k). These buckets are the padded sizes
  of the common COCO shapes (e.g. 640x480 -> 800x1066 -> 800x1088), so most images are padded
  exactly as torchvision pads them.
* anchors.stride_from_grid: torchvision spaces each level's anchors by
  `padded_size // feature_size`, which is not the nominal stride for P6 when the padded side
  / 32 is odd (800 px -> 13 P6 rows spaced 61 px apart). The model passes this field to
  `ops.anchors.generate_anchors(stride_from_grid=...)` (modeling/rpn.py passes it through).
"""

from configs import maskrcnn_r50_fpn

# Padded (height, width) of torchvision's batching (multiples of 32) for common COCO shapes.
TORCHVISION_COCO_BUCKETS = ((800, 1088), (800, 1216), (800, 1344), (768, 1344),
                            (1088, 800), (1216, 800), (1344, 800), (1344, 768), (800, 800))


def get_config(mode: str = ''):
  c = maskrcnn_r50_fpn.get_config(mode)
  # torchvision AnchorGenerator: strides = padded_size // feature_size (61 px for P6 at 800 px).
  c.model.anchors.stride_from_grid = True
  if mode != 'tiny':
    c.input.buckets = TORCHVISION_COCO_BUCKETS
  return c
