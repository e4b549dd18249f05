"""The one seam for backend-specific work, chosen by `config.execution.backend`.

    'auto'  the XLA:CPU forms when JAX's default backend is the CPU, the plain forms otherwise
    'xla'   the plain JAX/flax program on every platform (what GPUs and TPUs run)
    'cpu'   the XLA:CPU forms (faster and leaner on XLA:CPU; see docs/performance.md)

`modeling/` and `ops/` reach backend-specific code only through `get(name)`, whose result is
a `hooks.Backend`. This package imports nothing else of maskrcnn_jax (`host` holds the host-side
memory settings of the CLI and the train loop).
"""

from maskrcnn_jax.backends.hooks import Backend

BACKENDS = ('auto', 'xla', 'cpu')

__all__ = ['BACKENDS', 'Backend', 'get', 'resolve']


def resolve(name: str) -> str:
  """'xla' or 'cpu' for a `config.execution.backend` value; 'auto' asks JAX's default backend."""
  if name not in BACKENDS:
    raise ValueError(f'execution.backend = {name!r}: expected one of {BACKENDS}')
  if name == 'auto':
    import jax  # pylint: disable=g-import-not-at-top
    return 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return name


def get(name: str) -> Backend:
  """The `Backend` for a `config.execution.backend` value ('auto', 'xla' or 'cpu')."""
  if resolve(name) == 'cpu':
    from maskrcnn_jax.backends import cpu  # pylint: disable=g-import-not-at-top
    return cpu.CPU
  from maskrcnn_jax.backends import xla  # pylint: disable=g-import-not-at-top
  return xla.PLAIN
