"""The backend seam: the plain ('xla') and XLA:CPU ('cpu') forms of every hook point give the same
values and gradients, and so does a whole tiny train step; the plain program holds none of the
CPU constructs."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maskrcnn_jax import backends
from maskrcnn_jax import train
from maskrcnn_jax.backends import cpu
from maskrcnn_jax.backends import hooks
from maskrcnn_jax.backends import xla
from maskrcnn_jax.modeling import mask_head
from maskrcnn_jax.modeling import mask_rcnn

import synthetic

PLAIN, CPU = xla.PLAIN, cpu.CPU
NHWC = ('NHWC', 'HWIO', 'NHWC')


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=tol, atol=tol)


def _value_and_grads(fn, *args):
  """fn(*args) and the gradient of sum(fn * fixed random weights) for every argument."""
  out = fn(*args)
  weights = jax.tree_util.tree_map(
      lambda o: jnp.asarray(np.random.default_rng(0).normal(size=o.shape), o.dtype), out)

  def scalar(*a):
    return sum(jnp.sum(o * w) for o, w in zip(jax.tree_util.tree_leaves(fn(*a)),
                                               jax.tree_util.tree_leaves(weights)))

  return out, jax.grad(scalar, argnums=tuple(range(len(args))))(*args)


def test_switch_resolves_and_rejects():
  assert backends.resolve('auto') == 'cpu'  # the tests run on the CPU
  assert backends.get('auto') is CPU and backends.get('cpu') is CPU
  assert backends.get('xla') is PLAIN
  with pytest.raises(ValueError, match='execution.backend'):
    backends.get('tpu')


# (input HWC, kernel hw, cin, cout, stride, padding): 1x1 as a matmul, narrow and wide 3x3,
# strided 3x3 and 1x1, the stem's 7x7 stride 2.
CONVS = [((9, 11), 1, 6, 5, 1, 0), ((8, 10), 3, 4, 3, 1, 1), ((7, 9), 3, 256, 256, 1, 1),
         ((9, 12), 3, 5, 7, 2, 1), ((10, 10), 1, 6, 4, 2, 0), ((15, 13), 7, 3, 4, 2, 3)]


@pytest.mark.parametrize('case', CONVS)
@pytest.mark.parametrize('hook', ['conv_general_dilated', 'loop_conv_general_dilated'])
def test_conv_hooks_agree(case, hook):
  (h, w), k, cin, cout, stride, pad = case
  rng = np.random.default_rng(k * 7 + cin)
  x = jnp.asarray(rng.normal(size=(2, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)

  def run(backend):
    conv = getattr(backend, hook)
    return jax.jit(lambda a, b: _value_and_grads(
        lambda u, v: conv(u, v, (stride, stride), ((pad, pad), (pad, pad)),
                          dimension_numbers=NHWC), a, b))(x, kernel)

  _close(run(PLAIN), run(CPU), tol=1e-4 if cin == 256 else 1e-5)


def test_relu_upsample_zeros_and_pointwise_pair_agree():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
  for name in ('relu', 'upsample2x'):
    _close(jax.jit(lambda a, f=getattr(PLAIN, name): _value_and_grads(f, a))(x),
           jax.jit(lambda a, f=getattr(CPU, name): _value_and_grads(f, a))(x))
  for backend in (PLAIN, CPU):
    zeros = jax.jit(lambda a, b=backend: b.zeros_after((3, 4), jnp.float32, a))(x)
    assert zeros.shape == (3, 4) and not np.asarray(zeros).any()
  ka = jnp.asarray(rng.normal(size=(1, 1, 8, 3)), jnp.float32)
  kb = jnp.asarray(rng.normal(size=(1, 1, 8, 12)), jnp.float32)
  ba, bb = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=12))

  def two_convs(a, ka, ba, kb, bb):  # what the RPN does without the hook
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                             padding='VALID', dimension_numbers=NHWC)
    return conv(a, ka) + ba, conv(a, kb) + bb

  fused = lambda a, ka, ba, kb, bb: CPU.pointwise_pair(a, (ka, ba), (kb, bb))
  _close(jax.jit(lambda *a: _value_and_grads(two_convs, *a))(x, ka, ba, kb, bb),
         jax.jit(lambda *a: _value_and_grads(fused, *a))(x, ka, ba, kb, bb))


@pytest.mark.parametrize('seed', range(4))
def test_weighted_row_gather_agrees(seed):
  rng = np.random.default_rng(seed)
  rows, c = int(rng.integers(2, 60)), int(rng.choice([1, 8, 256]))
  n, k = int(rng.integers(1, 40)), 4 * int(rng.choice([1, 4]))
  flat = jnp.asarray(rng.normal(size=(rows, c)), jnp.float32)
  # Taps come in x-neighbour pairs (idx, idx + 1), as RoIAlign's bins do.
  first = rng.integers(0, rows - 1, size=(n, 2, 3, k // 2))
  idx = jnp.asarray(np.stack([first, first + 1], -1).reshape(n, 2, 3, k), jnp.int32)
  wts = jnp.asarray(rng.random(size=(n, 2, 3, k)), jnp.float32)
  run = lambda b: jax.jit(lambda f: _value_and_grads(
      lambda u: b.weighted_row_gather(u, idx, wts), f))(flat)
  _close(run(PLAIN), run(CPU), tol=1e-5)


def _mask_head(backend, chunk):
  head = ml_collections.FrozenConfigDict({'conv_dim': 8, 'num_convs': 2, 'resolution': 28})
  return mask_head.MaskHead(head=head,
                            pooler_size=14, num_classes=4, loss_chunk=chunk, backend=backend)


def test_mask_predictor_and_rows_loss_agree():
  """Same parameters in both forms; logits of every class and of the given labels, and the
  mask loss on padded foreground slots, values and parameter gradients."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 14, 14, 8)), jnp.float32)
  labels = jnp.asarray([1, 3, 0, 2, 2, 1], jnp.int32)
  plain, cpu_head = _mask_head(PLAIN, 0), _mask_head(CPU, 2)
  init = functools.partial(plain.init, method=mask_head.MaskHead.init_params)
  variables = init(jax.random.key(0), 8, jnp.float32)
  assert (jax.tree_util.tree_structure(variables) ==
          jax.tree_util.tree_structure(cpu_head.init(jax.random.key(0), 8, jnp.float32,
                                                     method=mask_head.MaskHead.init_params)))
  every = lambda head: head.apply(variables, x, method=lambda m, v: m.mask_predictor(
      m.mask_head(v)))
  _close(every(plain), every(cpu_head))
  _close(plain.apply(variables, x, labels), cpu_head.apply(variables, x, labels))

  rois = jnp.asarray(rng.uniform(0, 20, size=(2, 3, 4)), jnp.float32)
  rois = rois.at[..., 2:].add(rois[..., :2] + 4)
  fg = jnp.asarray([[True, True, False], [True, False, False]])
  from maskrcnn_jax.modeling import heads  # pylint: disable=g-import-not-at-top
  sample = heads.RoISample(rois, jnp.asarray([[1, 3, 0], [2, 0, 0]], jnp.int32),
                           jnp.zeros((2, 3, 4)), jnp.asarray([[0, 1, 0], [0, 0, 0]], jnp.int32),
                           fg, fg, num_fg_slots=3)
  gt_masks = jnp.asarray(rng.random(size=(2, 2, 28, 28)) > 0.5, jnp.uint8)
  batch = {'gt_masks': gt_masks, 'gt_boxes': rois[:, :2]}
  feats = x.reshape(2, 3, 14, 14, 8)
  pool = lambda boxes, size: feats

  def loss(head):
    fn = lambda p: head.apply({'params': p}, pool, sample, batch,
                              method=mask_head.MaskHead.loss)['loss_mask']
    return jax.jit(jax.value_and_grad(fn))(variables['params'])

  want = loss(plain)
  assert float(want[0]) > 0
  _close(want, loss(cpu_head))


