"""Hostile text and JSON inputs: every parser of a text or JSON file a user
hands us either parses it or refuses it with an error that names the file
and the line (or key) and says the fix; never another exception, a crash, a
hang or unbounded memory.

Fuzzed (tests/fuzzing.py, a fresh seed each run, in the summary line):
pairs files and landmark files through ``data_prep pairs``' conversion, the
three IJB meta files through ``ijb.load_meta`` and the aligned batches,
run.json through ``run_dir.load_run``, an earlier results.json through
evaluate's reading of it, a run's run.json, stats.jsonl and results.json
through what report.py makes of them, and a data_prep output's
dataset_info.json and features.json through
``input_pipeline.dataset_info``. ``fuzz_cases()`` is what
benchmarks/fuzz_parsers.py runs with larger counts. Then one deterministic
test per defect found.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import pathlib
import tempfile
import time
import types

import numpy as np
import pytest
from PIL import Image

from data_prep import DataPrepError, pairs, shards
from npcface_jax.common import textfile
from npcface_jax.faces import alignment
from tests import fuzzing
from tests.helpers import fresh_rng

# The fuzz children import this module for its targets: JAX (evaluate,
# ijb) and TensorFlow are imported where used, so that each child pays only
# for what its command imports.

# --- Seeds --------------------------------------------------------------------

_NAMES = ('Abel', 'Zoe', 'Ines')


def _jpeg(rng, size=24) -> bytes:
  out = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
      out, 'JPEG', quality=80)
  return out.getvalue()


def _lfw_images(rng) -> dict[str, bytes]:
  return {f'images/{n}/{n}_{i:04d}.jpg': _jpeg(rng)
          for n in _NAMES for i in (1, 2)}


def _landmark_lines(rng, names, size=24) -> str:
  """``name x1 y1 ... x5 y5`` lines: the template shrunk into each image."""
  lines = []
  for name in names:
    points = alignment.template(size * 0.7) + rng.uniform(0, size * 0.2, 2)
    lines.append(name + ' ' + ' '.join(f'{v:.3f}' for v in points.flat))
  return '\n'.join(lines) + '\n'


def _ijb_files(rng) -> dict[str, bytes]:
  """A small IJB-C release: meta/ as insightface's IJB_release holds it
  (see tests/test_ijb.py) and loose_crop/ JPEGs."""
  n = 8
  names = [f'{k + 1}.jpg' for k in range(n)]
  tids, mids = [1, 1, 2, 2, 3, 3, 4, 4], [10, 11, 12, 12, 13, 14, 15, 15]
  landmarks = _landmark_lines(rng, names).splitlines()
  scores = rng.uniform(0.5, 1.0, n)
  pairs_ = [(1, 2, 0), (1, 3, 0), (2, 3, 0), (3, 4, 1), (1, 4, 0), (2, 4, 1)]
  meta = {
      'ijbc_face_tid_mid.txt': ''.join(
          f'{m} {t} {d}\n' for m, t, d in zip(names, tids, mids)),
      'ijbc_name_5pts_score.txt': ''.join(
          f'{line} {s:.6f}\n' for line, s in zip(landmarks, scores)),
      'ijbc_template_pair_label.txt': ''.join(
          f'{a} {b} {y}\n' for a, b, y in pairs_),
  }
  files = {f'IJBC/meta/{k}': v.encode() for k, v in meta.items()}
  files.update({f'IJBC/loose_crop/{m}': _jpeg(rng) for m in names})
  return files


def _run_json() -> bytes:
  """run.json as training writes it (run_dir.write_run_info)."""
  from configs import demo  # noqa: PLC0415
  from npcface_jax.serving import run_dir  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as d:
    run_dir.write_run_info(d, demo.get_config(), types.SimpleNamespace(
        image_size=48, num_classes=40), {'scale': 32.0})
    return pathlib.Path(d, 'run.json').read_bytes()


def _results_json(rng) -> bytes:
  """An eval/step_N/results.json as evaluate_run writes it."""
  from npcface_jax.common import jsonfile  # noqa: PLC0415
  from npcface_jax.evaluation import protocols  # noqa: PLC0415
  issame = np.arange(200) % 2 == 0
  scores = rng.normal(0, 0.3, 200) + 0.5 * issame
  result = protocols.verification_report(scores, issame)
  result.update(kind='pairs', path='/data/lfw.bin', num_pairs=200,
                roc='roc_lfw.png')
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, 'results.json')
    jsonfile.write_object(path, {'step': 12, 'flip': False,
                                 'targets': {'lfw': result}})
    return pathlib.Path(path).read_bytes()


@functools.cache
def _dataset_files() -> dict[str, bytes]:
  """A data_prep output as ``python -m data_prep train`` writes it (shards
  and tfds metadata by data_prep.shards): 12 images of 3 identities."""
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    partials = shards.PartialShards(d, 2)
    for k in range(12):
      partials.write(k // 6, _jpeg(rng, 16), k % 3)
    names, lengths = shards.finalize(partials, d, {0: 0, 1: 1, 2: 2})
    shards.write_metadata(d, 16, list(_NAMES), names, lengths)
    return {f'data/{p.name}': p.read_bytes()
            for p in pathlib.Path(d).iterdir()}


_DIGITS = [b'0', b'1', b'2', b'9', b'-', b'+', b'.', b'-1', b'999999999',
           b'1234567890', b'9' * 25, b'9' * 5000]
_SPACE = [b' ', b'\t', b'\n', b'\r', b'\r\n', b'\n\n', b'\x0b', b'\xc2\xa0']
_HOSTILE = [b'\x00', b'#', b'\xff', b'\xfe\xff', b'\xef\xbb\xbf', b'\xc3',
            b'\xc2\xb2', b'\xd9\xa1', b'\xed\xa0\x80', b'\\', b'/', b'..']
_FLOATS = [b'nan', b'NaN', b'inf', b'-inf', b'1e999', b'1e308', b'-1e308',
           b'1e-320', b'1e6', b'1_0', b'0x10', b'e', b'0.0']
_JSON = [b'{', b'}', b'[', b']', b'"', b':', b',', b'null', b'true', b'false',
         b'NaN', b'Infinity', b'-Infinity', b'1e999', b'-1', b'0', b'1.5',
         b'"image_size"', b'"config"', b'"targets"', b'"label"', b'"train"',
         b'"shardLengths"', b'"numClasses"', b'"dimensions"', b'"-1"', b'"0"',
         b'"99999999999999999999"', b'"1e3"', b'\\u0000',
         b'\\ud800', b'[' * 200, b'{"a":' * 60, b'"' + b'x' * 5000 + b'"']


def _run_records(rng) -> dict[str, bytes]:
  """A run folder as report.py reads it: run.json, analysis/stats.jsonl
  and metrics.jsonl (two records each), eval/results.json with its ROC."""
  from npcface_jax.common import jsonfile  # noqa: PLC0415
  from npcface_jax.evaluation import protocols  # noqa: PLC0415
  from npcface_jax.training import hard_samples  # noqa: PLC0415
  stats, metrics = [], []
  for step in (16, 32):
    window = hard_samples.Window(step - 15)
    c_y = np.tanh(rng.normal(0.5, 0.3, 300))
    near = np.clip(rng.normal(0.3, 0.2, 300), -1, 1)
    window.add(c_y, near, near > c_y - 0.2)
    stats.append(window.record(step, step / 16, 0.4))
    metrics.append({'step': step, 'epoch': step / 16, 'loss': 3.5,
                    'accuracy': 0.25})
  issame = np.arange(200) % 2 == 0
  scores = rng.normal(0, 0.3, 200) + 0.5 * issame
  result = protocols.verification_report(scores, issame)
  result['roc_curve'] = protocols.roc_points(scores, issame, 32)
  lines = lambda records: ''.join(  # noqa: E731
      json.dumps(r, separators=(',', ':')) + '\n' for r in records).encode()
  with tempfile.TemporaryDirectory() as d:
    jsonfile.write_object(os.path.join(d, 'r.json'), {
        'step': 32, 'targets': {'lfw': result}})
    results = pathlib.Path(d, 'r.json').read_bytes()
  return {'run/run.json': _run_json(), 'run/eval/results.json': results,
          'run/analysis/stats.jsonl': lines(stats),
          'run/analysis/metrics.jsonl': lines(metrics)}


def fuzz_cases() -> list[dict]:
  """The keyword arguments of fuzzing.fuzz (but workdir, count and seed)
  per fuzzed format, with 'count': the test's default number of inputs."""
  rng = np.random.default_rng(0)
  lfw = ('2 3\nAbel 1 2\nZoe 1 2\nInes 1 2\n# different people\n'
         'Abel 1 Zoe 1\nZoe 2 Ines 1\nAbel 2 Ines 2\n')
  listed = ''.join(f'{n}/{n}_{i:04d}.jpg {m}/{m}_{j:04d}.jpg {int(n == m)}\n'
                   for n, i, m, j in [('Abel', 1, 'Abel', 2), ('Zoe', 1, 'Zoe',
                                      2), ('Abel', 2, 'Ines', 1),
                                      ('Ines', 2, 'Zoe', 2)])
  images = _lfw_images(rng)
  text = _DIGITS + _SPACE + _HOSTILE
  pairs_case = dict(target='tests.test_hostile_text:_pairs_command',
                    expected=['data_prep:DataPrepError'])
  ijb_case = dict(target='tests.test_hostile_text:_ijb_command',
                  files=_ijb_files(rng), call_file=False,
                  tokens=text + _FLOATS + [b'1.jpg', b'9223372036854775808'])
  data_case = dict(target='tests.test_hostile_text:_dataset_info',
                   files=_dataset_files(), call_file=False,
                   expected=['builtins:ValueError',
                             'builtins:FileNotFoundError'],
                   tokens=_JSON + _DIGITS + _HOSTILE, count=200)
  # report.py on a run whose records are damaged: never an exception
  report_case = dict(target='tests.test_hostile_text:_report_tables',
                     files=_run_records(rng), expected=[], count=400,
                     tokens=_JSON + _DIGITS + _FLOATS + _HOSTILE + [
                         b'"hist"', b'"step"', b'"epoch"', b'"far"',
                         b'"tar"', b'"roc_curve"', b'"scatter_degrees"'])
  return [
      dict(pairs_case, name='pairs_lfw', files={'pairs.txt': lfw.encode(),
                                                **images},
           mutate_file='pairs.txt', count=800,
           tokens=text + [b'Abel', b'Zoe 1']),
      dict(pairs_case, name='pairs_list',
           files={'pairs.txt': listed.encode(), **images},
           mutate_file='pairs.txt', count=800,
           tokens=text + [b'Abel/Abel_0001.jpg', b' 1', b' 0', b' 2']),
      dict(pairs_case, name='landmarks',
           target='tests.test_hostile_text:_pairs_with_landmarks',
           files={'pairs.txt': listed.encode(), **images,
                  'landmarks.txt': _landmark_lines(
                      rng, [k[len('images/'):] for k in images]).encode()},
           mutate_file='landmarks.txt', count=1000,
           tokens=text + _FLOATS + [b' 0 0 0 0 0 0 0 0 0 0']),
      dict(ijb_case, name='ijb_tid_mid',
           mutate_file='IJBC/meta/ijbc_face_tid_mid.txt', count=800),
      dict(ijb_case, name='ijb_5pts',
           mutate_file='IJBC/meta/ijbc_name_5pts_score.txt', count=800),
      dict(ijb_case, name='ijb_pairs',
           mutate_file='IJBC/meta/ijbc_template_pair_label.txt', count=800),
      dict(name='run_json', target='tests.test_hostile_text:_load_run',
           files={'run.json': _run_json()}, mutate_file='run.json',
           call_file=False, tokens=_JSON + _DIGITS + _HOSTILE, count=1500),
      dict(name='results_json',
           target='tests.test_hostile_text:_earlier_results',
           files={'eval/step_12/results.json': _results_json(rng)},
           mutate_file='eval/step_12/results.json', expected=[],
           tokens=_JSON + _DIGITS + _HOSTILE, count=1000),
      dict(data_case, name='dataset_info_json',
           mutate_file='data/dataset_info.json'),
      dict(data_case, name='features_json', mutate_file='data/features.json'),
      dict(report_case, name='stats_jsonl',
           mutate_file='run/analysis/stats.jsonl'),
      dict(report_case, name='report_results_json',
           mutate_file='run/eval/results.json'),
      dict(report_case, name='report_run_json', mutate_file='run/run.json',
           expected=['builtins:ValueError']),
  ]


