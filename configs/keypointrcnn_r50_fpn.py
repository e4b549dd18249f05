"""Keypoint R-CNN, ResNet-50-FPN, COCO person keypoints, torchvision's training defaults.

    maskrcnn-jax train --config=configs/keypointrcnn_r50_fpn.py --workdir=runs/kp_r50 \
        --config.data.train_json=person_keypoints_train2017.json \
        --config.data.train_images=train2017 \
        --config.data.val_json=person_keypoints_val2017.json --config.data.val_images=val2017

Expected: about 54.6 box AP / 65.0 keypoint AP on COCO val2017 (torchvision's published
keypointrcnn_resnet50_fpn, its 46-epoch schedule). A diff of configs/maskrcnn_r50_fpn.py:

* 2 labels (background, person), no mask head, the keypoint head with COCO's 17 keypoints;
* multi-scale training, short side drawn from 640..800 in steps of 32 (torchvision's
  references/detection `--data-augmentation` for keypoints: RandomShortestSize 640-800);
* torchvision's schedule: 46 epochs, lr 0.02 at batch 16, x0.1 at epochs 36 and 43; about
  3,540 steps an epoch on the ~56.6k train2017 images that keep a person with keypoints, so
  163k, 127k and 152k steps;
* box NMS 0.5 (the base's), images without visible keypoints dropped (torchvision keeps images
  with at least 10 visible keypoints for person keypoints; `data.min_keypoints_per_image`).
"""

from configs import maskrcnn_r50_fpn

COCO_PERSON_KEYPOINTS = 17
STEPS_PER_EPOCH = 3540  # ~56.6k images / batch 16


def get_config(mode: str = ''):
  c = maskrcnn_r50_fpn.get_config(mode)
  m = c.model
  m.mask_on = False
  m.keypoint_on = True
  if mode != 'tiny':
    m.num_classes = 2
    m.keypoint_head.num_keypoints = (0, COCO_PERSON_KEYPOINTS)
    c.data.label_space = 'contiguous'
    c.input.train_min_sizes = tuple(range(640, 801, 32))
    o = c.optim
    o.num_steps = 46 * STEPS_PER_EPOCH
    o.decay_steps = (36 * STEPS_PER_EPOCH, 43 * STEPS_PER_EPOCH)
    c.data.min_keypoints_per_image = 10  # torchvision references' person keypoints filter
  else:
    m.keypoint_head.conv_dim = 16
    m.keypoint_head.num_convs = 2
    m.keypoint_head.num_keypoints = (0, 3, 0, 0, 0)
  return c
