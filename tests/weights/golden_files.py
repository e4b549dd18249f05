"""Paths of the golden files written by tests/weights/golden/make_golden.py."""

import pathlib

GOLDEN = pathlib.Path(__file__).parent / 'golden'
GOLDEN_PTH = GOLDEN / 'tv_tiny_maskrcnn.pth'  # torch.save'd state dict (float16 tensors)
GOLDEN_NPZ = GOLDEN / 'tv_tiny_golden.npz'  # inputs and torchvision's outputs
READER_PTH = GOLDEN / 'reader_cases.pth'  # odd tensor layouts for the torch-free reader
# Written by tests/weights/golden/make_keypoint_golden.py: a tiny torchvision Keypoint R-CNN.
KEYPOINT_PTH = GOLDEN / 'tv_tiny_keypointrcnn.pth'
KEYPOINT_NPZ = GOLDEN / 'tv_tiny_keypoint_golden.npz'