# --- Targets: what each command does with the file ---------------------------

def _pairs_command(path: str) -> None:
  """python -m data_prep pairs PATH images/ out.bin"""
  case = os.path.dirname(path)
  with contextlib.redirect_stderr(io.StringIO()):
    pairs.convert(path, os.path.join(case, 'images'),
                  os.path.join(case, 'out.bin'), image_size=16, workers=1,
                  overwrite=True, progress=False)


def _pairs_with_landmarks(path: str) -> None:
  """python -m data_prep pairs pairs.txt images/ out.bin --landmarks PATH"""
  case = os.path.dirname(path)
  with contextlib.redirect_stderr(io.StringIO()):
    pairs.convert(os.path.join(case, 'pairs.txt'),
                  os.path.join(case, 'images'), os.path.join(case, 'out.bin'),
                  image_size=16, landmarks=path, workers=1, overwrite=True,
                  progress=False)


def _ijb_command(case: str) -> None:
  """evaluate --ijb: the meta files, then the faces aligned on them."""
  from npcface_jax.evaluation import ijb  # noqa: PLC0415
  root = os.path.join(case, 'IJBC')
  meta = ijb.load_meta(root)
  batches = ijb.aligned_batches(root, meta, image_size=16, batch_size=4,
                                workers=0)
  for _ in batches:
    pass


