"""detectron2 `mask_rcnn_R_101_FPN_3x` inference semantics, for converted detectron2 weights.

    maskrcnn-jax convert --from=detectron2 --checkpoint=model_final_a3ec72.pkl \
        --out=runs/d2_r101 --config=configs/detectron2_maskrcnn_r101_fpn.py
    maskrcnn-jax evaluate --config=configs/detectron2_maskrcnn_r101_fpn.py --workdir=runs/d2_r101 \
        --config.data.source=coco --config.data.val_json=... --config.data.val_images=...

Expected: close to detectron2's model-zoo figures for this model (42.9 box / 38.6 mask AP on
COCO val2017), with the deviations of `configs/detectron2_maskrcnn_r50_fpn.py` (the adaptive
sampling ratio is capped at 4 per axis). A diff of that preset: only the ResNet depth
changes (`RESNETS.DEPTH: 101`, stages of 3, 4, 23, 3 bottlenecks, stride in the 1x1 conv as in
the MSRA `R-101.pkl`); 81 labels, 28x28 masks, the detectron2 mask paste, as for R50. The 3x
schedule (270k iterations, x0.1 at 210k and 250k) matters only for training.
"""

from configs import detectron2_maskrcnn_r50_fpn


def get_config(mode: str = ''):
  c = detectron2_maskrcnn_r50_fpn.get_config(mode)
  if mode != 'tiny':  # the toy mode keeps its tiny body
    c.model.backbone.depth = 101
    c.optim.num_steps = 270_000
    c.optim.decay_steps = (210_000, 250_000)
  return c
