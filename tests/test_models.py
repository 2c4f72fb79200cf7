"""Backbones: shapes, parameter counts, BatchNorm modes, bf16, a jitted
training step, and the equality of the per-backend conv formulations."""

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from npcface_jax import models
from npcface_jax.models.attention import upsample_bilinear
from npcface_jax.models.layers import BatchNorm, Conv, DepthwiseConv
from tests.helpers import fresh_rng, random_variables


def _count(params, skip=None):
  return sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
             if skip is None or skip not in jax.tree_util.keystr(path))


BACKBONES = models.names()
_VARIABLES = {}


def _init(name, batch=4, width=1.0):
  """The model, its variables (drawn in NumPy at flax's initial
  distributions, cached per module) and images."""
  model = models.create(name, width=width)
  images = jnp.asarray(fresh_rng()[0].normal(size=(batch, 112, 112, 3)),
                       jnp.float32)
  if (name, width) not in _VARIABLES:
    _VARIABLES[name, width] = random_variables(model, images.shape)
  return model, _VARIABLES[name, width], images


@pytest.fixture(scope='module')
def mobilefacenet():
  return _init('mobilefacenet')


# Published counts at 512-d: FaceX-Zoo's / insightface's MobileFaceNet
# 1,200,512 (1,192,960 without PReLU); insightface iresnet50 43.6M and
# iresnet100 65.2M; face.evoLVe's IR-SE-50 43.8M. VGG-19-BN with the IR
# head: 20,018,880 conv + 11,008 conv-BN + 1,024 BN + 12,845,568 linear +
# 1,024 BN, counted by hand from its layers. Attention-56/92: FaceX-Zoo's
# AttentionNet (81,138,880 / 101,794,496) plus the IR head's BN before the
# flatten (4,096) and linear bias (512).
@pytest.mark.parametrize('name,count', [
    ('mobilefacenet', 1_200_512), ('resnet50', 43_590_848),
    ('resnet101', 65_156_160), ('se_resnet50', 43_813_568),
    ('vgg19', 32_877_504), ('attention56', 81_143_488),
    ('attention92', 101_799_104)])
def test_parameter_counts(name, count):
  model = models.create(name)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
  assert _count(variables['params']) == count


def _iresnet_count(units, dim=512, shortcut='conv', middle_bn=True):
  """Counted from arcface_torch's iresnet layer list (face.evoLVe's IR
  with shortcut='subsample': no conv where only the stride changes; and
  FaceX-Zoo's without the BN before each unit's PReLU)."""
  n, cin = 27 * 64 + 3 * 64, 64  # stem conv, BN, PReLU
  for out, count in zip((64, 128, 256, 512), units):
    for i in range(count):
      n += 2 * cin + 9 * cin * out + out + 9 * out * out + 2 * out
      n += 2 * out if middle_bn else 0
      if cin != out or (i == 0 and shortcut == 'conv'):
        n += cin * out + 2 * out
      cin = out
  return n + 2 * 512 + 512 * 49 * dim + dim + 2 * dim


def _mbf_count(stem, stem_groups, stages, blocks, dim=512, fc_bias=False):
  """Counted from arcface_torch's mobilefacenet.py layer list (ConvBlock:
  conv, BN, PReLU; LinearBlock: conv, BN; DepthWise: 1x1 ConvBlock to the
  expansion, grouped 3x3 ConvBlock, 1x1 LinearBlock)."""
  def conv_block(cin, cout, k=1, groups=1, prelu=True):
    return k * k * cin // groups * cout + (3 if prelu else 2) * cout

  def depthwise(cin, cout, g):
    return (conv_block(cin, g) + conv_block(g, g, 3, g)
            + conv_block(g, cout, prelu=False))

  n = conv_block(3, stem, 3)
  if blocks[0] > 1:
    n += blocks[0] * depthwise(stem, stem, 128)
  else:
    n += conv_block(stem, stem, 3, stem_groups or stem)
  cin = stem
  for out, down, g, count in zip(stages, (128, 256, 512), (128, 256, 256),
                                 blocks[1:]):
    n += depthwise(cin, out, down) + count * depthwise(out, out, g)
    cin = out
  n += conv_block(cin, 512) + conv_block(512, 512, 7, 512, prelu=False)
  return n + 512 * dim + (dim if fc_bias else 0) + 2 * dim


