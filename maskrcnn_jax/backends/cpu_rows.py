"""XLA:CPU backend: a head's loss over only the real rows of its padded slots.

Static shapes give the mask head 128 foreground slots per image although, with an untrained
RPN, only a handful hold a RoI. `active_rows_loss` runs the head on the chunks that hold real
rows only; `module_rows_loss` does it for bound flax modules. The plain form
(`backends.xla.module_rows_loss`) runs the head on every slot; both give the same value and
gradients (tests/backends/).
"""

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from maskrcnn_jax.backends import hooks


def _f32(x) -> jnp.ndarray:
  return jnp.asarray(x).astype(jnp.float32)


@hooks.cpu_scoped
def module_rows_loss(fn: Callable[[Mapping[str, Callable], jnp.ndarray, Any], jnp.ndarray],
                     modules: Mapping[str, nn.Module], rows: jnp.ndarray, aux: Any,
                     num_active: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """`fn(modules, rows, aux)` computed by `active_rows_loss`, `chunk` rows per image at a time.

  Args:
    fn: `fn(calls, rows_chunk [B, c, ...], aux_chunk) -> float32 scalar`, a sum over rows;
      `calls[name](*args)` applies `modules[name]`. Rows at or past `num_active[b]` must add
      nothing (mask them with a `valid` leaf of `aux`).
    modules: bound flax modules (e.g. a head's `mask_head` and `mask_predictor`); gradients flow
      to their parameters.
    rows, aux, num_active, chunk: as `active_rows_loss`. `chunk == 0` calls `fn` once on all
      rows.
  """
  if not chunk:
    return fn(dict(modules), rows, aux)
  # Unbound clones applied to explicit parameters: the pure function active_rows_loss needs.
  clones = {k: m.clone(parent=None) for k, m in modules.items()}
  params = {k: m.variables['params'] for k, m in modules.items()}

  def pure(p, xs, a):
    calls = {k: functools.partial(clones[k].apply, {'params': p[k]}) for k in clones}
    return fn(calls, xs, a)

  return active_rows_loss(pure, params, rows, aux, num_active, chunk)


@hooks.cpu_scoped
def active_rows_loss(fn: Callable[[Any, jnp.ndarray, Any], jnp.ndarray], params: Any,
                     rows: jnp.ndarray, aux: Any, num_active: jnp.ndarray,
                     chunk: int) -> jnp.ndarray:
  """`fn` summed over the first `num_active[b]` rows of every image, `chunk` rows at a time.

  Static shapes make a head run on every slot, padding included: the mask head always sees
  the 128 foreground slots per image of 512 sampled RoIs, although only `num_active[b]` of them
  are real (torchvision runs it on exactly those). Here a `lax.while_loop` visits only the
  chunks that hold a real row: `ceil(max_b num_active[b] / chunk)` iterations, each on
  `[B, chunk]` rows. The loop count is a runtime value, so nothing recompiles.

  A dynamic-length loop cannot be reverse-differentiated, so this is a `custom_vjp` that computes
  the gradient in the forward pass: each chunk's `value_and_grad`, accumulated in float32. The
  backward pass scales it by the incoming cotangent, which is exact because the result is a
  scalar. Cost: one forward and one backward per visited chunk (no recomputation), even when
  only the value is needed.

  Args:
    fn: `fn(params, rows_chunk [B, chunk, ...], aux_chunk) -> float32 scalar`. It must be a sum
      over rows, and rows at or past `num_active[b]` must add nothing to the value or the
      gradient (mask them with a `valid` leaf of `aux`). Padding appended to reach a multiple of
      `chunk` has all-zero `aux`, so `False` in a boolean `valid`. `fn` must not close over
      traced values.
    params: pytree of float arrays; gradients flow to it.
    rows: float `[B, N, ...]` with each image's real rows first; gradients flow to it.
    aux: pytree of `[B, N, ...]` arrays (targets, labels, valid), not differentiated.
    num_active: int `[B]`, real rows per image.
    chunk: rows per image per iteration (static).

  Returns:
    float32 scalar, equal to `fn(params, rows, aux)` under the rule above.
  """
  return _active_rows_loss(fn, chunk, params, rows, aux, num_active)


def _chunk_loop(fn, chunk, params, rows, aux, num_active, with_grads):
  n = rows.shape[1]
  padded = -(-n // chunk) * chunk

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, padded - n)] + [(0, 0)] * (x.ndim - 2))

  rows_p, aux_p = pad(rows), jax.tree_util.tree_map(pad, aux)
  trips = (jnp.max(jnp.asarray(num_active, jnp.int32)) + chunk - 1) // chunk

  def body(carry):
    i, total, dparams, drows = carry
    start = i * chunk
    x = lax.dynamic_slice_in_dim(rows_p, start, chunk, axis=1)
    a = jax.tree_util.tree_map(lambda v: lax.dynamic_slice_in_dim(v, start, chunk, axis=1), aux_p)
    if with_grads:
      value, (dp, dx) = jax.value_and_grad(fn, argnums=(0, 1))(params, x, a)
      dparams = jax.tree_util.tree_map(lambda s, d: s + d.astype(jnp.float32), dparams, dp)
      drows = lax.dynamic_update_slice_in_dim(drows, dx.astype(drows.dtype), start, axis=1)
    else:
      value = fn(params, x, a)
    return i + 1, total + _f32(value), dparams, drows

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  init = (jnp.int32(0), jnp.float32(0.0),
          jax.tree_util.tree_map(zeros, params) if with_grads else None,
          zeros(rows_p) if with_grads else None)
  _, total, dparams, drows = lax.while_loop(lambda c: c[0] < trips, body, init)
  if not with_grads:
    return total, None, None
  dparams = jax.tree_util.tree_map(lambda d, p: d.astype(p.dtype), dparams, params)
  return total, dparams, drows[:, :n].astype(rows.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _active_rows_loss(fn, chunk, params, rows, aux, num_active):
  return _chunk_loop(fn, chunk, params, rows, aux, num_active, with_grads=False)[0]


def _active_rows_fwd(fn, chunk, params, rows, aux, num_active):
  total, dparams, drows = _chunk_loop(fn, chunk, params, rows, aux, num_active, with_grads=True)
  return total, (dparams, drows)


def _active_rows_bwd(fn, chunk, residuals, g):
  del fn, chunk
  dparams, drows = residuals

  def scale(d):
    return (g * d).astype(d.dtype)

  # aux and num_active are not differentiated: None is custom_vjp's zero cotangent.
  return jax.tree_util.tree_map(scale, dparams), scale(drows), None, None


_active_rows_loss.defvjp(_active_rows_fwd, _active_rows_bwd)
