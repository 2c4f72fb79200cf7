"""data_prep (train and pairs conversions) and the .bin format
(npcface_jax.evaluation.bin_format), on the real ORL faces in
../shared/data and on broken inputs made here."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import DataPrepError, recordio, sources
from data_prep import pairs as pairs_lib
from data_prep import train_set
from data_prep.__main__ import main
from npcface_jax.evaluation import bin_format
from npcface_jax.faces import alignment

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
ORL = DATA / 'orl_faces'
REC = DATA / 'orl_rec'


@pytest.fixture(scope='module')
def data():
  if not (ORL / 's1' / '1.pgm').exists():
    pytest.skip(f'test data not found at {DATA} (the ORL faces in '
                '../shared/data next to the project root)')
  return DATA


def identity_folder(root, names, images=range(1, 11)):
  """root/<name>/<i>.pgm links to the ORL images."""
  for name in names:
    (root / name).mkdir(parents=True)
    for i in images:
      (root / name / f'{i}.pgm').symlink_to(ORL / name / f'{i}.pgm')
  return root


def orl_rgb(name, i):
  return np.asarray(Image.open(ORL / name / f'{i}.pgm').convert('RGB'),
                    np.float64)


def stretched(a, width):
  """Bilinear resize of the width only (pixel centres at i + 0.5)."""
  w = a.shape[1]
  x = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
  x0 = np.floor(x).astype(int)
  x1 = np.minimum(x0 + 1, w - 1)
  f = (x - x0)[None, :, None]
  return a[:, x0] * (1 - f) + a[:, x1] * f


def on_black(a, size=112):
  """The fixtures' preprocessing: centred on a black size x size canvas."""
  out = np.zeros((size, size, 3))
  h, w = a.shape[:2]
  top, left = (size - h) // 2, (size - w) // 2
  out[top:top + h, left:left + w] = a
  return out


def examples(out):
  import tensorflow_datasets as tfds  # noqa: PLC0415 (imports TensorFlow)
  builder = tfds.builder_from_directory(os.fspath(out))
  return builder, list(tfds.as_numpy(builder.as_dataset(split='train')))


def convert(src, out, **kw):
  kw = {'workers': 1, 'progress': False, **kw}
  return train_set.convert(os.fspath(src), os.fspath(out), **kw)


# --- Image folder -> TFRecords -----------------------------------------------

NAMES_30 = [f's{i}' for i in range(1, 31)]


