"""Face detection: detection.py's rules on made-up faces, MTCNN on the real
ORL photos, and data_prep's --detect / --save-landmarks (the same pixels as
images.read_face gives, reproduced from the saved landmarks without the
detector)."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import preprocess, train_set
from data_prep.__main__ import main
from npcface_jax.common import jsonfile
from npcface_jax.evaluation import bin_format
from npcface_jax.faces import alignment, detection, images
from tests.helpers import SHARED_DATA

ORL = SHARED_DATA / 'orl_faces'


def face(box, score, landmarks=None):
  points = np.zeros((5, 2)) if landmarks is None else np.asarray(landmarks)
  return detection.Face(tuple(map(float, box)), score, points)


def blank_and_noise(folder):
  """A grey PNG and a noise PNG (no face in either) in folder."""
  Image.new('RGB', (92, 112), (128, 128, 128)).save(folder / 'blank.png')
  noise = np.random.default_rng(0).integers(0, 256, (112, 92, 3), np.uint8)
  Image.fromarray(noise).save(folder / 'noise.png')


def orl_photo(key):
  return images.decode((ORL / key).read_bytes())


# --- detection.py on made-up faces --------------------------------------------

def test_pick_largest_sure_face_nearest_centre_breaks_ties():
  small = face((10, 10, 30, 30), 0.99)
  large_unsure = face((0, 0, 90, 90), 0.89)
  medium = face((40, 40, 80, 80), 0.95)
  assert detection.pick([small, large_unsure, medium], 100, 100) is medium
  assert detection.pick([small, large_unsure, medium], 100, 100,
                        min_score=0.8) is large_unsure
  # Equal areas: the box whose centre is nearest the image's (50, 50).
  off = face((0, 0, 20, 20), 0.99)
  near = face((45, 45, 65, 65), 0.91)
  assert detection.pick([off, near], 100, 100) is near
  assert detection.pick([near, off], 100, 100) is near
  assert detection.pick([large_unsure], 100, 100) is None
  assert detection.pick([], 100, 100) is None
  assert detection.pick([face((0, 0, 1, 1), 0.9)], 100, 100) is not None


def test_finder_detects_large_photos_scaled_down_and_scales_back():
  seen = []
  points = np.array([[10., 20.], [30., 20.], [20., 30.], [12., 40.],
                     [28., 40.]])

  def fake(rgb):
    seen.append(rgb.shape)
    return [face((0, 0, 40, 50), 0.99, points)]

  finder = detection.FaceFinder(detector=fake)
  side = 2 * detection.MAX_DETECT_SIDE
  got = finder(Image.new('RGB', (side, side * 5 // 8)))
  assert seen[-1] == (detection.MAX_DETECT_SIDE * 5 // 8,
                      detection.MAX_DETECT_SIDE, 3)
  # Pixel centres (x + 0.5) scale with the image: x' = 2 x + 0.5.
  np.testing.assert_array_equal(got, 2 * points + 0.5)
  got = finder(Image.new('RGB', (300, 200)))
  assert seen[-1] == (200, 300, 3)
  np.testing.assert_array_equal(got, points)


def test_finder_failures_are_bad_images():
  def broken(rgb):
    raise FloatingPointError('the network blew up')

  with pytest.raises(images.BadImage) as e:
    detection.FaceFinder(detector=broken)(Image.new('RGB', (50, 50)))
  assert e.value.reason == 'detector failed'
  assert 'FloatingPointError' in e.value.detail
  unsure = detection.FaceFinder(detector=lambda rgb: [face((0, 0, 9, 9), .5)])
  with pytest.raises(images.BadImage) as e:
    unsure(Image.new('RGB', (50, 50)))
  assert e.value.reason == 'no face' and 'score floor' in e.value.detail
  with pytest.raises(ValueError, match='probability'):
    detection.FaceFinder(min_score=1.5)


def test_saved_landmarks_read_back_as_the_same_floats(tmp_path):
  awkward = (0.1 + 0.2, 1 / 3, -0.0, 5e-324, 123.45678901234567, 2.0 ** 0.5,
             1e6, -1e-7, 7.0, 91.99999999999999)
  points = {'b/2.jpg': awkward, '#hash/1.jpg': awkward[::-1],
            ' lead/1.jpg': awkward, 'a b/1.jpg': awkward,
            'line\nbreak.jpg': awkward, 'trailing /x.jpg ': awkward,
            '10': awkward, '9': awkward}
  path = tmp_path / 'lm.txt'
  assert preprocess.write_landmarks(str(path), points) == 6
  read = alignment.read_landmarks(path)
  assert read == {'b/2.jpg': awkward, './#hash/1.jpg': awkward[::-1],
                  './ lead/1.jpg': awkward, 'a b/1.jpg': awkward,
                  '10': awkward, '9': awkward}
  assert [line.split()[0] for line in path.read_text().splitlines()] == [
      '9', '10', './', './#hash/1.jpg', 'a', 'b/2.jpg']  # numbers, then text


# --- MTCNN on real photos -----------------------------------------------------

@pytest.fixture(scope='module')
def finder():
  """The test process's detector (threads=0, as data_prep's with one
  worker: TensorFlow's sums, and so the last bit of a landmark, depend on
  its thread count)."""
  if not (ORL / 's1' / '1.pgm').exists():
    pytest.skip(f'ORL faces not found at {ORL} (shared test data absent)')
  pytest.importorskip('mtcnn', reason='the [detect] extra (mtcnn) is not '
                      f'installed: {detection.INSTALL}')
  return detection.FaceFinder()


def test_mtcnn_scales_landmarks_and_finds_no_face_in_blank_or_noise(
    finder, monkeypatch, tmp_path):
  photo = orl_photo('s1/1.pgm')
  small = finder(photo)
  double = photo.resize((184, 224), Image.Resampling.BILINEAR)
  # Detected at full size: MTCNN's answer at another scale, within 3 px.
  assert np.abs(finder(double) - (2 * small + 0.5)).max() < 3
  # Over MAX_DETECT_SIDE: detected on a copy scaled back to 92 x 112 (not
  # quite the original: two resamplings), landmarks scaled up by 2.
  monkeypatch.setattr(detection, 'MAX_DETECT_SIDE', 112)
  assert np.abs(finder(double) - (2 * small + 0.5)).max() < 1.5
  blank_and_noise(tmp_path)
  for name in ('blank.png', 'noise.png'):
    with pytest.raises(images.BadImage) as e:
      images.read_face(tmp_path / name, 112, detector=finder)
    assert e.value.reason == 'no face', name


def orl_folder(root, photos):
  """root/<person>/<i>.pgm links to the ORL photos ('s1/1.pgm', ...)."""
  for key in photos:
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).symlink_to(ORL / key)
  return root


# --- data_prep train --detect -------------------------------------------------

# 15 photos of two people; each converted test detects 17 images (with a
# blank and a noise PNG) and 5 more directly.
TRAIN_PHOTOS = [f's1/{i}.pgm' for i in range(1, 11)] + [
    f's2/{i}.pgm' for i in range(1, 6)]


def shard_records(out):
  """[(label, JPEG bytes)] of a data_prep output, in the written order."""
  import tensorflow as tf  # noqa: PLC0415 (TensorFlow only where read)
  records = []
  for path in sorted(out.glob('npcface-train.tfrecord-*')):
    for raw in tf.data.TFRecordDataset(str(path)):
      example = tf.train.Example.FromString(raw.numpy())
      records.append((example.features.feature['label'].int64_list.value[0],
                      example.features.feature['image'].bytes_list.value[0]))
  return records


def _no_detector(*_):
  raise AssertionError('the detector ran')


def test_train_detect_same_pixels_reproduced_from_saved_landmarks(
    finder, tmp_path, monkeypatch):
  src = orl_folder(tmp_path / 'src', TRAIN_PHOTOS)
  blank_and_noise(src / 's1')
  saved = tmp_path / 'landmarks.txt'
  assert main(['train', str(src), str(tmp_path / 'out'), '--detect',
               '--save-landmarks', str(saved), '--workers', '1',
               '--quiet']) == 0
  report = jsonfile.read_object(tmp_path / 'out' / 'report.json')
  assert report['num_examples'] == 15 and report['num_classes'] == 2
  assert report['skipped_by_reason'] == {'no face': 2}
  assert {s['path'] for s in report['skipped']} == {'s1/blank.png',
                                                    's1/noise.png'}
  assert report['num_landmarks_saved'] == 15
  options = report['options']
  assert options['detect'] is True and options['save_landmarks'] == str(saved)
  assert options['min_face_score'] == detection.MIN_SCORE

  points = alignment.read_landmarks(saved)
  assert list(points) == sorted(TRAIN_PHOTOS)
  for key, values in points.items():
    p = np.reshape(values, (5, 2))
    assert (p >= 0).all() and (p < (92, 112)).all(), key
    assert p[0, 0] < p[1, 0], key  # left eye left of the right eye
    assert max(p[0, 1], p[1, 1]) < min(p[3, 1], p[4, 1]), key  # eyes high
    assert min(p[0, 1], p[1, 1]) < p[2, 1] < max(p[3, 1], p[4, 1]), key

  # The shards hold what images.read_face gives, byte for byte: detected
  # here for a few photos (the landmarks saved are those, repr'd), aligned
  # on the saved landmarks for all.
  names = (tmp_path / 'out' / 'label.labels.txt').read_text().split()
  records = shard_records(tmp_path / 'out')
  got = sorted((names[label], jpeg) for label, jpeg in records)
  for key in ('s1/1.pgm', 's1/6.pgm', 's1/10.pgm', 's2/3.pgm', 's2/5.pgm'):
    image, found = images.read_face(ORL / key, 112, detector=finder)
    assert points[key] == tuple(found.flat), key
    assert (key[:2], preprocess.encode_jpeg(image, 95)) in got, key
  want = sorted((key[:2], preprocess.encode_jpeg(images.read_face(
      ORL / key, 112, landmarks=points[key])[0], 95)) for key in points)
  assert got == want, 'not the bytes images.read_face gives'

  # From the saved landmarks, no detector: the same images, in order.
  monkeypatch.setattr(detection.FaceFinder, '__call__', _no_detector)
  again = train_set.convert(str(src), str(tmp_path / 'again'), workers=1,
                            landmarks=str(saved), progress=False)
  assert shard_records(tmp_path / 'again') == records
  assert again['skipped_by_reason'] == {'no landmarks': 2}


# --- data_prep pairs --detect -------------------------------------------------

def test_pairs_detect_same_pixels_and_saved_landmarks(finder, tmp_path,
                                                      capsys):
  keys = ['s3/1.pgm', 's3/2.pgm', 's3/3.pgm', 's4/1.pgm', 's4/2.pgm',
          's4/3.pgm']
  src = orl_folder(tmp_path / 'src', keys)
  blank_and_noise(src / 's3')
  pairs = tmp_path / 'pairs.txt'
  pairs.write_text('s3/1.pgm s3/2.pgm 1\ns3/3.pgm s4/1.pgm 0\n'
                   's4/2.pgm s4/3.pgm 1\ns3/blank.png s4/1.pgm 0\n')
  saved = tmp_path / 'landmarks.txt'
  out = tmp_path / 'pairs.bin'
  assert main(['pairs', str(pairs), str(src), str(out), '--detect',
               '--save-landmarks', str(saved), '--workers', '1',
               '--quiet']) == 0
  err = capsys.readouterr().err
  assert 'skipped 1 of 4 (images left out: 1 no face)' in err, err
  assert 's3/blank.png: no face' in err
  bins, issame = bin_format.load_bin(out)
  assert issame.tolist() == [True, False, True]
  want = [preprocess.encode_jpeg(
      images.read_face(ORL / k, 112, detector=finder)[0], 95) for k in keys]
  assert bins == want, 'not the bytes images.read_face gives'
  assert sorted(alignment.read_landmarks(saved)) == keys
  again = tmp_path / 'pairs_again.bin'
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(detection.FaceFinder, '__call__', _no_detector)
    assert main(['pairs', str(pairs), str(src), str(again), '--landmarks',
                 str(saved), '--workers', '1', '--quiet']) == 0
  assert again.read_bytes() == out.read_bytes()


# --- Spawned workers (slow: each loads TensorFlow and MTCNN) ------------------

@pytest.mark.slow
def test_train_detect_in_two_workers_reproduced_from_landmarks(finder,
                                                              tmp_path):
  """Worker processes detect with one TensorFlow thread each: the same
  landmarks as in this process up to float rounding (TensorFlow's sums
  depend on its thread count), and their saved landmarks reproduce their
  images exactly in two workers again."""
  photos = TRAIN_PHOTOS[:10]
  src = orl_folder(tmp_path / 'src', photos)
  saved = tmp_path / 'landmarks.txt'
  report = train_set.convert(str(src), str(tmp_path / 'two'), detect=True,
                             save_landmarks=str(saved), workers=2,
                             progress=False)
  assert report['num_examples'] == 10 and report['num_landmarks_saved'] == 10
  points = alignment.read_landmarks(saved)
  for key in photos[:3]:
    np.testing.assert_allclose(points[key], finder(orl_photo(key)).flat,
                               atol=1e-3, err_msg=key)
  train_set.convert(str(src), str(tmp_path / 'again'), landmarks=str(saved),
                    workers=2, progress=False)
  assert (shard_records(tmp_path / 'again')
          == shard_records(tmp_path / 'two'))


# --- Without the [detect] extra, and bad options ------------------------------

def test_missing_extra_fails_before_work_naming_the_install_line(
    tmp_path, monkeypatch, capsys):
  (tmp_path / 'src' / 'a').mkdir(parents=True)
  Image.new('RGB', (40, 40)).save(tmp_path / 'src' / 'a' / '1.png')
  (tmp_path / 'pairs.txt').write_text('a/1.png a/1.png 1\n')
  monkeypatch.setitem(sys.modules, 'mtcnn', None)  # import mtcnn fails
  out = tmp_path / 'out'
  assert main(['train', str(tmp_path / 'src'), str(out), '--detect',
               '--quiet']) == 1
  err = capsys.readouterr().err
  assert detection.INSTALL in err and 'mtcnn' in err, err
  assert not out.exists()
  assert main(['pairs', str(tmp_path / 'pairs.txt'), str(tmp_path / 'src'),
               str(tmp_path / 'p.bin'), '--detect', '--quiet']) == 1
  assert detection.INSTALL in capsys.readouterr().err
  with pytest.raises(detection.MissingExtra, match='mtcnn'):
    detection.Mtcnn()


def test_detect_options_are_checked_before_work(tmp_path, capsys):
  (tmp_path / 'src' / 'a').mkdir(parents=True)
  Image.new('RGB', (40, 40)).save(tmp_path / 'src' / 'a' / '1.png')
  (tmp_path / 'taken.txt').write_text('')
  src, out = str(tmp_path / 'src'), str(tmp_path / 'out')
  cases = {
      ('--save-landmarks', str(tmp_path / 'lm.txt')): 'add --detect',
      ('--detect', '--save-landmarks', str(tmp_path / 'taken.txt')):
          '--overwrite',
      ('--detect', '--save-landmarks', str(tmp_path / 'no' / 'lm.txt')):
          'does not exist',
      ('--detect', '--save-landmarks', str(tmp_path)): 'is a folder',
      ('--detect', '--min-face-score', '1.5'): 'from 0 to 1',
  }
  for flags, why in cases.items():
    assert main(['train', src, out, '--quiet', *flags]) == 1, flags
    assert why in capsys.readouterr().err, flags
    assert not os.path.exists(out)
  with pytest.raises(SystemExit):
    main(['train', src, out, '--min-face-score', '0.5'])
  assert 'add --detect' in capsys.readouterr().err
