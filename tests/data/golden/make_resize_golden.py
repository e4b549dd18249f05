"""Writes resize_golden.npz: torch/torchvision resize outputs that tests/data check against.

    python tests/data/golden/make_resize_golden.py   # needs torch, torchvision

Contents: GeneralizedRCNNTransform output sizes for a list of (h, w, min_size, max_size), and
F.interpolate outputs (bilinear align_corners=False on float images; default 'nearest' on masks)
for small random inputs.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'resize_golden.npz')
SIZE_CASES = [(480, 640, 800, 1333), (427, 640, 800, 1333), (333, 500, 800, 1333),
              (640, 480, 800, 1333), (500, 333, 800, 1333), (612, 612, 800, 1333),
              (100, 1000, 800, 1333), (1000, 100, 800, 1333), (375, 500, 640, 1000),
              (50, 70, 64, 96), (64, 64, 48, 96), (37, 91, 64, 96), (281, 500, 800, 1333)]
# (h, w, new_h, new_w): up, down, mixed, identity and exact-2x resizes.
INTERP_CASES = [(7, 9, 13, 20), (13, 20, 7, 9), (10, 6, 4, 15), (5, 5, 5, 5), (6, 4, 12, 8),
                (31, 17, 64, 35), (64, 48, 33, 25)]


def main():
  torch.manual_seed(0)
  out = {}
  sizes = []
  for h, w, mn, mx in SIZE_CASES:
    t = GeneralizedRCNNTransform(mn, mx, [0.0] * 3, [1.0] * 3).eval()
    image_list, _ = t([torch.zeros(3, h, w)])
    sizes.append([h, w, mn, mx, *image_list.image_sizes[0]])
  out['sizes'] = np.array(sizes, np.int64)
  for n, (h, w, nh, nw) in enumerate(INTERP_CASES):
    img = torch.rand(3, h, w) * 255
    res = F.interpolate(img[None], size=(nh, nw), mode='bilinear', align_corners=False)[0]
    masks = (torch.rand(2, h, w) > 0.5).float()
    mres = F.interpolate(masks[:, None], size=(nh, nw))[:, 0].byte()
    out[f'image_{n}'] = img.permute(1, 2, 0).numpy()
    out[f'resized_{n}'] = res.permute(1, 2, 0).numpy()
    out[f'masks_{n}'] = masks.byte().numpy()
    out[f'masks_resized_{n}'] = mres.numpy()
  np.savez_compressed(OUT, **out)
  print('wrote', OUT)


if __name__ == '__main__':
  main()