def _load_run(workdir: str) -> None:
  from npcface_jax.serving import run_dir  # noqa: PLC0415
  run_dir.load_run(workdir)


def _earlier_results(path: str) -> None:
  """evaluate_run's reading of an earlier record, then what it does with
  it: the table and the record written back."""
  from npcface_jax import evaluate  # noqa: PLC0415
  from npcface_jax.common import jsonfile  # noqa: PLC0415
  targets = evaluate._earlier_targets(path)  # noqa: SLF001
  evaluate.format_table(targets)
  jsonfile.write_object(path + '.out', {'targets': targets})


def _report_tables(path: str) -> None:
  """What report.py makes of a run's records, without drawing: labels,
  the results table (Markdown, CSV), the last records, the ROC points."""
  from npcface_jax import report  # noqa: PLC0415
  from npcface_jax.study import comparison  # noqa: PLC0415
  runs = [comparison.load_run(os.path.join(path.split('/run/')[0], 'run'))]
  table = comparison.table(runs)
  comparison.markdown(table)
  comparison.csv_text(table)
  if runs[0].stats:
    report._last_records([('run', runs[0].stats)])  # noqa: SLF001
  comparison.roc_curves(runs[0])


def _dataset_info(case: str) -> None:
  from npcface_jax.data import input_pipeline  # noqa: PLC0415
  input_pipeline.dataset_info(os.path.join(case, 'data'))


