"""Host memory settings for XLA:CPU processes: glibc's huge-page malloc and heap trimming.

Used by the `maskrcnn-jax` CLI (`reexec_with_huge_page_malloc`, first thing in `main.run`), the
train loop (`release_host_memory` after each compile) and the benchmark scripts. Neither changes
a computed value.
"""

import ctypes
import ctypes.util
import logging
import os
import platform
import sys


# XLA:CPU gives every output and temporary buffer of a call fresh memory from malloc, and glibc
# serves chunks over 32 MB with new mmaps, so every call pays one page fault per 4 KiB it
# touches; on virtual machines a fault costs microseconds (docs/performance.md has the share of
# RoIAlign and train-step time). With this tunable (glibc >= 2.35) malloc marks its memory for
# transparent huge pages, 2 MiB per fault. It only matters where THP is in `madvise` mode (the
# common default); in `always` mode the kernel already does it, and `never` turns it off.
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


def release_host_memory() -> bool:
  """Returns the C heap's free pages to the OS (glibc `malloc_trim`); False where unavailable.

  XLA's compiler frees a large heap after compiling a train step, but glibc keeps those pages,
  so the process would carry them through training (docs/performance.md). The train loop calls
  this after every step that compiled.
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):  # not glibc
    return False
