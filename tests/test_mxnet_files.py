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

import json
import random

import numpy as np
import pytest

from npcface_jax.foreign import mxnet_graph, mxnet_params
from npcface_jax.foreign.mxnet_graph import MxnetGraphError
from tests import mxnet_files
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