def pytest_generate_tests(metafunc):
  """The cases, made at collection only (the children import this module)."""
  if metafunc.function.__name__ == 'test_fuzz':
    metafunc.parametrize('case', fuzz_cases(), ids=lambda c: c['name'])


@pytest.mark.slow
def test_fuzz(case, tmp_path, record_property):
  summary = fuzzing.fuzz(workdir=tmp_path, seed=None, **case)
  record_property('fuzz', summary.line())
  assert summary.problems() == '', summary.line() + '\n' + summary.problems()


# --- Pairs files --------------------------------------------------------------

def _write(path: pathlib.Path, data: bytes | str) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data.encode() if isinstance(data, str) else data)
  return str(path)


def test_pairs_file_not_utf8_names_file_and_line(tmp_path):
  """Was: UnicodeDecodeError escaped from convert."""
  path = _write(tmp_path / 'pairs.txt', b'2 3\nAbel 1 2\nZo\xe9 1 2\n')
  for read in (pairs.read_pairs, lambda p: pairs.convert(
      p, str(tmp_path), str(tmp_path / 'o.bin'), workers=1, progress=False)):
    with pytest.raises(DataPrepError, match=f'{path}, line 3: holds the byte '
                       '0xe9, which is not UTF-8'):
      read(path)


def test_pairs_image_numbers_are_ascii_and_sane(tmp_path):
  """Was: '²' passed str.isdigit and int() raised ValueError; a 5000-digit
  number raised ValueError (int's digit limit); absurd numbers became file
  names."""
  for line in ('Abel ² 3', 'Abel 1 ³', 'Abel ١ 2', 'Abel 1 Zoe ²', '² 3'):
    path = _write(tmp_path / 'pairs.txt', f'Zoe 1 2\n{line}\n')
    with pytest.raises(DataPrepError, match=f'{path}, line 2: .* is not a '
                       'pair'):
      pairs.read_pairs(path)
  for number in ('9' * 5000, '1234567890'):
    with pytest.raises(DataPrepError, match=r'line 1: image number .* \(at '
                       r'most 9 digits\)'):
      pairs.parse_pairs([f'Abel 1 {number}\n'])
  # A header of Unicode digits is no header, and 9 digits are a number.
  with pytest.raises(DataPrepError, match='line 1'):
    pairs.parse_pairs(['² 3\n', 'Abel 1 2\n'])
  assert pairs.parse_pairs(['Abel 1 123456789\n']) == [
      (1, 'Abel/Abel_0001.jpg', 'Abel/Abel_123456789.jpg', True)]


