"""XLA:CPU backend: constructs that change what XLA:CPU keeps alive, not what is computed.

`zeros_after` stops XLA:CPU's scheduler from allocating a zero-fill at the start of a program;
`relu` keeps only its activation for the backward pass. Both compute exactly what their plain
forms (`jnp.zeros`, `nn.relu`) compute, values and gradients (tests/backends/); the memory they
save is measured in docs/performance.md.
"""

import jax
import jax.numpy as jnp

from maskrcnn_jax.backends import hooks


@hooks.cpu_scoped
def zeros_after(shape, dtype, dependency: jnp.ndarray) -> jnp.ndarray:
  """Zeros of `shape` and `dtype` that XLA cannot compute before `dependency` exists.

  A constant fill has no inputs, so XLA:CPU's scheduler may run it at the start of the program
  and keep the buffer alive until the loop or op that uses it (the RoIAlign backward's scatter
  accumulators and a conv kernel gradient's padded input were held through the whole forward
  pass of a train step). Here the fill value is `min(|dependency[0]|, 0)`, a 0 known only at run
  time (NaN for a NaN first element: callers pass an input whose NaN reaches their result
  anyway).
  """
  dependency = jnp.asarray(dependency)
  if not dependency.size:
    return jnp.zeros(shape, dtype)
  zero = jnp.minimum(jnp.abs(dependency.reshape(-1)[0]), 0)
  return jnp.broadcast_to(zero.astype(dtype), shape)


def _opaque_copy(y: jnp.ndarray) -> jnp.ndarray:
  """`y`, passed through a one-trip `while_loop` whose trip count XLA cannot know.

  An identity that XLA:CPU's fusion cannot see through: the consumers of the result read this
  buffer instead of re-deriving `y` from its inputs. The body rewrites element 0 with itself
  (so XLA cannot drop the loop as invariant) in place.
  """
  flat = y.reshape(-1)
  trips = 1 - jnp.isnan(flat[0]).astype(jnp.int32)  # 1, but only known at run time

  def body(carry):
    i, v = carry
    return i + 1, v.at[0].set(jnp.where(i < 0, 0, v[0]))

  return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.int32(0), flat))[1].reshape(y.shape)


@hooks.cpu_scoped
def relu(x: jnp.ndarray) -> jnp.ndarray:
  """`max(x, 0)` with the derivative of `nn.relu`, differentiated so as to keep less memory.

  Its derivative mask is read from the output, and the output is made opaque to XLA
  (`_opaque_copy`). Without that, XLA:CPU computes the backward pass's mask by re-deriving the
  output from the conv outputs that produced it, through the whole chain of residual additions
  of a ResNet stage, so every conv output of every block stays alive until the backward pass,
  beside the activations the kernel gradients need. With it only the activations stay.
  """
  return _relu(x)


@jax.custom_jvp
def _relu(x):
  return jnp.maximum(x, 0)


@_relu.defjvp
def _relu_jvp(primals, tangents):
  y = _opaque_copy(jnp.maximum(primals[0], 0))
  return y, jnp.where(y > 0, tangents[0], jnp.zeros_like(tangents[0]))
