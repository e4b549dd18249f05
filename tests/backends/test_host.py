"""The host memory settings of XLA:CPU processes (backends/host.py)."""
import os
import platform
import subprocess
import sys

import pytest

from maskrcnn_jax.backends import host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_release_host_memory_runs():
  assert isinstance(host.release_host_memory(), bool)


def test_huge_page_malloc_env():
  madvise, glibc = 'madvise', ('glibc', '2.36')
  env = host.huge_page_malloc_env({'HOME': '/h'}, glibc, madvise)
  assert env == {'HOME': '/h', 'GLIBC_TUNABLES': host.HUGE_PAGE_TUNABLE}
  # Other tunables are kept.
  env = host.huge_page_malloc_env({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, glibc, madvise)
  assert env['GLIBC_TUNABLES'] == f'glibc.malloc.arena_max=2:{host.HUGE_PAGE_TUNABLE}'
  # Nothing to change: already set (also the re-executed process), opted out, THP always/never
  # or absent, not glibc, glibc before 2.35 (no such tunable).
  for environ, libc, thp in [({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, glibc, madvise),
                             ({host.MALLOC_ENV: 'default'}, glibc, madvise),
                             ({}, glibc, 'always'), ({}, glibc, 'never'), ({}, glibc, None),
                             ({}, ('', ''), madvise), ({}, ('glibc', '2.31'), madvise),
                             ({}, ('glibc', '2.x'), madvise)]:
    assert host.huge_page_malloc_env(environ, libc, thp) is None, (environ, libc, thp)
  with pytest.raises(ValueError, match=host.MALLOC_ENV):
    host.huge_page_malloc_env({host.MALLOC_ENV: 'jemalloc'}, glibc, madvise)


@pytest.mark.parametrize('choice', ['hugepage', 'default'])
def test_reexec_sets_the_tunable_only_where_it_helps(choice):
  code = ('import os, sys; sys.path.insert(0, os.getcwd()); '
          'from maskrcnn_jax.backends import host; '
          'host.reexec_with_huge_page_malloc(); '
          'print("tunables=" + os.environ.get("GLIBC_TUNABLES", ""))')
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  environ[host.MALLOC_ENV] = choice
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=environ,
                        capture_output=True, text=True, check=True)
  expected = None
  if sys.platform == 'linux':
    thp_mode = host._thp_mode()  # pylint: disable=protected-access
    expected = host.huge_page_malloc_env(environ, platform.libc_ver(), thp_mode)
  tunables = expected['GLIBC_TUNABLES'] if expected else ''
  assert proc.stdout.strip().splitlines() == [f'tunables={tunables}']
