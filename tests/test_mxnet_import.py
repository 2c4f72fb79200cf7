"""python -m npcface_jax.import_model MODEL-0000.params [MODEL-symbol.json]:
insightface's MXNet model-zoo graphs (made here at random in insightface's
names and structure and MXNet's file formats: tests/mxnet_files.py)
become run directories that embed uint8 faces as the MXNet graph itself
computes them (foreign/mxnet_graph.py, float64); graphs and params that
do not fit are refused naming the node or the layer and both shapes."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from npcface_jax import import_model
from npcface_jax.faces import images
from npcface_jax.foreign import mxnet_graph, mxnet_layouts, mxnet_params
from npcface_jax.serving import run_dir, trained_run
from tests import mxnet_files
from tests.helpers import fresh_rng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSIGHTFACE = images.InputContract('RGB', 127.5, 128.0)
IR = dict(filters=(8, 8, 16, 32, 64), units=(1, 1, 1, 1), side=7)

# name: (fixture, its options, params options, model, model_options, side)
VARIANTS = {
    'LResNet-IR, 1.x JSON': (
        lambda r: mxnet_files.lresnet(r, **IR), {},
        'resnet50', {'width': 0.125, 'units': [1, 1, 1, 1],
                     'bn_epsilon': 2e-5}, 112),
    'LResNet18E-IR, old JSON spelling, float16, 32-d': (
        lambda r: mxnet_files.lresnet(r, (8, 8, 16, 32, 64), (2, 2, 2, 2),
                                      emb=32, spelling='param', side=7),
        {'float16': True, 'version': 'v1'},
        'resnet18', {'width': 0.125, 'bn_epsilon': 2e-5}, 112),
    'MobileFaceNet y1, 128-d': (
        lambda r: mxnet_files.mobilefacenet(r, width=8, blocks=(1, 2, 1),
                                            emb=128), {},
        'mobilefacenet', {'width': 0.125, 'blocks': [1, 1, 2, 1],
                          'bn_epsilon': 1e-3, 'head_bn_epsilon': 2e-5,
                          'fc_bias': True}, 32),
    'MobileFaceNet y1 at width 1/4, old JSON spelling, float16': (
        lambda r: mxnet_files.mobilefacenet(r, width=16, spelling='param'),
        {'float16': True, 'version': 'legacy'},
        'mobilefacenet', {'width': 0.25, 'blocks': [1, 1, 1, 1],
                          'bn_epsilon': 1e-3, 'head_bn_epsilon': 2e-5,
                          'fc_bias': True}, 32),
}


def _graph_embeddings(symbol, params, faces):
  """The MXNet graph's fc1 on uint8 RGB faces (it normalises them itself),
  L2-normalised."""
  out = mxnet_graph.run(symbol, params, faces.transpose(0, 3, 1, 2),
                        outputs=['fc1_output'])['fc1_output']
  return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize('case', VARIANTS)
def test_import_writes_a_run_that_embeds_as_the_graph(case, tmp_path):
  """Recognised with its variant; the record names both files' sha256,
  the format, the layout and the graph's contract; the run embeds uint8
  faces as the MXNet graph does (cosine > 0.9999 on fresh faces)."""
  make, saved, model, options, side = VARIANTS[case]
  rng, seed = fresh_rng()
  sym_path, params_path = mxnet_files.write_model(tmp_path, *make(rng),
                                                  **saved)
  lines = []
  record = import_model.import_model(params_path, str(tmp_path / 'run'),
                                     license='research only',
                                     log=lines.append)
  info = run_dir.load_run(str(tmp_path / 'run'))[0]
  assert (info.model, dict(info.model_options)) == (model, options), seed
  assert record['format'] == 'MXNet (symbol + params)'
  assert record['symbol']['source'] == os.path.abspath(sym_path)
  assert len(record['sha256']) == len(record['symbol']['sha256']) == 64
  assert record['made_by'].startswith('insightface MXNet')
  assert record['stored_dtypes'] == (['float16'] if saved else ['float32'])
  assert record['fixed_gamma'] == ['fc1'] and record['left_out'] == []
  assert record['input'] == INSIGHTFACE._asdict()
  assert record['parity']['min_cosine'] >= 0.9999, seed
  assert run_dir.imported(str(tmp_path / 'run')) == json.loads(
      json.dumps(record))
  assert any('parity on 16 faces' in x for x in lines)
  run = trained_run.open_model(str(tmp_path / 'run'))
  assert (run.contract, run.image_size, run.step) == (INSIGHTFACE, side, 0)
  faces = rng.integers(0, 256, (6, side, side, 3), dtype=np.uint8)
  want = _graph_embeddings(mxnet_params.read_symbol(sym_path),
                           mxnet_params.read_params(params_path), faces)
  got = run.embed(faces)
  assert got.shape == want.shape
  assert (got * want).sum(1).min() > 0.9999, (seed, (got * want).sum(1))


def _load(tmp_path, symbol, params, **saved):
  sym_path, params_path = mxnet_files.write_model(tmp_path, symbol, params,
                                                  **saved)
  return import_model.mxnet_import.load(params_path, sym_path)


def test_a_graph_without_preprocessing_takes_raw_pixels(tmp_path):
  """No scalar ops on 'data': the contract is raw RGB (0, 1), said so in
  the record; the flags override it and parity still holds (both sides
  are fed the same inputs); params outside the graph are left out."""
  rng, seed = fresh_rng()
  symbol, params = mxnet_files.lresnet(rng, **IR, preprocess=False)
  params['arg:fc7_weight'] = np.ones((10, 16), 'f4')
  imported = _load(tmp_path, symbol, params)
  assert imported.contract == images.InputContract('RGB', 0.0, 1.0)
  assert imported.layout.left_out == ['arg:fc7_weight']
  record = import_model.import_model(
      str(tmp_path / 'model-0000.params'), str(tmp_path / 'run'), log=id,
      channels='BGR', center=127.5, scale=127.5)
  assert 'raw RGB pixels' in record['graph_input']
  assert record['input'] == {'channels': 'BGR', 'center': 127.5,
                             'scale': 127.5}
  assert record['parity']['min_cosine'] >= 0.9999, seed
  assert record['left_out'] == ['arg:fc7_weight']


def test_wrong_shapes_and_missing_arrays_are_named(tmp_path):
  """A wider IR (1/4, deeper stages) loads and computes as its graph; cut
  or missing arrays are refused naming the layer and both shapes, or the
  node and the variable."""
  rng, seed = fresh_rng()
  symbol, params = mxnet_files.lresnet(rng, (16, 16, 32, 64, 128),
                                       (1, 2, 3, 1), side=7)
  imported = _load(tmp_path, symbol, params)
  assert (imported.model, imported.options) == ('resnet50', {
      'width': 0.25, 'units': [1, 2, 3, 1], 'bn_epsilon': 2e-5})
  faces = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
  cosines = import_model.mxnet_import.parity(imported, faces, INSIGHTFACE)
  assert cosines.min() > 0.9999, (seed, cosines)
  symbol, params = mxnet_files.lresnet(rng, **IR)
  cut = dict(params)
  cut['arg:stage2_unit1_conv2_weight'] = cut[
      'arg:stage2_unit1_conv2_weight'][:, :8]
  with pytest.raises(mxnet_layouts.LayoutError,
                     match=r'stage2_unit1_conv2 gives params _Unit_1/Conv_1/'
                     r'kernel the shape \(3, 3, 8, 16\); resnet50 needs '
                     r'\(3, 3, 16, 16\)'):
    _load(tmp_path, symbol, cut)
  del params['aux:stage3_unit1_bn2_moving_var']
  with pytest.raises(mxnet_layouts.LayoutError,
                     match=r"node 'stage3_unit1_bn2' \(BatchNorm\) reads the "
                     r"variable 'stage3_unit1_bn2_moving_var', which the "
                     'params file does not hold'):
    _load(tmp_path, symbol, params)


def _rename(symbol, old, new, **attrs):
  for node in symbol['nodes']:
    if node['name'] == old:
      node['name'] = new
      node.setdefault('attrs', {}).update(attrs)
  return symbol


def test_graphs_that_do_not_fit_are_refused_naming_the_node(tmp_path):
  """Another first layer, a stride that is not fresnet's, a layer outside
  it, a second BatchNorm eps, a ReLU where fresnet has its PReLU, two
  stages, no fc1: refused before any weight is put anywhere."""
  rng, _ = fresh_rng()
  cases = [
      (lambda s: _rename(s, 'conv0', 'stem'),
       r"node 'stem' \(Convolution\) is the first layer: neither fresnet's "
       "'conv0' nor fmobilefacenet's 'conv_1_conv2d'"),
      (lambda s: _rename(s, 'stage1_unit1_conv1', 'stage1_unit1_conv1',
                         stride='(2, 2)'),
       r"node 'stage1_unit1_conv1' \(Convolution\) has stride=\(2, 2\); "
       r'insightface fresnet \(LResNet-IR\) has \(1, 1\) there'),
      (lambda s: _rename(s, 'stage3_unit1_bn3', 'stage3_unit1_extra'),
       r"node 'stage3_unit1_extra' \(BatchNorm\) does not fit insightface "
       r'fresnet \(LResNet-IR\) onto resnet50 .*: it has no such layer'),
  ]
  symbol, params = mxnet_files.lresnet(rng, **IR)
  for edit, message in cases:
    with pytest.raises(mxnet_layouts.LayoutError, match=message):
      _load(tmp_path, edit(json.loads(json.dumps(symbol))), params)
  with pytest.raises(mxnet_layouts.LayoutError,
                     match=r"node 'stage2_unit1_bn3' \(BatchNorm\) has eps "
                     "0.001 where 'bn0' has 2e-05"):
    _load(tmp_path, _rename(json.loads(json.dumps(symbol)),
                            'stage2_unit1_bn3', 'stage2_unit1_bn3',
                            eps='0.001'), params)
  relu = json.loads(json.dumps(symbol))
  for node in relu['nodes']:
    if node['name'] == 'stage2_unit1_relu1':
      node.update(op='Activation', attrs={'act_type': 'relu'},
                  inputs=node['inputs'][:1])
  with pytest.raises(mxnet_layouts.LayoutError,
                     match=r"node 'stage2_unit1_relu1' \(Activation\) is "
                     r'where insightface fresnet \(LResNet-IR\) has a '
                     'LeakyReLU'):
    _load(tmp_path, relu, params)
  with pytest.raises(mxnet_layouts.LayoutError,
                     match=r'units \{1: 1, 2: 2\} per stage: IResNet has '
                     'four stages'):
    _load(tmp_path, *mxnet_files.lresnet(rng))
  with pytest.raises(mxnet_layouts.LayoutError,
                     match="the graph has no node 'fc1'"):
    _load(tmp_path, _rename(json.loads(json.dumps(symbol)), 'fc1', 'emb'),
          params)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'npcface_jax.import_model',
                         *map(str, args)], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)


def test_command_line_with_the_symbol_file(tmp_path):
  """SRC2 names a symbol file that is not beside the params; the files'
  order and a second file for a non-MXNet model are refused naming why."""
  rng, _ = fresh_rng()
  sym_path, params_path = mxnet_files.write_model(
      tmp_path, *mxnet_files.mobilefacenet(rng, width=8, blocks=(1, 1, 1)))
  moved = tmp_path / 'y1.json'
  os.rename(sym_path, moved)
  run = _cli(params_path, moved, f'--workdir={tmp_path / "run"}',
             '--license=non-commercial research only')
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'imported into' in run.stdout
  assert run_dir.imported(str(tmp_path / 'run'))['symbol']['source'] == str(
      moved)
  with pytest.raises(ValueError, match='give the .params file first'):
    import_model.import_model(str(moved), str(tmp_path / 'b'),
                              symbol=params_path, log=id)
  with pytest.raises(ValueError, match='a second file is for MXNet models '
                     'only'):  # this .py is not MXNet: read as PyTorch
    import_model.import_model(__file__, str(tmp_path / 'c'),
                              symbol=str(moved), log=id)


@pytest.mark.slow
def test_the_model_zoos_full_structures():
  """LResNet50E-IR at full width (64 ... 512, units 3, 4, 14, 3, 512-d)
  and y1 at full width (blocks 1, 4, 6, 2, 128-d) are our defaults with the
  graphs' eps and biases, and compute as their graphs (2 faces; the
  float64 interpreter takes ~7 s a face for the r50)."""
  rng, seed = fresh_rng()
  cases = [(mxnet_files.lresnet(rng, (64, 64, 128, 256, 512), (3, 4, 14, 3),
                                emb=512, side=7),
            'resnet50', {'bn_epsilon': 2e-5}),
           (mxnet_files.mobilefacenet(rng, width=64, blocks=(4, 6, 2),
                                      emb=128),
            'mobilefacenet', {'bn_epsilon': 1e-3, 'head_bn_epsilon': 2e-5,
                              'fc_bias': True})]
  for (symbol, params), model, options in cases:
    with tempfile.TemporaryDirectory() as folder:
      imported = _load(pathlib.Path(folder), symbol, params)
    assert (imported.model, imported.options) == (model, options)
    side = imported.image_size
    faces = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    cosines = import_model.mxnet_import.parity(imported, faces, INSIGHTFACE)
    assert cosines.min() > 0.9999, (seed, cosines)