def test_pairs_file_binary_or_endless_line(tmp_path):
  """A NUL byte (which open() would refuse in an image path later) and a
  line of a megabyte are refused by line; a byte order mark and CRLF are
  text."""
  path = _write(tmp_path / 'p.txt', b'Abel 1 2\nAbel 1\x00 2\n')
  with pytest.raises(DataPrepError, match=f'{path}, line 2: holds a NUL'):
    pairs.read_pairs(path)
  _write(tmp_path / 'p.txt', b'Abel 1 2\n' + b'x' * (textfile.MAX_LINE + 5))
  with pytest.raises(DataPrepError, match='line 2: is 1048576 characters or '
                     'longer'):
    pairs.read_pairs(path)
  _write(tmp_path / 'p.txt', b'\xef\xbb\xbf1 2\r\nAbel 1 2\r\nAbel 1 Zoe 3\r')
  assert pairs.read_pairs(path) == [
      (2, 'Abel/Abel_0001.jpg', 'Abel/Abel_0002.jpg', True),
      (3, 'Abel/Abel_0001.jpg', 'Zoe/Zoe_0003.jpg', False)]


# --- Landmark files and alignment ---------------------------------------------

_POINTS = ' '.join(f'{v:.3f}' for v in alignment.ARCFACE_TEMPLATE.flat)


def test_read_landmarks_refuses_what_is_no_landmark(tmp_path):
  """Was: NaN, inf and 1e308 were read (NaN then failed the SVD with
  LinAlgError); a non-UTF-8 byte raised UnicodeDecodeError, whose message
  names neither file nor line; a name given twice kept the last landmarks
  silently."""
  path = tmp_path / 'lm.txt'
  for value in ('nan', 'inf', '-inf', '1e999', '1e308', '-2e6'):
    _write(path, f'a.jpg {_POINTS}\nb.jpg {_POINTS[:-6]} {value}\n')
    with pytest.raises(ValueError, match=f'{path}, line 2: landmarks must be '
                       'finite pixel coordinates'):
      alignment.read_landmarks(path)
  _write(path, f'a.jpg {_POINTS}\n'.encode() + b'b\xff.jpg ' + _POINTS.encode())
  with pytest.raises(ValueError, match=f'{path}, line 2: .*not UTF-8'):
    alignment.read_landmarks(path)
  _write(path, f'a.jpg {_POINTS}\n# c\na.jpg {_POINTS}\n'
         f'a.jpg {_POINTS.replace("38.295", "39")}\n')
  with pytest.raises(ValueError, match=f"{path}, line 4: 'a.jpg' already has "
                     'other landmarks on line 3'):
    alignment.read_landmarks(path)
  _write(path, f'\ufeffa b.jpg {_POINTS}\r\na b.jpg {_POINTS}\r\n')
  assert list(alignment.read_landmarks(path)) == ['a b.jpg']


def test_landmark_file_errors_name_file_and_line_in_both_commands(
    tmp_path, capsys):
  """data_prep pairs and data_prep train turn them into DataPrepError (exit
  status 1) naming the file and line."""
  from data_prep.__main__ import main  # noqa: PLC0415
  rng = np.random.default_rng(0)
  images = tmp_path / 'images'
  for name, data in _lfw_images(rng).items():
    _write(tmp_path / name, data)
  lm = _write(tmp_path / 'lm.txt', f'Abel/Abel_0001.jpg {_POINTS}\n'
              f'Abel/Abel_0002.jpg {_POINTS[:-6]} nan\n')
  list_file = _write(tmp_path / 'pairs.txt',
                     'Abel/Abel_0001.jpg Abel/Abel_0002.jpg 1\n')
  with pytest.raises(DataPrepError, match=f'{lm}, line 2: landmarks must'):
    pairs.convert(list_file, str(images), str(tmp_path / 'o.bin'),
                  landmarks=lm, workers=1, progress=False)
  assert main(['train', str(images), str(tmp_path / 'out'), '--landmarks', lm,
               '--workers', '1', '--quiet']) == 1
  assert f'{lm}, line 2: landmarks must' in capsys.readouterr().err


def _outcome(fn, *args):
  """'ok' or the exception; anything but ValueError (exactly) fails."""
  try:
    out = fn(*args)
  except Exception as e:  # noqa: BLE001
    assert type(e) is ValueError, (args, repr(e))
    return e
  return out


