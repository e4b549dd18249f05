"""`python -m maskrcnn_jax` is the `maskrcnn-jax` CLI."""
from maskrcnn_jax.main import run

if __name__ == '__main__':
  run()
