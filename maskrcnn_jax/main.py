"""The `maskrcnn-jax` command line: one function per subcommand, the work lives elsewhere.

    maskrcnn-jax train    [--config=configs/shapes.py] [--workdir=runs/shapes] [--config.a.b=v]
    maskrcnn-jax evaluate --config=... --workdir=DIR [--checkpoint=DIR]
    maskrcnn-jax predict  --config=... --image=IMG --out=vis.png [--checkpoint=DIR]
    maskrcnn-jax shapes   --out=DIR --num_train=N --num_val=M --size=S [--seed=0]
    maskrcnn-jax convert  --from=torchvision|detectron2 --checkpoint=PATH --out=DIR [--config=...]
"""

import logging
import os
import platform
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

import configs as _configs

COMMANDS = ('train', 'evaluate', 'predict', 'shapes', 'convert')
DEFAULT_CONFIG = os.path.join(os.path.dirname(_configs.__file__), 'shapes.py')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'an ml_collections config file '
                                '(append :tiny for the toy mode)', lock_config=True)
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
  from maskrcnn_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top
  metrics = coco_eval.evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
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


# Host memory. XLA:CPU gives every output and temporary buffer of a call fresh memory from malloc,
# and glibc serves chunks over 32 MB with new mmaps, so every call pays one page fault per 4 KiB
# it touches. On virtual machines a fault costs microseconds: measured on the 2-core CI-class VM,
# faults were ~45% of RoIAlign forward+backward (200 -> 110 ms) and 0-12% of an R50-FPN train step
# (5.35 -> 4.73 s). With this tunable (glibc >= 2.35) malloc marks its memory for transparent huge
# pages, 2 MiB per fault. It only matters where THP is in `madvise` mode (the common default);
# in `always` mode the kernel already does it, and `never` turns it off.
HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb=1'
MALLOC_ENV = 'MASKRCNN_JAX_MALLOC'  # 'default' keeps the C library's own settings
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_page_malloc_env(environ, libc: tuple[str, str], thp_mode: str | None) -> dict | None:
  """The environment to re-execute this process with, or None when nothing would change.

  Args:
    environ: the current environment (`os.environ`).
    libc: `platform.libc_ver()`, e.g. `('glibc', '2.36')`.
    thp_mode: the bracketed word of `THP_MODE_FILE` (`'always'`, `'madvise'`, `'never'`), or
      None where there is no such file.
  """
  choice = environ.get(MALLOC_ENV, 'hugepage')
  if choice not in ('hugepage', 'default'):
    raise ValueError(f'{MALLOC_ENV} must be "hugepage" or "default", got {choice!r}')
  tunables = environ.get('GLIBC_TUNABLES', '')
  if choice == 'default' or 'glibc.malloc.hugetlb' in tunables or thp_mode != 'madvise':
    return None
  name, version = libc
  try:
    major_minor = tuple(int(v) for v in version.split('.')[:2])
  except ValueError:
    return None
  if name != 'glibc' or major_minor < (2, 35):
    return None
  return dict(environ, GLIBC_TUNABLES=f'{tunables}:{HUGE_PAGE_TUNABLE}' if tunables
              else HUGE_PAGE_TUNABLE)


def _thp_mode() -> str | None:
  try:
    with open(THP_MODE_FILE) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.find('[') + 1:text.find(']')] if '[' in text else None


def reexec_with_huge_page_malloc() -> None:
  """Restarts the process with `HUGE_PAGE_TUNABLE` set, where that helps; else returns.

  Call it first thing in an entry point (the CLI and the benchmarks do): the C library reads the
  tunable only at start-up, so it cannot be switched on from inside a running process. Set
  `MASKRCNN_JAX_MALLOC=default` to keep the C library's settings.
  """
  if sys.platform != 'linux' or not sys.executable:
    return
  env = huge_page_malloc_env(os.environ, platform.libc_ver(), _thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # keep running with the default allocator
    logging.warning('could not restart with %s (%s)', HUGE_PAGE_TUNABLE, e)


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
  logging.getLogger().setLevel(logging.INFO)
  if HUGE_PAGE_TUNABLE in os.environ.get('GLIBC_TUNABLES', ''):
    logging.info('host malloc uses transparent huge pages (GLIBC_TUNABLES=%s; %s=default '
                 'turns this off)', HUGE_PAGE_TUNABLE, MALLOC_ENV)
  globals()[f'cmd_{argv[1]}']()


def run() -> None:
  """Console-script entry point."""
  reexec_with_huge_page_malloc()
  app.run(main, argv=sys.argv)


if __name__ == '__main__':
  run()
