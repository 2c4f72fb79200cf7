"""python -m npcface_jax.import_model on ONNX face recognisers: graphs made
here (tests/onnx_files.py) in the structure arcface_torch's torch2onnx.py
gives insightface's w600k_r50 / glintr100 / w600k_mbf, from random
weights in torch's names (tests/released_nets.py); first shown to compute
the network they stand for (onnxruntime against the float64 NumPy forward
of the unfolded network), then imported into runs that embed as
onnxruntime does. Wrong shapes and unknown structures are refused naming
the node, unsafe files naming the tensor, and nothing is written."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from npcface_jax import import_model
from npcface_jax.faces import images
from npcface_jax.foreign import (onnx_layouts, reference_nets, torch_import,
                                 torch_layouts)
from npcface_jax.serving import run_dir, trained_run
from tests import fuzzing, onnx_files, released_nets
from tests.helpers import fresh_rng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (state dict in torch's names, graph builder and its options, the
# backbone and options the import must find)
CASES = {
    'w600k_r50-like (folded, Gemm)': (
        lambda r: released_nets.arcface_iresnet(r, (2, 1, 1, 1)),
        onnx_files.iresnet, {},
        ('resnet50', {'width': 0.125, 'units': [2, 1, 1, 1]})),
    'iresnet unfolded, MatMul + Add, batch 1': (
        lambda r: released_nets.arcface_iresnet(r, (1, 1, 2, 1)),
        onnx_files.iresnet, {'fold': False, 'linear': 'matmul', 'batch': 1},
        ('resnet50', {'width': 0.125, 'units': [1, 1, 2, 1]})),
    'w600k_mbf-like (grouped stem)': (
        lambda r: released_nets.mobilefacenet(
            r, width=0.25, scale=2, stem_groups=16, blocks=(1, 1, 1, 1),
            arcface_torch=True),
        onnx_files.mobilefacenet, {},
        ('mobilefacenet', {'width': 0.25, 'stem': 128, 'stem_groups': 16,
                           'stages': [128, 256, 256],
                           'blocks': [1, 1, 1, 1]})),
    'mbf_large-like (residual stem)': (
        lambda r: released_nets.mobilefacenet(
            r, width=0.125, scale=4, blocks=(2, 1, 2, 1), arcface_torch=True),
        onnx_files.mobilefacenet, {},
        ('mobilefacenet', {'width': 0.125, 'stem': 256,
                           'stages': [256, 512, 512],
                           'blocks': [2, 1, 2, 1]})),
}


def _case(name, rng):
  make, build, kwargs, want = CASES[name]
  sd = make(rng)
  return sd, build(sd, **kwargs), want


def _save(tmp_path, model, name='model.onnx') -> str:
  path = tmp_path / name
  path.write_bytes(model.SerializeToString())
  return str(path)


def _cos(a, b):
  return (a * b).sum(1) / (np.linalg.norm(a, axis=1) *
                           np.linalg.norm(b, axis=1))


@pytest.mark.parametrize('case', CASES)
def test_the_fixture_graphs_compute_their_network(case):
  """onnxruntime on the fixture graph (BNs folded by the fixture's own
  arithmetic) agrees with the float64 NumPy forward of the unfolded
  network, written from its PyTorch code: the graph is the network."""
  rng, _ = fresh_rng()
  sd, model, (backbone, _) = _case(case, rng)
  x = rng.normal(size=(3, 3, 112, 112))
  got = onnx_files.run(model, x.astype(np.float32))
  canonical = {n: np.asarray(v, np.float64) for n, v in
               torch_layouts.detect(sd).tensors.items()}
  forward = (reference_nets.mobilefacenet if backbone == 'mobilefacenet'
             else reference_nets.iresnet)
  want = forward(canonical, x)
  assert _cos(got, want).min() > 0.99999
  assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()


@pytest.mark.parametrize('case', [
    pytest.param(c, marks=[pytest.mark.slow] if 'large' in c else [])
    for c in CASES])
def test_import_writes_a_run_that_embeds_as_onnxruntime(case, tmp_path):
  """The variant is read from the graph's structure and shapes; the run
  embeds uint8 faces as onnxruntime runs the graph on them, fed by
  arcface_torch's contract (RGB, (x - 127.5) / 127.5); run.json records
  the format, opset, producer and parity."""
  rng, _ = fresh_rng()
  _, model, (backbone, options) = _case(case, rng)
  source = _save(tmp_path, model)
  lines = []
  record = import_model.import_model(source, str(tmp_path / 'run'),
                                     license='non-commercial research only',
                                     log=lines.append)
  assert record['format'] == 'ONNX' and record['opset'] == 11
  assert record['producer'] == 'pytorch 1.11.0'
  assert record['input'] == torch_import.ARCFACE_TORCH._asdict()
  assert record['parity']['min_cosine'] >= 0.9999
  assert 'onnxruntime' in record['parity']['against']
  assert record['left_out_count'] == 0
  assert run_dir.imported(str(tmp_path / 'run'))['sha256'] == record['sha256']
  run = trained_run.open_model(str(tmp_path / 'run'))
  assert run.step == 0 and run.contract == torch_import.ARCFACE_TORCH
  config = json.loads((tmp_path / 'run' / 'run.json').read_text())['config']
  assert config['model'] == backbone and config['model_options'] == options
  faces = rng.integers(0, 256, (6, 112, 112, 3), dtype=np.uint8)
  x = images.normalize(faces.astype(np.float32), torch_import.ARCFACE_TORCH)
  want = onnx_files.run(model, x.transpose(0, 3, 1, 2).copy())
  assert _cos(run.embed(faces), want).min() > 0.9999


@pytest.mark.slow
@pytest.mark.parametrize('name', ['w600k_r50', 'w600k_mbf'])
def test_full_size_released_structures(name, tmp_path):
  """At full size the graphs are the released recognisers' networks
  (iresnet50: 174 MB of float32 weights, as w600k_r50.onnx; arcface_torch's
  mbf, 512-d) and are found as our presets: resnet50 without options, the
  mbf's doubled channels and grouped stem."""
  rng, _ = fresh_rng()
  if name == 'w600k_r50':
    model = onnx_files.iresnet(released_nets.arcface_iresnet(
        rng, (3, 4, 14, 3), dim=512, width=1.0))
    want = ('resnet50', {})
  else:
    model = onnx_files.mobilefacenet(released_nets.mobilefacenet(
        rng, dim=512, width=1.0, scale=2, stem_groups=64,
        arcface_torch=True), linear='matmul')
    want = ('mobilefacenet', {'stem': 128, 'stem_groups': 64,
                              'stages': [128, 256, 256]})
  record = import_model.import_model(_save(tmp_path, model, f'{name}.onnx'),
                                     str(tmp_path / 'run'), log=id)
  assert record['parity']['min_cosine'] >= 0.9999
  config = json.loads((tmp_path / 'run' / 'run.json').read_text())['config']
  assert (config['model'], config['model_options']) == want
  assert config['embedding_dim'] == 512


