"""python -m npcface_jax.import_model: released PyTorch checkpoints (made
here from random networks in their own names and torch's file format:
tests/released_nets.py, tests/torch_files.py) become run directories that
the commands take as runs trained here, each proved against the source's
computation first; what cannot be imported is refused naming why, and
nothing is written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from npcface_jax import import_model
from npcface_jax.evaluation import bin_format, protocols
from npcface_jax.faces import images
from npcface_jax.foreign import torch_import, torch_layouts
from npcface_jax.serving import run_dir, trained_run
from tests import released_nets, torch_files
from tests.helpers import SHARED_DATA, fresh_rng


def _write(tmp_path, name, arrays, **kwargs):
  data, _ = torch_files.checkpoint(arrays, **kwargs)
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


def _adaface(rng):
  sd = released_nets.evolve_ir(rng, (2, 1, 1, 1), middle_bn=True,
                               output_affine=False)
  return {**{f'model.{n}': v for n, v in sd.items()},
          'head.kernel': rng.normal(size=(64, 10)).astype('f4')}


SOURCES = {
    'arcface_torch r-small fp16': (
        lambda r: {n: v.astype('f2') if v.dtype == np.float32 else v
                   for n, v in released_nets.arcface_iresnet(r).items()},
        {}, torch_import.ARCFACE_TORCH, 'insightface arcface_torch'),
    'AdaFace ckpt (legacy format)': (
        _adaface, {'wrapper': 'lightning', 'fmt': 'legacy'},
        torch_import.ADAFACE, 'AdaFace'),
    'FaceX-Zoo MobileFaceNet .pt': (
        lambda r: {f'backbone.{n}': v for n, v in
                   released_nets.mobilefacenet(r, blocks=(1, 1, 1, 1)).items()},
        {'wrapper': 'facex'}, torch_import.FACEX_ZOO, 'FaceX-Zoo'),
}


@pytest.mark.parametrize('case', SOURCES)
def test_import_writes_a_run_that_embeds_as_the_source(case, tmp_path):
  """The run directory holds the record (sha256, format, layout, parity,
  licence, the source's input contract) and embeds uint8 faces as the
  source's architecture does when fed by its contract (BGR for AdaFace and
  FaceX-Zoo): the contract travels with the model."""
  make, kwargs, contract, made_by = SOURCES[case]
  rng, _ = fresh_rng()
  arrays = make(rng)
  source = _write(tmp_path, 'model.pth', arrays, **kwargs)
  lines = []
  record = import_model.import_model(
      source, str(tmp_path / 'run'), license='non-commercial research only',
      log=lines.append)
  assert record['made_by'].startswith(made_by)
  assert record['parity']['min_cosine'] >= 0.9999
  assert record['license'] == 'non-commercial research only'
  assert record['input'] == contract._asdict()
  assert len(record['sha256']) == 64 and record['bytes'] == os.path.getsize(
      source)
  assert any('parity on 16 faces of random pixels' in x for x in lines)
  assert run_dir.imported(str(tmp_path / 'run')) == json.loads(
      json.dumps(record))
  model = trained_run.open_model(str(tmp_path / 'run'))
  assert model.contract == contract and model.step == 0
  faces = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
  imported = torch_import.load(source)
  want = torch_import.reference(
      imported, images.normalize(faces.astype(np.float64), contract))
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = model.embed(faces)
  assert (got * want).sum(1).min() > 0.9999


def test_the_record_and_refusals(tmp_path):
  """A non-empty workdir, a bare face.evoLVe state dict without a stated
  contract, an MXNet .params without its symbol file and a backbone that
  does not reproduce its source are refused naming why; no run directory
  is left behind."""
  rng, _ = fresh_rng()
  source = _write(tmp_path, 'backbone.pth', released_nets.arcface_iresnet(rng))
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(FileExistsError, match='is not empty: import into a '
                     'new --workdir'):
    import_model.import_model(source, str(tmp_path / 'full'), log=id)
  bare = _write(tmp_path, 'bare.pth', released_nets.evolve_ir(rng))
  with pytest.raises(ValueError, match=r'input contract is unknown .*give '
                     '--channels, --center and --scale'):
    import_model.import_model(bare, str(tmp_path / 'a'), log=id)
  record = import_model.import_model(bare, str(tmp_path / 'b'), log=id,
                                     channels='BGR', center=127.5, scale=128)
  assert record['input'] == {'channels': 'BGR', 'center': 127.5,
                             'scale': 128.0}
  params = tmp_path / 'model-0000.params'
  params.write_bytes((0x112).to_bytes(8, 'little') + bytes(16))
  with pytest.raises(ValueError, match=r'its symbol file .*model-symbol\.json '
                     'is not there'):
    import_model.import_model(str(params), str(tmp_path / 'c'), log=id)
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'c').exists()


def test_a_backbone_that_does_not_reproduce_its_source_is_not_written(
    tmp_path, monkeypatch):
  """A mapping fault (here the linear's rows left in PyTorch's (C, H, W)
  order) shows as parity far below 0.9999, and nothing is written."""
  rng, _ = fresh_rng()
  source = _write(tmp_path, 'backbone.pth', released_nets.arcface_iresnet(rng))
  real = torch_layouts._converted  # noqa: SLF001 (a fault injected)

  def wrong_flatten(sd, src, kind):
    return real(sd, src, 'dense' if kind == 'dense_nchw' else kind)

  monkeypatch.setattr(torch_layouts, '_converted', wrong_flatten)
  with pytest.raises(ValueError, match=r'does not reproduce the source '
                     r'\(minimum cosine -?\d\.\d+ < 0\.9999\); nothing was '
                     'written'):
    import_model.import_model(source, str(tmp_path / 'run'), log=id)
  assert not (tmp_path / 'run').exists()
  assert not list(tmp_path.glob('run.partial-*'))


def test_command_line(tmp_path):
  rng, _ = fresh_rng()
  source = _write(tmp_path, 'backbone.pth', released_nets.arcface_iresnet(rng))
  run = subprocess.run(
      [sys.executable, '-m', 'npcface_jax.import_model', source,
       f'--workdir={tmp_path / "run"}', '--license=CC BY-NC 4.0'],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr
  assert 'imported into' in run.stdout and 'CC BY-NC 4.0' in run.stdout
  run = subprocess.run(
      [sys.executable, '-m', 'npcface_jax.import_model', source,
       f'--workdir={tmp_path / "run"}'], capture_output=True, text=True,
      timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 1 and 'is not empty' in run.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(*args, timeout=600):
  run = subprocess.run([sys.executable, '-m', *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


def _orl_and_adaface(tmp_path):
  """(ORL's pairs .bin in the shared folder, an AdaFace-style .ckpt, the
  rng); skips where the shared faces are absent."""
  bin_path = SHARED_DATA / 'orl_bin' / 'orl_test.bin'
  if not bin_path.is_file():
    pytest.skip(f'{bin_path} not found: the shared test faces are absent')
  rng, _ = fresh_rng()
  return bin_path, _write(tmp_path, 'adaface.ckpt', _adaface(rng),
                          wrapper='lightning'), rng


@pytest.mark.slow
def test_an_imported_run_evaluates_exports_and_finetunes(tmp_path):
  """An AdaFace-style import (BGR, /127.5) is evaluated on ORL pairs (the
  shared folder's .bin), verifies two faces at that evaluation's
  threshold, is exported to ONNX with its contract inside the
  graph and the card naming the licence and the source, and fine-tuned by
  configs/finetune.py:RUN (its backbone, options and contract taken from
  the run) for a few steps on synthetic faces."""
  bin_path, source, rng = _orl_and_adaface(tmp_path)
  run = str(tmp_path / 'run')
  import_model.import_model(source, run, license='research only', log=id)
  _command('npcface_jax.evaluate', f'--workdir={run}',
           f'--targets={bin_path}')
  results = json.loads((tmp_path / 'run' / 'eval' / 'step_0' /
                        'results.json').read_text())
  assert 0.3 < results['targets']['orl_test']['accuracy'] <= 1.0
  faces = tmp_path / 'faces'
  faces.mkdir()
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
        faces / f'{i}.png')
  said = json.loads(_command('npcface_jax.verify', f'--workdir={run}',
                             '--aligned', '--json', str(faces / '0.png'),
                             str(faces / '1.png')))
  assert 'orl_test' in json.dumps(said)  # its threshold: the evaluated set
  _command('npcface_jax.export', f'--workdir={run}', '--formats=onnx',
           f'--images={faces}', f'--out={tmp_path / "export"}')
  card = json.loads((tmp_path / 'export' / 'model_card.json').read_text())
  assert 'BGR' in card['input']['normalisation']
  assert card['imported']['license'] == 'research only'
  _command('npcface_jax.main', f'--config=configs/finetune.py:{run}',
           f'--workdir={tmp_path / "tuned"}', '--config.dataset=synthetic',
           '--config.synthetic.image_size=112',
           '--config.synthetic.num_classes=10', '--config.batch_size=16',
           '--config.synthetic.epoch_examples=32',
           '--config.synthetic.heldout_identities=0',
           '--config.num_train_steps=3', '--config.freeze_backbone_steps=1',
           '--config.log_every_steps=1', '--config.eval_every_steps=0',
           '--config.checkpoint_every_steps=3')
  tuned = trained_run.open_model(str(tmp_path / 'tuned'))
  assert tuned.step == 3 and tuned.contract == torch_import.ADAFACE


@pytest.mark.slow
def test_evaluate_reproduces_the_sources_accuracy(tmp_path):
  """On ORL's aligned pairs (the shared folder's .bin), the imported run's
  10-fold accuracy through evaluate's embedding step equals the accuracy
  of the source's own computation (its float64 forward) on the same
  decoded faces, to 0.1 point; the issue's bar for a real release."""
  bin_path, source, _ = _orl_and_adaface(tmp_path)
  import_model.import_model(source, str(tmp_path / 'run'), log=id)
  model = trained_run.open_model(str(tmp_path / 'run'))
  pairs = bin_format.load_pairs(bin_path, 112)
  ours = model.embed(pairs.images)
  theirs = torch_import.reference(torch_import.load(source), images.normalize(
      pairs.images.astype(np.float64), model.contract))
  acc = [protocols.verification_accuracy(protocols.pair_similarities(e),
                                         pairs.issame)['accuracy']
         for e in (ours, theirs)]
  print(f"imported {acc[0]:.5f}, source {acc[1]:.5f}")
  assert 0.5 < acc[0] and abs(acc[0] - acc[1]) <= 0.001, acc