@pytest.mark.parametrize('name,options,count', [
    ('resnet18', {}, _iresnet_count((2, 2, 2, 2))),
    ('resnet34', {}, _iresnet_count((3, 4, 6, 3))),
    ('resnet200', {}, _iresnet_count((6, 26, 60, 6))),
    ('resnet50', {'shortcut': 'subsample'},
     _iresnet_count((3, 4, 14, 3), shortcut='subsample')),
    ('resnet50', {'shortcut': 'subsample', 'middle_bn': False, 'se': True},
     _iresnet_count((3, 4, 14, 3), shortcut='subsample', middle_bn=False)
     + sum(n * 2 * c * c // 16  # each unit's SE: two 1x1 convs, no bias
           for n, c in zip((3, 4, 14, 3), (64, 128, 256, 512)))),
    ('resnet101', {'embedding_dim': 128}, _iresnet_count((3, 13, 30, 3), 128)),
    ('mobilefacenet', {}, _mbf_count(64, None, (64, 128, 128), (1, 4, 6, 2))),
    ('mobilefacenet', {'stem': 128, 'stem_groups': 64,
                       'stages': (128, 256, 256)},
     _mbf_count(128, 64, (128, 256, 256), (1, 4, 6, 2))),
    ('mobilefacenet', {'stem': 256, 'stages': (256, 512, 512),
                       'blocks': (2, 8, 12, 4), 'fc_bias': True,
                       'embedding_dim': 128},
     _mbf_count(256, None, (256, 512, 512), (2, 8, 12, 4), 128, True))])
def test_released_variants_parameter_counts(name, options, count):
  """The variants released networks need (arcface_torch's depths, mbf and
  mbf_large, face.evoLVe's subsampled shortcut, 128-d) have the layers
  their own code lists; the counts agree with the published ones above
  for resnet50, resnet101 and MobileFaceNet."""
  assert _iresnet_count((3, 4, 14, 3)) == 43_590_848
  assert _mbf_count(64, None, (64, 128, 128), (1, 4, 6, 2)) == 1_200_512
  model = models.create(name, **options)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
  assert _count(variables['params']) == count


def test_variant_options_change_the_computation():
  """bn_epsilon reaches every BatchNorm and 'subsample' replaces the
  stride-only shortcuts' convs, on a small IR net whose weights are the
  same otherwise."""
  x = jnp.asarray(fresh_rng()[0].normal(size=(2, 112, 112, 3)), jnp.float32)
  small = dict(units=(1, 1, 1, 1), width=0.125, embedding_dim=16)
  base = models.resnet.IResNet(**small)
  variables = random_variables(base, x.shape)
  out = base.apply(variables, x, train=False)
  eps = models.resnet.IResNet(**small, bn_epsilon=1e-1)
  assert not np.allclose(eps.apply(variables, x, train=False), out,
                         atol=1e-4)
  sub = models.resnet.IResNet(**small, shortcut='subsample')
  sub_vars = sub.init(jax.random.key(0), x, train=False)
  unit = sub_vars['params']['_Unit_0']
  assert 'Conv_2' not in unit and 'Conv_2' in variables['params']['_Unit_0']
  assert 'Conv_2' in sub_vars['params']['_Unit_1']  # 8 -> 16 channels
  with pytest.raises(ValueError, match="shortcut must be 'conv' or "):
    models.resnet.IResNet(**small, shortcut='max').init(
        jax.random.key(0), x, train=False)


@pytest.mark.slow
def test_mobilefacenet_parameter_count_without_prelu(mobilefacenet):
  _, variables, _ = mobilefacenet
  assert _count(variables['params'], skip='PReLU') == 1_192_960


