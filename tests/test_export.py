"""Export: the ONNX translation against JAX primitive by primitive, every
backbone in every format loaded back in its own runtime on real faces
(batches of 1, 7 and 64), and the export command: parity built in, the
model card, ``--check`` catching a damaged, edited, added or missing file,
a failed export kept apart, a missing extra named."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from PIL import Image

from npcface_jax.common import arrays
from npcface_jax import export, models
from npcface_jax.common import jsonfile
from npcface_jax.evaluation import embedding_step, run_sets
from npcface_jax.faces import images
from npcface_jax.serving import (export_formats, model_card, onnx_graph,
                                 trained_run)
from tests import tiny_backbone
from tests.helpers import fresh_rng, orl_faces, random_variables
from tests.test_commands import _results, write_run

ort = pytest.importorskip('onnxruntime', reason='the [export] extra')


@pytest.fixture(scope='module')
def faces():
  """72 ORL faces at 112x112 (s1-s8, nine photos each), read from the
  shared data in place."""
  orl = orl_faces()
  return np.stack([images.read_image(orl / f's{p}' / f'{i}.pgm', 112)
                   for p in range(1, 9) for i in range(1, 10)])


def _onnx_run(fn, shape, dtype):
  model = onnx_graph.to_onnx(fn, shape, dtype)
  session = ort.InferenceSession(model.SerializeToString(),
                                 providers=['CPUExecutionProvider'])
  return lambda x: session.run(None, {'images': x})[0]


# --- The translation, primitive by primitive ---------------------------------

def _vocabulary(x):
  """One function using every primitive the translation knows."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
  y = lax.conv_general_dilated(x, w, (2, 1), [(1, 2), (0, 1)],
                               rhs_dilation=(1, 2),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  dw = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  y = lax.conv_general_dilated(y, dw, (1, 1), 'SAME', feature_group_count=8,
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                        ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = jnp.where(y >= 0, y, 0.25 * y) + jax.nn.relu(-y) ** 3
  y = jnp.concatenate([y, lax.rev(y, (2,))], axis=-1)
  y = jnp.pad(y, ((0, 0), (1, 0), (0, 2), (0, 0)), constant_values=0.5)
  y = lax.slice_in_dim(lax.slice_in_dim(y, 1, None, axis=1), 0, None, 2, 2)
  y = y * jax.nn.sigmoid(y)
  m = jnp.asarray(rng.normal(size=(5, y.shape[1])), jnp.float32)
  y = jnp.einsum('oh,bhwc->bowc', m, y)
  s = jnp.mean(y, axis=(1, 2)) + jnp.max(y, axis=(1, 2)) - jnp.min(y, (1, 2))
  v = jnp.asarray(rng.normal(size=(s.shape[1], 6)), jnp.float32)
  a, b = (lax.slice_in_dim(s, k, k + 6, axis=1) for k in (0, 6))
  z = jnp.tanh(s @ v) + jnp.exp(-jnp.abs(a)) + jnp.sqrt(
      jnp.square(b) + 1) + lax.rsqrt(jnp.square(a) + 1)
  z = z.reshape(-1, 2, 3).transpose(0, 2, 1).reshape(-1, 6)
  return z / jnp.linalg.norm(z, axis=1, keepdims=True)


@pytest.mark.parametrize('batch', [1, 5])
def test_every_primitive_matches_jax(batch):
  rng, seed = fresh_rng()
  run = _onnx_run(_vocabulary, (9, 10, 4), jnp.float32)
  x = rng.normal(size=(batch, 9, 10, 4)).astype(np.float32)
  np.testing.assert_allclose(run(x), _vocabulary(x), atol=2e-5,
                             err_msg=f'seed {seed}')


def test_a_primitive_without_translation_is_named():
  with pytest.raises(onnx_graph.Unsupported, match="'cumsum'"):
    onnx_graph.to_onnx(lambda x: jnp.cumsum(x, axis=1), (4,), jnp.float32)


def test_weights_are_folded_and_shared():
  """BatchNorm in inference mode folds into constants (no Sqrt in the
  graph: its rsqrt is computed here), and the flip's second pass through
  the backbone reuses the first pass's weights."""
  model = models.create('mobilefacenet', width=0.25, embedding_dim=16)
  variables = random_variables(model, (1, 48, 48, 3))
  graphs = [onnx_graph.to_onnx(
      export_formats.serving_function(model, variables, f), (48, 48, 3),
      jnp.uint8) for f in (False, True)]
  ops = [n.op_type for n in graphs[0].graph.node]
  kernels = [k for k in jax.tree.leaves(variables['params']) if k.ndim == 4]
  assert ops.count('Conv') == len(kernels) == 49
  assert ops.count('Sqrt') == 1  # the output's norm only
  size = [sum(np.prod(t.dims) for t in g.graph.initializer
              if t.data_type == onnx_graph.onnx.TensorProto.FLOAT)
          for g in graphs]
  assert size[1] == size[0]  # the weights once, whatever the passes


# --- Every backbone, every format ---------------------------------------------

# ResNet-101 and Attention-92 are deeper stacks of ResNet-50's and
# Attention-56's blocks: the same primitives, so the translation of their
# jaxprs (ONNX) is checked, and the formats that serialise any jaxpr alike
# (jax2tf's) run on the shallower one of each pair.
DEEPER = ('resnet101', 'attention92')


# ResNet-18/34/200: ResNet-50's units, more or fewer (parameter counts in
# test_models check the structure); nothing new to translate.
SAME_UNITS = ('resnet18', 'resnet34', 'resnet200')


@pytest.mark.slow(minutes=1)
@pytest.mark.parametrize('name', [n for n in models.names()
                                  if n not in SAME_UNITS])
def test_every_backbone_exports_to_every_format(name, faces, tmp_path,
                                                monkeypatch):
  """At width 0.25 (the structure whole, the channels fewer): each format
  written, loaded back in its own runtime and run on ORL faces reproduces
  the JAX embedder (flip included) to a cosine of 0.9999; MobileFaceNet
  also shows the dynamic batch, 1, 7 and 64 from one file. The SavedModel
  is lowered for CPU only here (two thirds of its export time); the
  command's test lowers for all three platforms."""
  monkeypatch.setattr(export_formats, 'SAVEDMODEL_PLATFORMS', ('cpu',))
  _, seed = fresh_rng()
  model = models.create(name, width=0.25, embedding_dim=64)
  variables = random_variables(model, (1, 112, 112, 3), seed)
  pixels = faces if name == 'mobilefacenet' else faces[:8]
  embedder = embedding_step.Embedder(model, arrays.make_mesh(1), 8, flip=True)
  reference = embedder(variables, pixels)
  assert (reference @ reference.T).min() < 0.99  # faces embed apart
  fn = export_formats.serving_function(model, variables, flip=True)
  formats = ['onnx'] if name in DEEPER else export_formats.FORMATS
  for fmt in formats:
    path = str(tmp_path / export_formats.FILES[fmt])
    export_formats.write(fmt, fn, 112, path)
    run = export_formats.load(fmt, path)
    if name == 'mobilefacenet' or fmt == 'onnx':
      got = export.run_batched(run, pixels)  # batches of 1, 7 (and 64)
    else:  # one batch: TF compiles the XlaCallModule once per batch size
      got = run(pixels)
    cosines = np.sum(got * reference, axis=1)
    assert got.shape == reference.shape, fmt
    assert cosines.min() >= model_card.MIN_COSINE, (fmt, seed, cosines.min())


# --- The command -------------------------------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A step-0 TinyNet run on synthetic faces, its BatchNorm statistics the
  data's, and evaluation results at its step."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models, 'from_config', tiny_backbone.create_model)
    workdir = write_run(tmp_path_factory.mktemp('run'), calibrate=True)
    c = trained_run.open_model(workdir).config
  _results(workdir)
  return workdir, c


@pytest.fixture
def tiny(monkeypatch):
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)


def _held_out(monkeypatch):
  """The run's config with held-out synthetic pairs to check parity on."""
  original = run_sets.verification_sets

  def with_pairs(config, image_size):
    config = config.copy_and_resolve_references()
    config.synthetic.heldout_identities = 12
    config.synthetic.heldout_pairs = 60
    return original(config, image_size)

  monkeypatch.setattr(run_sets, 'verification_sets', with_pairs)


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  workdir, _ = run
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models, 'from_config', tiny_backbone.create_model)
    _held_out(patch)
    out = str(tmp_path_factory.mktemp('export') / 'model')
    card = export.export_run(workdir, out=out, log=lambda *_: None)
  return out, card


