"""The RoI-operator ablation's keypoint column (the paper's Table 6) on the keypoint shapes.

    python experiments/ablations/roi_op.py --config=configs/ablation_roi_op_keypoints.py \
        --workdir=runs/ablation_roi_op_keypoints --ops=pool,align_v2 --levels=fpn

Each cell is a short training of configs/shapes_keypoints.py (boxes, masks and per-class keypoint
sets), with the schedule of configs/ablation_roi_op.py, so the table gains keypoint AP. A diff
of configs/shapes_keypoints.py.
"""

from configs import ablation_roi_op
from configs import shapes_keypoints


def get_config(mode: str = ''):
  c = shapes_keypoints.get_config(mode)
  if mode != 'tiny':
    c.optim.num_steps = ablation_roi_op.NUM_STEPS
    c.optim.decay_steps = (ablation_roi_op.DECAY_STEP,)
    c.optim.warmup_steps = 100
    c.run.checkpoint_every = 250  # a killed cell resumes from here
  c.run.num_eval_pictures = 2
  return c
