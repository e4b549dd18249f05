"""backends/cpu_rows.py: a loss over only the chunks of slots that hold real rows equals the
full sum, values and gradients, and compiles once for any number of real rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.backends import cpu_rows


def _row_loss(p, x, aux):
  """A per-row loss (tanh layer, squared error) summed over valid rows: `[B, R, C]` rows."""
  h = jnp.tanh(jnp.einsum('brc,cd->brd', x, p['w']) + p['b'])
  per_row = jnp.sum((h - aux['target']) ** 2, axis=-1)
  return jnp.sum(jnp.where(aux['valid'], per_row, 0.0))


@pytest.mark.parametrize('seed', range(6))
def test_active_rows_loss_equals_full_sum_with_gradients(seed):
  rng = np.random.default_rng(seed)
  b, n, c, d = rng.integers(1, 4), rng.integers(1, 13), 5, 3
  num_active = rng.integers(0, n + 1, b)
  num_active[rng.integers(b)] = rng.choice([0, n])  # the edge cases: nothing, everything
  params = {'w': jnp.asarray(rng.normal(size=(c, d)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=d), jnp.float32)}
  rows = jnp.asarray(rng.normal(size=(b, n, c)), jnp.float32)
  aux = {'target': jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32),
         'valid': jnp.asarray(np.arange(n)[None] < num_active[:, None])}
  want, want_grads = jax.value_and_grad(_row_loss, argnums=(0, 1))(params, rows, aux)
  for chunk in (1, 2, 5, n, n + 3):
    fn = jax.jit(jax.value_and_grad(
        lambda p, x, a, k, chunk=chunk: cpu_rows.active_rows_loss(_row_loss, p, x, a, k, chunk),
        argnums=(0, 1)))
    got, got_grads = fn(params, rows, aux, jnp.asarray(num_active))
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f'chunk {chunk}')
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f'chunk {chunk}')
    value_only = cpu_rows.active_rows_loss(_row_loss, params, rows, aux, num_active, chunk)
    np.testing.assert_allclose(value_only, want, rtol=1e-5)


def test_active_rows_loss_skips_inactive_chunks_and_compiles_once():
  """Rows past num_active are never read (NaN there changes nothing) and the loop length is a
  runtime value: one trace for every num_active."""
  traces = []

  def fn(p, x, aux):
    traces.append(1)
    return _row_loss(p, x, aux)

  params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
  rows = jnp.ones((1, 8, 2)).at[0, 4:].set(jnp.nan)
  aux = {'target': jnp.zeros((1, 8, 2)), 'valid': jnp.arange(8)[None] < 4}
  step = jax.jit(jax.value_and_grad(
      lambda p, x, k: cpu_rows.active_rows_loss(fn, p, x, aux, k, 2), argnums=(0, 1)))
  for k in (4, 0, 3):
    value, (dp, dx) = step(params, rows, jnp.array([k]))
    # valid marks 4 rows; only the first ceil(k / 2) chunks are visited.
    visited = min(4, -(-k // 2) * 2)
    np.testing.assert_allclose(value, visited * 2 * np.tanh(2.0) ** 2, rtol=1e-6)
    assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(dp['w'])).all()
    assert (np.asarray(dx[0, visited:]) == 0).all() and (np.asarray(dx[0, :visited]) != 0).all()
  assert len(traces) == 1