def test_alignment_degenerate_points_raise_value_error():
  """Was: NaN or inf landmarks raised LinAlgError ('SVD did not converge'),
  points within 1e-150 of each other LinAlgError ('Singular matrix') from
  align, coordinates near 1e308 a matrix of NaN."""
  image = Image.new('RGB', (40, 40))
  template = alignment.ARCFACE_TEMPLATE
  refused = {
      'NaN': np.full((5, 2), np.nan),
      'inf': np.where(np.eye(5, 2) > 0, np.inf, template),
      'one point': np.full((5, 2), 7.0),
      'within 1e-8 px': 3 + 1e-8 * template,
      'within 1e-150 px': 5 + 1e-150 * template,
      'odd count': np.arange(7.0),
      'one pair': [1.0, 2.0],
      'not numbers': [['a', 'b']] * 5,
      'four points': template[:4],
  }
  for what, points in refused.items():
    for fn, args in ((alignment.similarity_transform, (points, template)),
                     (alignment.align, (image, points, 16))):
      assert isinstance(_outcome(fn, *args), ValueError), (what, fn)
  # Huge but finite: a finite transform or a ValueError, never NaN.
  for scale in (1e300, 1e305, 1.7e306):
    out = _outcome(alignment.similarity_transform, template * scale, template)
    if not isinstance(out, ValueError):
      assert np.all(np.isfinite(out)), scale
      np.testing.assert_allclose(alignment.apply(out, template * scale),
                                 template, atol=1e-6, err_msg=str(scale))
    _outcome(alignment.align, image, template * scale, 16)


def test_alignment_random_hostile_points():
  """Random points of any magnitude, repeated and special values: align
  gives a 16 x 16 crop or raises ValueError, the transform is finite."""
  rng, seed = fresh_rng()
  image = Image.new('RGB', (30, 20), (9, 9, 9))
  special = np.array([np.nan, np.inf, -np.inf, 0.0, 1e-320, 1.7e308, -1e308])
  for trial in range(300):
    points = rng.normal(size=(5, 2)) * 10.0 ** rng.integers(-320, 308, (5, 2))
    if rng.random() < 0.3:
      points[rng.random((5, 2)) < 0.3] = rng.choice(special)
    if rng.random() < 0.2:
      points[1:] = points[0]
    msg = f'seed {seed}, trial {trial}: {points.tolist()}'
    matrix = _outcome(alignment.similarity_transform, points,
                      alignment.template(16))
    if not isinstance(matrix, ValueError):
      assert matrix.shape == (2, 3) and np.all(np.isfinite(matrix)), msg
    crop = _outcome(alignment.align, image, points, 16)
    if not isinstance(crop, ValueError):
      assert crop.size == (16, 16), msg


# --- IJB meta files -----------------------------------------------------------

def _ijb_release(tmp_path) -> tuple[pathlib.Path, dict]:
  rng = np.random.default_rng(0)
  for name, data in _ijb_files(rng).items():
    _write(tmp_path / name, data)
  meta = tmp_path / 'IJBC' / 'meta'
  return tmp_path / 'IJBC', {p.name: p.read_bytes() for p in meta.iterdir()}


def _with_line(good: bytes, line: int, text: bytes) -> bytes:
  lines = good.split(b'\n')
  lines[line - 1] = text
  return b'\n'.join(lines)


def _meta_error(root, good, file, line, text, *, restore=True) -> str:
  """load_meta's message after line ``line`` of ``file`` became text."""
  meta = root / 'meta'
  for name, data in good.items():
    (meta / name).write_bytes(data)
  (meta / file).write_bytes(_with_line(good[file], line, text))
  from npcface_jax.evaluation import ijb  # noqa: PLC0415
  with pytest.raises(ValueError) as e:
    ijb.load_meta(root)
  return str(e.value)


def test_ijb_meta_refuses_bad_lines_by_file_and_line(tmp_path):
  """Was: a non-UTF-8 byte escaped as UnicodeDecodeError (the pairs file's
  through np.loadtxt); an id beyond int64 raised OverflowError; one in the
  pairs file was refused without its line; 1e308 landmarks became inf in
  float32; Arabic-Indic digits were ids in one file and refused in the
  other."""
  root, good = _ijb_release(tmp_path)
  tid, five, prs = ('ijbc_face_tid_mid.txt', 'ijbc_name_5pts_score.txt',
                    'ijbc_template_pair_label.txt')
  line5 = good[five].split(b'\n')[2]
  cases = [
      (tid, 2, b'2.jpg 1 1\xff', 'not UTF-8'),
      (five, 3, line5 + b' \xc3', 'not UTF-8'),
      (prs, 4, b'3 4 \xff1', 'not UTF-8'),
      (prs, 2, b'1 2\x00 0', 'NUL'),
      (tid, 3, b'3.jpg 99999999999999999999 12', 'template_id media_id'),
      (tid, 3, b'3.jpg 2 9223372036854775808', 'template_id media_id'),
      (tid, 3, '3.jpg ١ 12'.encode(), 'template_id media_id'),
      (prs, 5, b'1 9223372036854775808 0', 'template1 template2 label'),
      (prs, 5, '1 ١ 0'.encode(), 'template1 template2 label'),
      (five, 2, line5.replace(line5.split()[3], b'1e308'), 'face_score'),
      (five, 2, line5.replace(line5.split()[3], b'1e999'), 'face_score'),
      (five, 2, line5.rsplit(maxsplit=1)[0] + b' -inf', 'face_score'),
  ]
  for file, line, text, what in cases:
    message = _meta_error(root, good, file, line, text)
    assert f'{root / "meta" / file}, line {line}: ' in message, (text, message)
    assert what in message, (text, message)


