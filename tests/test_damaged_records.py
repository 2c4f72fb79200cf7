"""Damaged TFRecord shards (issue: 64 damaged bytes ended training with
TensorFlow's raw DataLossError, forever, since resume replays the same
batches): the damaged record is skipped, named (shard, byte offset) and
counted, or stops the run with config.strict_records; a resumed stream
skips it identically; ``python -m data_prep check`` names every problem;
and the shard readers are fuzzed in a child process (``fuzz_cases()`` is
what benchmarks/fuzz_parsers.py runs at length)."""

import functools
import io
import json
import logging
import os
import pathlib
import shutil
import struct

import jax
import ml_collections
import numpy as np
import pytest

from data_prep import check as check_lib
from data_prep.__main__ import main as data_prep_main
from npcface_jax.data import input_pipeline as ip, synthetic, tfrecords
from npcface_jax.serving import run_dir
from npcface_jax.training import config_checks
from tests import fuzzing
from tests.conftest import NUM_DEVICES
from tests.helpers import SHARED_DATA
from tests.test_input_pipeline import Data, write_dataset

tf = pytest.importorskip('tensorflow')

SIZE = 112
SHARDS = (13, 9, 10)
NUM_CLASSES = 5
HERE = 'tests.test_damaged_records'


def shard_name(i, count=len(SHARDS)):
  return f'npcface-train.tfrecord-{i:05d}-of-{count:05d}'


def record_starts(path):
  """Each record's byte offset, walked from the lengths alone (not the
  code under test), and the file's size."""
  return record_starts_of(pathlib.Path(path).read_bytes())


def record_starts_of(data):
  starts, p = [], 0
  while p < len(data):
    starts.append(p)
    p += 16 + struct.unpack_from('<Q', data, p)[0]
  return starts, len(data)


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
  n = sum(SHARDS)
  labels = np.arange(n) % NUM_CLASSES
  rng = np.random.default_rng(0)
  faces = synthetic.prototypes(labels, SIZE, seed=3)
  faces += rng.normal(0, 20, faces.shape)
  images = np.clip(faces, 0, 255).astype(np.uint8)
  out = tmp_path_factory.mktemp('clean')
  return Data(out, write_dataset(out, images, labels, SHARDS, NUM_CLASSES),
              labels, SHARDS)


def damaged(clean, folder, edits):
  """A copy of the clean dataset with ``edits``: {shard index: function of
  the shard's bytes and record starts -> new bytes}."""
  shutil.copytree(clean.path, folder)
  for i, edit in edits.items():
    path = folder / shard_name(i)
    starts, _ = record_starts(path)
    path.write_bytes(bytes(edit(bytearray(path.read_bytes()), starts)))
  return folder


def overwrite(at, n=64, value=0):
  def edit(data, starts):
    where = at(data, starts)
    data[where:where + n] = bytes([value]) * n
    return data
  return edit