@pytest.mark.slow
def test_mobilefacenet_shapes_and_batchnorm_modes(mobilefacenet):
  model, variables, images = mobilefacenet
  apply = jax.jit(functools.partial(model.apply, mutable=['batch_stats']),
                  static_argnames='train')
  out, _ = apply(variables, images, train=False)
  assert out.shape == (4, 512) and out.dtype == jnp.float32
  # Eval: running statistics, so a sample's embedding ignores its batch.
  alone, _ = apply(variables, images[:1], train=False)
  scale = float(np.max(np.abs(out)))  # untrained embeddings are large
  np.testing.assert_allclose(alone[0], out[0], rtol=1e-4, atol=1e-5 * scale)
  # Train: batch statistics (the sample's embedding depends on the batch)
  # and updated running statistics.
  train_out, updates = apply(variables, images, train=True)
  train_alone, _ = apply(variables, images[:2], train=True)
  train_scale = float(np.max(np.abs(train_out)))
  assert not np.allclose(train_alone[0], train_out[0], atol=1e-3 * train_scale)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def _mobilefacenet_count(c64, c128, c256, c512, gdc, dim):
  """MobileFaceNet's parameters counted by hand from its layers, given its
  body's channel counts (those of 64, 128, 256, 512 at width 1) and GDC
  kernel: a k x k conv i -> o has k*k*i*o weights, its BN 2o, its PReLU o
  (none after the linear ones); a depthwise k x k conv k*k*c; a bottleneck
  i -> e -> o has i*e + 3e (1x1, BN, PReLU), 9e + 3e (depthwise, BN,
  PReLU) and e*o + 2o (projection, BN)."""
  def bottleneck(i, e, o):
    return i * e + 3 * e + 9 * e + 3 * e + e * o + 2 * o
  return (27 * c64 + 3 * c64 + 9 * c64 + 3 * c64             # stem, dw 3x3
          + 5 * bottleneck(c64, c128, c64)                   # 1 + 4 blocks
          + bottleneck(c64, c256, c128) + 6 * bottleneck(c128, c256, c128)
          + bottleneck(c128, c512, c128) + 2 * bottleneck(c128, c256, c128)
          + c128 * c512 + 3 * c512                           # 1x1 to 512
          + gdc * gdc * c512 + 2 * c512                      # GDC, BN
          + c512 * dim + 2 * dim)                            # linear, BN


@pytest.mark.slow
def test_mobilefacenet_reduced_width_and_size():
  """width 0.25 at 48x48: body channels 16/32/64/128, a 3x3 GDC, the
  embedding as given; parameters as the hand count (which at width 1, 112
  gives the published 1,200,512)."""
  assert _mobilefacenet_count(64, 128, 256, 512, 7, 512) == 1_200_512
  model = models.create('mobilefacenet', width=0.25, embedding_dim=96)
  rng, seed = fresh_rng()
  images = jnp.asarray(rng.normal(size=(4, 48, 48, 3)), jnp.float32)
  variables = jax.jit(
      lambda x: model.init(jax.random.key(0), x, train=False))(images)
  assert _count(variables['params']) == _mobilefacenet_count(
      16, 32, 64, 128, 3, 96)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert out.shape == (4, 96) and out.dtype == jnp.float32, f'seed {seed}'
  assert np.all(np.isfinite(out)), f'seed {seed}'


@pytest.mark.parametrize('width,channels', [(0.3, (16, 40, 80, 152)),
                                            (0.02, (8, 8, 8, 8))])
def test_mobilefacenet_width_rounds_to_multiples_of_8(width, channels):
  """64, 128, 256, 512 times width to the nearest multiple of 8, at least
  8 (0.3: 19.2, 38.4, 76.8, 153.6)."""
  model = models.create('mobilefacenet', width=width)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert _count(variables['params']) == _mobilefacenet_count(*channels, 2, 512)


@pytest.mark.parametrize('size', [(100, 100), (112, 96), (8, 8)])
def test_mobilefacenet_rejects_bad_sizes(size):
  with pytest.raises(ValueError, match='MobileFaceNet takes square images '
                     rf'.*multiple of 16.*got {size[0]}x{size[1]}'):
    models.create('mobilefacenet').init(
        jax.random.key(0), jnp.zeros((1, *size, 3)), train=False)


def test_mobilefacenet_rejects_nonpositive_width():
  with pytest.raises(ValueError, match='width must be positive, got 0'):
    models.create('mobilefacenet', width=0.0).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