def test_ijb_meta_duplicate_names_and_text_variants(tmp_path):
  """An image given landmarks twice in a 5pts file that is not in
  face_tid_mid's order is refused naming both lines (was: the last one
  silently won); a byte order mark and CR line ends are text, with lines
  counted as np.loadtxt counts them."""
  from npcface_jax.evaluation import ijb  # noqa: PLC0415
  root, good = _ijb_release(tmp_path)
  five, prs = 'ijbc_name_5pts_score.txt', 'ijbc_template_pair_label.txt'
  lines = good[five].split(b'\n')
  shuffled = [lines[1], lines[0], *lines[2:-1], lines[3]]  # 4.jpg twice
  message = _meta_error(root, good, five, 1, b'\n'.join(shuffled))
  assert f"{root / 'meta' / five}, line 9: image '4.jpg' already has " \
         'landmarks on line 4' in message, message
  for file, data in good.items():
    (root / 'meta' / file).write_bytes(b'\xef\xbb\xbf' + data.replace(
        b'\n', b'\r'))
  meta = ijb.load_meta(root)
  assert meta.pair_templates.shape == (6, 2) and len(meta.image_names) == 8
  (root / 'meta' / prs).write_bytes(b'\xef\xbb\xbf' + good[prs].replace(
      b'\n', b'\r').replace(b'3 4 1', b'3 4 2'))
  with pytest.raises(ValueError, match=f'{prs}, line 4: .* got label 2'):
    ijb.load_meta(root)