def _ir_model(rng):
  return onnx_files.iresnet(released_nets.arcface_iresnet(rng))


def _replace_input(model, op, index, array, nth=0):
  """The ``nth`` ``op`` node's constant input ``index`` set to ``array``;
  returns that node's name."""
  node = [n for n in model.graph.node if n.op_type == op][nth]
  for t in model.graph.initializer:
    if t.name == node.input[index]:
      t.CopyFrom(numpy_helper.from_array(array, t.name))
  return node.name


def test_wrong_shapes_are_refused_naming_the_node(tmp_path):
  rng, _ = fresh_rng()
  model = _ir_model(rng)
  name = _replace_input(model, 'PRelu', 1, np.ones((7, 1, 1), 'f4'), 1)
  with pytest.raises(torch_layouts.LayoutError,
                     match=rf"'{name}' \(PRelu\): its slope has the shape "
                     r'\(7, 1, 1\), a per-channel PReLU of 8 channels'):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  model = _ir_model(rng)
  name = _replace_input(model, 'Conv', 1, np.ones((8, 16, 3, 3), 'f4'), 2)
  with pytest.raises(torch_layouts.LayoutError,
                     match=rf"'{name}' \(Conv\): its weight has the shape "
                     r'\(8, 16, 3, 3\), the graph needs \(8, 8, 3, 3\)'):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  model = _ir_model(rng)
  name = _replace_input(model, 'Gemm', 1, np.ones((64, 64 * 50), 'f4'))
  with pytest.raises(torch_layouts.LayoutError,
                     match=rf"'{name}' \(Gemm\): its weight takes 3200 "
                     r'features .* the graph gives it 3136'):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  assert not (tmp_path / 'a').exists()


