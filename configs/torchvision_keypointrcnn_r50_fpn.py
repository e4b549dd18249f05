"""torchvision `keypointrcnn_resnet50_fpn` inference semantics, for converted torchvision weights.

    maskrcnn-jax convert --from=torchvision \
        --checkpoint=keypointrcnn_resnet50_fpn_coco-fc266e95.pth \
        --out=runs/tv_kp_r50 --config=configs/torchvision_keypointrcnn_r50_fpn.py
    maskrcnn-jax predict --config=configs/torchvision_keypointrcnn_r50_fpn.py \
        --checkpoint=runs/tv_kp_r50 --image=photo.jpg --out=vis.png

Expected: torchvision's published 54.6 box AP / 65.0 keypoint AP on COCO val2017 (the converted
model matches torchvision, see experiments/parity/). The training config with torchvision's
padded-size buckets and anchor spacing (as configs/torchvision_maskrcnn_r50_fpn.py).
"""

from configs import keypointrcnn_r50_fpn
from configs import torchvision_maskrcnn_r50_fpn


def get_config(mode: str = ''):
  c = keypointrcnn_r50_fpn.get_config(mode)
  c.model.anchors.stride_from_grid = True  # torchvision AnchorGenerator strides
  if mode != 'tiny':
    c.input.buckets = torchvision_maskrcnn_r50_fpn.TORCHVISION_COCO_BUCKETS
  return c
