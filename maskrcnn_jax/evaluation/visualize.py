"""Pictures of predictions: boxes, class names, scores, semi-transparent coloured masks, and
keypoints (dots) joined by their class's skeleton (lines)."""

from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_ALPHA = 0.5  # weight of the mask colour in a masked pixel
BOX_WIDTH = 2
KEYPOINT_RADIUS = 2  # pixels
SKELETON_WIDTH = 1
KEYPOINT_OUTLINE = (255, 255, 255)
# Distinct, saturated colours (RGB) cycled by label.
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)

ClassNames = Union[Mapping[int, str], Sequence[str], None]
# label -> 0-based keypoint index pairs, as a mapping or a sequence indexed by label.
Skeletons = Union[Mapping[int, Sequence[Sequence[int]]], Sequence[Sequence[Sequence[int]]], None]


def label_color(label: int) -> tuple[int, int, int]:
  """The RGB colour of a label (stable across pictures)."""
  return tuple(int(c) for c in PALETTE[int(label) % len(PALETTE)])


def _name(label: int, class_names: ClassNames) -> str:
  if class_names is None:
    return str(label)
  if isinstance(class_names, Mapping):
    return str(class_names.get(label, label))
  return str(class_names[label]) if 0 <= label < len(class_names) else str(label)


def _skeleton(label: int, skeletons: Skeletons) -> Sequence[Sequence[int]]:
  if skeletons is None:
    return ()
  if isinstance(skeletons, Mapping):
    return skeletons.get(label, ())
  return skeletons[label] if 0 <= label < len(skeletons) else ()


def draw_predictions(image: np.ndarray, prediction: Mapping[str, np.ndarray],
                     class_names: ClassNames = None, score_thresh: float = 0.0,
                     max_detections: Optional[int] = None, keypoint_skeleton: Skeletons = None,
                     keypoint_thresh: Optional[float] = None) -> np.ndarray:
  """Draws one image's detections.

  Args:
    image: uint8 [H, W, 3] RGB (a [H, W] or [H, W, 1] grey image is repeated to 3 channels).
    prediction: `boxes` float32 [D, 4] xyxy original pixels, `scores` [D], `labels` int [D],
      optionally `masks` bool [D, H, W], and `keypoints` float32 [D, K, 3] (x, y, .) original
      pixels with `keypoint_valid` bool [D, K] (default all) and `keypoint_scores` [D, K].
    class_names: label -> name, as a mapping or a sequence indexed by label; None prints labels.
    score_thresh: detections below it are not drawn.
    max_detections: draw at most this many (highest scores first).
    keypoint_skeleton: label -> 0-based keypoint index pairs joined by lines, as a mapping or a
      sequence indexed by label (e.g. from the checkpoint meta's `keypoint_skeleton`); None
      draws the keypoints without lines.
    keypoint_thresh: keypoints scoring below it are not drawn (None: every valid keypoint).

  Returns:
    uint8 [H, W, 3]: the image with masks blended at MASK_ALPHA, box outlines, and
    "name score" captions, coloured by label; keypoints as dots with a white rim, joined by
    their skeleton's lines in the label's colour.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  canvas = image.astype(np.float32)
  boxes = np.asarray(prediction['boxes'], np.float32).reshape(-1, 4)
  scores = np.asarray(prediction['scores'], np.float32).reshape(-1)
  labels = np.asarray(prediction['labels']).reshape(-1)
  masks = prediction.get('masks')
  order = np.argsort(-scores, kind='stable')
  order = order[scores[order] >= score_thresh]
  if max_detections is not None:
    order = order[:max_detections]

  # Lowest score first, so the most confident mask ends up on top.
  if masks is not None:
    masks = np.asarray(masks)
    for d in order[::-1]:
      inside = masks[d] != 0
      color = np.array(label_color(labels[d]), np.float32)
      canvas[inside] = (1 - MASK_ALPHA) * canvas[inside] + MASK_ALPHA * color

  picture = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(picture)
  font = ImageFont.load_default()
  for d in order[::-1]:
    color = label_color(labels[d])
    x1, y1, x2, y2 = (float(v) for v in boxes[d])
    draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=BOX_WIDTH)
    caption = f'{_name(int(labels[d]), class_names)} {scores[d]:.2f}'
    left, top, right, bottom = draw.textbbox((x1, y1), caption, font=font)
    # Caption above the box when there is room, else inside its top edge.
    dy = (bottom - top) + 2 if y1 - (bottom - top) - 2 >= 0 else 0
    draw.rectangle([left, top - dy, right + 2, bottom - dy], fill=color)
    draw.text((x1 + 1, y1 - dy), caption, fill=(0, 0, 0), font=font)
  if prediction.get('keypoints') is not None:
    _draw_keypoints(draw, prediction, order, labels, keypoint_skeleton, keypoint_thresh)
  return np.asarray(picture, np.uint8)


def _draw_keypoints(draw: ImageDraw.ImageDraw, prediction: Mapping[str, np.ndarray], order,
                    labels: np.ndarray, skeletons: Skeletons,
                    keypoint_thresh: Optional[float]) -> None:
  """The keypoints of the detections `order` (lowest score last drawn first) and their lines."""
  keypoints = np.asarray(prediction['keypoints'], np.float32)
  keypoints = keypoints.reshape(len(labels), -1, 3) if len(labels) else keypoints
  shown = np.ones(keypoints.shape[:2], bool)
  if prediction.get('keypoint_valid') is not None:
    shown &= np.asarray(prediction['keypoint_valid'], bool).reshape(shown.shape)
  if keypoint_thresh is not None and prediction.get('keypoint_scores') is not None:
    shown &= np.asarray(prediction['keypoint_scores'], np.float32).reshape(shown.shape) >= (
        keypoint_thresh)
  r = KEYPOINT_RADIUS
  for d in order[::-1]:
    color = label_color(labels[d])
    points = keypoints[d, :, :2]
    for a, b in _skeleton(int(labels[d]), skeletons):
      if max(a, b) < len(points) and shown[d, a] and shown[d, b]:
        draw.line([tuple(map(float, points[a])), tuple(map(float, points[b]))], fill=color,
                  width=SKELETON_WIDTH)
    for k in np.flatnonzero(shown[d]):
      x, y = (float(v) for v in points[k])
      draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=KEYPOINT_OUTLINE)