def test_unknown_structures_are_refused_naming_the_node(tmp_path):
  """A ReLU where the structure has a PReLU; normalisation inside the
  graph (as insightface's MXNet conversions have: Sub, Mul); a node
  hanging off the graph outside the structure."""
  rng, _ = fresh_rng()
  model = _ir_model(rng)
  prelu = [n for n in model.graph.node if n.op_type == 'PRelu'][3]
  prelu.op_type = 'Relu'
  del prelu.input[1:]
  with pytest.raises(torch_layouts.LayoutError,
                     match=rf"expected PRelu alone, found node \d+ "
                     rf"'{prelu.name}' \(Relu\)"):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  model = _ir_model(rng)
  model.graph.initializer.append(numpy_helper.from_array(
      np.float32(127.5), 'mean'))
  model.graph.node.insert(0, helper.make_node(
      'Sub', ['input.1', 'mean'], ['centred'], name='Sub_0'))
  for node in model.graph.node[1:]:
    node.input[:] = ['centred' if x == 'input.1' else x for x in node.input]
  with pytest.raises(torch_layouts.LayoutError,
                     match=r"expected the stem Conv alone .*found node 0 "
                     r"'Sub_0' \(Sub\)"):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  model = _ir_model(rng)
  model.graph.node.append(helper.make_node('Relu', ['fc.bias'], ['extra'],
                                           name='Relu_extra'))
  with pytest.raises(torch_layouts.LayoutError,
                     match=r"1 nodes outside the structure: node \d+ "
                     r"'Relu_extra' \(Relu\)"):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)
  assert not (tmp_path / 'a').exists()


def test_a_width_our_backbone_does_not_have_names_the_node(tmp_path,
                                                         monkeypatch):
  """A graph consistent in itself whose second stage is wider than the
  width the stem implies: refused by our backbone's shapes, naming the
  ONNX node and both shapes."""
  rng, _ = fresh_rng()
  real = released_nets._c  # noqa: SLF001 (the fixture's channel rule)
  monkeypatch.setattr(released_nets, '_c',
                      lambda n, w: 24 if n == 128 else real(n, w))
  model = _ir_model(rng)
  conv = [n for n in model.graph.node if n.op_type == 'Conv'][4]
  with pytest.raises(torch_layouts.LayoutError,
                     match=rf"node \d+ '{conv.name}' \(Conv\) \(as "
                     r'layer2.0.conv1\) gives params .* the shape '
                     r'\(3, 3, 8, 24\); resnet50 needs \(3, 3, 8, 16\)'):
    import_model.import_model(_save(tmp_path, model), str(tmp_path / 'a'),
                              log=id)


