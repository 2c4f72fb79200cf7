"""verify, embed and identify on a run, and the one way from a photo to an
embedding: the same ORL photo gives the same embedding through embed,
verify, identify and the evaluation command's folder input.

The run is at its initial state, written as training writes it (run.json
and a checkpoint): what is checked is that every path computes the same
thing, which needs no training. In-process tests use the tests' TinyNet
(it compiles in a second); the command lines run the demo's
MobileFaceNet."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from PIL import Image

from configs import demo
from npcface_jax import (embed as embed_command, evaluate, identify, models,
                         verify)
from npcface_jax.common import arrays, checkpoint, jsonfile
from npcface_jax.evaluation import protocols
from npcface_jax.faces import detection, images
from npcface_jax.serving import run_dir, trained_run
from npcface_jax.training import data_source, setup
from tests import tiny_backbone
from tests.conftest import NUM_DEVICES
from tests.helpers import SHARED_DATA, fresh_rng
from tests.test_run_log import bare_env, startup_lines

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORL = SHARED_DATA / 'orl_faces'
PHOTOS = [f's{p}/{i}.pgm' for p in (31, 32) for i in (1, 2, 3)]


def _orl():
  if not (ORL / 's31' / '1.pgm').is_file():
    pytest.skip(f'ORL faces not found at {ORL} (shared test data absent)')
  return ORL


def write_run(workdir, calibrate=False, **overrides) -> str:
  """A run directory at step 0 (run.json, one checkpoint), as training
  leaves it; ``calibrate``: with BatchNorm statistics of the data."""
  os.makedirs(workdir, exist_ok=True)
  c = demo.get_config()
  c.synthetic.heldout_identities = 0
  c.eval_batch_size = 16
  for key, value in overrides.items():
    setattr(c, key, value)
  mesh = arrays.make_mesh(1)
  data = data_source.open_data(c, mesh)
  task = setup.make_task(c, mesh, data)
  run_dir.write_run_info(str(workdir), c, data, task.head.options)
  checkpoints = checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=1, every_steps=1,
      asynchronous=False)
  state = setup.init_state(task)
  if calibrate:
    state = _calibrated(task, state, data)
  checkpoints.save(0, state, data.open(None).state(), force=True)
  checkpoints.close()
  return str(workdir)


def _calibrated(task, state, data):
  """The state with the BatchNorm statistics of a batch of the data, as
  training leaves them (BatchNorm's momentum 0.9, 60 updates): at the
  initial (0, 1) every face embeds to nearly the same direction."""
  images = data.open(None).next_local()['image']
  params = state.params['backbone']

  @jax.jit
  def update(stats):
    _, new = task.model.apply({'params': params, 'batch_stats': stats},
                              images, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
    return new['batch_stats']

  stats = state.batch_stats
  for _ in range(60):
    stats = update(stats)
  return state.replace(batch_stats=stats)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models, 'from_config', tiny_backbone.create_model)
    workdir = write_run(tmp_path_factory.mktemp('run'))
    return trained_run.open_model(workdir)


@pytest.fixture(scope='module')
def photos(model):
  """The ORL photos' embeddings through trained_run.embed_images, the path
  of every command."""
  orl = _orl()
  got = trained_run.embed_images(model, PHOTOS, root=str(orl), progress=False)
  assert got.kept == list(range(len(PHOTOS))) and not got.skipped
  return got


def _results(workdir, step=0, flip=False, targets=None):
  path = os.path.join(workdir, 'eval', f'step_{step}' + '_flip' * flip,
                      'results.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  targets = targets or {'lfw': {
      'accuracy': 0.9, 'accuracy_std': 0.01, 'threshold': 0.31,
      'tar_at_far': [{'far': 1e-3, 'tar': 0.8, 'threshold': 0.42,
                      'false_accepts': 2}]}}
  jsonfile.write_object(path, {'step': step, 'flip': flip,
                               'targets': targets})


# --- The threshold -----------------------------------------------------------

def test_threshold_from_the_runs_own_results(tmp_path):
  _results(tmp_path)
  t = trained_run.find_threshold(str(tmp_path), 0)
  assert (t.value, t.flip) == (0.31, False)
  assert '10-fold threshold of lfw' in t.source
  t = trained_run.find_threshold(str(tmp_path), 0, far=1e-3)
  assert t.value == 0.42 and 'FAR 0.001 on lfw: TAR 80.00%' in t.source
  with pytest.raises(ValueError, match='no threshold at FAR 1e-05.*0.001'):
    trained_run.find_threshold(str(tmp_path), 0, far=1e-5)
  with pytest.raises(ValueError, match='no evaluation results for step 7'
                     '.*npcface_jax.evaluate.*--threshold'):
    trained_run.find_threshold(str(tmp_path), 7)


def test_threshold_says_its_folds(tmp_path):
  """Results that record their folds: the threshold's source says them
  (results from before read as the 10-fold threshold they were)."""
  _results(tmp_path, targets={'devtest': {
      'threshold': 0.3, 'fold_rule': 'label-balanced', 'num_folds': 10}})
  _results(tmp_path, step=1, targets={'sets4': {
      'threshold': 0.2, 'fold_rule': 'declared', 'num_folds': 4}})
  t = trained_run.find_threshold(str(tmp_path), 0)
  assert t.source.startswith('the 10-fold threshold of devtest (10 '
                             'label-balanced folds; eval/step_0/'), t.source
  t = trained_run.find_threshold(str(tmp_path), 1)
  assert t.source.startswith('the 4-fold threshold of sets4 (4 declared '
                             'folds; eval/step_1/'), t.source


def test_threshold_prefers_the_flip_results_and_names_ambiguity(tmp_path):
  two = {n: {'threshold': t, 'accuracy': 1.0, 'accuracy_std': 0.0}
         for n, t in (('lfw', 0.2), ('agedb', 0.25))}
  _results(tmp_path, flip=True, targets=two)
  _results(tmp_path)
  with pytest.raises(ValueError, match='2 sets.*agedb, lfw.*--target'):
    trained_run.find_threshold(str(tmp_path), 0)
  t = trained_run.find_threshold(str(tmp_path), 0, target='agedb')
  assert (t.value, t.flip) == (0.25, True)
  assert trained_run.find_threshold(str(tmp_path), 0, flip=False).value == 0.31
  with pytest.raises(ValueError, match="no set 'cfp'"):
    trained_run.find_threshold(str(tmp_path), 0, target='cfp')


# --- The open-set threshold of a gallery ------------------------------------

def _people(rng, count, photos, dim=64):
  """Synthetic embeddings (count, photos, dim): unit rows around each
  person's random direction (same-person cosine about 0.5, impostors
  about N(0, 1/8))."""
  centres = rng.normal(size=(count, 1, dim))
  centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
  x = centres + rng.normal(size=(count, photos, dim)) / np.sqrt(dim)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _roc_results(workdir, rng, people=300, photos=4, name='synthetic'):
  """results.json as evaluate writes it for every pair among ``people`` x
  ``photos`` synthetic faces (about 720,000 impostor pairs by default);
  returns the impostor similarities, sorted from the highest."""
  x = _people(rng, people, photos).reshape(people * photos, -1)
  label = np.repeat(np.arange(people), photos)
  i, j = np.triu_indices(len(x), 1)
  sim, same = (x @ x.T)[i, j].astype(np.float64), label[i] == label[j]
  _results(workdir, targets={name: {
      'kind': 'pairs', 'tar_at_far': protocols.tar_at_far(sim, same),
      'roc_curve': protocols.roc_points(sim, same)}})
  return np.sort(sim[~same])[::-1]


def test_open_set_threshold_grows_stricter_with_the_gallery(tmp_path):
  """The threshold for N enrolled is the ROC's at pair FAR FPIR / N: never
  more accepting than NumPy's impostor quantile there, stricter as N
  grows; past the lowest FAR the pairs measure, the highest impostor
  score with a warning that names the fix. --target picks a set."""
  rng, seed = fresh_rng()
  imp = _roc_results(tmp_path, rng, people=100, photos=4)  # 79,200
  roc = trained_run.stored_roc(str(tmp_path), 0)
  assert (roc.target, roc.rows, roc.flip) == ('synthetic', False, False)
  values = []
  for n in (1, 10, 100, 500):
    t = trained_run.gallery_threshold(roc, 0.01, n)
    far = 0.01 / n
    exact = imp[int(np.floor(far * imp.size))]
    assert t.value >= exact and np.mean(imp > t.value) <= far, seed
    assert t.warning is None and t.calibration['pair_far'] == far
    assert (f'FPIR 0.01 with {n} enrolled -> pair FAR {far:.3g} (FPIR / '
            f'{n}) on synthetic: its ROC point at FAR') in t.source
    values.append(t.value)
  assert values == sorted(values) and len(set(values)) == 4, (seed, values)
  t = trained_run.gallery_threshold(roc, 0.01, 10_000)  # FAR 1e-6 < 1/79,200
  assert t.value == imp[0] and t.value > values[-1], seed
  assert not t.calibration['resolved'] and t.calibration['roc_far'] == 0
  assert t.warning.startswith(f'synthetic measures pair FAR down to '
                              f'{1 / imp.size:.3g} only, above the 1e-06')
  assert 'more impostor pairs, raise --fpir, or pass --threshold' in (
      t.warning)
  (tmp_path / 'two').mkdir()
  _roc_results(tmp_path / 'two', rng, people=20, photos=2, name='a')
  record = jsonfile.read_object(tmp_path / 'two/eval/step_0/results.json')
  record['targets']['b'] = record['targets']['a']
  jsonfile.write_object(tmp_path / 'two/eval/step_0/results.json', record)
  with pytest.raises(ValueError, match=r'2 sets with an ROC \(a, b\).*'
                     '--target'):
    trained_run.stored_roc(str(tmp_path / 'two'), 0)
  assert trained_run.stored_roc(str(tmp_path / 'two'), 0, target='b').target


def test_open_set_threshold_from_older_results(tmp_path):
  """results.json from before the ROC kept its thresholds: tar_at_far's
  rows, said so; with neither, the message names the fix."""
  _results(tmp_path)  # the ROC's points absent; FAR 1e-3 -> 0.42
  roc = trained_run.stored_roc(str(tmp_path), 0)
  assert roc.rows and roc.far.tolist() == [1e-3]
  t = trained_run.gallery_threshold(roc, 0.1, 10)
  assert t.value == 0.42 and t.warning is None
  assert 'keep no ROC thresholds, only tar_at_far' in t.source
  t = trained_run.gallery_threshold(roc, 0.01, 100)
  assert t.value == 0.42 and 'Evaluate again, on a set with more' in (
      t.warning)
  _results(tmp_path, targets={'lfw': {'threshold': 0.3, 'roc_curve': {
      'far': [0.0, 1.0], 'tar': [0.0, 1.0]}}})
  with pytest.raises(ValueError, match='no ROC with thresholds.*evaluate '
                     '--workdir=.*--step=0 again.*--threshold or --far'):
    trained_run.stored_roc(str(tmp_path), 0)


@pytest.mark.parametrize('roc', [
    {'far': [0, 0.5, 1], 'tar': [0, 1], 'threshold': [0.9, 0.5, None]},
    {'far': 'x', 'tar': None, 'threshold': {}},
    {'far': [True, 2.0, float('nan')], 'tar': [0, 1, 1],
     'threshold': [0.9, 0.0, 0.0]},
    {'far': [[0]], 'tar': [[0]], 'threshold': [['0.5']]},
    [], 'roc'])
def test_a_damaged_roc_is_left_out_not_a_crash(tmp_path, roc):
  """Only numeric points with a FAR in [0, 1] are read; a set with none
  (and no tar_at_far rows) is not a set to calibrate on."""
  _results(tmp_path, targets={'lfw': {'roc_curve': roc, 'tar_at_far': [
      {'far': 'x'}, 7]}})
  with pytest.raises(ValueError, match='no ROC with thresholds'):
    trained_run.stored_roc(str(tmp_path), 0)


@pytest.mark.parametrize('fpir', [0.05, 0.2])
def test_calibrated_threshold_keeps_strangers_near_the_target_fpir(fpir):
  """200 people enrolled (one photo each, synthetic embeddings), 2,000
  probes of people not enrolled: at the threshold identify takes from the
  run's results for FPIR f (pair FAR f / 200), the share of strangers
  given a name stays near f (about 1 - (1 - f / 200)^200), for several
  seeds; the pairs threshold at FAR f, not scaled for the gallery, names
  most of them. Mates are still named: the top template, above it."""
  rng, seed = fresh_rng()
  rates = []
  for trial in range(4):
    with tempfile.TemporaryDirectory() as workdir:
      _roc_results(workdir, rng)
      roc = trained_run.stored_roc(workdir, 0)
    gallery = _people(rng, 200, 2)
    templates, names = gallery[:, 0], [f'p{i}' for i in range(200)]
    strangers = _people(rng, 1000, 2).reshape(2000, -1)
    rate = {}
    for n in (200, 1):
      t = trained_run.gallery_threshold(roc, fpir, n)
      got = identify.answers(strangers @ templates.T, names, t.value)
      rate[n] = np.mean([a['answer'] != 'unknown' for a in got])
    mates = identify.answers(gallery[:, 1] @ templates.T, names, t.value)
    named = np.mean([a['answer'] == n for a, n in zip(mates, names)])
    msg = f'seed {seed}, trial {trial}: {rate}, mates named {named}'
    assert fpir / 2 <= rate[200] <= fpir * 1.6, msg
    assert rate[1] > min(0.9, 20 * fpir) and named > 0.3, msg
    rates.append(rate[200])
  assert 0.7 * fpir <= np.mean(rates) <= 1.25 * fpir, (seed, rates)


def test_sources_folder_list_and_paths(tmp_path):
  (tmp_path / 'a' / 'b').mkdir(parents=True)
  for name in ('a/1.jpg', 'a/b/2.png', 'a/notes.txt'):
    (tmp_path / name).write_bytes(b'x')
  assert trained_run.list_sources([str(tmp_path / 'a')]) == (
      str(tmp_path / 'a'), ['1.jpg', os.path.join('b', '2.png')])
  (tmp_path / 'list.txt').write_text('# faces\na/1.jpg\n\n a/b/2.png \n')
  assert trained_run.list_sources([str(tmp_path / 'list.txt')]) == (
      str(tmp_path), ['a/1.jpg', 'a/b/2.png'])
  assert trained_run.list_sources(['x.jpg', 'y.jpg']) == (None,
                                                         ['x.jpg', 'y.jpg'])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='holds no image files'):
    trained_run.list_sources([str(tmp_path / 'empty')])


def test_pairs_file_errors_name_the_line(tmp_path):
  path = tmp_path / 'pairs.txt'
  path.write_text('a.jpg b.jpg 1\nc.jpg d.jpg\n')
  assert verify.read_pairs(str(path)) == (
      [('a.jpg', 'b.jpg', True), ('c.jpg', 'd.jpg', None)], str(tmp_path))
  path.write_text('a.jpg b.jpg 1\na.jpg b.jpg yes\n')
  with pytest.raises(ValueError, match="line 2: 'a.jpg b.jpg yes' is not a "
                     'pair'):
    verify.read_pairs(str(path))


# --- Same photo, same embedding ----------------------------------------------

def test_embed_writes_rows_names_skips_and_landmarks(model, photos, tmp_path):
  src = tmp_path / 'src'
  for name in PHOTOS:
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).symlink_to(ORL / name)
  Image.new('RGB', (64, 64), (128, 128, 128)).save(src / 's31' / 'blank.png')
  out = tmp_path / 'out'
  record = embed_command.embed(model, [str(src)], str(out), progress=False)
  vectors = np.load(out / 'embeddings.npy')
  assert record['names'] == PHOTOS  # sorted, blank.png left out
  assert [s['name'] for s in record['skipped']] == ['s31/blank.png']
  assert record['skipped'][0]['reason'].startswith('no face')
  np.testing.assert_allclose(vectors, photos.embeddings, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
  # The landmarks file is data_prep's --landmarks format: reading it and
  # aligning on it gives the very pixels detection gave.
  from npcface_jax.faces import alignment  # noqa: PLC0415
  points = alignment.read_landmarks(out / 'landmarks.txt')
  assert sorted(points) == PHOTOS
  for i, name in enumerate(PHOTOS):
    np.testing.assert_array_equal(
        np.reshape(points[name], (5, 2)), photos.landmarks[i])
    again = images.read_image(ORL / name, model.image_size,
                              landmarks=points[name])
    detected = images.read_image(ORL / name, model.image_size,
                                 detector=detection.FaceFinder())
    np.testing.assert_array_equal(again, detected)
  with pytest.raises(ValueError, match='--overwrite'):
    embed_command.embed(model, [str(src)], str(out), progress=False)


def test_verify_scores_are_the_embeddings_cosines(model, photos):
  pairs = [(PHOTOS[0], p, None) for p in PHOTOS[1:]] + [
      (PHOTOS[0], 'missing.jpg', True)]
  threshold = trained_run.Threshold(0.5, 'given', False)
  result = verify.verify(model, threshold, pairs, str(ORL), progress=False)
  e = photos.embeddings
  assert [p['b'] for p in result['pairs']] == PHOTOS[1:]
  np.testing.assert_allclose([p['cosine'] for p in result['pairs']],
                             e[1:] @ e[0], atol=1e-5)
  assert [p['same'] for p in result['pairs']] == list(e[1:] @ e[0] > 0.5)
  assert result['skipped'][0]['name'] == 'missing.jpg'
  assert 'accuracy' not in result  # the labelled pair was skipped
  assert 'cosine' in verify.format_result(result)


def test_evaluate_folder_input_with_detect_gives_the_same(
    model, photos, tmp_path, monkeypatch):
  """The evaluation command's probe folder, --detect: the same rows."""
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  probes, distractors = tmp_path / 'probes', tmp_path / 'distractors'
  for name in PHOTOS:
    (probes / name).parent.mkdir(parents=True, exist_ok=True)
    (probes / name).symlink_to(ORL / name)
  distractors.mkdir()
  (distractors / '1.pgm').symlink_to(ORL / 's33' / '1.pgm')
  evaluate.evaluate_run(model.workdir, probes=str(probes),
                        distractors=str(distractors), detect=True,
                        export_features=True, log=lambda *a: None)
  features = np.load(os.path.join(model.workdir, 'eval', 'step_0',
                                  'features', 'probes_probes.npy'))
  np.testing.assert_allclose(features, photos.embeddings, atol=1e-5)


