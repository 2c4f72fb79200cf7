"""MXNet checkpoints read without MXNet (npcface_jax/foreign/mxnet_params.py)
and computed in NumPy (mxnet_graph.py): the files tests/mxnet_files.py
writes read back in every layout and spelling; the interpreter against
hand computations written here from MXNet's operator definitions (loops,
fresh random inputs, float64) and against independent forwards of the
small LResNet-IR and MobileFaceNet; hostile files refused naming the file
and the byte offset or node, the forged lengths in a memory-limited
subprocess; seeded mutation fuzzing (slow) as tests/fuzzing.py runs the
other readers. ``fuzz_cases()`` is what benchmarks/fuzz_parsers.py runs
with larger counts."""

import functools
import json
import random
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from npcface_jax.foreign import mxnet_graph, mxnet_params
from npcface_jax.foreign.mxnet_graph import MxnetGraphError
from npcface_jax.foreign.mxnet_params import MxnetFileError
from tests import fuzzing, mxnet_files
from tests.mxnet_files import Builder

HERE = 'tests.test_mxnet_files'


def _rng():
  """Fresh random inputs each run; the seed is in every failure message."""
  seed = random.SystemRandom().randrange(2**32)
  return np.random.default_rng(seed), f'seed {seed}'


# --- Round trips -------------------------------------------------------------

@pytest.mark.parametrize('version', ['v2', 'v3', 'v1', 'legacy'])
def test_params_round_trip_every_layout_and_dtype(tmp_path, version):
  rng, seed = _rng()
  arrays = {'arg:conv0_weight': rng.normal(size=(4, 3, 3, 3)).astype('f4'),
            'aux:bn0_moving_var': rng.uniform(size=5).astype('f8'),
            'arg:half': rng.normal(size=(2, 7)).astype('f2'),
            'arg:bytes': rng.integers(0, 255, (3, 1, 2), 'u1'),
            'arg:ints': rng.integers(-9, 9, (6,), 'i4'),
            'arg:small': rng.integers(-9, 9, (2, 2), 'i1'),
            'arg:long': rng.integers(-2**40, 2**40, (1,), 'i8')}
  if version == 'v3':
    arrays['arg:scalar'] = np.array(2.5, 'f4')  # ndim 0: NumPy semantics
  path = tmp_path / 'model-0000.params'
  path.write_bytes(mxnet_files.params_bytes(arrays, version))
  back = mxnet_params.read_params(path)
  assert list(back) == list(arrays), seed
  for name, array in arrays.items():
    assert back[name].dtype == array.dtype and back[name].shape == array.shape
    np.testing.assert_array_equal(back[name], array, err_msg=seed)


def test_float16_option_stores_half_precision(tmp_path):
  rng, seed = _rng()
  arrays = {'arg:w': rng.normal(size=(3, 4)).astype('f4')}
  path = tmp_path / 'm.params'
  path.write_bytes(mxnet_files.params_bytes(arrays, float16=True))
  back = mxnet_params.read_params(path)['arg:w']
  assert back.dtype == np.float16
  np.testing.assert_array_equal(back, arrays['arg:w'].astype('f2'), seed)


def _summary(graph):
  """The nodes as read; the legacy spelling's '_Plus' is 1.x's
  'elemwise_add'."""
  return [('elemwise_add' if n.op == '_Plus' else n.op, n.name, n.inputs,
           {k: n.attrs[k] for k in mxnet_params.SCHEMA.get(n.op, {})})
          for n in graph.nodes]


@pytest.mark.parametrize('build', [mxnet_files.lresnet,
                                   mxnet_files.mobilefacenet])
def test_symbol_spellings_read_the_same(tmp_path, build):
  graphs = []
  for spelling in ('attrs', 'legacy'):
    symbol, _ = build(np.random.default_rng(0), spelling=spelling)
    path = tmp_path / f'{spelling}-symbol.json'
    path.write_text(json.dumps(symbol))
    graphs.append(mxnet_params.read_symbol(path))
  assert _summary(graphs[0]) == _summary(graphs[1])
  assert graphs[0].heads == graphs[1].heads
  assert graphs[0].output_name(graphs[0].heads[0][0]) == 'fc1_output'


