"""COCO metrics (pycocotools) and pictures of predictions; no models, no checkpoints."""

from maskrcnn_jax.evaluation.coco_eval import (METRIC_NAMES, coco_evaluate, decode_masks,
                                               detections_to_coco_results, encode_masks)
from maskrcnn_jax.evaluation.visualize import draw_predictions

__all__ = ['METRIC_NAMES', 'coco_evaluate', 'decode_masks', 'detections_to_coco_results',
           'draw_predictions', 'encode_masks']