@pytest.fixture(scope='module')
def orl30(data, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('orl30')
  src = identity_folder(tmp / 'src', NAMES_30)
  report = convert(src, tmp / 'out', num_shards=3)
  return tmp / 'out', report


def test_folder_counts_label_map_and_report(orl30):
  out, report = orl30
  assert report['num_examples'] == 300 and report['num_classes'] == 30
  assert report['source_format'] == 'folder' and report['image_size'] == 112
  assert report['shards'] == [f'npcface-train.tfrecord-0000{i}-of-00003'
                              for i in range(3)]
  assert sum(report['shard_lengths']) == 300
  assert report['num_skipped'] == 0 and report['skipped'] == []
  assert json.loads((out / 'report.json').read_text()) == report
  names = json.loads((out / 'label_map.json').read_text())
  assert names == sorted(NAMES_30)  # s1, s10, s11, ..., s2, s20, ...
  assert (out / 'label.labels.txt').read_text().split() == names


def test_tfds_round_trip_pixels_and_labels(orl30):
  out, _ = orl30
  builder, got = examples(out)
  names = json.loads((out / 'label_map.json').read_text())
  assert builder.info.features['image'].shape == (112, 112, 3)
  assert builder.info.features['label'].names == names
  assert builder.info.splits['train'].num_examples == len(got) == 300
  matched = {}
  for ex in got:
    name = names[ex['label']]
    want = [stretched(orl_rgb(name, i), 112) for i in range(1, 11)]
    diffs = [np.abs(ex['image'] - w).mean() for w in want]
    best = int(np.argmin(diffs))
    assert diffs[best] < 2.0, (name, diffs)
    matched.setdefault(name, set()).add(best)
  # Every source image shows up once under its own label.
  assert matched == {n: set(range(10)) for n in NAMES_30}


# --- RecordIO ----------------------------------------------------------------

def test_split_record_is_rejoined(data):
  rec = REC / 'insightface' / 'train.rec'
  index = recordio.read_index(REC / 'insightface' / 'train.idx')
  with open(rec, 'rb') as f:
    payload = recordio.read_record(f, index[7])
  assert struct_magic() in payload  # the writer split it at this word
  header, jpeg = recordio.unpack(payload)
  assert header.labels == (0.0,) and header.flag == 0
  image = Image.open(io.BytesIO(jpeg))
  image.load()  # raises if the rejoin lost or garbled bytes
  face = np.asarray(image.convert('RGB'), np.float64)
  diffs = [np.abs(face - on_black(orl_rgb('s1', i))).mean()
           for i in range(1, 11)]
  # Record 7 is the 7th image of the first person (label 0).
  assert np.argmin(diffs) == 6 and diffs[6] < 2.0
  assert sorted(diffs)[1] > 5 * diffs[6]


def struct_magic():
  return recordio.MAGIC.to_bytes(4, 'little')


@pytest.mark.parametrize('layout,workers', [('insightface', 1),
                                            ('im2rec', 2)])
def test_rec_fixtures(data, tmp_path, layout, workers):
  listing = sources.list_source(REC / layout / 'train.rec')
  assert listing.layout == layout and listing.skipped == []
  assert len(listing.entries) == 400
  report = convert(REC / layout / 'train.rec', tmp_path / 'out',
                   workers=workers)
  assert (report['num_examples'], report['num_classes']) == (400, 40)
  assert report['source_format'] == 'rec' and report['rec_layout'] == layout
  assert json.loads((tmp_path / 'out' / 'label_map.json').read_text()) == [
      str(i) for i in range(40)]
  _, got = examples(tmp_path / 'out')
  assert np.bincount([ex['label'] for ex in got]).tolist() == [10] * 40


def test_rec_folder_is_detected(data):
  assert sources.list_source(REC / 'im2rec').format == 'rec'


# --- Verification .bin -------------------------------------------------------

def test_fixture_bin_loads(data):
  bins, issame = bin_format.load_bin(DATA / 'orl_bin' / 'orl_test.bin')
  # (The data README says 149 + 149; the file holds 142 + 142.)
  assert len(bins) == 2 * len(issame) == 568
  assert issame.dtype == bool and issame.sum() == 142 and (~issame).sum() == 142
  faces = bin_format.decode_pairs(bins[:4], 112)
  assert faces.shape == (4, 112, 112, 3) and faces.dtype == np.uint8


def test_npcface_jax_does_not_import_tensorflow():
  code = ('import sys, npcface_jax.evaluation.bin_format; '
          'sys.exit("tensorflow" in sys.modules)')
  assert subprocess.run([sys.executable, '-c', code]).returncode == 0


def test_data_prep_does_not_import_jax():
  """data_prep's worker processes import preprocess (and pairs imports
  verification_bin): npcface_jax's package names are lazy, so none of it
  starts JAX; the loss API still imports from the package."""
  code = ('import data_prep.preprocess, data_prep.pairs, sys; '
          "assert 'jax' not in sys.modules, 'jax imported'")
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr
  code = ('from npcface_jax import npcface_logits, get_head; import '
          'npcface_jax as nf; from npcface_jax.loss import heads; '
          'assert heads.npcface_logits is npcface_logits; '
          'assert "get_head" in dir(nf)')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, check=False)
  assert proc.returncode == 0, proc.stderr


# --- Broken inputs -----------------------------------------------------------