@pytest.mark.parametrize('name', [n for n in BACKBONES if n != 'mobilefacenet'])
def test_rejects_other_sizes(name):
  """(MobileFaceNet takes any side divisible by 16: its own test below.)"""
  with pytest.raises(ValueError, match='112x112'):
    models.create(name).init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)),
                             train=False)


def test_unknown_model_is_named():
  with pytest.raises(ValueError, match="unknown model 'mobilefacenett'"):
    models.create('mobilefacenett')


# Where an untrained network amplifies rounding by itself, bf16 agreement
# says nothing about the bf16 computation, so that mode is checked for
# finiteness only. Train mode normalises by the statistics of a batch of 4,
# through which the 100+-unit Attention networks amplify rounding from unit
# to unit (cosine 0.78-0.92 at float32 vs bf16, 0.90 at width 0.25;
# calibrated eval mode does the same); in eval mode with initial running
# statistics nothing is normalised, and SE-ResNet's squeeze-excitation
# gates saturate on the resulting activations of 1e4, flipping with
# rounding (cosine 0.5-0.8; 0.64 at width 0.25).
_BF16_UNCHECKED_MODE = {'attention56': True, 'attention92': True,
                        'se_resnet50': False}


# ResNet-18/34/101/200 and Attention-92 are stacks of ResNet-50's and
# Attention-56's blocks (their parameter counts check the structure); the
# compile-heavy tests run on the shallower one of each pair.
DISTINCT_BACKBONES = [n for n in BACKBONES if n not in (
    'resnet18', 'resnet34', 'resnet101', 'resnet200', 'attention92')]
# Their every layer at a quarter of the channels: compile time is the
# layer count's, and the arithmetic, 16x less, was half these tests' time.
WIDTH = 0.25


@pytest.mark.slow
@pytest.mark.parametrize('name', DISTINCT_BACKBONES)
def test_bfloat16_forward(name):
  """bf16 compute against float32 in both BatchNorm modes: embeddings
  finite, float32, and in the same direction (cosine > 0.95; measured
  0.982-1.0 at width 0.25, VGG-19's training mode the lowest, and
  0.968-0.9999 at full width) except in the mode named above."""
  _, variables, images = _init(name, batch=4, width=WIDTH)

  def forward(dtype, train):
    model = models.create(name, dtype=dtype, width=WIDTH)
    return jax.jit(lambda v, x: model.apply(v, x, train=train,
                                            mutable=['batch_stats'])[0])(
                                                variables, images)

  for train in (False, True):
    out16 = forward(jnp.bfloat16, train)
    assert out16.shape == (4, 512)
    assert out16.dtype == jnp.float32  # embeddings leave in float32
    assert np.all(np.isfinite(out16))
    if _BF16_UNCHECKED_MODE.get(name) == train:
      continue  # finiteness only (above): no float32 forward to compare
    out32 = forward(None, train)
    cos = np.sum(out16 * out32, 1) / (np.linalg.norm(out16, axis=1)
                                      * np.linalg.norm(out32, axis=1))
    assert np.all(cos > 0.95), (train, cos)


@pytest.mark.slow
@pytest.mark.parametrize('name', DISTINCT_BACKBONES)
def test_jitted_training_step(name):
  # Batch 4: over 2 samples the last BatchNorm leaves every feature at +-1,
  # whatever the parameters, and the loss barely moves.
  model, variables, images = _init(name, batch=4, width=WIDTH)
  # Plain SGD with a small step, so that each step must lower the loss.
  tx = optax.sgd(1e-3)
  target = jnp.asarray(fresh_rng()[0].normal(size=(4, 512)), jnp.float32)

  @jax.jit
  def step(params, stats, opt):
    def loss_fn(p):
      out, upd = model.apply({'params': p, 'batch_stats': stats}, images,
                             train=True, mutable=['batch_stats'])
      out = out / jnp.linalg.norm(out, axis=1, keepdims=True)
      return jnp.mean(jnp.square(out - target)), upd['batch_stats']
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt, loss, grads

  params, stats = variables['params'], variables['batch_stats']
  opt = tx.init(params)
  losses = []
  for _ in range(3):
    params, stats, opt, loss, grads = step(params, stats, opt)
    losses.append(float(loss))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize('kernel,stride,padding,size', [
    (3, 1, None, (9, 9)), (3, 2, None, (9, 9)), (3, 2, None, (8, 8)),
    (3, 2, None, (8, 11)), (3, 1, None, (6, 5)), (7, 1, 0, (7, 7))])
