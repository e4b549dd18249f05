"""The RoI-operator ablation (issue #16, Mask R-CNN paper Table 2c-d) on the synthetic shapes.

    python experiments/ablations/roi_op.py --config=configs/ablation_roi_op.py \
        --workdir=runs/ablation_roi_op

Runs RoIPool / RoIWarp / RoIAlign (aligned False and True) x {FPN levels, P5 only} x 3 seeds,
each cell a short shapes training (below) evaluated on the validation split, and writes the
table, JSON and plot into the workdir; results and discussion in docs/ablation_roi_op.md.
The grid's axes are flags of the script; the per-cell fields it sets are `model.roi_op`,
`model.roi.aligned`, `model.roi.pool_level` and `seed`. A diff of configs/shapes.py.
"""

from configs import shapes

# A shorter schedule than shapes.py's 1600 steps so that 24 cells fit in about an hour on a
# 2-core CPU (measured in docs/ablation_roi_op.md); the decay keeps shapes.py's proportion.
NUM_STEPS = 500
DECAY_STEP = 400


def get_config(mode: str = ''):
  c = shapes.get_config(mode)
  if mode != 'tiny':
    c.optim.num_steps = NUM_STEPS
    c.optim.decay_steps = (DECAY_STEP,)
    c.optim.warmup_steps = 100
    c.run.checkpoint_every = 250  # a killed cell resumes from here
  c.run.num_eval_pictures = 2
  return c