def broken_files(folder):
  folder.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  Image.open(ORL / 's1' / '1.pgm').convert('RGB').save(buf, 'JPEG')
  (folder / 'truncated.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue())
                                                          // 2])
  (folder / 'empty.jpg').write_bytes(b'')
  (folder / 'text.jpg').write_text('not an image\n')
  return {'truncated image', 'empty', 'not an image'}


def test_broken_images_are_skipped_and_reported(data, tmp_path, capsys):
  src = identity_folder(tmp_path / 'src', ['s1', 's2'], images=range(1, 4))
  reasons = broken_files(src / 's1')
  report = convert(src, tmp_path / 'out')
  assert (report['num_examples'], report['num_classes']) == (6, 2)
  assert report['num_skipped'] == 3
  skipped = {s['path']: s['reason'] for s in report['skipped']}
  assert skipped == {'s1/truncated.jpg': 'truncated image',
                     's1/empty.jpg': 'empty', 's1/text.jpg': 'not an image'}
  assert set(report['skipped_by_reason']) == reasons
  assert all(s['detail'] for s in report['skipped'])
  assert 'skipped 3' in capsys.readouterr().err


def test_nothing_valid_fails_clearly(data, tmp_path, capsys):
  broken_files(tmp_path / 'src' / 'a')
  assert main(['train', str(tmp_path / 'src'), str(tmp_path / 'out'),
               '--workers', '1', '--quiet']) == 1
  err = capsys.readouterr().err
  assert 'no valid image' in err and 'truncated image' in err
  assert not (tmp_path / 'out').exists()


# --- Filters, list files, overwrite, usage -----------------------------------

def test_exclusions_and_min_images(data, tmp_path):
  src = identity_folder(tmp_path / 'src', ['s1', 's2', 's3'], range(1, 7))
  identity_folder(src, ['s4'], range(1, 4))
  (src / 's1' / '1.pgm').unlink()
  (src / 's1' / 'bad.jpg').write_bytes(b'')  # s1: 5 valid of 6 listed
  (tmp_path / 'exclude.txt').write_text('s2\nnobody\n')
  report = convert(src, tmp_path / 'out', min_images_per_identity=6,
                   exclude_identities=str(tmp_path / 'exclude.txt'))
  # s2 excluded; s4 (3 images) dropped before decoding; s1 dropped after,
  # so s3's provisional label 1 is rewritten to 0.
  assert report['num_excluded_identities'] == 1
  assert report['exclude_names_not_in_source'] == 1
  assert report['num_identities_below_min'] == 2
  assert (report['num_examples'], report['num_classes']) == (6, 1)
  assert json.loads((tmp_path / 'out' / 'label_map.json').read_text()) == [
      's3']
  _, got = examples(tmp_path / 'out')
  assert [ex['label'] for ex in got] == [0] * 6
  assert not [p for p in os.listdir(tmp_path / 'out') if 'partial' in p]


def test_exclude_file_that_is_not_text_names_its_line(tmp_path):
  from data_prep import train_set  # noqa: PLC0415
  names = tmp_path / 'exclude.txt'
  names.write_bytes(b'# overlap with LFW\ns2\r\n  s3  \n\ns\xe9\n')
  with pytest.raises(DataPrepError, match=r'exclude\.txt, line 5: .*not UTF-8'):
    train_set._read_names(str(names))  # noqa: SLF001
  names.write_bytes(b'# overlap with LFW\ns2\r\n  s3  \n\ns\xc3\xa9\n')
  read = train_set._read_names(str(names))  # noqa: SLF001
  assert read == {'s2', 's3', 's\xe9'}


def test_list_file_with_integer_labels(data, tmp_path):
  lines = [f'{ORL}/s5/{i}.pgm 12' for i in (1, 2)]
  lines += [f'../links/{i}.pgm 3' for i in (1, 2, 3)]
  (tmp_path / 'links').mkdir()
  for i in (1, 2, 3):
    (tmp_path / 'links' / f'{i}.pgm').symlink_to(ORL / 's6' / f'{i}.pgm')
  (tmp_path / 'lists').mkdir()
  (tmp_path / 'lists' / 'train.txt').write_text('\n'.join(lines) + '\n')
  report = convert(tmp_path / 'lists' / 'train.txt', tmp_path / 'out')
  assert report['source_format'] == 'list' and report['num_examples'] == 5
  names = json.loads((tmp_path / 'out' / 'label_map.json').read_text())
  assert names == ['3', '12']  # numeric order


def test_overwrite(data, tmp_path, capsys):
  src = identity_folder(tmp_path / 'src', ['s1', 's2'], range(1, 3))
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  (out / 'npcface-train.tfrecord-00000-of-00009').write_text('stale')
  args = ['train', str(src), str(out), '--workers', '1', '--quiet']
  assert main(args) == 1
  assert 'exists and is not empty; pass --overwrite' in capsys.readouterr().err
  assert main(args + ['--overwrite']) == 0
  assert sorted(os.listdir(out)) == sorted([
      'notes.txt', 'npcface-train.tfrecord-00000-of-00001', 'label_map.json',
      'report.json', 'dataset_info.json', 'features.json', 'label.labels.txt'])


def test_usage(capsys):
  assert main([]) == 2
  assert 'usage: python -m data_prep' in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    main(['train', '--help'])
  assert e.value.code == 0
  assert '--min-images-per-identity' in capsys.readouterr().out


# --- Pairs -> .bin -----------------------------------------------------------

def test_pairs_round_trip(data, tmp_path, capsys):
  images = tmp_path / 'lfw'
  for name in ('s31', 's32', 's33'):
    (images / name).mkdir(parents=True)
    for i in range(1, 11):
      (images / name / f'{name}_{i:04d}.jpg').symlink_to(
          ORL / name / f'{i}.pgm')
  pairs_txt = tmp_path / 'pairs.txt'
  pairs_txt.write_text('1 3\ns31 1 2\ns32 3 4\ns33 1 10\n'
                       's31 1 s32 2\ns32 5 s33 6\ns31 1 s33 99\n')
  out = tmp_path / 'orl.bin'
  assert main(['pairs', str(pairs_txt), str(images), str(out), '--pad',
               '--workers', '1', '--quiet']) == 0
  err = capsys.readouterr().err
  assert 'line 7' in err and 's33/s33_0099.jpg: missing file' in err
  assert '5 pairs are too few for the 10 folds of evaluate' in err
  bins, issame = bin_format.load_bin(out)
  assert issame.tolist() == [True, True, True, False, False]
  faces = bin_format.decode_pairs(bins, 112).astype(np.float64)
  sources_ = [('s31', 1), ('s31', 2), ('s32', 3), ('s32', 4), ('s33', 1),
              ('s33', 10), ('s31', 1), ('s32', 2), ('s32', 5), ('s33', 6)]
  for face, (name, i) in zip(faces, sources_):
    assert np.abs(face - on_black(orl_rgb(name, i))).mean() < 2.0
  assert main(['pairs', str(pairs_txt), str(images), str(out)]) == 1
  assert '--overwrite' in capsys.readouterr().err


def _lfw_pairs_txt(header, sets, per_set):
  """An LFW pairs.txt: each set per_set same then per_set different."""
  lines = [header + '\n'] if header else []
  for s in range(sets):
    lines += [f'P{s}_{i} 1 2\n' for i in range(per_set)]
    lines += [f'P{s}_{i} 1 Q{s}_{i} 1\n' for i in range(per_set)]
  return lines


def test_pairs_header_declares_the_folds():
  """LFW's header "10 3" is ten folds of 3 + 3 in file order; "4 3" four,
  which a .bin cannot keep (evaluate says so at conversion); "500" alone
  declares nothing."""
  from npcface_jax.evaluation import protocols  # noqa: PLC0415
  lines = _lfw_pairs_txt('10 3', 10, 3)
  declared = pairs_lib.declared_sets(lines)
  same = np.array([p[3] for p in pairs_lib.parse_pairs(lines)])
  assert declared == (10, 3) and same.size == 60
  folds = protocols.fold_assignment(same, declared=declared)
  assert folds.rule == 'declared'
  assert folds.index.tolist() == [i // 6 for i in range(60)]
  assert pairs_lib.folds_note(declared, same) == (
      'evaluate will take 10 folds in file order: the 10 sets of 3 + 3 '
      'pairs the header declares')
  lines = _lfw_pairs_txt('4 3', 4, 3)
  same = np.array([p[3] for p in pairs_lib.parse_pairs(lines)])
  folds = protocols.fold_assignment(same, declared=(4, 3))
  assert (folds.rule, folds.count) == ('declared', 4)
  assert pairs_lib.folds_note((4, 3), same) == (
      'evaluate will take 10 label-balanced folds, not the 4 sets of 3 + 3 '
      'pairs the header declares: a .bin keeps no header')
  sixty = _lfw_pairs_txt('10 3', 10, 3)
  same = np.array([p[3] for p in pairs_lib.parse_pairs(sixty)])
  assert pairs_lib.folds_note((10, 3), same[1:], skipped=1).endswith(
      'not the 10 sets of 3 + 3 pairs the header declares: the 1 skipped '
      'pair(s) break them')
  assert pairs_lib.folds_note(None, np.sort(same)) == (
      'evaluate will take 10 label-balanced folds')
  assert 'too few' in pairs_lib.folds_note(None, same[:9])
  assert pairs_lib.declared_sets(['# LFW\n', '\n', '4 3\n']) == (4, 3)
  for header in ('500', '1 300', '0 3', '10 0', '10 1234567890', '10 3 x',
                 '10 \u00b3'):
    assert pairs_lib.declared_sets(_lfw_pairs_txt(header, 1, 1)) is None
  assert pairs_lib.declared_sets(_lfw_pairs_txt('', 1, 1)) is None


def test_pairs_formats():
  lfw = pairs_lib.parse_pairs(['Abel 1 2\n', 'Abel 1 Zoe 3\n'])  # headerless
  assert lfw == [(1, 'Abel/Abel_0001.jpg', 'Abel/Abel_0002.jpg', True),
                 (2, 'Abel/Abel_0001.jpg', 'Zoe/Zoe_0003.jpg', False)]
  simple = pairs_lib.parse_pairs(['300\n', 'a/1.png b/2.png 0\n'])
  assert simple == [(2, 'a/1.png', 'b/2.png', False)]
  with pytest.raises(DataPrepError, match='line 1'):
    pairs_lib.parse_pairs(['a b c d e\n'])


def test_pairs_with_nothing_readable_fails(tmp_path):
  (tmp_path / 'img').mkdir()
  (tmp_path / 'p.txt').write_text('x 1 2\n')
  with pytest.raises(DataPrepError, match='no pair'):
    pairs_lib.convert(str(tmp_path / 'p.txt'), str(tmp_path / 'img'),
                      str(tmp_path / 'o.bin'), workers=1, progress=False)


# --- Landmark alignment ------------------------------------------------------

def random_similarity(rng, scales=(0.5, 3.0), angle=0.6, shifts=(0, 200)):
  """(scaled rotation, shift) drawn from the given ranges."""
  a, scale = rng.uniform(-angle, angle), rng.uniform(*scales)
  c, s = np.cos(a), np.sin(a)
  return scale * np.array([[c, -s], [s, c]]), rng.uniform(*shifts, 2)


def test_similarity_transform_lands_on_template():
  rng = np.random.default_rng(0)
  for _ in range(20):
    rotation, shift = random_similarity(rng)
    # Detected landmarks are off by a fraction of a pixel: within 1 px.
    noisy = (alignment.ARCFACE_TEMPLATE + rng.normal(0, 0.3, (5, 2)))
    points = noisy @ rotation.T + shift
    matrix = alignment.similarity_transform(points, alignment.ARCFACE_TEMPLATE)
    moved = alignment.apply(matrix, points)
    assert np.abs(moved - alignment.ARCFACE_TEMPLATE).max() < 1.0
    # Exact for a similar copy of the template, at any output size.
    points = alignment.ARCFACE_TEMPLATE @ rotation.T + shift
    for size in (112, 224):
      target = alignment.template(size)
      moved = alignment.apply(
          alignment.similarity_transform(points, target), points)
      np.testing.assert_allclose(moved, target, atol=1e-9)
  mirrored = alignment.ARCFACE_TEMPLATE * [-1, 1]  # no reflection allowed
  matrix = alignment.similarity_transform(mirrored, alignment.ARCFACE_TEMPLATE)
  assert np.linalg.det(matrix[:, :2]) > 0


def blobs(points, size):
  yy, xx = np.mgrid[:size[1], :size[0]]
  img = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 18.0) for x, y in points)
  return Image.fromarray((255 * np.clip(img, 0, 1)).astype(np.uint8))