def test_identify_caches_the_gallery_until_it_changes(model, tmp_path):
  orl = _orl()
  gallery = tmp_path / 'gallery'
  for p in (31, 32, 33):
    (gallery / f's{p}').mkdir(parents=True)
    for i in (1, 2):
      (gallery / f's{p}' / f'{i}.pgm').symlink_to(orl / f's{p}' / f'{i}.pgm')
  read = dict(aligned=True, progress=False)  # crops: no detector, quick
  first = identify.enroll(model, str(gallery), **read)
  assert first['embedded'] == 6 and first['names'] == ['s31', 's32', 's33']
  again = identify.enroll(model, str(gallery), **read)
  assert again['embedded'] == 0
  np.testing.assert_array_equal(again['templates'], first['templates'])
  (gallery / 's33' / '2.pgm').unlink()
  (gallery / 's34').mkdir()
  (gallery / 's34' / '1.pgm').symlink_to(orl / 's34' / '1.pgm')
  (gallery / 's34' / 'bad.png').write_bytes(b'not an image')
  changed = identify.enroll(model, str(gallery), **read)
  assert changed['embedded'] == 2 and changed['names'][-1] == 's34'
  assert changed['images'] == {'s31': 2, 's32': 2, 's33': 1, 's34': 1}
  assert [s['name'] for s in changed['skipped']] == [
      os.path.join('s34', 'bad.png')]
  # A template is the normalised mean of the person's embeddings.
  crops = trained_run.embed_images(
      model, [str(orl / 's31' / f'{i}.pgm') for i in (1, 2)], **read)
  mean = crops.embeddings.mean(0)
  np.testing.assert_allclose(changed['templates'][0],
                             mean / np.linalg.norm(mean), atol=1e-5)
  probes = [str(orl / 's31' / '1.pgm'), str(orl / 's35' / '1.pgm')]
  scores = changed['templates'] @ crops.embeddings[0]
  result = identify.identify(
      model, trained_run.Threshold(float(np.max(scores)) - 1e-4, 'given',
                                 False), changed, probes, top_k=2, **read)
  top = result['probes'][0]['top']
  assert [t['name'] for t in top] == [changed['names'][j] for j in
                                      np.argsort(-scores)[:2]]
  assert result['probes'][0]['answer'] == top[0]['name']
  stranger = result['probes'][1]
  assert stranger['answer'] == 'unknown' or (
      stranger['top'][0]['score'] > result['threshold'])