def test_inference_no_ops_are_passed_through(tmp_path):
  """Identity, Dropout and a Cast to float32 (what some exports leave)
  change nothing: the same backbone is found."""
  rng, _ = fresh_rng()
  model = _ir_model(rng)
  flatten = next(n for n in model.graph.node if n.op_type == 'Flatten')
  gemm = next(n for n in model.graph.node if n.op_type == 'Gemm')
  at = list(model.graph.node).index(gemm)
  model.graph.node.insert(at, helper.make_node(
      'Cast', ['d'], ['c'], to=onnx.TensorProto.FLOAT, name='Cast_x'))
  model.graph.node.insert(at, helper.make_node('Dropout', ['i'], ['d'],
                                               name='Dropout_x'))
  model.graph.node.insert(at, helper.make_node(
      'Identity', [flatten.output[0]], ['i'], name='Identity_x'))
  gemm.input[0] = 'c'
  found = onnx_layouts.layout(onnx_layouts.read(_save(tmp_path, model)))
  assert found.layout.model == 'resnet50'
  assert found.layout.options == {'width': 0.125, 'units': [1, 1, 1, 1]}


def test_unsafe_and_damaged_files_are_refused(tmp_path, monkeypatch):
  """External data, an initializer whose bytes do not fill its shape, a
  file over the size bound, bytes that are not a ModelProto; unused
  initializers are reported, not refused."""
  rng, _ = fresh_rng()
  model = _ir_model(rng)
  tensor = model.graph.initializer[0]
  tensor.data_location = onnx.TensorProto.EXTERNAL
  tensor.external_data.add(key='location', value='weights.bin')
  with pytest.raises(onnx_layouts.OnnxFileError,
                     match=rf"the tensor '{tensor.name}' keeps its data in an "
                     'external file'):
    onnx_layouts.read(_save(tmp_path, model))
  model = _ir_model(rng)
  tensor = model.graph.initializer[1]
  tensor.raw_data = tensor.raw_data[:-4]
  with pytest.raises(onnx_layouts.OnnxFileError,
                     match=rf"'{tensor.name}': \d+ bytes for the shape"):
    onnx_layouts.read(_save(tmp_path, model))
  model = _ir_model(rng)
  model.graph.initializer.append(numpy_helper.from_array(
      np.zeros(3, 'f4'), 'spare'))
  path = _save(tmp_path, model)
  assert onnx_layouts.layout(onnx_layouts.read(path)).layout.left_out == [
      'spare']
  monkeypatch.setattr(onnx_layouts, 'MAX_BYTES', 1000)
  with pytest.raises(onnx_layouts.OnnxFileError, match='over the 1000'):
    onnx_layouts.read(path)
  monkeypatch.undo()
  junk = tmp_path / 'junk.onnx'
  junk.write_bytes(b'\x08\x07\x12\xff' + bytes(range(256)))
  with pytest.raises(onnx_layouts.OnnxFileError, match='not an ONNX model'):
    import_model.import_model(str(junk), str(tmp_path / 'a'), log=id)
  assert not (tmp_path / 'a').exists()


def test_onnx_is_told_by_content_and_needs_its_extra(tmp_path, monkeypatch):
  """A graph named .bin is still read as ONNX; a torch checkpoint is not.
  Without the onnx package the refusal names the install line."""
  rng, _ = fresh_rng()
  path = _save(tmp_path, _ir_model(rng), 'model.bin')
  assert onnx_layouts.looks_like_onnx(path)
  from tests import torch_files  # noqa: PLC0415 (this test only)
  data, _ = torch_files.checkpoint(released_nets.arcface_iresnet(rng))
  (tmp_path / 'backbone.pth').write_bytes(data)
  assert not onnx_layouts.looks_like_onnx(str(tmp_path / 'backbone.pth'))
  monkeypatch.setitem(sys.modules, 'onnx', None)
  with pytest.raises(onnx_layouts.MissingExtra,
                     match=r'pip install "npcface_jax\[export\]"'):
    import_model.import_model(path, str(tmp_path / 'a'), log=id)