def test_attributes_are_parsed_with_mxnet_defaults(tmp_path):
  symbol, _ = mxnet_files.mobilefacenet(np.random.default_rng(0))
  path = tmp_path / 'model-symbol.json'
  path.write_text(json.dumps(symbol))
  nodes = {n.name: n for n in mxnet_params.read_symbol(path).nodes}
  conv = nodes['conv_2_dw_conv2d'].attrs
  assert (conv['kernel'], conv['stride'], conv['pad']) == ((3, 3), (1, 1),
                                                           (1, 1))
  assert conv['num_group'] == conv['num_filter'] == 8
  assert conv['no_bias'] is True and conv['workspace'] == '256'
  bn = nodes['conv_1_batchnorm'].attrs
  assert bn['eps'] == 1e-3 and bn['fix_gamma'] is False  # eps left out
  assert nodes['fc1'].attrs['fix_gamma'] is True
  assert nodes['fc1'].attrs['eps'] == 2e-5
  assert nodes['_minusscalar0'].attrs['scalar'] == 127.5
  assert nodes['conv_6dw7_7_conv2d'].attrs['kernel'] == (2, 2)


# --- The interpreter against hand computations ------------------------------

def _conv_loops(x, w, b, stride, pad, group=1, dilate=1):
  """Convolution by its definition, one output value at a time."""
  n, c, h, wd = x.shape
  f, cg, k, _ = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (h + 2 * pad - dilate * (k - 1) - 1) // stride + 1
  wo = (wd + 2 * pad - dilate * (k - 1) - 1) // stride + 1
  out = np.zeros((n, f, ho, wo))
  for i in range(n):
    for o in range(f):
      g = o // (f // group)
      for y in range(ho):
        for z in range(wo):
          win = xp[i, g * cg:(g + 1) * cg,
                   y * stride:y * stride + dilate * (k - 1) + 1:dilate,
                   z * stride:z * stride + dilate * (k - 1) + 1:dilate]
          out[i, o, y, z] = np.sum(win * w[o]) + (0 if b is None else b[o])
  return out


def _bn_loops(x, gamma, beta, mean, var, eps, fix_gamma):
  out = np.empty_like(x)
  for ch in range(x.shape[1]):
    g = 1.0 if fix_gamma else gamma[ch]
    out[:, ch] = (x[:, ch] - mean[ch]) / np.sqrt(var[ch] + eps) * g + beta[ch]
  return out


def _prelu_loops(x, gamma):
  out = x.copy()
  for ch in range(x.shape[1]):
    out[:, ch] = np.where(x[:, ch] > 0, x[:, ch], gamma[ch] * x[:, ch])
  return out


def _var(b, name, array, aux=False):
  return b.var(name, array, aux, dtype=np.float64)


def _bn_vars(b, rng, name, c, var_scale=1.0):
  arrays = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
            rng.normal(0, 0.3, c), rng.uniform(0.5, 1.5, c) * var_scale]
  names = ('gamma', 'beta', 'moving_mean', 'moving_var')
  return arrays, [_var(b, f'{name}_{s}', a, aux=s.startswith('moving'))
                  for s, a in zip(names, arrays)]


def _graph(tmp_path, b, heads, name='g'):
  path = tmp_path / f'{name}-symbol.json'
  path.write_text(json.dumps(b.symbol(heads)))
  return mxnet_params.read_symbol(path), {
      k: v.astype(np.float64) for k, v in b.params.items()}


def test_conv_bn_fix_gamma_prelu_fc_by_hand(tmp_path):
  """Convolution (bias, stride 2, pad 1) + BatchNorm (fix_gamma, eps
  left to MXNet's default 1e-3, a small variance so eps matters) + PReLU
  + FullyConnected, against loops."""
  rng, seed = _rng()
  b = Builder(rng)
  w, bias = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
  x = b.op('Convolution', 'c', [b.var('data'), _var(b, 'c_weight', w),
                                _var(b, 'c_bias', bias)],
           kernel=(3, 3), stride=(2, 2), pad=(1, 1), num_filter=4)
  bn, inputs = _bn_vars(b, rng, 'bn', 4, var_scale=1e-3)
  x = b.op('BatchNorm', 'bn', [x] + inputs)  # fix_gamma defaults to True
  gamma = rng.uniform(0.1, 0.4, 4)
  x = b.op('LeakyReLU', 'act', [x, _var(b, 'act_gamma', gamma)],
           act_type='prelu')
  fw, fb = rng.normal(size=(5, 4 * 4 * 4)), rng.normal(size=5)
  x = b.op('FullyConnected', 'fc', [x, _var(b, 'fc_weight', fw),
                                    _var(b, 'fc_bias', fb)], num_hidden=5)
  graph, params = _graph(tmp_path, b, [x])
  images = rng.normal(size=(2, 3, 7, 8))
  got = mxnet_graph.run(graph, params, images)['fc_output']
  h = _conv_loops(images, w, bias, 2, 1)
  h = _prelu_loops(_bn_loops(h, *bn, eps=1e-3, fix_gamma=True), gamma)
  want = np.einsum('nk,hk->nh', h.reshape(2, -1), fw) + fb
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=seed)
  wrong = _prelu_loops(_bn_loops(_conv_loops(images, w, bias, 2, 1), *bn,
                                 eps=2e-5, fix_gamma=False), gamma)
  assert not np.allclose(h, wrong, rtol=1e-3), 'eps and gamma do not matter'


