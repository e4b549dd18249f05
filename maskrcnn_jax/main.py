"""The `maskrcnn-jax` command line: one function per subcommand, the work lives elsewhere.

    maskrcnn-jax train    --config=configs/shapes.py [--workdir=runs/shapes] [--config.a.b=v]
    maskrcnn-jax evaluate --config=... --workdir=DIR [--checkpoint=DIR]
    maskrcnn-jax predict  --config=... --image=IMG --out=vis.png [--checkpoint=DIR]
    maskrcnn-jax shapes   --out=DIR --num_train=N --num_val=M --size=S [--seed=0]
    maskrcnn-jax convert  --from=torchvision|detectron2 --checkpoint=PATH --out=DIR [--config=...]
    maskrcnn-jax export   --config=... --checkpoint=DIR --out=DIR [--batch=1] [--buckets=HxW,...]
                          [--platforms=cpu,cuda,tpu]

Exit codes: 0 done; 1 an error its message explains, printed as one `error:` line naming the
file, field or directory (a bug keeps its traceback); 2 a command line that cannot be parsed;
143 a training run preempted by SIGTERM after saving its checkpoint.
"""

import difflib
import importlib.util
import logging
import os
import signal
import sys
import threading

from absl import app
from absl import flags
from ml_collections import config_flags

from maskrcnn_jax.backends import host

COMMANDS = ('train', 'evaluate', 'predict', 'shapes', 'convert', 'export')
NEEDS_CONFIG = ('train', 'evaluate', 'predict', 'convert', 'export')

# Exit codes: 1 an error the message explains (one `error:` line on stderr), 2 a command line
# that cannot be parsed, 143 (128 + SIGTERM) a training run preempted after saving its
# checkpoint, so a scheduler does not mistake it for a finished one.
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 128 + signal.SIGTERM

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'an ml_collections config file, e.g. '
                                'configs/shapes.py (append :tiny for the toy mode)',
                                lock_config=True)
flags.DEFINE_string('workdir', 'runs/shapes', 'run directory: checkpoints, logs, results')
flags.DEFINE_string('checkpoint', '', 'a checkpoint directory (training workdir or converted)')
flags.DEFINE_string('image', '', 'predict: input image')
flags.DEFINE_string('out', '', 'predict: output PNG; shapes/convert/export: output directory')
flags.DEFINE_integer('num_train', 1000, 'shapes: training images')
flags.DEFINE_integer('num_val', 100, 'shapes: validation images')
flags.DEFINE_integer('size', 256, 'shapes: image side in pixels')
flags.DEFINE_integer('seed', 0, 'shapes: random seed')
flags.DEFINE_enum('from', 'torchvision', ['torchvision', 'detectron2'], 'convert: source')
flags.DEFINE_bool('allow_class_mismatch', False,
                  'convert: re-initialise class-specific layers when class counts differ')
flags.DEFINE_float('score_thresh', 0.5, 'predict: draw detections scoring at least this')
flags.DEFINE_integer('batch', 1, 'export: images per call of the exported programs')
flags.DEFINE_string('buckets', '', 'export: padded sizes HxW,... (default: config.input.buckets)')
flags.DEFINE_string('platforms', 'cpu', 'export: comma-separated jax.export platforms '
                    '(cpu, cuda, rocm, tpu); any of them can be exported from a CPU machine')


def cmd_train() -> None:
  from maskrcnn_jax import train  # pylint: disable=g-import-not-at-top
  try:
    metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(e, flush=True)
    sys.exit(EXIT_PREEMPTED)
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
  try:
    predictor.check_output_path(FLAGS.out)
  except (OSError, ValueError) as e:
    _exit_with_error(str(e))
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