def _tiny_step(tiny_config, backend_name):
  config = tiny_config.copy_and_resolve_references()
  config.execution.backend = backend_name
  model = mask_rcnn.build_model(config)
  mesh = train.make_mesh(jax.devices()[:1])
  state, shardings, optimizer = train.init_state(config, model, mesh, (64, 96))
  batch = synthetic.synthetic_batch(config, 2, seed=3)
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer))
  return step, state, batch


@pytest.mark.slow
def test_tiny_train_step_agrees_and_plain_jaxpr_has_no_cpu_construct(tiny_config):
  """One train step of the tiny config from the same state: loss terms, gradient norm and
  updated parameters within 1e-5 (float32). The plain program's jaxpr has no equation under the
  CPU backend's named scope, and the CPU one has them."""
  results, scopes = {}, {}
  for name in ('xla', 'cpu'):
    step, state, batch = _tiny_step(tiny_config, name)
    scopes[name] = _scopes(jax.make_jaxpr(step)(state, batch).jaxpr)
    new_state, metrics = step(state, batch)
    results[name] = (jax.device_get(metrics), jax.device_get(new_state.params))
  (m_plain, p_plain), (m_cpu, p_cpu) = results['xla'], results['cpu']
  assert float(m_plain['loss_mask']) > 0 and float(m_plain['num_roi_foreground']) > 0
  for key in m_plain:
    np.testing.assert_allclose(m_cpu[key], m_plain[key], rtol=1e-5, atol=1e-5, err_msg=key)
  _close(p_plain, p_cpu, tol=1e-5)
  assert not any(hooks.CPU_SCOPE in s for s in scopes['xla']), sorted(scopes['xla'])[:5]
  cpu_scopes = {s.split(hooks.CPU_SCOPE + '.')[1].split('/')[0]
                for s in scopes['cpu'] if hooks.CPU_SCOPE in s}
  assert {'conv_general_dilated', 'relu', 'weighted_row_gather', 'module_rows_loss',
          'MaskPredictor', 'upsample2x', 'pointwise_pair'} <= cpu_scopes, cpu_scopes


def _scopes(jaxpr) -> set:
  """The name stacks of every equation of a jaxpr, sub-jaxprs included."""
  out = set()
  for eqn in jaxpr.eqns:
    out.add(str(eqn.source_info.name_stack))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          out |= _scopes(inner)
  return out


@pytest.mark.parametrize('hw', [(14, 14), (5, 9)])
def test_conv_transpose_4x4_stride2_agrees(hw):
  """The keypoint predictor's deconv: XLA's transposed conv against four phase convs."""
  rng = np.random.default_rng(hw[1])
  x = jnp.asarray(rng.normal(size=(3,) + hw + (6,)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 4, 5, 6)) / 10, jnp.float32)
  bias = jnp.asarray(rng.normal(size=5), jnp.float32)
  run = lambda b: jax.jit(lambda *a: _value_and_grads(b.conv_transpose_4x4_stride2, *a))(
      x, kernel, bias)
  want = run(PLAIN)
  assert want[0].shape == (3, 2 * hw[0], 2 * hw[1], 5)
  _close(want, run(CPU), tol=1e-4)  # kernel gradients sum ~600 products in another order
