"""COCO 2017 instance categories and the label spaces of torchvision and detectron2 models.

torchvision's COCO detectors use the 91-entry label space where label == COCO category id
(0 = background, ids absent from COCO 2017 are 'N/A'); detectron2's use 80 contiguous labels in
category-id order, which we shift by one so that 0 is background.
"""

# (category id, name) of the 80 COCO 2017 instance categories.
COCO_CATEGORIES = (
    (1, 'person'), (2, 'bicycle'), (3, 'car'), (4, 'motorcycle'), (5, 'airplane'), (6, 'bus'),
    (7, 'train'), (8, 'truck'), (9, 'boat'), (10, 'traffic light'), (11, 'fire hydrant'),
    (13, 'stop sign'), (14, 'parking meter'), (15, 'bench'), (16, 'bird'), (17, 'cat'),
    (18, 'dog'), (19, 'horse'), (20, 'sheep'), (21, 'cow'), (22, 'elephant'), (23, 'bear'),
    (24, 'zebra'), (25, 'giraffe'), (27, 'backpack'), (28, 'umbrella'), (31, 'handbag'),
    (32, 'tie'), (33, 'suitcase'), (34, 'frisbee'), (35, 'skis'), (36, 'snowboard'),
    (37, 'sports ball'), (38, 'kite'), (39, 'baseball bat'), (40, 'baseball glove'),
    (41, 'skateboard'), (42, 'surfboard'), (43, 'tennis racket'), (44, 'bottle'),
    (46, 'wine glass'), (47, 'cup'), (48, 'fork'), (49, 'knife'), (50, 'spoon'), (51, 'bowl'),
    (52, 'banana'), (53, 'apple'), (54, 'sandwich'), (55, 'orange'), (56, 'broccoli'),
    (57, 'carrot'), (58, 'hot dog'), (59, 'pizza'), (60, 'donut'), (61, 'cake'), (62, 'chair'),
    (63, 'couch'), (64, 'potted plant'), (65, 'bed'), (67, 'dining table'), (70, 'toilet'),
    (72, 'tv'), (73, 'laptop'), (74, 'mouse'), (75, 'remote'), (76, 'keyboard'),
    (77, 'cell phone'), (78, 'microwave'), (79, 'oven'), (80, 'toaster'), (81, 'sink'),
    (82, 'refrigerator'), (84, 'book'), (85, 'clock'), (86, 'vase'), (87, 'scissors'),
    (88, 'teddy bear'), (89, 'hair drier'), (90, 'toothbrush'),
)
BACKGROUND = '__background__'
TORCHVISION_NUM_CLASSES = 91  # labels 0..90, label == COCO category id
DETECTRON2_NUM_CLASSES = 81  # our labels 0..80 (detectron2's 0..79 shifted by one)


def torchvision_label_space() -> tuple[dict[int, int], list[str]]:
  """(label -> category id for labels 1..90, class names indexed by label incl. 'N/A')."""
  names = dict(COCO_CATEGORIES)
  class_names = [BACKGROUND] + [names.get(i, 'N/A') for i in range(1, TORCHVISION_NUM_CLASSES)]
  return {i: i for i in range(1, TORCHVISION_NUM_CLASSES)}, class_names


def detectron2_label_space() -> tuple[dict[int, int], list[str]]:
  """(label -> category id for labels 1..80, class names indexed by label)."""
  return ({i + 1: cat for i, (cat, _) in enumerate(COCO_CATEGORIES)},
          [BACKGROUND] + [name for _, name in COCO_CATEGORIES])


def generic_label_space(num_classes: int) -> tuple[dict[int, int], list[str]]:
  """Identity map and placeholder names, for class counts no known dataset has."""
  return ({i: i for i in range(1, num_classes)},
          [BACKGROUND] + [f'class_{i}' for i in range(1, num_classes)])
