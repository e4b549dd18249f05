"""XLA:CPU backend: the weighted row gather under RoIAlign, chunked and in order of position.

`weighted_row_gather(flat, idx, wts)` computes `sum_k wts[..., k] * flat[idx[..., k]]` (what
`backends.xla.weighted_row_gather` computes with one gather) as a loop over chunks of RoIs
taken in order of position, with a float32 scatter-add backward issued chunk by chunk. On
XLA:CPU this keeps the taps and the scatter updates in cache; the figures are in
docs/performance.md. Values and gradients equal the plain form (tests/backends/).
"""

import jax
import jax.numpy as jnp

from maskrcnn_jax.backends import cpu_memory
from maskrcnn_jax.backends import hooks


# RoIs are processed in chunks whose K * C float32 taps take about this many bytes: each chunk's
# backward scatter updates then stay in cache instead of materialising all N * oh * ow * K * C
# of them (several times faster than one big scatter-add on a 2-core CPU; docs/performance.md).
CHUNK_BYTES = 4 << 20


def _chunking(n, oh, ow, k, c):
  """(RoIs per chunk, number of chunks) for the chunk budget."""
  chunk = int(max(1, min(n, CHUNK_BYTES // max(1, oh * ow * k * c * 4))))
  return chunk, -(-n // chunk)


def _pad_rois(x, total):
  pad = total - x.shape[0]
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x


def _chunk_plan(idx, c):
  """`(order, num_chunks)` of both passes over `[N, oh, ow, K]` taps with C channels.

  `order` (int32 `[num_chunks * chunk]`, chunk from `_chunking`) lists the RoIs sorted by the
  flat index of their first tap (by level, then row, then column), then the padding slots
  `N..`: neighbouring RoIs read and update overlapping feature rows one after the other, while
  the rows are still in cache (measured faster forward and backward on 1000 random RoIs;
  docs/performance.md).
  """
  n, oh, ow, k = idx.shape
  chunk, num_chunks = _chunking(n, oh, ow, k, c)
  order = jnp.argsort(idx[:, 0, 0, 0]).astype(jnp.int32)
  return jnp.concatenate([order, jnp.arange(n, chunk * num_chunks, dtype=jnp.int32)]), num_chunks


def _to_chunks(x, order, num_chunks):
  """Per-RoI `[N, ...]` -> `[num_chunks, chunk, ...]` in `order`, padding RoIs filled with 0."""
  return _pad_rois(x, order.shape[0])[order].reshape((num_chunks, -1) + x.shape[1:])


def _x_pairs(idx, wts, num_rows: int):
  """The K taps of `_bin_taps` as K/2 windows of two adjacent rows: `(start, w_first, w_second)`,
  each `[N, oh, ow, K/2]`.

  `_bin_taps` orders a bin's taps with the x-neighbour innermost, so taps `2t` and `2t + 1` are
  pixels x and x + 1 of one image row, adjacent in the flat map (at the right edge both are x,
  and the second weight is 0). One gather of a `[2, C]` window reads both, measured faster than
  two row gathers. A window starting at the last row is moved back by one, its
  weights with it.
  """
  first, w_first, w_second = idx[..., 0::2], wts[..., 0::2], wts[..., 1::2]
  shifted = first >= num_rows - 1
  start = jnp.where(shifted, num_rows - 2, first)
  return (start, jnp.where(shifted, 0.0, w_first), jnp.where(shifted, w_first, w_second))


@hooks.cpu_scoped
def weighted_row_gather(flat, idx, wts):
  """See `_weighted_gather`."""
  return _weighted_gather(flat, idx, wts)


@jax.custom_vjp
def _weighted_gather(flat, idx, wts):
  """`out[n, i, j] = sum_k wts[n, i, j, k] * flat[idx[n, i, j, k]]` in float32.

  Args:
    flat: float `[P, C]` feature rows (any float dtype).
    idx: int32 `[N, oh, ow, K]` row indices, all in `[0, P)`, in `_bin_taps`' tap order.
    wts: float32 `[N, oh, ow, K]` weights.

  Returns:
    float32 `[N, oh, ow, C]`. A loop over chunks of RoIs (taken in `_chunk_plan`'s order) whose
    body fuses the K/2 gathers of row pairs (`_x_pairs`) with the weighted sum (no
    `[..., K, C]` intermediate). The loop also keeps consumers out of that fusion: XLA:CPU
    otherwise fuses a following reduction with the arithmetic and materialises K separate
    gathers (measured several times slower).
  """
  flat, idx, wts = jnp.asarray(flat), jnp.asarray(idx), jnp.asarray(wts)
  n, oh, ow, k = idx.shape
  c = flat.shape[-1]
  if n == 0:
    return jnp.zeros((0, oh, ow, c), jnp.float32)
  if flat.shape[0] < 2:  # a 1-pixel map: give the row-pair windows a second (unused) row
    flat = jnp.pad(flat, ((0, 2 - flat.shape[0]), (0, 0)))
  order, num_chunks = _chunk_plan(idx, c)
  start_c, w0_c, w1_c = (_to_chunks(x, order, num_chunks)
                         for x in _x_pairs(idx, wts, flat.shape[0]))
  order_c = order.reshape(num_chunks, -1)
  window = jax.lax.GatherDimensionNumbers(offset_dims=(3, 4), collapsed_slice_dims=(),
                                          start_index_map=(0,))

  def one_chunk(start, w0, w1):
    acc = None
    for t in range(k // 2):
      rows = jax.lax.gather(flat, start[..., t, None], window, slice_sizes=(2, c),
                            mode='promise_in_bounds').astype(jnp.float32)
      term = w0[..., t, None] * rows[..., 0, :] + w1[..., t, None] * rows[..., 1, :]
      acc = term if acc is None else acc + term
    return acc

  def body(i, out):
    return out.at[order_c[i]].set(one_chunk(start_c[i], w0_c[i], w1_c[i]),
                                  mode='promise_in_bounds', unique_indices=True)

  out = cpu_memory.zeros_after((order.shape[0], oh, ow, c), jnp.float32, idx)
  return jax.lax.fori_loop(0, num_chunks, body, out)[:n]


def _weighted_gather_fwd(flat, idx, wts):
  # A zero-size array carries the feature dtype and row count through the residuals.
  return _weighted_gather(flat, idx, wts), (idx, wts, jnp.zeros((0, flat.shape[0]), flat.dtype))


def _weighted_gather_bwd(res, g):
  """Transpose: float32 scatter-add of `wts * g` into the rows, one chunk of RoIs at a time."""
  idx, wts, carrier = res
  idx, wts = jnp.asarray(idx), jnp.asarray(wts)
  num_rows = carrier.shape[-1]
  g = jnp.asarray(g).astype(jnp.float32)
  n, oh, ow, k = idx.shape
  c = g.shape[-1]
  if n == 0:
    return jnp.zeros((num_rows, c), carrier.dtype), None, None
  order, num_chunks = _chunk_plan(idx, c)
  # Padded RoIs have weight 0 at row 0.
  idx = _to_chunks(idx, order, num_chunks).reshape(num_chunks, -1)
  wts = _to_chunks(wts, order, num_chunks).reshape(num_chunks, -1, k)
  g = _pad_rois(g, order.shape[0])
  order_c = order.reshape(num_chunks, -1)

  def body(i, grad):
    g_i = g.at[order_c[i]].get(mode='promise_in_bounds').reshape(-1, c)
    updates = (wts[i][:, :, None] * g_i[:, None, :]).reshape(-1, c)
    return grad.at[idx[i]].add(updates, mode='promise_in_bounds')

  zeros = cpu_memory.zeros_after((num_rows, c), jnp.float32, g)
  grad = jax.lax.fori_loop(0, num_chunks, body, zeros)
  return grad.astype(carrier.dtype), None, None


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)
