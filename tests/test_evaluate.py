"""python -m npcface_jax.evaluate on a trained demo checkpoint: the ORL
fixture .bin end to end, the numbers it writes recomputed from the features
it exports, the embedding step against the trained state, step selection,
results that accumulate, and errors that name the fix."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo
from npcface_jax import models
from npcface_jax.common import arrays
from npcface_jax import evaluate
from npcface_jax.evaluation import embedding_step, protocols
from npcface_jax.faces import alignment, images
from npcface_jax.training import loop, setup
from tests import tiny_backbone
from tests.conftest import NUM_DEVICES
from tests.helpers import SHARED_DATA

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORL_BIN = SHARED_DATA / 'orl_bin' / 'orl_test.bin'


def _demo_config(**overrides):
  c = demo.get_config()
  c.num_train_steps = 12
  c.checkpoint_every_steps = 6
  c.synthetic.heldout_identities = 0
  c.eval_at_start = False
  c.log_every_steps = 6
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A demo run of 12 steps (checkpoints at steps 1, 6 and 12) with the
  tests' small backbone, in this module's tests and its commands (what
  evaluation does with a checkpoint does not depend on the backbone;
  test_models covers each one's inference)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models, 'from_config', tiny_backbone.create_model)
    workdir = tmp_path_factory.mktemp('demo')
    outcome = loop.train_and_evaluate(_demo_config(), str(workdir))
    yield workdir, outcome.state


def _evaluate(*args, devices=NUM_DEVICES):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES=str(devices), TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'tests.tiny_backbone',
                         'evaluate', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_orl_bin_end_to_end(trained):
  if not ORL_BIN.is_file():
    pytest.skip(f'{ORL_BIN} not found (shared test data absent)')
  workdir, state = trained
  proc = _evaluate(f'--workdir={workdir}', f'--targets={ORL_BIN}', '--flip',
                   '--export_features')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'orl_test' in proc.stdout and 'accuracy %' in proc.stdout
  out = workdir / 'eval' / 'step_12_flip'
  record = json.loads((out / 'results.json').read_text())
  assert record == json.loads((workdir / 'eval' / 'results.json').read_text())
  assert record['step'] == 12 and record['flip'] is True
  result = record['targets']['orl_test']
  assert result['num_pairs'] == 284

  # The numbers are the protocols' on the exported features...
  features = np.load(out / 'features' / 'orl_test.npy')
  assert features.shape == (568, 128) and features.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
  from npcface_jax.evaluation import bin_format  # noqa: PLC0415
  _, issame = bin_format.load_bin(ORL_BIN)
  want = protocols.verification_report(
      protocols.pair_similarities(features), issame)
  for key in ('accuracy', 'accuracy_std', 'auc', 'fold_accuracies'):
    assert result[key] == want[key], key
  assert [t['far'] for t in result['tar_at_far']] == [0.1, 0.01]
  assert [t['tar'] for t in result['tar_at_far']] == [
      t['tar'] for t in want['tar_at_far']]
  # ...and the features are the trained network's, flip included.
  images = bin_format.decode_pairs(bin_format.load_bin(ORL_BIN)[0],
                                   48)
  embedder = embedding_step.Embedder(models.from_config(_demo_config(),
                                                        train_dtype=False),
                                     arrays.make_mesh(1), 64, flip=True)
  np.testing.assert_allclose(
      embedder(setup.eval_variables(state), images), features, atol=2e-6)
  with Image.open(out / result['roc']) as png:
    assert png.format == 'PNG' and png.size == (720, 540)


@pytest.mark.slow
def test_step_selection_and_accumulating_targets(trained, tmp_path):
  if not ORL_BIN.is_file():
    pytest.skip(f'{ORL_BIN} not found (shared test data absent)')
  workdir, _ = trained
  second = tmp_path / 'second.bin'
  second.write_bytes(ORL_BIN.read_bytes())
  # The older checkpoint, one target and then another.
  for target in (ORL_BIN, second):
    evaluate.evaluate_run(str(workdir), targets=[str(target)], step=6,
                          log=lambda *a: None)
  record = json.loads(
      (workdir / 'eval' / 'step_6' / 'results.json').read_text())
  assert record['step'] == 6 and record['flip'] is False
  assert set(record['targets']) == {'orl_test', 'second'}
  assert record['targets']['orl_test']['accuracy'] == (
      record['targets']['second']['accuracy'])


@pytest.mark.slow
def test_corrupt_earlier_results_are_moved_aside(trained, caplog):
  """A damaged eval/step_N/results.json neither crashes the evaluation nor
  is lost: it is moved aside, named in a warning, and a fresh record is
  written."""
  if not ORL_BIN.is_file():
    pytest.skip(f'{ORL_BIN} not found (shared test data absent)')
  workdir, _ = trained
  out = workdir / 'eval' / 'step_1'
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.json').write_bytes(b'{"step": 1, "targets": {"lf')
  with caplog.at_level('WARNING'):
    evaluate.evaluate_run(str(workdir), targets=[str(ORL_BIN)], step=1,
                          log=lambda *a: None)
  (aside,) = out.glob('results.json.corrupt-*')
  assert aside.read_bytes() == b'{"step": 1, "targets": {"lf'
  record = json.loads((out / 'results.json').read_text())
  assert list(record['targets']) == ['orl_test']
  assert any(str(aside) in r.getMessage() and 'not valid JSON' in
             r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.slow
def test_errors_name_the_fix(trained, tmp_path):
  workdir, _ = trained
  proc = _evaluate(f'--workdir={workdir}', '--step=5', '--targets=x.bin',
                   devices=1)
  assert proc.returncode != 0
  assert 'x.bin does not exist' in proc.stderr
  with pytest.raises(FileNotFoundError, match='run.json not found'):
    evaluate.evaluate_run(str(tmp_path), targets=[str(ORL_BIN)])
  with pytest.raises(FileNotFoundError,
                     match=r'no checkpoint of step 5 .* \[1, 6, 12\]'):
    evaluate.evaluate_run(str(workdir), targets=[str(ORL_BIN)], step=5)
  with pytest.raises(ValueError, match='nothing to evaluate'):
    evaluate.evaluate_run(str(workdir))
  with pytest.raises(ValueError, match='go together'):
    evaluate.evaluate_run(str(workdir), probes=str(tmp_path))


def test_format_table():
  results = {
      'lfw': {'accuracy': 0.995, 'accuracy_std': 0.003, 'auc': 0.9991,
              'num_pairs': 6000,
              'tar_at_far': [{'far': 1e-1, 'tar': 1.0},
                             {'far': 1e-3, 'tar': 0.98}]},
      'megaface': {'rank1': 0.9812, 'tar_at_far': [{'far': 1e-6,
                                                    'tar': 0.9833}]}}
  lines = evaluate.format_table(results).splitlines()
  assert lines[0].split() == ['target', 'pairs', 'accuracy', '%', 'AUC',
                              'TAR@1e-3', 'TAR@1e-4', 'TAR@1e-5', 'TAR@1e-6',
                              'rank-1']
  assert lines[1].split() == ['lfw', '6000', '99.50', '+-', '0.30', '0.9991',
                              '98.00', '-', '-', '-', '-']
  assert lines[2].split() == ['megaface', '-', '-', '-', '-', '-', '-',
                              '98.33', '98.12']
  assert len(lines) == 3  # results from before the folds were recorded


def test_format_table_says_the_folds():
  """A line after the table: each pair set's folds, those without (older
  results, other kinds, a rule that is no rule) left out."""
  pair = {'accuracy': 0.85, 'accuracy_std': 0.03, 'auc': 0.934,
          'num_pairs': 1000, 'tar_at_far': []}
  results = {
      'lfw': dict(pair, fold_rule='file order', num_folds=10),
      'devtest': dict(pair, fold_rule='label-balanced', num_folds=10),
      'sets4': dict(pair, fold_rule='declared', num_folds=4),
      'old': pair, 'odd': dict(pair, fold_rule='shuffled', num_folds=10),
      'megaface': {'rank1': 0.98, 'tar_at_far': []}}
  lines = evaluate.format_table(results).splitlines()
  assert len(lines) == 8
  assert lines[-1] == ('accuracy folds: lfw 10 folds in file order; '
                       'devtest 10 label-balanced folds; sets4 4 declared '
                       'folds')
  assert jax.device_count() == NUM_DEVICES


def _face(rng, size=64):
  """A random RGB face-sized picture with landmarks near the template."""
  pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  return Image.fromarray(pixels), alignment.template(size) + rng.uniform(
      -2, 2, (5, 2))


@pytest.mark.slow
def test_ijb_and_identification_sets_end_to_end(trained, tmp_path):
  """A tiny IJB release folder (one unreadable image) and a MegaFace-style
  probe/distractor pair of folders (one corrupt distractor), evaluated from
  the checkpoint; the written numbers recomputed from the exported features
  with the protocols."""
  from npcface_jax.evaluation import ijb, ranking  # noqa: PLC0415
  rng, seed = np.random.default_rng(0), 0
  workdir, _ = trained
  root = tmp_path / 'IJBC'
  (root / 'loose_crop').mkdir(parents=True)
  (root / 'meta').mkdir()
  lines, lmk_lines = [], []
  for i in range(12):  # 6 templates of 2 images, media = image // 3
    image, lmk = _face(rng)
    image.save(root / 'loose_crop' / f'{i}.jpg')
    lines.append(f'{i}.jpg {i // 2} {i // 3}')
    lmk_lines.append(f'{i}.jpg ' + ' '.join(f'{v:.3f}' for v in lmk.ravel())
                     + f' {rng.uniform(0.5, 1):.3f}')
  (root / 'loose_crop' / '4.jpg').write_bytes(b'not a jpeg')
  (root / 'meta' / 'ijbc_face_tid_mid.txt').write_text('\n'.join(lines))
  (root / 'meta' / 'ijbc_name_5pts_score.txt').write_text(
      '\n'.join(lmk_lines))
  pairs = [(a, b, int(a % 2 == b % 2)) for a in range(6) for b in range(a)]
  (root / 'meta' / 'ijbc_template_pair_label.txt').write_text(
      '\n'.join(f'{a} {b} {y}' for a, b, y in pairs))

  probes, distractors = tmp_path / 'facescrub', tmp_path / 'megaface'
  for person in ('ann', 'bob', 'cy'):
    (probes / person).mkdir(parents=True)
    for k in range(3):
      _face(rng)[0].save(probes / person / f'{k}.png')
  (distractors / 'a' / 'b').mkdir(parents=True)
  for k in range(40):
    _face(rng)[0].save(distractors / ('a' if k % 2 else 'a/b') / f'{k}.jpg')
  (distractors / 'a' / 'broken.jpg').write_bytes(b'\xff\xd8 broken')
  (probes / 'bad\nname').mkdir()  # cannot be a class name: listed, skipped
  _face(rng)[0].save(probes / 'bad\nname' / '0.png')

  record = evaluate.evaluate_run(
      str(workdir), ijb=[str(root)], probes=str(probes),
      distractors=str(distractors), export_features=True, face_scores=True,
      log=lambda *a: None)
  out = workdir / 'eval' / 'step_12'
  ijbc = record['targets']['ijbc']
  assert ijbc['kind'] == 'ijb' and ijbc['num_pairs'] == 15
  assert len(ijbc['skipped_images']) == 1, ijbc['skipped_images']
  assert ijbc['skipped_images'][0].startswith('4.jpg: not an image: Pillow '
                                              'recognises none of JPEG, PNG')
  meta = ijb.load_meta(root)
  feats = np.load(out / 'features' / 'ijbc.npy')
  want = ijb.evaluate(feats, meta, use_face_scores=True, skipped=[4])
  rows = np.load(out / 'features' / 'ijbc_rows.npy')  # whose each row is
  assert len(rows) == len(feats) and 4 not in rows
  assert list(rows) == sorted(rows) and rows[-1] == len(feats)
  assert ijbc['tar_at_far'] == want['tar_at_far'], f'seed {seed}'
  assert ijbc['auc'] == want['auc']
  assert (out / 'roc_ijbc.png').is_file()

  mega = record['targets']['facescrub']
  assert mega['kind'] == 'identification'
  assert mega['num_distractors'] == 40 and mega['trials'] == 3 * 3 * 2
  assert len(mega['skipped_images']) == 2, mega['skipped_images']
  assert mega['skipped_images'][0].startswith('bad\nname/0.png: bad identity '
                                              'name'), mega['skipped_images']
  assert mega['skipped_images'][1].endswith(
      'broken.jpg: not an image: Pillow recognises none of '
      + ', '.join(images.FORMATS) + ' in it'), mega['skipped_images']
  want = ranking.megaface(
      np.load(out / 'features' / 'facescrub_probes.npy'),
      np.load(out / 'features' / 'facescrub_labels.npy'),
      np.load(out / 'features' / 'facescrub_distractors.npy'),
      fars=(0.1, 0.01))
  assert mega['rank1'] == want['rank1']
  assert mega['tar_at_far'] == want['tar_at_far']
  assert json.loads((out / 'results.json').read_text())['targets'].keys() >= {
      'ijbc', 'facescrub'}


@pytest.mark.slow
def test_hostile_and_damaged_bins_through_the_command(trained, tmp_path):
  """The .bin that crashed the old reader (SIGSEGV) is refused with a usage
  error naming it; a .bin with one undecodable image is evaluated without
  that pair, which results.json names."""
  if not ORL_BIN.is_file():
    pytest.skip(f'{ORL_BIN} not found (shared test data absent)')
  from npcface_jax.evaluation import bin_format  # noqa: PLC0415
  from tests.test_verification_bin import forged_dtype_bin  # noqa: PLC0415
  workdir, _ = trained
  forged = tmp_path / 'forged.bin'
  forged.write_bytes(forged_dtype_bin())
  proc = _evaluate(f'--workdir={workdir}', f'--targets={forged}', devices=1)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert f'{forged} is not an insightface verification .bin' in proc.stderr
  bins, issame = bin_format.load_bin(ORL_BIN)
  bins[5] = bins[5][:100]  # pair 2's second image, truncated
  damaged = tmp_path / 'damaged.bin'
  bin_format.save_bin(damaged, bins, issame)
  record = evaluate.evaluate_run(str(workdir), targets=[str(damaged)],
                                 log=lambda *a: None)
  result = record['targets']['damaged']
  assert result['num_pairs'] == len(issame) - 1
  assert len(result['skipped_pairs']) == 1
  assert result['skipped_pairs'][0].startswith('pair 2: image 5: ')
