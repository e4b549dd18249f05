"""Static-shape Mask R-CNN in JAX/Flax. `maskrcnn_jax.Predictor` runs a model on raw images.

Submodules are imported on first use, so `import maskrcnn_jax` stays cheap.
"""

__all__ = ['Predictor']


def __getattr__(name):
  if name == 'Predictor':
    from maskrcnn_jax.predictor import Predictor  # pylint: disable=g-import-not-at-top
    return Predictor
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