# --- The command lines -------------------------------------------------------

def _command(name, *args):
  """The command as typed: TensorFlow kept quiet by its own settings only
  (tests/test_run_log.py)."""
  env = bare_env(JAX_NUM_CPU_DEVICES=str(NUM_DEVICES))
  return subprocess.run([sys.executable, '-m', f'npcface_jax.{name}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_embed_and_identify_command_lines(tmp_path):
  """embed and identify as typed, on a MobileFaceNet run: identify's score
  is the cosine of embed's rows, its threshold the run's own (verify's
  command line runs in tests/test_orl_workflow.py)."""
  orl = _orl()
  workdir = write_run(tmp_path / 'run')
  _results(workdir)  # threshold 0.31 and 0.42 at FAR 1e-3, step 0
  a, b = (str(orl / p) for p in PHOTOS[:2])
  proc = _command('embed', f'--workdir={workdir}', a, b, str(tmp_path / 'e'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not startup_lines(proc.stderr), proc.stderr[-3000:]  # MTCNN's TF
  e = np.load(tmp_path / 'e' / 'embeddings.npy')
  gallery = tmp_path / 'gallery'
  (gallery / 's31').mkdir(parents=True)
  (gallery / 's31' / '1.pgm').symlink_to(orl / PHOTOS[0])
  proc = _command('identify', f'--workdir={workdir}',
                  f'--gallery={gallery}', b, '--far=1e-3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not startup_lines(proc.stderr), proc.stderr[-3000:]
  assert 'threshold 0.4200: FAR 0.001 on lfw' in proc.stdout
  expected = 's31' if e[0] @ e[1] > 0.42 else 'unknown'
  assert f'{b}: {expected}  (s31 {e[0] @ e[1]:.3f})' in proc.stdout
  # By default the open-set threshold for the gallery, from the ROC.
  imp = _roc_results(workdir, fresh_rng()[0], people=10, photos=2)  # exact
  proc = _command('identify', f'--workdir={workdir}',
                  f'--gallery={gallery}', b, '--fpir=0.05', '--json')
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout)
  assert got['calibration']['pair_far'] == 0.05 and not (
      got['threshold_warning'])
  assert got['threshold'] == imp[int(0.05 * imp.size)], got
  assert got['threshold_source'].startswith(
      'FPIR 0.05 with 1 enrolled -> pair FAR 0.05 (FPIR / 1) on synthetic')
  proc = _command('identify', f'--workdir={workdir}',
                  f'--gallery={gallery}', b, '--fpir=0.05', '--far=1e-3')
  assert proc.returncode != 0 and 'not both' in proc.stderr


def test_verify_command_line_needs_two_photos():
  proc = _command('verify', '--workdir=/nonexistent', 'a.jpg')
  assert proc.returncode != 0 and 'give two photos or more' in proc.stderr


def test_missing_detector_extra_names_the_install_line(monkeypatch):
  monkeypatch.setitem(sys.modules, 'mtcnn', None)  # import mtcnn fails
  with pytest.raises(detection.MissingExtra, match=r'npcface_jax\[detect\]'):
    detection.Mtcnn()


def test_data_prep_faces_reach_training_and_evaluation_as_one(model, photos):
  """data_prep --detect stores each face as JPEG (quality 95; its bytes are
  checked against images.read_face in test_detection.py): the one lossy
  step, within JPEG rounding of the face every command embeds. Training
  (tf.data) and evaluation (.bin sets, Pillow) decode those bytes to the
  very same pixels, so they embed the same."""
  import tensorflow as tf  # noqa: PLC0415 (the input pipeline's decoder)
  from data_prep import preprocess  # noqa: PLC0415 (the test's only use)
  from npcface_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)
  faces, decoded = [], []
  for i, name in enumerate(PHOTOS):
    face, _ = images.read_face(ORL / name, model.image_size,
                               landmarks=photos.landmarks[i])
    jpeg = preprocess.encode_jpeg(face, 95)
    trained = input_pipeline.decode_jpeg(tf, jpeg).numpy()
    evaluated = np.asarray(images.decode(jpeg))
    np.testing.assert_array_equal(trained, evaluated)
    faces.append(np.asarray(face))
    decoded.append(trained)
  diff = np.abs(np.stack(decoded).astype(int) - np.stack(faces).astype(int))
  assert diff.mean() < 3 and diff.max() <= 24, (diff.mean(), diff.max())
  np.testing.assert_array_equal(model.embed(np.stack(faces)),
                                photos.embeddings)
  cosines = np.sum(model.embed(np.stack(decoded)) * photos.embeddings, 1)
  assert cosines.min() > 0.99, cosines


def test_small_batches_pad_to_a_power_of_two_and_embed_alike(model, photos):
  """One pair of photos is embedded in a batch of 2 per device, not a full
  batch (verify's latency), with the same embeddings as in a full one."""
  e = model.embedder
  devices = e.mesh.size
  assert [e.padded_size(n) for n in (1, devices, devices + 1)] == [
      devices, devices, 2 * devices]
  assert e.padded_size(e.batch_size) == e.batch_size
  faces = np.stack([images.read_image(ORL / name, model.image_size,
                                      landmarks=photos.landmarks[i])
                    for i, name in enumerate(PHOTOS)])
  np.testing.assert_allclose(model.embed(faces[:1]), photos.embeddings[:1],
                             atol=1e-5)