def test_depthwise_shifted_equals_native(kernel, stride, padding, size):
  """Values and gradients (the shifted form's backward is hand-written)."""
  rng, seed = fresh_rng()
  x = jnp.asarray(rng.normal(size=(2, *size, 5)), jnp.float32)
  outs, grads = [], []
  for impl in ('shifted', 'native'):
    layer = DepthwiseConv(kernel, stride, padding, impl=impl)
    v = layer.init(jax.random.key(seed), x)
    outs.append(layer.apply(v, x))
    grads.append(jax.grad(lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))),
                          argnums=(0, 1))(v, x))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5,
                             err_msg=f'seed {seed}')
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4,
                               err_msg=f'seed {seed}')


@pytest.mark.parametrize('stride', [1, 2])
def test_pointwise_matmul_equals_native(stride):
  """Values and gradients (the matrix-product form's backward is
  hand-written)."""
  rng, seed = fresh_rng()
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 8)), jnp.float32)
  outs, grads = [], []
  for impl in ('matmul', 'native'):
    layer = Conv(16, stride=stride, impl=impl)
    v = layer.init(jax.random.key(seed), x)
    outs.append(layer.apply(v, x))
    grads.append(jax.grad(lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x))),
                          argnums=(0, 1))(v, x))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5,
                             err_msg=f'seed {seed}')
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4,
                               err_msg=f'seed {seed}')


@pytest.mark.parametrize('shape', [(4, 5, 3, 6), (8, 6)])
@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_equals_flax(shape, train):
  """Our BatchNorm (hand-written train-mode backward) against flax's
  nn.BatchNorm under autodiff: outputs, gradients in x, scale and bias, and
  the updated running statistics, from non-trivial parameters and stats."""
  rng, seed = fresh_rng()
  x = jnp.asarray(rng.normal(1.5, 2.0, size=shape), jnp.float32)
  c = shape[-1]
  variables = {
      'params': {'scale': jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                 'bias': jnp.asarray(rng.normal(size=c), jnp.float32)},
      'batch_stats': {'mean': jnp.asarray(rng.normal(size=c), jnp.float32),
                      'var': jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  results = []
  for layer in (BatchNorm(train), flax.linen.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5)):
    def loss(params, x):
      y, upd = layer.apply({**variables, 'params': params}, x,
                           mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * weights), (y, upd['batch_stats'])
    grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
        variables['params'], x)
    results.append((y, stats, grads))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                               err_msg=f'seed {seed}')


def _bn_variables(rng, c):
  return {
      'params': {'scale': jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                 'bias': jnp.asarray(rng.normal(size=c), jnp.float32)},
      'batch_stats': {'mean': jnp.asarray(rng.normal(size=c), jnp.float32),
                      'var': jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}


@pytest.mark.parametrize('shape', [(4, 5, 3, 6), (8, 6), (8, 7, 7, 32)])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_formulations_agree(shape, dtype):
  """impl='native' (autodiff, the default off the CPU) against the
  hand-written backward (the CPU's): outputs, gradients in x, scale and
  bias, and the updated running statistics, with the tolerances above;
  bf16 outputs and input gradients may also differ by one bf16 rounding
  step (2^-8 relative), where a float32 sum that differs in its last bit
  rounds the other way."""
  rng, seed = fresh_rng()
  x = jnp.asarray(rng.normal(1.5, 2.0, size=shape), dtype)
  variables = _bn_variables(rng, shape[-1])
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  results = []
  for impl in ('shifted', 'native'):
    layer = BatchNorm(True, impl=impl)

    def loss(params, x):
      y, upd = layer.apply({**variables, 'params': params}, x,
                           mutable=['batch_stats'])
      return (jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights),
              (y, upd['batch_stats']))
    grads, (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(
        variables['params'], x)
    assert y.dtype == grads[1].dtype == dtype
    results.append((y, stats, grads))
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    rtol = 2.0**-8 if a.dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=rtol,
                               atol=1e-5, err_msg=f'seed {seed}')