def cmd_export() -> None:
  from maskrcnn_jax import export  # pylint: disable=g-import-not-at-top
  if not FLAGS.checkpoint or not FLAGS.out:
    raise app.UsageError('export needs --checkpoint=DIR and --out=DIR')
  if FLAGS.batch < 1:
    raise app.UsageError(f'--batch={FLAGS.batch}: must be >= 1')
  try:
    buckets = export.parse_buckets(FLAGS.buckets)
    platforms = export.parse_platforms(FLAGS.platforms)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  manifest = export.export_checkpoint(FLAGS.config, FLAGS.checkpoint, FLAGS.out,
                                      batch_size=FLAGS.batch, buckets=buckets,
                                      platforms=platforms)
  print(f'wrote {len(manifest["artifacts"])} programs ({", ".join(manifest["platforms"])}; '
        f'buckets {", ".join("x".join(map(str, b)) for b in manifest["buckets"])}; batch '
        f'{manifest["batch_size"]}) and their weights to {FLAGS.out}')


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
  try:
    globals()[f'cmd_{argv[1]}']()
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, _explained_errors()):
      raise  # a bug: keep its traceback
    _exit_with_error(str(e))


def _explained_errors() -> tuple:
  """The error types whose message says what is wrong and names the file, field or directory:
  the CLI prints it as one `error:` line instead of a traceback. OSError is one of them (a full
  disk, a missing or unwritable file: its message names the file)."""
  # pylint: disable=g-import-not-at-top  (imported once something failed: no start-up cost)
  from maskrcnn_jax import checkpoint
  from maskrcnn_jax import distributed
  from maskrcnn_jax import structures
  from maskrcnn_jax import train
  from maskrcnn_jax.data import coco
  from maskrcnn_jax.weights import core
  from maskrcnn_jax.weights import safe_io
  return (structures.ConfigError, checkpoint.CheckpointError, distributed.DistributedError,
          train.WorkdirBusyError,
          train.NonFiniteLossError, coco.CocoFormatError, core.WeightsMismatchError,
          safe_io.WeightsFormatError, safe_io.UnsafePickleError, OSError)


def _exit_with_error(message: str, code: int = EXIT_ERROR) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  if threading.active_count() > 1:
    # Threads a failed checkpoint write left behind (orbax's) would echo the failure for
    # hundreds of lines while the interpreter shuts down; what this process opened is closed
    # by now, so leave without that shutdown.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


# ============================================================================ flag parsing


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one `error:` line (exit 2) for what ml_collections reports as a
  long traceback: a `--config.a.b=v` override of a field that does not exist, and a config file
  that cannot be loaded (which it reports only when the config is first read)."""
  try:
    args = app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:  # raised by ml_collections' override parser
    _exit_with_error(_missing_field_message(argv) or f'bad --config override ({e})', EXIT_USAGE)
  if FLAGS.config is not None:
    try:
      FLAGS.config.keys()
    except OSError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      _exit_with_error(f'cannot load --config={_config_arg(argv)}: {lines[-1]}', EXIT_USAGE)
  return args


def _config_arg(argv: list[str]) -> str:
  """The value of --config in `argv` (`path` or `path:mode`), '' without one."""
  for i, arg in enumerate(argv):
    for prefix in ('--config=', '-config='):
      if arg.startswith(prefix):
        return arg[len(prefix):]
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1]
  return ''


def _missing_field_message(argv: list[str]) -> str:
  """'config field train.num_steps does not exist (...)' for the first override in `argv` whose
  field is not in the config; '' when the config cannot be loaded or every field exists."""
  overrides = [arg.split('=', 1)[0].lstrip('-')[len('config.'):] for arg in argv[1:]
               if arg.lstrip('-').startswith('config.')]
  path, _, mode = _config_arg(argv).partition(':')
  try:  # loaded as ml_collections loads it: the module's get_config(mode)
    spec = importlib.util.spec_from_file_location('_config_for_the_message', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(mode) if mode else module.get_config()
  except Exception:  # pylint: disable=broad-except  (report the original error instead)
    return ''
  for field in overrides:
    node, walked = config, []
    for key in field.split('.'):
      if not hasattr(node, 'keys'):
        return (f'config field {field} does not exist: config.{".".join(walked)} is a '
                f'{type(node).__name__}, not a section')
      if key not in node:
        where = f'config.{".".join(walked)}' if walked else 'the config'
        close = difflib.get_close_matches(key, list(node.keys()), n=1)
        hint = f'; did you mean {".".join(walked + close)}?' if close else ''
        return (f'config field {field} does not exist ({where} has: '
                f'{", ".join(sorted(node.keys()))}){hint}')
      node, walked = node[key], walked + [key]
  return ''


def run() -> None:
  """Console-script entry point."""
  host.reexec_with_huge_page_malloc()
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
