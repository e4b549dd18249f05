"""Builds the `coco_instances` TFDS dataset (data/tfds_builder.py) from a COCO-format folder:

    python -m maskrcnn_jax.data.build_tfds --config=coco2017 --manual_dir=data/coco \\
        --data_dir=data/tfds

A module of its own because TFDS registers a builder class once per process, by the module it
is defined in, and a module run with `-m` would define it a second time as `__main__`.
"""

import argparse
import logging
from typing import Optional, Sequence

from maskrcnn_jax.data import tfds_builder


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True,
                      choices=[c.name for c in tfds_builder.CocoInstances.BUILDER_CONFIGS],
                      help='the folder layout: coco2017 (the official files) or shapes')
  parser.add_argument('--manual_dir', required=True,
                      help='the COCO-format folder (coco2017: annotations/, train2017/, val2017/)')
  parser.add_argument('--data_dir', default=None,
                      help="where to write the dataset (default: TFDS's, $TFDS_DATA_DIR)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  builder = tfds_builder.build(args.config, args.manual_dir, args.data_dir)
  for split, info in builder.info.splits.items():
    print(f'{builder.info.full_name} {split}: {info.num_examples} images in {builder.data_dir}')


if __name__ == '__main__':
  main()