def _variable_shapes(name, impl):
  model = models.create(name, impl=impl)
  return jax.tree.map(jnp.shape, jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, 112, 112, 3)), train=False)))


def test_batch_norm_impl_selects_the_backward():
  """'native' traces plain autodiff (no custom_vjp), 'shifted' the
  hand-written backward, 'auto' the CPU's one here; all keep one variable
  layout, so checkpoints move between them."""
  x = jnp.ones((4, 6))
  for impl, custom in (('native', False), ('shifted', True), ('auto', True)):
    layer = BatchNorm(True, impl=impl)
    variables = layer.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == {
        'params': {'scale': (6,), 'bias': (6,)},
        'batch_stats': {'mean': (6,), 'var': (6,)}}
    jaxpr = jax.make_jaxpr(lambda v: layer.apply(
        v, x, mutable=['batch_stats']))(variables)
    assert ('custom_vjp_call' in str(jaxpr)) == custom, (impl, jaxpr)
  for name in ('mobilefacenet', 'resnet50'):
    assert _variable_shapes(name, 'native') == _variable_shapes(name,
                                                                'shifted')


@pytest.mark.slow
def test_mobilefacenet_formulations_agree(mobilefacenet):
  """The whole network, CPU formulation against cuDNN's (native)."""
  _, variables, images = mobilefacenet
  fast = models.create('mobilefacenet', impl='shifted').apply(
      variables, images[:2], train=False)
  native = models.create('mobilefacenet', impl='native').apply(
      variables, images[:2], train=False)
  np.testing.assert_allclose(fast, native, rtol=1e-4,
                             atol=1e-5 * float(np.max(np.abs(native))))


def test_bad_impl_is_named():
  with pytest.raises(ValueError, match="impl must be"):
    Conv(4, impl='cudnn').init(jax.random.key(0), jnp.zeros((1, 3, 3, 2)))


@pytest.mark.parametrize('size_in,size_out', [((7, 7), (14, 14)),
                                              ((4, 6), (9, 5))])
def test_upsample_bilinear_aligned_corners(size_in, size_out):
  """Against the aligned-corners formula, pixel by pixel: output (i, j)
  samples input (i (H-1)/(H'-1), j (W-1)/(W'-1)) bilinearly."""
  rng, seed = fresh_rng()
  x = rng.normal(size=(2, *size_in, 3))
  out = np.asarray(upsample_bilinear(jnp.asarray(x, jnp.float32), *size_out))
  (h, w), (ho, wo) = size_in, size_out
  want = np.zeros((2, ho, wo, 3))
  for i in range(ho):
    for j in range(wo):
      y, z = i * (h - 1) / (ho - 1), j * (w - 1) / (wo - 1)
      y0, z0 = int(y), int(z)
      y1, z1 = min(y0 + 1, h - 1), min(z0 + 1, w - 1)
      dy, dz = y - y0, z - z0
      want[:, i, j] = ((1 - dy) * (1 - dz) * x[:, y0, z0]
                       + (1 - dy) * dz * x[:, y0, z1]
                       + dy * (1 - dz) * x[:, y1, z0] + dy * dz * x[:, y1, z1])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5,
                             err_msg=f'seed {seed}')


@pytest.mark.parametrize('groups', [2, 4])
def test_grouped_conv_is_convs_of_channel_groups(groups):
  """Conv(groups=g) (arcface_torch's mbf, 2 channels a group) equals g
  dense convs, each over its slice of the input channels."""
  rng = fresh_rng()[0]
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
  conv = Conv(12, 3, 2, groups=groups)
  variables = conv.init(jax.random.key(0), x)
  kernel = variables['params']['kernel']
  assert kernel.shape == (3, 3, 8 // groups, 12)
  i, o = 8 // groups, 12 // groups
  parts = [Conv(o, 3, 2).apply({'params': {'kernel': kernel[..., g * o:
                                                             (g + 1) * o]}},
                               x[..., g * i:(g + 1) * i])
           for g in range(groups)]
  np.testing.assert_allclose(conv.apply(variables, x),
                             jnp.concatenate(parts, -1), atol=1e-5)
  with pytest.raises(ValueError, match='3 groups do not divide 8 input'):
    Conv(12, 3, groups=3).init(jax.random.key(0), x)
