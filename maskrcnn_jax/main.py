"""The `maskrcnn-jax` command line: one function per subcommand, the work lives elsewhere.

    maskrcnn-jax train    --config=configs/shapes.py [--workdir=runs/shapes] [--config.a.b=v]
    maskrcnn-jax evaluate --config=... --workdir=DIR [--checkpoint=DIR]
    maskrcnn-jax predict  --config=... --image=IMG --out=vis.png [--checkpoint=DIR]
    maskrcnn-jax shapes   --out=DIR --num_train=N --num_val=M --size=S [--seed=0]
    maskrcnn-jax convert  --from=torchvision|detectron2 --checkpoint=PATH --out=DIR [--config=...]
"""

import logging
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from maskrcnn_jax.backends import host

COMMANDS = ('train', 'evaluate', 'predict', 'shapes', 'convert')
NEEDS_CONFIG = ('train', 'evaluate', 'predict', 'convert')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'an ml_collections config file, e.g. '
                                'configs/shapes.py (append :tiny for the toy mode)',
                                lock_config=True)
flags.DEFINE_string('workdir', 'runs/shapes', 'run directory: checkpoints, logs, results')
flags.DEFINE_string('checkpoint', '', 'a checkpoint directory (training workdir or converted)')
flags.DEFINE_string('image', '', 'predict: input image')
flags.DEFINE_string('out', '', 'predict: output PNG; shapes/convert: output directory')
flags.DEFINE_integer('num_train', 1000, 'shapes: training images')
flags.DEFINE_integer('num_val', 100, 'shapes: validation images')
flags.DEFINE_integer('size', 256, 'shapes: image side in pixels')
flags.DEFINE_integer('seed', 0, 'shapes: random seed')
flags.DEFINE_enum('from', 'torchvision', ['torchvision', 'detectron2'], 'convert: source')
flags.DEFINE_bool('allow_class_mismatch', False,
                  'convert: re-initialise class-specific layers when class counts differ')
flags.DEFINE_float('score_thresh', 0.5, 'predict: draw detections scoring at least this')


def cmd_train() -> None:
  from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top
  metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  _print_summary(metrics, FLAGS.workdir)


def cmd_evaluate() -> None:
  from maskrcnn_jax import evaluate  # pylint: disable=g-import-not-at-top
  metrics = evaluate.evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
                                          FLAGS.checkpoint or FLAGS.workdir)
  _print_summary(metrics, FLAGS.workdir)


def cmd_predict() -> None:
  from maskrcnn_jax import predictor  # pylint: disable=g-import-not-at-top
  if not FLAGS.image or not FLAGS.out:
    raise app.UsageError('predict needs --image=IMG and --out=OUT.png')
  predictor.predict_to_file(FLAGS.config, FLAGS.image, FLAGS.out, FLAGS.checkpoint,
                            score_thresh=FLAGS.score_thresh)


def cmd_shapes() -> None:
  from maskrcnn_jax.data import shapes  # pylint: disable=g-import-not-at-top
  if not FLAGS.out:
    raise app.UsageError('shapes needs --out=DIR')
  shapes.write_shapes_dataset(FLAGS.out, FLAGS.num_train, FLAGS.num_val, FLAGS.size, FLAGS.seed)
  print(f'wrote the shapes dataset to {FLAGS.out}')


def cmd_convert() -> None:
  from maskrcnn_jax import weights  # pylint: disable=g-import-not-at-top
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError('convert needs --checkpoint=PATH and --out=DIR')
  weights.convert_file(FLAGS['from'].value, FLAGS.checkpoint, FLAGS.out, FLAGS.config,
                       allow_class_mismatch=FLAGS.allow_class_mismatch)
  print(f'wrote the converted checkpoint to {FLAGS.out}')


def _print_summary(metrics: dict, workdir: str) -> None:
  keys = [k for k in ('bbox/AP', 'bbox/AP50', 'segm/AP', 'segm/AP50', 'loss', 'step')
          if k in metrics]
  print('summary: ' + ', '.join(f'{k}={metrics[k]:.4g}' for k in keys))
  print(f'outputs in {workdir}')


def main(argv) -> None:
  if len(argv) < 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: maskrcnn-jax {{{"|".join(COMMANDS)}}} [--flags]; '
                         f'got {argv[1:]}')
  if len(argv) > 2:
    raise app.UsageError(f'unexpected arguments {argv[2:]}')
  if argv[1] in NEEDS_CONFIG and FLAGS.config is None:
    raise app.UsageError(f'{argv[1]} needs --config=FILE (for example --config=configs/shapes.py)')
  logging.getLogger().setLevel(logging.INFO)
  if host.HUGE_PAGE_TUNABLE in os.environ.get('GLIBC_TUNABLES', ''):
    logging.info('host malloc uses transparent huge pages (GLIBC_TUNABLES=%s; %s=default '
                 'turns this off)', host.HUGE_PAGE_TUNABLE, host.MALLOC_ENV)
  globals()[f'cmd_{argv[1]}']()


def run() -> None:
  """Console-script entry point."""
  host.reexec_with_huge_page_malloc()
  app.run(main, argv=sys.argv)


if __name__ == '__main__':
  run()