def test_ijb_big_pairs_file_stays_fast(tmp_path):
  """A million pair lines through np.loadtxt (IJB-C has 15.7 million) in
  less time than Python takes to just read their lines (a reader that
  parses them in Python takes several times that), and a bad last line
  found by its number."""
  from npcface_jax.evaluation import ijb  # noqa: PLC0415
  root, good = _ijb_release(tmp_path)
  block = b''.join(b'%d %d %d\n' % (a, b, (a + b) % 2)
                   for a in range(1, 5) for b in range(1, 5)) * 1000
  n = 1_024_000
  pairs_file = root / 'meta' / 'ijbc_template_pair_label.txt'
  pairs_file.write_bytes(block * (n // 16000))
  start = time.perf_counter()
  meta = ijb.load_meta(root)
  seconds = time.perf_counter() - start
  start = time.perf_counter()
  assert sum(1 for _ in textfile.text_lines(pairs_file)) == n
  python_s = time.perf_counter() - start
  assert meta.pair_templates.shape == (n, 2)
  assert seconds < 1.5 * python_s, (
      f'{n} pairs took {seconds:.2f} s, reading their lines {python_s:.2f} s')
  with open(pairs_file, 'ab') as f:
    f.write(b'1 2 x\n')
  with pytest.raises(ValueError, match=f'line {n + 1}: expected'):
    ijb.load_meta(root)


# --- run.json and results.json ------------------------------------------------

def test_load_run_refuses_bad_run_json(tmp_path):
  """Was: JSONDecodeError, UnicodeDecodeError or KeyError escaped from
  load_run naming no file, and an image size of true or 112.5 was taken as
  an int."""
  from npcface_jax.serving import run_dir  # noqa: PLC0415
  good = json.loads(_run_json())
  path = tmp_path / 'run.json'
  cases = {
      b'{"config": {': 'is not valid JSON',
      b'\xff{}': 'is not UTF-8',
      b'[' * 100000: 'nests JSON deeper than 64 levels',
      b'{"config": {"a": %s}, "image_size": 9}' % (b'[' * 500 + b']' * 500):
          'nests JSON deeper than 64 levels',
      b'[1, 2]': 'holds a JSON list, not an object',
      b'{"image_size": 112}': '"config" is missing',
      b'{"config": [], "image_size": 112}': '"config" is not an object',
      b'{"config": {"a.b": 1}, "image_size": 112}': '"config" is not a config',
      b'{"config": {}}': '"image_size" is None',
  }
  for size in ('"112"', '0', '-1', 'true', '112.0', '1e999', '100000'):
    cases[json.dumps(dict(good, image_size=None)).replace(
        'null', size).encode()] = f'"image_size" is {json.loads(size)!r}'
  for text, what in cases.items():
    path.write_bytes(text)
    with pytest.raises(ValueError) as e:
      run_dir.load_run(str(tmp_path))
    assert str(e.value).startswith(str(path)), (text[:80], e.value)
    assert what in str(e.value), (text[:80], e.value)
    assert 're-run training' in str(e.value), (text[:80], e.value)
  path.write_bytes(_run_json())
  config, size = run_dir.load_run(str(tmp_path))
  assert size == 48 and config.model == good['config']['model']


def test_corrupt_results_json_is_moved_aside(tmp_path, caplog):
  """Was: a corrupt eval/step_N/results.json stopped evaluate_run with a
  JSONDecodeError naming no file (a deeply nested one with RecursionError,
  after the evaluation, when the record was written); one without
  'targets' was silently replaced."""
  from npcface_jax import evaluate  # noqa: PLC0415
  rng = np.random.default_rng(0)
  path = tmp_path / 'results.json'
  good = _results_json(rng)
  path.write_bytes(good)
  assert list(evaluate._earlier_targets(str(path))) == ['lfw']  # noqa: SLF001
  bad = [good[:100], b'\xff' + good, b'[]', b'{"step": 1}',
         b'{"targets": {"lfw": {"accuracy": "high"}}}',
         # Deep enough to break json.dump when the record is written back.
         b'{"targets": {"lfw": {"x": %s}}}' % (b'[' * 500 + b']' * 500)]
  asides = set()
  for data in bad:
    path.write_bytes(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert evaluate._earlier_targets(str(path)) == {}  # noqa: SLF001
    assert not path.exists()
    (aside,) = set(tmp_path.glob('results.json.corrupt-*')) - asides
    asides.add(aside)
    assert aside.read_bytes() == data
    (record,) = caplog.records
    assert str(path) in record.getMessage() and str(aside) in (
        record.getMessage()), record.getMessage()


# --- Dataset metadata ---------------------------------------------------------

def test_dataset_info_refuses_damaged_metadata(tmp_path):
  """Was: shard lengths of 3e15 or -30 examples and 10^14 classes were
  accepted; a label that is no ClassLabel raised AttributeError, an image
  shape of None TypeError; corrupt JSON named the directory only."""
  from npcface_jax.data import input_pipeline  # noqa: PLC0415
  files = _dataset_files()
  for name, data in files.items():
    _write(tmp_path / name, data)
  data_dir = tmp_path / 'data'
  info = input_pipeline.dataset_info(data_dir)
  assert (info.num_classes, info.num_examples, info.image_size,
          info.shard_lengths) == (3, 12, 16, (6, 6))
  good = {f: (data_dir / f).read_bytes() for f in ('dataset_info.json',
                                                    'features.json')}
  info_json, features_json = good['dataset_info.json'], good['features.json']
  label = json.loads(features_json)['featuresDict']['features']['label']
  text_label = json.dumps(json.loads(features_json)).replace(
      label['pythonClassName'], 'tensorflow_datasets.core.features.'
      'text_feature.Text').replace('"classLabel": {"numClasses": "3"}',
                                   '"text": {}').encode()
  cases = [
      ('features.json', features_json[:-40], 'not valid JSON'),
      ('features.json', b'\xff' + features_json, 'not valid JSON'),
      ('features.json', b'["features"]', 'not an object'),
      ('features.json', features_json.replace(b'"label"', b'"name"'),
       "features ['image', 'name']"),
      ('features.json', text_label, 'label Text'),
      ('features.json', features_json.replace(b'"16",', b'"-1",'),
       'image Image of shape (None, None, 3)'),
      ('features.json', features_json.replace(
          b'"numClasses": "3"', b'"numClasses": "100000000000000"'),
       'with 100000000000000 classes for 12 examples'),
      ('dataset_info.json', info_json[:70], 'not valid JSON'),
      ('dataset_info.json', info_json.replace(b'"6"', b'"3000000000000000"'),
       'cannot hold 3000000000000000'),
      ('dataset_info.json', info_json.replace(b'"6"', b'"-30"', 1),
       'shard lengths (-30, 6) do not fit'),
      ('dataset_info.json', info_json.replace(b'"train"', b'"test"'),
       "no 'train' split"),
  ]
  for file, text, what in cases:
    for f, g in good.items():
      (data_dir / f).write_bytes(g)
    (data_dir / file).write_bytes(text)
    with pytest.raises(ValueError) as e:
      input_pipeline.dataset_info(data_dir)
    message = str(e.value)
    assert message.startswith(str(data_dir / file)), (file, what, message)
    assert what in message and f'{str(data_dir)!r}' in message, (what, message)
    assert 'python -m data_prep train' in message, message