def test_a_wrong_mapping_fails_parity_and_writes_nothing(tmp_path,
                                                          monkeypatch):
  """The linear's rows left in NCHW order: parity far below 0.9999."""
  rng, _ = fresh_rng()
  source = _save(tmp_path, _ir_model(rng))
  real = torch_layouts._converted  # noqa: SLF001 (a fault injected)
  monkeypatch.setattr(torch_layouts, '_converted', lambda sd, src, kind: real(
      sd, src, 'dense' if kind == 'dense_nchw' else kind))
  with pytest.raises(ValueError, match='does not reproduce the source'):
    import_model.import_model(source, str(tmp_path / 'run'), log=id)
  assert not (tmp_path / 'run').exists()


def test_command_line(tmp_path):
  rng, _ = fresh_rng()
  source = _save(tmp_path, _ir_model(rng), 'w600k_r50.onnx')
  run = subprocess.run(
      [sys.executable, '-m', 'npcface_jax.import_model', source,
       f'--workdir={tmp_path / "run"}', '--license=non-commercial',
       '--channels=BGR'], capture_output=True, text=True, timeout=300,
      cwd=ROOT)
  assert run.returncode == 0, run.stderr
  assert 'imported into' in run.stdout
  record = run_dir.imported(str(tmp_path / 'run'))
  assert record['format'] == 'ONNX'
  assert record['input'] == {'channels': 'BGR', 'center': 127.5,
                             'scale': 127.5}
  broken = tmp_path / 'broken.onnx'
  broken.write_bytes(b'not a model')
  run = subprocess.run(
      [sys.executable, '-m', 'npcface_jax.import_model', str(broken),
       f'--workdir={tmp_path / "b"}'], capture_output=True, text=True,
      timeout=300, cwd=ROOT)
  assert run.returncode == 1 and 'error: ' in run.stderr
  assert 'not an ONNX model' in run.stderr


def _read_and_lay_out(path):
  """The fuzz target: the file read and walked as the import does."""
  onnx_layouts.layout(onnx_layouts.read(path))


def fuzz_cases() -> list[dict]:
  """fuzzing.fuzz's arguments (less workdir and seed) for a small IR
  recogniser's bytes: protobuf fields, initializer sizes and the graph's
  wiring mutated. A refusal is OnnxFileError (naming the file) or
  LayoutError (naming the node, so the file is not required in it)."""
  rng = np.random.default_rng(0)
  _, model, _ = _case('w600k_r50-like (folded, Gemm)', rng)
  return [dict(name='onnx_recogniser', target=f'{__name__}:_read_and_lay_out',
               files={'model.onnx': model.SerializeToString()},
               mutate_file='model.onnx', must_name='',
               expected=['npcface_jax.foreign.onnx_layouts:OnnxFileError',
                         'npcface_jax.foreign.torch_layouts:LayoutError'],
               tokens=[b'Conv', b'PRelu', b'Gemm', b'BatchNormalization',
                       b'Add', b'Flatten', b'input.1'], count=400)]


@pytest.mark.slow
def test_fuzz(tmp_path, record_property):
  case = dict(fuzz_cases()[0])
  summary = fuzzing.fuzz(workdir=tmp_path, **case)
  record_property('fuzz', summary.line())
  print(summary.line())
  assert summary.problems() == '', f'{summary.line()}\n{summary.problems()}'
  assert summary.refused > 0, summary.line()


def test_a_mistyped_attribute_is_refused_naming_the_node(tmp_path):
  """An attribute declared with another type than ONNX gives it (the
  fuzzer's find: a Conv's strides as a float) is a LayoutError naming the
  node, not a TypeError deep in the walk."""
  model = _ir_model(np.random.default_rng(0))
  conv = next(n for n in model.graph.node if n.op_type == 'Conv')
  strides = next(a for a in conv.attribute if a.name == 'strides')
  strides.CopyFrom(helper.make_attribute('strides', 1.0))
  path = _save(tmp_path, model)
  with pytest.raises(torch_layouts.LayoutError,
                     match=r"node 0 .*\(Conv\): attribute 'strides' declared "
                     'of type 1, where ONNX has INTS'):
    onnx_layouts.layout(onnx_layouts.read(path))
