"""CPU keypoint demo: boxes, masks and per-class keypoint sets on the synthetic keypoint shapes.

    maskrcnn-jax train --config=configs/shapes_keypoints.py --workdir=runs/shapes_keypoints

Generates data/shapes_keypoints when missing (stick-figure persons with COCO's 17 keypoints,
isosceles triangles with 3, circles and squares with none; data/shapes_keypoints.py), trains a
small ResNet-FPN Mask R-CNN with the keypoint head, and evaluates bbox, segm and keypoint AP per
keypoint set (OKS with COCO's person sigmas, and the triangle's below). A diff of
configs/shapes.py; README.md gives the measured result and wall time.
"""

from configs import shapes

# Triangle corners are sharp points, localised about like a person's eyes or wrists in COCO.
TRIANGLE_SIGMA = 0.05


def get_config(mode: str = ''):
  c = shapes.get_config(mode)
  m = c.model
  m.keypoint_on = True
  # Labels: 1 person (COCO's 17 keypoints), 2 triangle (apex, left_base, right_base), 3 circle
  # and 4 square (none).
  m.keypoint_head.num_keypoints = (0, 17, 3, 0, 0)
  m.keypoint_head.conv_dim = 64  # torchvision's 512 x 8 is far more than 128-pixel images need
  m.keypoint_head.num_convs = 4
  d = c.data
  d.source = 'shapes_keypoints'
  d.root = 'data/shapes_keypoints'
  # Per label; () for the person set means COCO's 17 person sigmas.
  d.keypoint_oks_sigmas = ((), (), (TRIANGLE_SIGMA,) * 3, (), ())
  if mode != 'tiny':
    # Keypoints take longer to learn than boxes and masks: 2000 steps instead of 1600.
    c.optim.num_steps = 2000
    c.optim.decay_steps = (1700,)
  else:
    m.keypoint_head.conv_dim = 16
    m.keypoint_head.num_convs = 2
  return c