def test_export_passes_parity_and_writes_the_card(run, exported):
  workdir, config = run
  out, card = exported
  assert card['path'] == out and card['parity']['passed']
  parity = card['parity']
  assert parity['images'] == 120 and 'synthetic_heldout (60 pairs)' in (
      parity['faces'])
  for fmt in export_formats.FORMATS:
    r = parity['formats'][fmt]
    assert r['min_cosine'] >= 0.9999 and r['passed'], fmt
    a = r['accuracy']['synthetic_heldout']
    assert abs(a['jax'] - a['export']) <= 0.001, fmt
    assert os.path.exists(os.path.join(out, card['formats'][fmt]))
  i = card['input']
  assert (i['dtype'], i['channels'], i['shape']) == (
      'uint8', 'RGB', ['batch', 48, 48, 3])
  assert np.allclose(i['template'][0], [38.2946 * 48 / 112,
                                        51.6963 * 48 / 112], atol=1e-4)
  assert '127.5' in i['normalisation'] and i['flip'] is False
  assert card['output']['shape'] == ['batch', config.embedding_dim]
  assert card['training']['classes'] == config.synthetic.num_classes
  assert card['training']['head'] == 'npcface'
  lfw = card['evaluation']['sets']['lfw']
  assert lfw['tar_at_far'][0]['threshold'] == 0.42 and lfw['threshold'] == 0.31
  for name, record in card['files'].items():
    assert record['sha256'] == model_card.sha256(os.path.join(out, name))
  assert {'jax', 'flax', 'onnxruntime'} <= set(card['versions'])
  text = pathlib.Path(out, model_card.CARD_MD).read_text()
  for words in ('uint8 RGB', '**PASSED**', '80.00% at 0.001 (0.4200)',
                'model.onnx', card['files']['model.onnx']['sha256']):
    assert words in text, words


