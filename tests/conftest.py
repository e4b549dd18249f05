"""Test set-up: four virtual CPU devices (configured before JAX is imported anywhere) and a
persistent compilation cache so repeated tiny-model compiles are cheap."""
import os
import pathlib
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / 'tests'):  # the repo (configs/) and tests/ (synthetic.py)
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir',
                  os.path.join(tempfile.gettempdir(), 'maskrcnn_jax_test_jit_cache'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def tiny_config():
  from configs import maskrcnn_r50_fpn
  return maskrcnn_r50_fpn.get_config('tiny')