def _mesh():
  return jax.make_mesh((NUM_DEVICES, 1), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _examples(data, batches):
  return [i for b in batches for i, _ in data.identify(b['image'])]


def _index_of(clean, shard, record):
  return sum(SHARDS[:shard]) + record


# --- The stream --------------------------------------------------------------

def test_64_damaged_bytes_are_skipped_named_and_counted(clean, tmp_path,
                                                        caplog):
  """The issue's reproduction: 64 zero bytes in the middle of a shard.
  TensorFlow's reader alone stops at them; the stream skips the record
  they fall in, names it and keeps every epoch whole."""
  middle = overwrite(lambda data, starts: len(data) // 2)
  path = damaged(clean, tmp_path / 'ds', {1: middle})
  shard = path / shard_name(1)
  starts, _ = record_starts(clean.path + '/' + shard_name(1))
  hit = max(k for k, s in enumerate(starts) if s <= shard.stat().st_size // 2)
  with pytest.raises(tf.errors.DataLossError, match='corrupted record at'):
    list(tf.data.TFRecordDataset(str(shard)))  # the failure of the issue
  it = ip.train_stream(path, 8, _mesh(), flip=False, seed=3)
  with caplog.at_level(logging.WARNING):
    epochs = [_examples(clean, [it.next_local() for _ in range(4)])
              for _ in range(2)]
  assert it.damaged == [{
      'shard': shard_name(1), 'offset': starts[hit],
      'bytes': starts[hit + 1] - starts[hit], 'examples': 1,
      'what': 'the data fails its checksum; this record alone is skipped'}]
  warning = [r.getMessage() for r in caplog.records
             if 'damaged record at' in r.getMessage()]
  assert len(warning) == 1 and str(shard) in warning[0], warning
  assert f'byte {starts[hit]}' in warning[0]
  assert 'python -m data_prep check' in warning[0]
  lost = _index_of(clean, 1, hit)
  for order in epochs:
    assert len(order) == 32 and lost not in order
    assert set(order) == set(range(32)) - {lost}  # one filled in twice
  assert it.state() == {'epoch': 2, 'index': 0}


def test_resume_skips_the_damage_identically(clean, tmp_path):
  """A restarted stream meets the damage again and yields bit for bit the
  batches of an uninterrupted one, also on a record-split process."""
  path = damaged(clean, tmp_path / 'ds', {
      1: overwrite(lambda data, starts: starts[3] + 200),
      2: overwrite(lambda data, starts: starts[7] + 5)})  # a header too
  mesh = _mesh()
  it = ip.train_stream(path, 8, mesh, seed=5)
  want = [it.next_local() for _ in range(11)]
  assert len(it.damaged) == 2
  for at in (3, 4, 6):
    state = {'epoch': at // 4, 'index': at % 4 * 8}
    resumed = ip.train_stream(path, 8, mesh, seed=5, start=state)
    for w in want[at:]:
      g = resumed.next_local()
      assert g['image'].tobytes() == w['image'].tobytes(), at
      np.testing.assert_array_equal(g['label'], w['label'])
    assert resumed.damaged == it.damaged

  def stream(start=None):
    return ip.train_stream(path, 8, mesh, seed=7, start=start,
                           process_index=1, process_count=4)
  first = stream()
  want = [first.next_local() for _ in range(10)]
  resumed = stream({'epoch': 1, 'index': 2})
  for w in want[5:]:
    assert resumed.next_local()['image'].tobytes() == w['image'].tobytes()


@pytest.mark.parametrize('case', ['header', 'across', 'truncated'])
def test_lost_framing_resumes_at_the_next_record_or_loses_the_tail(
    clean, tmp_path, case):
  """A damaged length field: reading resumes at the next intact record;
  damage across two records costs both; a shard cut short loses its tail,
  and the warning says which."""
  starts, size = record_starts(clean.path + '/' + shard_name(0))
  k = 5
  edit, offset, end, lost, resumed = {
      'header': (overwrite(lambda d, s: s[k], 12, 0xFF), starts[k],
                 starts[k + 1], 1, True),
      'across': (overwrite(lambda d, s: s[k] - 20), starts[k - 1],
                 starts[k + 1], 2, True),
      'truncated': (lambda d, s: d[:s[k] + 100], starts[k], starts[k] + 100,
                    SHARDS[0] - k, False),
  }[case]
  path = damaged(clean, tmp_path / 'ds', {0: edit})
  it = ip.train_stream(path, 8, _mesh(), flip=False)
  order = _examples(clean, [it.next_local() for _ in range(4)])
  (record,) = it.damaged
  assert (record['shard'], record['offset'], record['bytes'],
          record['examples']) == (shard_name(0), offset, end - offset, lost)
  assert ('resumed at the next intact record' in record['what']) == resumed
  assert ('the rest of the shard' in record['what']) == (not resumed)
  first = offset == starts[k - 1]
  gone = set(range(k - first, k - first + lost))
  assert set(order) == set(range(32)) - gone and len(order) == 32


@pytest.mark.parametrize('cut', [0, 5])
def test_a_shard_cut_short_is_named_at_the_start(clean, tmp_path, cut):
  """TensorFlow reads a shard cut at a record's end (or inside a header)
  without a word: the sizes data_prep recorded name it at the start."""
  sizes = [os.path.getsize(os.path.join(clean.path, shard_name(i)))
           for i in range(3)]
  path = damaged(clean, tmp_path / 'ds', {2: lambda d, s: d[:s[7] + cut]})
  starts, _ = record_starts(os.path.join(clean.path, shard_name(2)))
  assert len(list(tf.data.TFRecordDataset(str(path / shard_name(2))))) == 7
  report = {'shards': [shard_name(i) for i in range(3)], 'shard_bytes': sizes}
  (path / 'report.json').write_text(json.dumps(report))
  it = ip.train_stream(path, 8, _mesh())
  (record,) = it.damaged
  assert (record['shard'], record['offset'], record['examples']) == (
      shard_name(2), starts[7], 3)
  assert ('the shard ends 3 record(s) short' in record['what']) == (not cut)
  assert ('too few for a record' in record['what']) == bool(cut)
  with pytest.raises(ip.DamagedShard, match=f'{shard_name(2)}: damaged '
                     f'record at byte {starts[7]}'):
    ip.train_stream(path, 8, _mesh(), strict=True)


def test_without_shard_sizes_the_total_is_compared(clean, tmp_path, caplog):
  path = damaged(clean, tmp_path / 'ds', {2: lambda d, s: d[:s[7]]})
  total = sum(os.path.getsize(os.path.join(clean.path, shard_name(i)))
              for i in range(3))
  info = json.loads((path / 'dataset_info.json').read_text())
  info['splits'][0]['numBytes'] = str(total)
  (path / 'dataset_info.json').write_text(json.dumps(info))
  with caplog.at_level(logging.WARNING):
    ip.train_stream(path, 8, _mesh())
  now = sum(os.path.getsize(path / shard_name(i)) for i in range(3))
  assert (f'{path}: the shards hold {now} bytes where its dataset_info.json '
          f'says {total}: a shard was cut short') in caplog.text
  with pytest.raises(ip.DamagedShard, match='python -m data_prep check'):
    ip.train_stream(path, 8, _mesh(), strict=True)


def test_strict_records_stop_naming_shard_offset_and_fix(clean, tmp_path):
  path = damaged(clean, tmp_path / 'ds',
                 {2: overwrite(lambda data, starts: starts[4] + 30)})
  starts, _ = record_starts(path / shard_name(2))
  it = ip.train_stream(path, 8, _mesh(), strict=True)
  with pytest.raises(ip.DamagedShard) as e:
    for _ in range(4):
      it.next_local()
  message = str(e.value)
  assert message.startswith(f'{path / shard_name(2)}: damaged record at '
                            f'byte {starts[4]}: the data fails'), message
  assert f'python -m data_prep check {path}' in message
  assert 're-copy the shard' in message and 'strict_records=False' in message


def test_a_shard_with_no_intact_record_is_refused(clean, tmp_path):
  """Two processes split the files: the damage leaves process 1 nothing."""
  path = damaged(clean, tmp_path / 'ds',
                 {0: lambda data, starts: b'\7' * len(data)})
  assert ip.split_files(SHARDS, 2)[0] == (0,)
  it = ip.train_stream(path, 8, _mesh(), process_index=0, process_count=2)
  with pytest.raises(ip.DamagedShard, match='every record that process 0 '
                     'reads .* is damaged'):
    it.next_local()


@pytest.mark.slow
def test_training_names_the_damage_in_its_log_and_run_json(
    tmp_path, monkeypatch, caplog):
  """The loop's side: the warning and a summary in the log, run.json's
  damaged_records kept once across a resume; strictness ends the run."""
  from npcface_jax import models  # noqa: PLC0415
  from npcface_jax.training import loop  # noqa: PLC0415
  from tests import tiny_backbone  # noqa: PLC0415
  from tests.test_train import _config  # noqa: PLC0415
  monkeypatch.setattr(models, 'from_config', tiny_backbone.create_model)
  labels = np.arange(32) % NUM_CLASSES
  faces = np.clip(synthetic.prototypes(labels, 32, seed=1), 0, 255)
  write_dataset(tmp_path / 'ds', faces.astype(np.uint8), labels, SHARDS,
                NUM_CLASSES)
  shard = tmp_path / 'ds' / shard_name(1)
  starts, _ = record_starts(shard)
  data = bytearray(shard.read_bytes())
  data[starts[4] + 40:starts[4] + 104] = bytes(64)
  shard.write_bytes(bytes(data))
  config = _config(dataset=str(tmp_path / 'ds'), batch_size=8,
                   num_train_steps=4, checkpoint_every_steps=2)
  workdir = tmp_path / 'run'
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(config, str(workdir))
  assert f'{shard}: damaged record at byte {starts[4]}' in caplog.text
  assert ('input: 1 damaged record(s) skipped so far, 1 example(s) fewer '
          'in every epoch') in caplog.text
  want = [{'shard': shard_name(1), 'offset': starts[4],
           'bytes': starts[5] - starts[4], 'examples': 1,
           'what': 'the data fails its checksum; this record alone is '
                   'skipped'}]
  info = json.loads((workdir / 'run.json').read_text())
  assert info['damaged_records'] == {'examples': 1, 'records': want}
  config.num_train_steps = 6  # resumed: the same record, once
  loop.train_and_evaluate(config, str(workdir))
  info = json.loads((workdir / 'run.json').read_text())
  assert info['damaged_records'] == {'examples': 1, 'records': want}
  config.strict_records = True
  with pytest.raises(ip.DamagedShard, match=f'{shard}: damaged record at '
                     f'byte {starts[4]}'):
    loop.train_and_evaluate(config, str(tmp_path / 'strict'))


def test_config_field_is_checked():
  from tests.test_train import _config  # noqa: PLC0415
  config_checks.check(_config(), num_devices=NUM_DEVICES)
  c = ml_collections.ConfigDict({**_config().to_dict(),
                                 'strict_records': 'yes'})
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.strict_records = 'yes': must be True"):
    config_checks.check(c, num_devices=NUM_DEVICES)


def test_run_json_keeps_damage_and_old_files_read(tmp_path):
  """run.json's damaged_records: merged by (shard, offset) across a
  resume; a run.json written before the field reads as none."""
  (tmp_path / 'run.json').write_text(json.dumps(
      {'config': {'model': 'x'}, 'image_size': 112, 'num_classes': 3}))
  assert run_dir.damaged_records(
      json.loads((tmp_path / 'run.json').read_text())) == []
  run_dir.load_run(str(tmp_path))  # still a run
  first = {'shard': 's0', 'offset': 10, 'bytes': 5, 'examples': 1,
           'what': 'w'}
  second = dict(first, offset=99, examples=3)
  run_dir.record_damage(str(tmp_path), [first])
  run_dir.record_damage(str(tmp_path), [first, second])
  info = json.loads((tmp_path / 'run.json').read_text())
  assert info['damaged_records'] == {'examples': 4,
                                     'records': [first, second]}
  assert info['config'] == {'model': 'x'}


# --- The framing reader ------------------------------------------------------

def test_crc32c_and_scan_agree_with_tensorflow(tmp_path):
  rng = np.random.default_rng(1)
  lengths = [0, 1, 3, 4, 5, 8, 255, 256, 257, 4097, 70_000]
  records = [rng.integers(0, 256, n, np.uint8).tobytes() for n in lengths]
  buf = b''.join(records)
  starts = np.cumsum([0] + lengths[:-1])
  assert tfrecords.crc32c_py(b'123456789') == 0xE3069283  # the check value
  assert tfrecords.crc32c(buf, starts, lengths).tolist() == [
      tfrecords.crc32c_py(r) for r in records]
  path = str(tmp_path / 'x.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for r in records:
      writer.write(r)
  seen = []
  scan = tfrecords.scan(path, lambda i, offset, data: seen.append(
      (i, offset, bytes(data))))
  want_starts, size = record_starts(path)
  assert scan.damage == [] and scan.size == size
  assert scan.offsets.tolist() == want_starts
  assert scan.lengths.tolist() == lengths
  assert seen == list(zip(range(len(records)), want_starts, records))


@pytest.mark.parametrize('case', ['data', 'header', 'truncated', 'trailing'])
def test_tensorflow_errors_are_traced_to_their_shard(clean, tmp_path, case):
  """The offset in TensorFlow's message, checked in every shard, points
  at the damaged one alone."""
  edit = {
      'data': overwrite(lambda d, s: s[6] + 40),
      'header': overwrite(lambda d, s: s[6] + 2, 4, 0xAA),
      'truncated': lambda d, s: d[:s[6] + 20],
      'trailing': lambda d, s: d + b'\0' * 20,
  }[case]
  path = damaged(clean, tmp_path / 'ds', {1: edit})
  files = [str(path / shard_name(i)) for i in range(3)]
  with pytest.raises(tf.errors.DataLossError) as e:
    list(tf.data.TFRecordDataset(files[1]))
  assert tfrecords.shards_at(e.value.message, files) == [files[1]]
  assert tfrecords.shards_at('no offset here', files) is None


def test_parse_example_reads_what_tensorflow_writes():
  from data_prep import shards  # noqa: PLC0415
  record = shards.serialize(b'\xff\xd8\xffjpeg', 7)
  assert tfrecords.parse_example(record) == {
      'image': ('bytes', [b'\xff\xd8\xffjpeg']), 'label': ('int64', [7])}
  negative = tf.train.Example(features=tf.train.Features(feature={
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[-3]))}))
  assert tfrecords.parse_example(negative.SerializeToString()) == {
      'label': ('int64', [-3])}
  for bad in (record[:-3], b'\x0a\xff\xff\xff\xff\x0f', b'\x0f'):
    with pytest.raises(ValueError):
      tfrecords.parse_example(bad)


# --- data_prep check ---------------------------------------------------------

def _write_records(path, records):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for r in records:
      writer.write(r)


def test_check_passes_a_clean_set_and_names_each_problem(clean, tmp_path,
                                                         capsys):
  assert data_prep_main(['check', clean.path, '--workers', '1']) == 0
  out = capsys.readouterr().out
  assert out.count(', OK\n') == 3 and 'data_prep check: OK' in out
  from data_prep import shards  # noqa: PLC0415
  path = damaged(clean, tmp_path / 'ds', {
      0: overwrite(lambda d, s: s[2] + 100),
      1: lambda d, s: d[:s[8] + 30]})
  # Shard 2 rewritten: intact frames around a bad label, a PNG, a JPEG of
  # the wrong size and a record that is no Example.
  good = [bytes(r) for r in tf.data.TFRecordDataset(
      str(path / shard_name(2))).as_numpy_iterator()]
  png = io.BytesIO()
  from PIL import Image  # noqa: PLC0415
  Image.new('RGB', (SIZE, SIZE)).save(png, 'PNG')
  small = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  bad = [shards.serialize(clean_jpeg(good[0]), 99),
         shards.serialize(png.getvalue(), 1), shards.serialize(small, 1),
         b'\x0fnot an example']
  _write_records(path / shard_name(2), good[:6] + bad)
  assert data_prep_main(['check', str(path), '--workers', '2']) == 1
  out = capsys.readouterr().out
  s0, _ = record_starts(clean.path + '/' + shard_name(0))
  s1, _ = record_starts(clean.path + '/' + shard_name(1))
  assert f'byte {s0[2]} (record 2): damaged (1 example(s) lost): the data' \
      in out
  assert (f'byte {s1[8]} (record 8): damaged (1 example(s) lost): the '
          'record runs past the end of the file') in out
  rows = record_starts(path / shard_name(2))[0]
  for k, what in ((6, 'label 99 is not in [0, 5)'),
                  (7, 'the image is not a JPEG'),
                  (8, 'the image is 8x8; the metadata says 112x112'),
                  (9, 'not a tf.train.Example')):
    assert f'byte {rows[k]} (record {k}): {what}' in out, (k, out)
  assert 'data_prep check: 6 problem(s) in 3 of 3 shard(s); 6 of 32' in out


def clean_jpeg(record):
  return tfrecords.parse_example(record)['image'][1][0]


def test_check_refuses_what_is_no_dataset(tmp_path, capsys):
  assert data_prep_main(['check', str(tmp_path / 'nowhere')]) == 1
  assert 'does not exist' in capsys.readouterr().err


# --- Fuzzing -----------------------------------------------------------------

def _orl_dataset(folder):
  """Two shards of six ORL faces (32 x 32 JPEGs, 3 people) and metadata."""
  from PIL import Image  # noqa: PLC0415
  faces = np.stack([np.asarray(Image.open(
      SHARED_DATA / 'orl_faces' / f's{p}' / f'{k}.pgm').convert('RGB')
      .resize((32, 32))) for p in (1, 2, 3) for k in (1, 2, 3, 4)])
  labels = np.repeat([0, 1, 2], 4)
  order = np.random.default_rng(0).permutation(12)
  write_dataset(folder, faces[order], labels[order], (6, 6), 3)


@functools.cache
def _fuzz_files():
  import tempfile  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    _orl_dataset(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def fuzz_cases() -> list[dict]:
  """Keyword arguments of fuzzing.fuzz for the shard readers (with
  'count', the test's); skips without the shared ORL data."""
  if not (SHARED_DATA / 'orl_faces' / 's1' / '1.pgm').is_file():
    pytest.skip(f'ORL faces not found at {SHARED_DATA}')
  files = _fuzz_files()
  shard = shard_name(0, 2)
  starts, _ = record_starts_of(files[shard])
  case = dict(files=files, mutate_file=shard, call_file=False,
              tokens=[files[shard][s:s + 12] for s in starts[:3]],
              length_fields=[(s, 8) for s in starts], mem_mb=16384,
              per_input_s=30.0)
  return [
      dict(case, name='tfrecord_shard', target=f'{HERE}:_read_shards',
           expected=['builtins:ValueError'], count=60),
      # Checksums recomputed after mutating, as a writer of bad records
      # would leave them: mutations reach the Example and JPEG decoders.
      dict(case, name='tfrecord_shard_reframed',
           target=f'{HERE}:_read_reframed_shards',
           expected=['builtins:ValueError',
                     'npcface_jax.data.input_pipeline:DamagedShard'],
           must_name='case_tfrecord_shard_reframed', count=40),
  ]


def _read_shards(folder):
  """What a user does with a mutated shard: `data_prep check`, then two
  epochs of training, then the same with strict_records. Every damaged
  record the stream meets must be one check names; strictness must stop
  at the first, naming it."""
  report = check_lib.check(folder, workers=1, stream=io.StringIO())
  named = {(s['shard'], p['offset']) for s in report['shards']
           for p in s['problems'] if p['what'].startswith('damaged')}
  mesh = jax.make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1])
  it = ip.train_stream(folder, 4, mesh, process_index=0, process_count=1)
  try:
    for _ in range(2 * it.steps_per_epoch):
      batch = it.next_local()
      assert batch['image'].shape == (4, 32, 32, 3), batch['image'].shape
      assert np.all((batch['label'] >= 0) & (batch['label'] < 3))
  except ip.DamagedShard as e:  # a record that holds but does not decode
    assert 'although its checksums hold' in str(e), str(e)
    assert any(not p['what'].startswith('damaged') and p['offset'] is not
               None for s in report['shards'] for p in s['problems']), report
    raise
  met = {(d['shard'], d['offset']) for d in it.damaged}
  assert met <= named, (met, named)
  strict = ip.train_stream(folder, 4, mesh, process_index=0, process_count=1,
                           strict=True)
  try:
    for _ in range(2 * it.steps_per_epoch):
      strict.next_local()
  except ip.DamagedShard as e:
    assert any(f'{shard}: damaged record at byte {offset}:' in str(e)
               for shard, offset in met), (str(e), met)
  else:
    assert not met, met


def _read_reframed_shards(folder):
  """_read_shards after giving every whole frame of the mutated shard the
  right checksums."""
  path = pathlib.Path(folder) / shard_name(0, 2)
  data, p = bytearray(path.read_bytes()), 0
  while p + 12 <= len(data):
    (n,) = struct.unpack_from('<Q', data, p)
    if n > len(data) - p - 16:
      break
    for at, size in ((p, 8), (p + 12, n)):
      crc = tfrecords.mask(tfrecords.crc32c_py(bytes(data[at:at + size])))
      struct.pack_into('<I', data, at + size, crc)
    p += 16 + n
  path.write_bytes(bytes(data))
  _read_shards(folder)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['tfrecord_shard', 'tfrecord_shard_reframed'])
def test_fuzz_shards(name, tmp_path, record_property):
  case = {c['name']: c for c in fuzz_cases()}[name]
  summary = fuzzing.fuzz(workdir=tmp_path, seed=None, **case)
  record_property('fuzz', summary.line())
  assert summary.problems() == '', f'{summary.line()}\n{summary.problems()}'
  assert summary.parsed > case['count'] // 4, summary.line()
