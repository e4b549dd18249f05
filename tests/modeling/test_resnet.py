"""ResNet bodies: torchvision parameter counts, strides, stride placement, freezing, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.modeling import mask_rcnn
from maskrcnn_jax.modeling import resnet
from tests.modeling.helpers import numpy_variables

IMAGE = jnp.zeros((1, 64, 96, 3), jnp.float32)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('depth,expected', [
    # torchvision resnet{18,34,50,101} parameters minus the classifier fc and the batch-norm
    # affine terms (which are frozen constants here).
    (18, 11_689_512 - 513_000 - 9_600),
    (34, 21_797_672 - 513_000 - 17_024),
    (50, 25_557_032 - 2_049_000 - 53_120),
    (101, 44_549_160 - 2_049_000 - 105_344),
])
def test_param_count_matches_torchvision(depth, expected):
  model = resnet.ResNet(depth=depth)
  shapes = jax.eval_shape(model.init, jax.random.key(0), IMAGE)
  assert _count(shapes['params']) == expected


def test_output_strides_and_channels(tiny_config):
  model = resnet.ResNet.from_config(tiny_config)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), IMAGE))[0]
  assert [o.shape for o in out] == [(1, 16, 24, 32), (1, 8, 12, 64), (1, 4, 6, 128),
                                    (1, 2, 3, 256)]
  assert resnet.stage_channels(tiny_config) == (32, 64, 128, 256)


@pytest.mark.parametrize('stride_in_1x1,conv1_hw,conv2_hw', [(False, (16, 24), (8, 12)),
                                                             (True, (8, 12), (8, 12))])
def test_stride_placement(stride_in_1x1, conv1_hw, conv2_hw):
  model = resnet.ResNet(depth='tiny', width=8, stride_in_1x1=stride_in_1x1)
  _, state = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), IMAGE,
                                                           capture_intermediates=True))
  block = state['intermediates']['layer2']['0']
  assert block['conv1']['__call__'][0].shape[1:3] == conv1_hw
  assert block['conv2']['__call__'][0].shape[1:3] == conv2_hw


def test_frozen_bn_matches_formula():
  bn = resnet.FrozenBatchNorm(eps=1e-5)
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 4))
  variables = jax.jit(bn.init)(jax.random.key(0), x)
  assert set(variables) == {'constants'}
  np.testing.assert_allclose(bn.apply(variables, x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
  rng = np.random.default_rng(0)
  w, b, mu = (rng.normal(size=4).astype(np.float32) for _ in range(3))
  var = rng.uniform(0.5, 2, size=4).astype(np.float32)
  consts = {'constants': {'weight': w, 'bias': b, 'running_mean': mu, 'running_var': var}}
  expected = (np.asarray(x) - mu) / np.sqrt(var + 1e-5) * w + b
  np.testing.assert_allclose(bn.apply(consts, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('freeze_at', [0, 2])
def test_freeze_at_stops_gradients_and_masks(tiny_config, freeze_at):
  model = resnet.ResNet(depth='tiny', width=8, freeze_at=freeze_at)
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  variables = numpy_variables(jax.eval_shape(model.init, jax.random.key(1), x))

  def loss(params):
    outs = model.apply({'params': params, 'constants': variables['constants']}, x)
    return sum(jnp.sum(o) for o in outs)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  norms = {k: float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(v)))
           for k, v in grads.items()}
  frozen = {'conv1', 'layer1'} if freeze_at == 2 else set()
  for name, norm in norms.items():
    assert (norm == 0.0) == (name in frozen), (name, norm)

  cfg = tiny_config.copy_and_resolve_references()
  cfg.model.backbone.freeze_at = freeze_at
  full = jax.eval_shape(functools.partial(mask_rcnn.init_variables, cfg), jax.random.key(0))
  mask = mask_rcnn.trainable_mask(full['params'], cfg)
  body = mask['backbone']['body']
  for name in ('conv1', 'layer1', 'layer2', 'layer3', 'layer4'):
    assert all(v == (name not in frozen) for v in jax.tree_util.tree_leaves(body[name])), name
  assert all(jax.tree_util.tree_leaves(mask['roi_heads']))
  assert all(jax.tree_util.tree_leaves(mask['backbone']['fpn']))


def test_bfloat16_computes_in_bf16_with_f32_params():
  model = resnet.ResNet(depth='tiny', width=8, dtype=jnp.bfloat16)
  outs, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), IMAGE))
  assert all(o.dtype == jnp.bfloat16 for o in outs)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