def test_check_catches_every_kind_of_damage(exported, tmp_path):
  out, _ = exported
  assert export.check_export(out, log=lambda *_: None) == []
  damaged = str(tmp_path / 'copy')
  import shutil  # noqa: PLC0415 (this test only)
  shutil.copytree(out, damaged)
  onnx_path = pathlib.Path(damaged, 'model.onnx')
  data = bytearray(onnx_path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  onnx_path.write_bytes(bytes(data))
  assert export.check_export(damaged) == [
      'model.onnx: sha256 differs from the card (the file was changed or '
      'damaged)']
  shutil.copy(os.path.join(out, 'model.onnx'), onnx_path)
  card_path = os.path.join(damaged, model_card.CARD_JSON)
  card = jsonfile.read_object(card_path)
  card['files']['model.tflite']['sha256'] = '0' * 64
  jsonfile.write_object(card_path, card)
  problems = export.check_export(damaged)
  assert problems == ['model.tflite: sha256 differs from the card (the file '
                      'was changed or damaged)']
  shutil.copy(os.path.join(out, model_card.CARD_JSON), card_path)
  pathlib.Path(damaged, 'extra.bin').write_bytes(b'x')
  os.remove(os.path.join(damaged, 'saved_model', 'saved_model.pb'))
  assert export.check_export(damaged) == [
      'saved_model/saved_model.pb: missing',
      'extra.bin: not in the card (added after the export)']
  pathlib.Path(card_path).write_text('{"files": ')
  problem, = export.check_export(damaged)
  assert 'model_card.json' in problem and 'the card is damaged' in problem


def test_check_runs_every_format_on_the_sample(exported, tmp_path):
  """A file whose hash is recomputed into the card but whose model computes
  something else is caught by running it: here the sample's recorded
  embeddings are replaced, and the card re-hashed to match."""
  out, _ = exported
  import shutil  # noqa: PLC0415 (this test only)
  copy = str(tmp_path / 'copy')
  shutil.copytree(out, copy)
  sample = dict(np.load(os.path.join(copy, export.SAMPLE)))
  sample['embeddings'] = np.roll(sample['embeddings'], 1, axis=0)
  np.savez(os.path.join(copy, export.SAMPLE), **sample)
  assert (sample['embeddings'] @ sample['embeddings'].T).min() < 0.99
  card = jsonfile.read_object(os.path.join(copy,
                                           model_card.CARD_JSON))
  card['files'] = model_card.file_records(copy)
  model_card.write(copy, card)
  problems = export.check_export(copy, log=lambda *_: None)
  assert [p.split(':')[0] for p in problems] == list(export_formats.FORMATS)
  assert all('below 0.9999' in p for p in problems)


@pytest.mark.slow
def test_check_command_line_exit_status(exported, tmp_path):
  out, _ = exported
  command = [sys.executable, '-m', 'npcface_jax.export', f'--check={out}']
  done = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and f'{out}: intact' in done.stdout, done.stderr
  done = subprocess.run(command[:-1] + [f'--check={tmp_path}'],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and 'model_card.json not found' in done.stderr


def test_a_failed_export_is_kept_apart(run, faces, tiny, monkeypatch,
                                       tmp_path):
  """Parity that fails leaves the new files at <out>.failed and the earlier
  export untouched; --images checks on given crops (no pairs)."""
  workdir, _ = run
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'earlier.txt').write_text('an earlier export')
  crops = tmp_path / 'crops'
  crops.mkdir()
  for k in range(5):
    Image.fromarray(faces[k]).save(crops / f'{k}.png')
  monkeypatch.setattr(model_card, 'MIN_COSINE', 1.5)
  card = export.export_run(workdir, out=str(out), formats=['onnx'],
                           image_paths=[str(crops)], log=lambda *_: None)
  assert not card['parity']['passed']
  assert card['path'] == str(out) + '.failed'
  assert card['parity']['images'] == 5 and '5 aligned crops' in (
      card['parity']['faces'])
  assert (out / 'earlier.txt').read_text() == 'an earlier export'
  assert export.check_export(card['path']) == [
      'the card records a failed parity check']


def test_missing_extra_and_bad_requests_are_named(run, tiny, monkeypatch):
  workdir, _ = run
  with pytest.raises(ValueError, match='--formats: pdf; choose from'):
    export.export_run(workdir, formats=['pdf'])
  with pytest.raises(ValueError, match='no verification sets.*--images'):
    export.export_run(workdir, formats=['onnx'])
  monkeypatch.setitem(sys.modules, 'onnxruntime', None)
  with pytest.raises(export_formats.MissingExtra,
                     match=r'pip install "npcface_jax\[export\]"'):
    export.export_run(workdir, formats=['savedmodel', 'onnx'])
  with pytest.raises(export_formats.MissingExtra):
    export_formats.load('onnx', 'model.onnx')
  assert not list(pathlib.Path(workdir).glob('export*'))