@pytest.mark.parametrize('group,dilate', [(6, 1), (2, 1), (1, 2), (3, 2)])
def test_grouped_depthwise_and_dilated_convolutions_by_hand(tmp_path, group,
                                                             dilate):
  rng, seed = _rng()
  b = Builder(rng)
  w = rng.normal(size=(6, 6 // group, 3, 3))
  x = b.op('Convolution', 'c', [b.var('data'), _var(b, 'c_weight', w)],
           kernel=(3, 3), pad=(1, 1), num_filter=6, num_group=group,
           dilate=(dilate, dilate), no_bias=True)
  graph, params = _graph(tmp_path, b, [x])
  images = rng.normal(size=(2, 6, 6, 5))
  got = mxnet_graph.run(graph, params, images)['c_output']
  want = _conv_loops(images, w, None, 1, 1, group, dilate)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=seed)


def _pool_loops(x, kind, k, s, p, full, include_pad=True):
  """MXNet's pooling by its definition: each window clipped to the padded
  input (an average divides by that size, or by the part inside the
  input without count_include_pad), pads never taken by a max."""
  n, c, h, w = x.shape
  size = (lambda d: -(-(d + 2 * p - k) // s) + 1) if full else (
      lambda d: (d + 2 * p - k) // s + 1)
  out = np.zeros((n, c, size(h), size(w)))
  for i in range(size(h)):
    for j in range(size(w)):
      hs, ws = i * s - p, j * s - p
      he, we = min(hs + k, h + p), min(ws + k, w + p)
      count = (he - hs) * (we - ws)
      hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
      win = x[:, :, hs:he, ws:we]
      if kind == 'max':
        out[:, :, i, j] = win.max(axis=(2, 3))
      else:
        count = count if include_pad else (he - hs) * (we - ws)
        out[:, :, i, j] = win.sum(axis=(2, 3)) / count
  return out


@pytest.mark.parametrize('kind,k,s,p,convention,include_pad', [
    ('max', 3, 2, 1, 'valid', True), ('avg', 3, 2, 1, 'valid', True),
    ('avg', 3, 2, 1, 'full', True), ('max', 2, 2, 0, 'full', True),
    ('avg', 3, 2, 1, 'valid', False), ('avg', 2, 3, 1, 'full', False)])
def test_pooling_by_hand(tmp_path, kind, k, s, p, convention, include_pad):
  rng, seed = _rng()
  b = Builder(rng)
  x = b.op('Pooling', 'pool', [b.var('data')], kernel=(k, k), stride=(s, s),
           pad=(p, p), pool_type=kind, pooling_convention=convention,
           count_include_pad=include_pad)
  graph, params = _graph(tmp_path, b, [x])
  images = rng.normal(size=(2, 3, 7, 6))
  got = mxnet_graph.run(graph, params, images)['pool_output']
  want = _pool_loops(images, kind, k, s, p, convention == 'full',
                     include_pad)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=seed)


def test_global_pooling_flatten_and_elementwise_ops_by_hand(tmp_path):
  rng, seed = _rng()
  b = Builder(rng)
  data = b.var('data')
  pool = b.op('Pooling', 'gap', [data], kernel=(7, 7), global_pool=True,
              pool_type='avg')
  sig = b.op('Activation', 'sig', [pool], act_type='sigmoid')
  scaled = b.op('broadcast_mul', 'se', [data, sig])
  leaky = b.op('LeakyReLU', 'leaky', [scaled], act_type='leaky', slope=0.1)
  added = b.op('_plus', 'sum', [leaky, b.op('_copy', 'copy', [data])])
  out = b.op('_div_scalar', 'div', [b.op('Flatten', 'flat', [added])],
             scalar=4.0)
  graph, params = _graph(tmp_path, b, [out])
  x = rng.normal(size=(2, 3, 5, 4))
  got = mxnet_graph.run(graph, params, x)['div_output']
  se = x * (1 / (1 + np.exp(-x.mean(axis=(2, 3), keepdims=True))))
  want = (np.where(se > 0, se, 0.1 * se) + x).reshape(2, -1) / 4.0
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=seed)


# --- Whole models against independent forwards -------------------------------

class _Ref:
  """insightface's layers by name over a params dict, written here from
  MXNet's definitions (im2col by sliding windows and einsum)."""

  def __init__(self, params):
    self.p = params

  def a(self, name):
    key = f'arg:{name}' if f'arg:{name}' in self.p else f'aux:{name}'
    return self.p[key].astype(np.float64)

  def conv(self, x, name, stride=1, pad=0):
    w = self.a(f'{name}_weight')
    group = x.shape[1] // w.shape[1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], (2, 3))
    win = win[:, :, ::stride, ::stride]
    n, c, ho, wo, kh, kw = win.shape
    win = win.reshape(n, group, c // group, ho, wo, kh, kw)
    wg = w.reshape(group, -1, c // group, kh, kw)
    out = np.einsum('ngchwij,gocij->ngohw', win, wg)
    return out.reshape(n, -1, ho, wo)

  def bn(self, x, name, eps=2e-5, fix_gamma=False):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma = 1.0 if fix_gamma else self.a(f'{name}_gamma').reshape(shape)
    mean = self.a(f'{name}_moving_mean').reshape(shape)
    var = self.a(f'{name}_moving_var').reshape(shape)
    return ((x - mean) / np.sqrt(var + eps) * gamma
            + self.a(f'{name}_beta').reshape(shape))

  def prelu(self, x, name):
    gamma = self.a(f'{name}_gamma').reshape(1, -1, 1, 1)
    return np.where(x > 0, x, gamma * x)

  def embedding(self, x):
    """pre_fc1 + fc1 (BatchNorm, fix_gamma)."""
    x = x.reshape(len(x), -1) @ self.a('pre_fc1_weight').T
    return self.bn(x + self.a('pre_fc1_bias'), 'fc1', fix_gamma=True)


def _lresnet_forward(params, images, units):
  r = _Ref(params)
  x = (images - 127.5) * 0.0078125
  x = r.prelu(r.bn(r.conv(x, 'conv0', 1, 1), 'bn0'), 'relu0')
  for i, count in enumerate(units):
    for j in range(count):
      name, stride = f'stage{i + 1}_unit{j + 1}', 2 if j == 0 else 1
      body = r.conv(r.bn(x, f'{name}_bn1'), f'{name}_conv1', 1, 1)
      body = r.prelu(r.bn(body, f'{name}_bn2'), f'{name}_relu1')
      body = r.bn(r.conv(body, f'{name}_conv2', stride, 1), f'{name}_bn3')
      x = body + (x if j else r.bn(r.conv(x, f'{name}_conv1sc', stride),
                                   f'{name}_sc'))
  return r.embedding(r.bn(x, 'bn1'))


def _mobilefacenet_forward(params, images, blocks):
  r = _Ref(params)

  def conv(x, name, stride=1, pad=0, act=True):
    x = r.bn(r.conv(x, f'{name}_conv2d', stride, pad), f'{name}_batchnorm',
             eps=1e-3)  # fmobilefacenet leaves MXNet's default
    return r.prelu(x, f'{name}_relu') if act else x

  def dresidual(x, name, stride):
    x = conv(conv(x, f'{name}_conv_sep'), f'{name}_conv_dw', stride, 1)
    return conv(x, f'{name}_conv_proj', act=False)

  x = conv((images - 127.5) * 0.0078125, 'conv_1', 2, 1)
  x = conv(x, 'conv_2_dw', 1, 1)
  for (down, res), count in zip((('dconv_23', 'res_3'), ('dconv_34', 'res_4'),
                                 ('dconv_45', 'res_5')), blocks):
    x = dresidual(x, down, 2)
    for k in range(count):
      x = dresidual(x, f'{res}_block{k}', 1) + x
  x = conv(conv(x, 'conv_6sep'), 'conv_6dw7_7', act=False)
  return r.embedding(x)


MODELS = {'lresnet': (mxnet_files.lresnet, _lresnet_forward, 'units',
                      (1, 2), 16),
          'mobilefacenet': (mxnet_files.mobilefacenet,
                            _mobilefacenet_forward, 'blocks', (1, 2, 1), 32)}


@pytest.mark.parametrize('model', list(MODELS))
@pytest.mark.parametrize('spelling,version,float16', [
    ('attrs', 'v2', False), ('legacy', 'legacy', True), ('attrs', 'v1', True),
    ('attrs', 'v3', False)])
def test_models_match_independent_forwards(tmp_path, model, spelling,
                                           version, float16):
  rng, seed = _rng()
  build, forward, depth_key, depth, size = MODELS[model]
  symbol, params = build(rng, spelling=spelling, **{depth_key: depth})
  sym, par = mxnet_files.write_model(tmp_path, symbol, params,
                                     version=version, float16=float16)
  graph, read = mxnet_params.read_symbol(sym), mxnet_params.read_params(par)
  images = rng.uniform(0, 255, (2, 3, size, size))
  got = mxnet_graph.run(graph, read, images)
  assert list(got) == ['fc1_output'], seed
  want = forward(read, images, depth)
  assert got['fc1_output'].shape == (2, 16)
  np.testing.assert_allclose(got['fc1_output'], want, rtol=1e-9, atol=1e-9,
                             err_msg=seed)
  assert np.std(want) > 0.1, 'a degenerate embedding checks nothing'


def test_outputs_pick_layers_and_a_loss_head_is_refused(tmp_path):
  """A training graph (fc1, then fc7 and SoftmaxOutput): its head needs the
  loss, which is refused by name; fc1 and any internal output are
  computed on asking."""
  rng, seed = _rng()
  symbol, params = mxnet_files.lresnet(rng)
  fc1 = symbol['heads'][0][0]
  b = Builder(rng)
  b.nodes = [dict(op=n['op'], name=n['name'], attrs=n.get('attrs', {}),
                  inputs=[i for i, *_ in n['inputs']])
             for n in symbol['nodes']]
  fc7 = b.op('FullyConnected', 'fc7', [fc1, b.var('fc7_weight')],
             num_hidden=10, no_bias=True)
  loss = b.op('SoftmaxOutput', 'softmax', [fc7, b.var('softmax_label')])
  path = tmp_path / 'train-symbol.json'
  path.write_text(json.dumps(b.symbol([loss])))
  graph = mxnet_params.read_symbol(path)
  images = rng.uniform(0, 255, (2, 3, 16, 16))
  with pytest.raises(MxnetGraphError, match=r'train-symbol\.json.*softmax.*'
                     r'SoftmaxOutput.*not computed'):
    mxnet_graph.run(graph, params, images)
  got = mxnet_graph.run(graph, params, images,
                        outputs=['relu0_output', 'fc1_output'])
  np.testing.assert_allclose(got['fc1_output'],
                             _lresnet_forward(params, images, (1, 2)),
                             rtol=1e-9, atol=1e-9, err_msg=seed)
  assert got['relu0_output'].shape == (2, 8, 16, 16)
  with pytest.raises(MxnetGraphError, match="no output named.*fc2_output"):
    mxnet_graph.run(graph, params, images, outputs=['fc2_output'])


def test_params_of_another_graph_are_refused_naming_the_variable(tmp_path):
  rng, _ = _rng()
  symbol, params = mxnet_files.lresnet(rng)
  sym, _ = mxnet_files.write_model(tmp_path, symbol, params)
  graph = mxnet_params.read_symbol(sym)
  images = rng.uniform(0, 255, (1, 3, 16, 16))
  missing = {k: v for k, v in params.items() if k != 'aux:bn0_moving_var'}
  with pytest.raises(MxnetGraphError, match=r"model-symbol\.json.*"
                     r"'bn0_moving_var' has no array"):
    mxnet_graph.run(graph, missing, images)
  wrong = dict(params, **{'arg:conv0_weight': np.zeros((8, 3, 5, 5))})
  with pytest.raises(MxnetGraphError, match=r"conv0.*weight \(8, 3, 5, 5\) "
                     'does not fit'):
    mxnet_graph.run(graph, wrong, images)


# --- Hostile params ----------------------------------------------------------

# The base file: arrays 'arg:a' (2, 3) and 'aux:b' (4,), float32, V2. Byte
# offsets of its fields, as NDArray::Save lays them out.
A_AT, B_AT = 24, 88  # the two records
STYPE_AT, NDIM_AT, DIMS_AT = A_AT + 4, A_AT + 8, A_AT + 12
FLAG_AT, DATA_AT = A_AT + 36, A_AT + 40
NAMES_AT = 136


def _base() -> bytes:
  arrays = {'arg:a': np.arange(6, dtype='f4').reshape(2, 3),
            'aux:b': np.ones(4, 'f4')}
  data = mxnet_files.params_bytes(arrays)
  assert struct.unpack_from('<I', data, B_AT)[0] == mxnet_files.V2
  assert struct.unpack_from('<Q', data, NAMES_AT)[0] == 2
  return data


def _put(data: bytes, offset: int, fmt: str, *values) -> bytes:
  out = bytearray(data)
  struct.pack_into(fmt, out, offset, *values)
  return bytes(out)


HOSTILE_PARAMS = {
    'list_magic': (lambda d: _put(d, 0, '<Q', 0x113), 0,
                   'not the NDArray list magic'),
    'ndarray_magic': (lambda d: _put(d, A_AT, '<I', 0x12345678), A_AT,
                      'neither an NDArray magic nor a shape'),
    'row_sparse': (lambda d: _put(d, STYPE_AT, '<i', 1), A_AT,
                   'row_sparse storage'),
    'csr': (lambda d: _put(d, STYPE_AT, '<i', 2), A_AT, 'csr storage'),
    'type_flag': (lambda d: _put(d, FLAG_AT, '<i', 9), FLAG_AT,
                  'type flag 9'),
    'negative_dim': (lambda d: _put(d, DIMS_AT, '<q', -1), NDIM_AT,
                     'negative'),
    'none_array': (lambda d: _put(d, NDIM_AT, '<i', 0), A_AT,
                   'none .never initialised'),
    'names_count': (lambda d: _put(d, NAMES_AT, '<Q', 1), NAMES_AT,
                    '1 names for 2 arrays'),
    'duplicate_name': (lambda d: d.replace(b'aux:b', b'arg:a'), NAMES_AT + 21,
                       "'arg:a' twice"),
    'not_utf8': (lambda d: d.replace(b'aux:b', b'aux:\xff'), NAMES_AT + 29,
                 'not UTF-8'),
    'trailing': (lambda d: d + b'\0', len(_base()), '1 bytes follow'),
}
# Forged lengths: what a reader that trusts them would allocate.
FORGED_PARAMS = {
    'forged_dims': (lambda d: _put(d, DIMS_AT, '<qq', 2**40, 2**40), DATA_AT,
                    'needs 4835703278458516698824704 bytes'),
    'forged_legacy_dims': (
        lambda d: _put(d, A_AT, '<III', 2, 2**32 - 1, 2**32 - 1), A_AT + 24,
        'needs'),
    'forged_count': (lambda d: _put(d, 16, '<Q', 2**63), 16,
                     'cannot fit'),
    'forged_names': (lambda d: _put(d, NAMES_AT, '<Q', 2**40), NAMES_AT,
                     'cannot fit'),
    'forged_name_length': (lambda d: _put(d, NAMES_AT + 8, '<Q', 2**62),
                           NAMES_AT + 8, 'a name of 4611686018427387904'),
    'forged_ndim': (lambda d: _put(d, NDIM_AT, '<i', 2**31 - 1), NDIM_AT,
                    'neither an NDArray magic nor a shape'),
}


@pytest.mark.parametrize('case', sorted(HOSTILE_PARAMS))
def test_hostile_params_are_refused_naming_file_and_offset(tmp_path, case):
  forge, offset, what = HOSTILE_PARAMS[case]
  path = tmp_path / f'{case}.params'
  path.write_bytes(forge(_base()))
  with pytest.raises(MxnetFileError,
                     match=f'^{re.escape(str(path))}: byte {offset}: .*{what}'):
    mxnet_params.read_params(path)


def test_every_truncation_is_refused_naming_the_offset(tmp_path):
  data, path = _base(), tmp_path / 'cut.params'
  for length in range(len(data)):
    path.write_bytes(data[:length])
    with pytest.raises(MxnetFileError, match=f'^{re.escape(str(path))}: '
                       r'byte \d+: .*(left|cut short)'):
      mxnet_params.read_params(path)


_CHILD = textwrap.dedent('''
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from npcface_jax.foreign import mxnet_params, mxnet_graph
    for path in sys.argv[1:]:
      try:
        if path.endswith('.json'):
          mxnet_params.read_symbol(path)
        else:
          mxnet_params.read_params(path)
        print('PARSED', path)
      except mxnet_params.MxnetFileError as e:
        print('REFUSED', str(e).replace(chr(10), ' '))
''')


def _refusals_in_subprocess(paths) -> list[str]:
  """Each file read in a child limited to 1 GiB of address space: a forged
  length that were trusted would die there, not take the test run down."""
  proc = subprocess.run(
      [sys.executable, '-c', _CHILD, *map(str, paths)], capture_output=True,
      text=True, timeout=120, cwd=str(fuzzing.ROOT), check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.splitlines()


def test_forged_lengths_are_refused_before_allocating(tmp_path):
  paths = []
  for case, (forge, _, _) in sorted(FORGED_PARAMS.items()):
    paths.append(tmp_path / f'{case}.params')
    paths[-1].write_bytes(forge(_base()))
  lines = _refusals_in_subprocess(paths)
  assert len(lines) == len(paths)
  for line, (case, (_, offset, what)) in zip(lines,
                                             sorted(FORGED_PARAMS.items())):
    assert re.match(f'REFUSED .*{case}.params: byte {offset}: .*{what}',
                    line), line


# --- Hostile symbol JSON -----------------------------------------------------

def _tiny_symbol() -> dict:
  """data -> conv (weight) -> relu: nodes 0 to 3."""
  b = Builder(np.random.default_rng(0))
  conv = b.conv(b.var('data'), 'c', 3, 4)
  return b.symbol([b.op('Activation', 'relu', [conv], act_type='relu')])


def _edit(edit):
  def forge():
    symbol = _tiny_symbol()
    edit(symbol)
    return json.dumps(symbol)
  return forge


def _set(path, value):
  def edit(symbol):
    target = symbol
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = value
  return edit


HOSTILE_SYMBOLS = {
    'self_reference': (_edit(_set(['nodes', 3, 'inputs'], [[3, 0, 0]])),
                       r'nodes\[3\] \(.relu.\): input 0 reads node 3, which '
                       'is not a node before it'),
    'forward_reference': (_edit(_set(['nodes', 2, 'inputs', 0], [3, 0, 0])),
                          r'nodes\[2\] \(.c.\): input 0 reads node 3.*cycle'),
    'unknown_op': (_edit(_set(['nodes', 3, 'op'], 'MyPlugin')),
                   r"nodes\[3\].*op 'MyPlugin' is not an MXNet op"),
    'bad_tuple': (_edit(_set(['nodes', 2, 'attrs', 'kernel'], '(3, x)')),
                  r'nodes\[2\].*kernel=.\(3, x\).*not an integer'),
    'bad_bool': (_edit(_set(['nodes', 2, 'attrs', 'no_bias'], 'yes')),
                 r'nodes\[2\].*no_bias.*not True/False'),
    'not_a_string': (_edit(_set(['nodes', 2, 'attrs', 'num_filter'], 4)),
                     r'nodes\[2\].*num_filter.*not the string'),
    'input_count': (_edit(_set(['nodes', 2, 'inputs'], [[0, 0, 0]])),
                    r'nodes\[2\].*Convolution has 1 inputs, not 2'),
    'second_output': (_edit(_set(['nodes', 3, 'inputs', 0], [2, 1, 0])),
                      r'nodes\[3\].*reads output 1 of node 2'),
    'missing_attribute': (
        _edit(lambda s: s['nodes'][3]['attrs'].pop('act_type')),
        r"nodes\[3\].*needs the attribute 'act_type'"),
    'head_out_of_range': (_edit(_set(['heads'], [[9, 0, 0]])),
                          r'the graph: a head reads node 9'),
    'arg_node_not_variable': (_edit(_set(['arg_nodes'], [2])),
                              r"the graph: 'arg_nodes' must list variable"),
    'no_nodes': (_edit(lambda s: s.pop('nodes')), r"'nodes': must be a list"),
    'node_not_object': (_edit(_set(['nodes', 1], 'conv')),
                        r'nodes\[1\]: a JSON str, not a node'),
    'infinite_eps': (_edit(lambda s: s['nodes'].__setitem__(3, dict(
        op='BatchNorm', name='bn', attrs={'eps': '1e999'},
        inputs=[[2, 0, 0]] * 5))), r'nodes\[3\].*eps=.1e999.*not a finite'),
    'not_json': (lambda: '{"nodes": [', 'not valid JSON'),
    'deep_nesting': (lambda: '[' * 100_000 + ']' * 100_000,
                     'nests JSON deeper than'),
}


@pytest.mark.parametrize('case', sorted(HOSTILE_SYMBOLS))
def test_hostile_symbols_are_refused_naming_file_and_node(tmp_path, case):
  forge, what = HOSTILE_SYMBOLS[case]
  path = tmp_path / f'{case}-symbol.json'
  path.write_text(forge())
  with pytest.raises(MxnetFileError, match=f'^{re.escape(str(path))}.*{what}'):
    mxnet_params.read_symbol(path)


def test_deep_nesting_in_a_subprocess(tmp_path):
  """A recursion-prone input read where a crash would not end the run."""
  path = tmp_path / 'deep-symbol.json'
  path.write_text('{"nodes": ' + '[' * 2_000_000 + ']' * 2_000_000 + '}')
  (line,) = _refusals_in_subprocess([path])
  assert re.match(f'REFUSED {re.escape(str(path))} nests JSON deeper', line)


# --- Fuzzing (tests/fuzzing.py) ----------------------------------------------

@functools.cache
def _fuzz_model():
  """(symbol JSON text, params bytes, params) of a small LResNet, fixed."""
  symbol, params = mxnet_files.lresnet(np.random.default_rng(1), units=(1, 1))
  return (json.dumps(symbol, indent=1), mxnet_files.params_bytes(params),
          params)


def _parse_params(path):
  mxnet_params.read_params(path)


def _run_symbol(path):
  """A mutated graph read and run over the fixed weights."""
  graph = mxnet_params.read_symbol(path)
  images = np.linspace(0, 255, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
  mxnet_graph.run(graph, _fuzz_model()[2], images)


def _params_fields(data: bytes) -> list[tuple[int, int]]:
  """(offset, width) of the length and count fields of a V2 params file."""
  fields, pos = [(16, 8)], 24
  for _ in range(struct.unpack_from('<Q', data, 16)[0]):
    ndim = struct.unpack_from('<i', data, pos + 8)[0]
    fields += [(pos + 8, 4)] + [(pos + 12 + 8 * k, 8) for k in range(ndim)]
    size = int(np.prod(struct.unpack_from(f'<{ndim}q', data, pos + 12)))
    pos += 12 + 8 * ndim + 12 + 4 * size
  fields.append((pos, 8))
  pos += 8
  while pos < len(data):
    fields.append((pos, 8))
    pos += 8 + struct.unpack_from('<Q', data, pos)[0]
  return fields


_PARAMS_TOKENS = (struct.pack('<I', 0xF993FAC8), struct.pack('<I', 0xF993FAC9),
                  struct.pack('<I', 0xF993FACA), struct.pack('<i', -1),
                  struct.pack('<Q', 0x112), b'arg:', b'aux:', b'\xff' * 8,
                  b'\0' * 8)
_SYMBOL_TOKENS = (b'[', b']', b'{', b'}', b',', b'"', b'"op"', b'"inputs"',
                  b'"attrs"', b'"param"', b'-1', b'999999999', b'1e999',
                  b'"(3, 3)"', b'"(0, 0)"', b'"(99999, 99999)"', b'"True"',
                  b'"False"', b'"0"', b'null', b'"Pooling"', b'"SoftmaxOutput"',
                  b'"full"', b'"global_pool": "True"', b'[0, 0, 0]', b'\\u0000')


def fuzz_cases() -> list[dict]:
  """Keyword arguments of fuzzing.fuzz (less workdir and seed; 'count' is
  this file's default) for the params reader and the symbol reader with
  the interpreter behind it."""
  text, data, _ = _fuzz_model()
  errors = ['npcface_jax.foreign.mxnet_params:MxnetFileError',
            'npcface_jax.foreign.mxnet_graph:MxnetGraphError']
  return [
      dict(name='mxnet_params', target=f'{HERE}:_parse_params',
           files={'model-0000.params': data}, mutate_file='model-0000.params',
           expected=errors[:1], tokens=_PARAMS_TOKENS,
           length_fields=_params_fields(data), count=1000),
      dict(name='mxnet_symbol', target=f'{HERE}:_run_symbol',
           files={'model-symbol.json': text.encode()},
           mutate_file='model-symbol.json', expected=errors,
           tokens=_SYMBOL_TOKENS, count=1000),
  ]


@pytest.mark.slow
@pytest.mark.parametrize('case', ['mxnet_params', 'mxnet_symbol'])
def test_fuzz(case, tmp_path, record_property):
  kwargs = {c['name']: c for c in fuzz_cases()}[case]
  summary = fuzzing.fuzz(workdir=tmp_path, seed=None, **kwargs)
  record_property('fuzz', summary.line())
  print(summary.line())
  assert summary.problems() == '', f'{summary.line()}\n{summary.problems()}'
  assert summary.refused > 0 and summary.parsed > 0, summary.line()


def test_fuzz_length_fields_are_the_files_lengths():
  """The fields the fuzzer forges are the counts and lengths themselves."""
  _, data, params = _fuzz_model()
  fields = _params_fields(data)
  value = [int.from_bytes(data[o:o + w], 'little') for o, w in fields]
  assert value[0] == value[-len(params) - 1] == len(params)
  assert value[-len(params):] == [len(n.encode()) for n in params]
  first = params['arg:conv0_weight']
  assert value[1:2 + first.ndim] == [first.ndim, *first.shape]