def test_landmarks_option_aligns_images(tmp_path):
  rng = np.random.default_rng(1)
  src, lines = tmp_path / 'src', []
  for name in ('a', 'b'):
    (src / name).mkdir(parents=True)
    # Kept inside the 320 x 300 image.
    rotation, shift = random_similarity(rng, (0.8, 1.6), 0.4, (60, 90))
    points = alignment.ARCFACE_TEMPLATE @ rotation.T + shift
    blobs(points, (320, 300)).save(src / name / '1.png')
    lines.append(f'{name}/1.png ' + ' '.join(f'{v:.3f}' for v in points.flat))
  blobs(points, (320, 300)).save(src / 'b' / 'no_line.png')
  (tmp_path / 'lm.txt').write_text('\n'.join(lines) + '\n')
  report = convert(src, tmp_path / 'out', landmarks=str(tmp_path / 'lm.txt'),
                   image_size=128)
  assert report['num_examples'] == 2
  assert [(s['path'], s['reason']) for s in report['skipped']] == [
      ('b/no_line.png', 'no landmarks')]
  _, got = examples(tmp_path / 'out')
  yy, xx = np.mgrid[:128, :128]
  for ex in got:
    img = ex['image'][..., 0].astype(np.float64)
    for tx, ty in alignment.template(128):
      near = img * (((xx - tx) ** 2 + (yy - ty) ** 2) < 36)
      centre = (near * xx).sum() / near.sum(), (near * yy).sum() / near.sum()
      assert np.hypot(centre[0] - tx, centre[1] - ty) < 1.0
