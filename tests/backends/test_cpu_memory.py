"""backends/cpu_memory.py: the XLA:CPU ReLU equals nn.relu in value and gradient and keeps less
memory for the backward pass; zeros_after is a zero fill."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from maskrcnn_jax.backends import cpu_conv
from maskrcnn_jax.backends import cpu_memory


def test_relu_equals_nn_relu_in_value_and_gradient():
  """`cpu_memory.relu` is `nn.relu`: values, gradients through a conv chain (derivative 0 at
  x = 0), under jit and vmap."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 5, 8)).astype(np.float32)
  x[0, 0, 0, :4] = 0.0  # the kink: derivative 0 there, as nn.relu
  w = (rng.normal(size=(1, 1, 8, 8)) * 0.3).astype(np.float32)

  def chain(act, w, x):
    y = x
    for _ in range(3):
      y = act(jax.lax.conv_general_dilated(y, w, (1, 1), 'VALID',
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + y)
    return jnp.sum(y * jnp.arange(8.0))

  for act_x in (x, x[0]):
    np.testing.assert_array_equal(jax.jit(cpu_memory.relu)(act_x), jax.nn.relu(act_x))
  ours = jax.jit(jax.grad(functools.partial(chain, cpu_memory.relu), argnums=(0, 1)))(w, x)
  ref = jax.jit(jax.grad(functools.partial(chain, jax.nn.relu), argnums=(0, 1)))(w, x)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  per_image = jax.vmap(jax.grad(lambda v: jnp.sum(cpu_memory.relu(v) ** 2)))(x)
  np.testing.assert_allclose(per_image, 2 * np.maximum(x, 0), rtol=1e-6)


def test_relu_chain_backward_keeps_less_memory_than_nn_relu():
  """The point of `cpu_memory.relu`: in a chain of residual blocks (1x1 conv, affine norm, add,
  relu) XLA:CPU's compiled gradient needs less temp memory than with `nn.relu`, which keeps
  every conv output alive for the backward pass (here 7 MB against 10 MB)."""
  x = jnp.ones((1, 64, 64, 64))
  ws = [jnp.full((1, 1, 64, 64), 0.01) for _ in range(4)]

  def chain(act, ws, x):
    y = x
    for w in ws:
      z = cpu_conv.conv_general_dilated(y, w, (1, 1), 'VALID',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      y = act(z * 0.9 + 0.1 + y)
    return jnp.sum(y)

  def temp_bytes(act):
    compiled = jax.jit(jax.grad(functools.partial(chain, act))).lower(ws, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours, plain = temp_bytes(cpu_memory.relu), temp_bytes(jax.nn.relu)
  assert ours <= 0.8 * plain, (ours, plain)
