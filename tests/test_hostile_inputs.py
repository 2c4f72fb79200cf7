"""Hostile inputs for data_prep's readers (issue 14): MXNet .rec and .idx,
``path label`` lists, image folders and image files must parse, or be
refused with an error naming the file and the line or offset, or be skipped
and reported; never crash, hang or allocate a forged length.

Seeded mutation fuzzing (tests/fuzzing.py) of real ORL files; then one
deterministic test per defect found, the decompression bomb under an
address-space limit, the colour modes ``images.decode`` must get right,
and a ``data_prep train`` run over hostile files among good faces.
``fuzz_cases()`` is what benchmarks/fuzz_parsers.py runs with larger counts.
"""

import functools
import io
import json
import math
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep import DataPrepError, preprocess, recordio, sources
from npcface_jax.faces import images
from tests import fuzzing
from tests.helpers import SHARED_DATA

ORL = SHARED_DATA / 'orl_faces'
REC = SHARED_DATA / 'orl_rec'
ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = 'tests.test_hostile_inputs'
OPTIONS = preprocess.Options()


class Refused(ValueError):
  """A fuzz target's image refused with BadImage (the file named here: the
  decoder sees only bytes)."""


def _need_data():
  if not ((ORL / 's1' / '1.pgm').is_file()
          and (REC / 'insightface' / 'train.idx').is_file()
          and (REC / 'im2rec' / 'train.idx').is_file()):
    pytest.skip(f'shared test data (ORL faces and .rec) not found at '
                f'{SHARED_DATA}')


# --- Fuzz targets: what a command does with the file -------------------------

def _parse_rec(path):
  """`data_prep train x.rec`: list it, then read, unpack and prepare every
  listed record."""
  _prepare_listed(sources.list_rec(path), os.path.basename(path))


def _parse_idx(path):
  """The same, with the .idx mutated."""
  _parse_rec(path[:-len('.idx')] + '.rec')


def _parse_list(path):
  """`data_prep train list.txt`: list it, then prepare every listed file."""
  _prepare_listed(sources.list_file(path), os.path.basename(path))


def _prepare_listed(listing, name):
  """Each image prepared as the conversion does; every skip must name the
  file it comes from, and none may be the catch-all of an unexpected
  exception ('failed': a bug that ``_run`` hid)."""
  for skipped in listing.skipped:
    assert name in skipped['detail'], skipped
  jobs = [preprocess.Job(e.path, e.offset) for e in listing.entries]
  for job, result in zip(jobs, preprocess.prepare_faces(jobs, OPTIONS)):
    if isinstance(result, preprocess.Skip):
      assert result.reason != 'failed', (job, result)
      if result.reason == 'unreadable record':
        assert name in result.detail, result
    else:
      assert result.jpeg[:2] == b'\xff\xd8', job


def _decode_image(path):
  """What every reader of an image does: images.decode, then prepare."""
  _decode_bytes(pathlib.Path(path).read_bytes(), path)


def _decode_png_crc_fixed(path):
  """The same after recomputing every chunk's CRC, so that mutations reach
  the decoder as a forger's file would, not only Pillow's checksum test."""
  _decode_bytes(_with_png_crcs(pathlib.Path(path).read_bytes()), path)


def _decode_bytes(data, path):
  try:
    image = images.decode(data)
    jpeg = preprocess.prepare_face(data, OPTIONS).jpeg
  except images.BadImage as e:
    raise Refused(f'{path}: {e}') from None
  width, height = image.size
  assert image.mode == 'RGB', image.mode
  assert 0 < width * height <= images.MAX_PIXELS, image.size
  assert Image.open(io.BytesIO(jpeg)).size == (112, 112)


# --- Real files to mutate ----------------------------------------------------

def _orl(person=1, i=1, mode='RGB'):
  return Image.open(ORL / f's{person}' / f'{i}.pgm').convert(mode)


def _encoded(image, fmt, **kw):
  out = io.BytesIO()
  image.save(out, fmt, **kw)
  return out.getvalue()


def _rec_subset(layout, keys):
  """(.rec bytes, .idx bytes, lrec offsets) of the real records ``keys``
  copied byte for byte (record 7 of the insightface file is the one split
  into chunks), re-indexed."""
  data = (REC / layout / 'train.rec').read_bytes()
  index = recordio.read_index(REC / layout / 'train.idx')
  ends = dict(zip(sorted(index.values()),
                  sorted(index.values())[1:] + [len(data)]))
  rec, lines, lrecs = b'', [], []
  for key in keys:
    start = index[key]
    record = data[start:ends[start]]
    lines.append(f'{key}\t{len(rec)}\n')
    position = 0
    while position < len(record):  # every chunk's lrec word
      lrecs.append(len(rec) + position + 4)
      length = struct.unpack_from('<I', record, position + 4)[0] & (2**29 - 1)
      position += 8 + length + (-length) % 4
    rec += record
  return rec, ''.join(lines).encode(), lrecs


def _png_fields(data):
  """(offset, 4) of every chunk length, and of IHDR's width and height
  (big-endian: the harness writes little-endian, so its huge values land as
  0xFFFFFF7F, 0xFFFFFFFF, 0xFFFFFF1F or 0, all of them absurd)."""
  fields, position = [(16, 4), (20, 4)], 8
  while position + 8 <= len(data):
    fields.append((position, 4))
    position += 12 + int.from_bytes(data[position:position + 4], 'big')
  return fields


def _jpeg_fields(data):
  """(offset, 2) of the segment lengths before the scan, the frame's height
  and width, and in an EXIF block the IFD's entry count and each entry's
  count and value offset."""
  fields, position = [], 2
  while position + 4 <= len(data) and data[position] == 0xFF:
    marker = data[position + 1]
    length = int.from_bytes(data[position + 2:position + 4], 'big')
    fields.append((position + 2, 2))
    if marker in (0xC0, 0xC1, 0xC2):
      fields += [(position + 5, 2), (position + 7, 2)]
    if marker == 0xE1 and data[position + 4:position + 10] == b'Exif\0\0':
      tiff = position + 10
      ifd = tiff + int.from_bytes(data[tiff + 4:tiff + 8], 'big')
      fields += [(tiff + 4, 4), (ifd, 2)]
      for n in range(int.from_bytes(data[ifd:ifd + 2], 'big')):
        fields += [(ifd + 2 + 12 * n + 4, 4), (ifd + 2 + 12 * n + 8, 4)]
    if marker == 0xDA:
      break
    position += 2 + length
  return fields


def _with_png_crcs(data):
  out, position = bytearray(data), 8
  while position + 12 <= len(out):
    end = position + 8 + int.from_bytes(out[position:position + 4], 'big')
    if end + 4 > len(out):
      break
    out[end:end + 4] = zlib.crc32(out[position + 4:end]).to_bytes(4, 'big')
    position = end + 4
  return bytes(out)


def _exif(orientation, more=()):
  """An EXIF block ('Exif\\0\\0' and a big-endian TIFF IFD) with this
  orientation and the (tag, value) pairs in more."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  for tag, value in more:
    exif[tag] = value
  return exif.tobytes()


def _exif_jpeg(image, orientation, quality=95):
  """A JPEG as a camera writes it: EXIF with make, model, software, date."""
  exif = _exif(orientation, [(0x010F, 'Olivetti'), (0x0110, 'ORL'),
                             (0x0131, 'test'), (0x0132, '1994:01:01 00:00:00')])
  return _encoded(image, 'JPEG', quality=quality, exif=exif)


def _png16(grey):
  return _encoded(Image.fromarray(grey.astype(np.uint16)), 'PNG')


_REC_TOKENS = (struct.pack('<I', recordio.MAGIC), struct.pack('<I', 1 << 29),
               struct.pack('<I', 3 << 29 | 8), struct.pack('<f', math.nan),
               struct.pack('<f', math.inf), struct.pack('<f', -1.0),
               struct.pack('<f', 2.5), struct.pack('<I', 2),
               struct.pack('<I', 2**31 - 1), b'\xff\xd8', b'\xff\xd9')
_IDX_TOKENS = (b'\t', b'\n', b' ', b'-', b'0', b'18446744073709551615',
               b'99999999999999999999999', b'\xc3\xa9', b'\xff', b'\x00',
               b'\r\n', b'+1', b'1_0', b'4294967296')
_LIST_TOKENS = (b' ', b'\t', b'\n', b'\r', b'#', b'\x00', b'\xff', b'\xc3\xa9',
                b'..', b'/', b'/dev/zero', b'faces/', b'-1', b'\xe2\x80\xa8',
                b'\x01', b'x' * 300, b' 0\n')
_PGM_TOKENS = (b'P5', b'P2', b'P6', b'65535', b'0', b'99999999999', b'\n',
               b' ', b'#', b'-1')
_PNG_TOKENS = (b'IHDR', b'IDAT', b'IEND', b'PLTE', b'tRNS', b'eXIf', b'iCCP',
               b'zTXt', b'\x00\x00\x00\x00', b'\xff\xff\xff\xff')
_JPEG_TOKENS = (b'\xff\xd8', b'\xff\xd9', b'\xff\xc0', b'\xff\xc4', b'\xff\xdb',
                b'\xff\xda', b'\xff\xe1', b'\xff\xee', b'Exif\0\0', b'MM\0*',
                b'II*\0', b'\xff\xff', b'\x00\x00')


def fuzz_cases() -> list[dict]:
  """Keyword arguments of fuzzing.fuzz (less workdir, count and seed; with
  'count', this file's default) for each parser; skips without the data."""
  _need_data()
  return [dict(case) for case in _fuzz_cases()]


@functools.cache
def _fuzz_cases() -> tuple:
  rec_errors = ['data_prep:DataPrepError', 'data_prep.recordio:RecordError']
  insightface = _rec_subset('insightface', [*range(1, 9), 0])
  im2rec = _rec_subset('im2rec', range(6))
  faces = {'faces/s1_1.pgm': (ORL / 's1' / '1.pgm').read_bytes(),
           'faces/s1 two.jpg': _encoded(_orl(1, 2), 'JPEG'),
           'faces/s2_1.png': _encoded(_orl(2, 1), 'PNG')}
  listing = (b'# ORL faces, two people\nfaces/s1_1.pgm 0\n'
             b'faces/s1 two.jpg 0\nfaces/s2_1.png s2\n')
  jpeg = _encoded(_orl(3, 1), 'JPEG', quality=90)
  png = _encoded(_orl(4, 1), 'PNG')
  png16 = _png16(np.asarray(_orl(5, 1, 'L'), np.uint16) * 257)
  cmyk = _encoded(_orl(6, 1).convert('CMYK'), 'JPEG', quality=90)
  exif = _exif_jpeg(_orl(7, 1), 6)
  image = dict(target=f'{HERE}:_decode_image', expected=[f'{HERE}:Refused'])
  return (
      dict(name='rec_insightface', target=f'{HERE}:_parse_rec',
           files={'train.rec': insightface[0], 'train.idx': insightface[1]},
           mutate_file='train.rec', expected=rec_errors, tokens=_REC_TOKENS,
           length_fields=[(o, 4) for o in insightface[2]], count=1000),
      dict(name='idx_insightface', target=f'{HERE}:_parse_idx',
           files={'train.rec': insightface[0], 'train.idx': insightface[1]},
           mutate_file='train.idx', expected=rec_errors, tokens=_IDX_TOKENS,
           count=1000),
      dict(name='rec_im2rec', target=f'{HERE}:_parse_rec',
           files={'train.rec': im2rec[0], 'train.idx': im2rec[1]},
           mutate_file='train.rec', expected=rec_errors, tokens=_REC_TOKENS,
           length_fields=[(o, 4) for o in im2rec[2]], count=1000),
      dict(name='list_file', target=f'{HERE}:_parse_list',
           files={'list.txt': listing, **faces}, mutate_file='list.txt',
           expected=['data_prep:DataPrepError'], tokens=_LIST_TOKENS,
           count=2000),
      dict(name='jpeg', files={'face.jpg': jpeg}, mutate_file='face.jpg',
           tokens=_JPEG_TOKENS, length_fields=_jpeg_fields(jpeg), count=700,
           **image),
      dict(name='jpeg_exif', files={'face.jpg': exif}, mutate_file='face.jpg',
           tokens=_JPEG_TOKENS, length_fields=_jpeg_fields(exif), count=700,
           **image),
      dict(name='jpeg_cmyk', files={'face.jpg': cmyk}, mutate_file='face.jpg',
           tokens=_JPEG_TOKENS, length_fields=_jpeg_fields(cmyk), count=500,
           **image),
      dict(name='png', files={'face.png': png}, mutate_file='face.png',
           tokens=_PNG_TOKENS, length_fields=_png_fields(png), count=400,
           **image),
      dict(name='png16_crc_fixed', files={'face.png': png16},
           mutate_file='face.png', tokens=_PNG_TOKENS,
           length_fields=_png_fields(png16), count=700,
           **dict(image, target=f'{HERE}:_decode_png_crc_fixed')),
      dict(name='pgm', files={'face.pgm': (ORL / 's8' / '1.pgm').read_bytes()},
           mutate_file='face.pgm', tokens=_PGM_TOKENS, count=700, **image),
  )


CASES = ['rec_insightface', 'idx_insightface', 'rec_im2rec', 'list_file',
         'jpeg', 'jpeg_exif', 'jpeg_cmyk', 'png', 'png16_crc_fixed', 'pgm']


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES)
def test_fuzz(case, tmp_path, record_property):
  kwargs = {c['name']: c for c in fuzz_cases()}[case]
  summary = fuzzing.fuzz(workdir=tmp_path, seed=None, **kwargs)
  record_property('fuzz', summary.line())
  assert summary.problems() == '', f'{summary.line()}\n{summary.problems()}'


def test_cases_are_listed():
  assert [c['name'] for c in fuzz_cases()] == CASES


# --- RecordIO ----------------------------------------------------------------

def _record(payload, cflag=0):
  return (struct.pack('<II', recordio.MAGIC, cflag << 29 | len(payload))
          + payload + bytes(-len(payload) % 4))


def _payload(label, image=b'\xff\xd8 image', labels=()):
  return (struct.pack('<IfQQ', len(labels), label, 0, 0)
          + struct.pack(f'<{len(labels)}f', *labels) + image)


def _write_rec(folder, records):
  """folder/train.rec and train.idx holding {key: record bytes}."""
  folder.mkdir(parents=True, exist_ok=True)
  rec, idx = b'', ''
  for key, record in records.items():
    idx += f'{key}\t{len(rec)}\n'
    rec += record
  (folder / 'train.rec').write_bytes(rec)
  (folder / 'train.idx').write_text(idx)
  return folder / 'train.rec'


@pytest.mark.parametrize('line', ['\u00e9\t5264', '5\t-40', '5', '5\t1\t2',
                                  'x\ty', '1' * 30 + '\t0', '5\t1e3'])
def test_damaged_idx_line_is_named(tmp_path, line):
  idx = tmp_path / 'train.idx'
  idx.write_bytes(f'1\t0\n2\t5264\n{line}\n4\t15304\n'.encode())
  with pytest.raises(recordio.RecordError,
                     match=re.escape(f'{idx}, line 3: ')):
    recordio.read_index(idx)
  (tmp_path / 'train.rec').write_bytes(_record(_payload(0.0)))
  with pytest.raises(DataPrepError, match=re.escape(f'{idx}, line 3: ')):
    sources.list_rec(str(tmp_path / 'train.rec'))


def test_offsets_outside_the_rec_are_refused(tmp_path):
  rec = _write_rec(tmp_path, {0: _record(_payload(0.0))})
  size = rec.stat().st_size
  with open(rec, 'rb') as f:
    for offset in (-8, size, size - 4, 2**63, 2**70):
      with pytest.raises(recordio.RecordError, match=re.escape(
          f'{rec}, record at offset {offset}: the offset is outside')):
        recordio.read_record(f, offset)


def test_forged_length_is_checked_before_reading(tmp_path):
  """An lrec of 2^29 - 1 in a 120-byte file: refused without allocating
  the 512 MB it claims (the reader once did f.read(length) first)."""
  forged = struct.pack('<II', recordio.MAGIC, 2**29 - 1) + _payload(1.0)
  rec = _write_rec(tmp_path, {0: _record(_payload(0.0)), 1: forged,
                              2: _record(_payload(2.0))})
  tracemalloc.start()
  try:
    with open(rec, 'rb') as f:
      with pytest.raises(recordio.RecordError, match=re.escape(
          f'{rec}, record at offset 40: the length 536870911 at offset 44 '
          'runs past the end')):
        recordio.read_record(f, 40)
    listing = sources.list_rec(str(rec))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 2**20, f'{peak} bytes allocated'
  assert [e.key for e in listing.entries] == ['0', '2']
  assert [(s['key'], s['reason']) for s in listing.skipped] == [
      ('1', 'unreadable record')]


def test_labels_that_are_no_class_index_are_skipped(tmp_path):
  """NaN and inf once escaped list_rec as ValueError / OverflowError."""
  labels = [0.0, math.nan, math.inf, -math.inf, -1.0, 2.5, 3.0]
  rec = _write_rec(tmp_path, {k: _record(_payload(v))
                              for k, v in enumerate(labels)})
  listing = sources.list_rec(str(rec))
  assert [(e.key, e.identity) for e in listing.entries] == [('0', '0'),
                                                            ('6', '3')]
  assert [s['key'] for s in listing.skipped] == ['1', '2', '3', '4', '5']
  for s in listing.skipped:
    assert s['reason'] == 'bad label' and f'{rec}, record at offset' in (
        s['detail'])


@pytest.mark.parametrize('a,b', [(math.nan, 5.0), (math.inf, math.inf),
                                 (5.0, 2.0), (0.0, 3.0), (2.5, 4.0)])
def test_absurd_insightface_header_is_refused(tmp_path, a, b):
  records = {k: _record(_payload(0.0)) for k in (1, 2)}
  records[0] = _record(_payload(0.0, b'', labels=(a, b)))
  rec = _write_rec(tmp_path, records)
  offset = 2 * len(records[1])
  with pytest.raises(DataPrepError, match=re.escape(
      f'{rec}: the insightface header (key 0, record at offset {offset})')):
    sources.list_rec(str(rec))


def test_bad_records_are_skipped_and_the_listing_goes_on(tmp_path):
  good = _record(_payload(0.0))
  records = {
      0: good,
      1: b'\0\0\0\0' + good[4:],  # no magic word
      2: _record(_payload(1.0), cflag=2),  # a middle chunk to begin with
      3: _record(b'short'),  # shorter than the image header
      4: _record(_payload(9.0, labels=(1.0,))),  # a flag label: kept
      5: _record(struct.pack('<IfQQ', 1000, 1.0, 0, 0)),  # 1000 labels?
      6: _record(_payload(1.0), cflag=1),  # a first chunk, then no more
      7: good,
  }
  rec = _write_rec(tmp_path, records)
  listing = sources.list_rec(str(rec))
  assert [e.key for e in listing.entries] == ['0', '4', '7']
  assert {s['key']: s['reason'] for s in listing.skipped} == {
      str(k): 'unreadable record' for k in (1, 2, 3, 5, 6)}
  for s in listing.skipped:
    assert f'{rec}, record at offset' in s['detail'], s


def test_fuzz_rec_cases_start_from_files_that_read_whole(tmp_path):
  """The fuzz cases' .rec files (real records copied, re-indexed) read as
  the originals do, record 7 split into chunks and rejoined, so mutations
  start from a file every record of which converts."""
  for name, layout, keys in (('rec_insightface', 'insightface', range(1, 9)),
                             ('rec_im2rec', 'im2rec', range(6))):
    case = {c['name']: c for c in fuzz_cases()}[name]
    for file_name, data in case['files'].items():
      (tmp_path / layout).mkdir(exist_ok=True)
      (tmp_path / layout / file_name).write_bytes(data)
    listing = sources.list_rec(str(tmp_path / layout / 'train.rec'))
    assert listing.layout == layout and listing.skipped == []
    assert [e.key for e in listing.entries] == [str(k) for k in keys]
    jobs = [preprocess.Job(e.path, e.offset) for e in listing.entries]
    results = list(preprocess.prepare_faces(jobs, OPTIONS))
    assert all(isinstance(r, preprocess.Prepared) for r in results), results
  assert len(case['length_fields']) == 6  # one chunk a record
  insightface = {c['name']: c for c in fuzz_cases()}['rec_insightface']
  assert len(insightface['length_fields']) > 9  # record 7 is in chunks


# --- List files and folders --------------------------------------------------

@contextmanager
def _deadline(seconds):
  """Fails (instead of hanging the test run) when the block runs longer."""
  def late(*_):
    raise TimeoutError(f'still running after {seconds} s')
  old = signal.signal(signal.SIGALRM, late)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_list_file_skips_bad_lines_naming_them(tmp_path):
  lines = [b'a.jpg 0', b'caf\xe9.jpg 1', b'b\x00.jpg 1', b'no_label',
           b'x' * 5000 + b' 2', b'c.jpg ' + b'y' * 300, b'd.jpg s\x01',
           b'# comment', b'', b'e f.jpg 1']
  path = tmp_path / 'list.txt'
  path.write_bytes(b'\n'.join(lines) + b'\n')
  listing = sources.list_file(str(path))
  assert [(e.key, e.identity) for e in listing.entries] == [('a.jpg', '0'),
                                                            ('e f.jpg', '1')]
  assert [s['key'] for s in listing.skipped] == [f'line {n}' for n in
                                                 range(2, 8)]
  for s in listing.skipped:
    assert s['reason'] == 'bad list line'
    assert s['detail'].startswith(f'{path}, {s["key"]}: '), s
  assert 'not UTF-8' in listing.skipped[0]['detail']
  assert 'NUL' in listing.skipped[1]['detail']


def test_list_file_with_nothing_usable_names_the_first_bad_line(tmp_path):
  path = tmp_path / 'list.txt'
  path.write_bytes(b'\n\xff\xd8\xff\xe0 binary\n')
  with pytest.raises(DataPrepError, match=re.escape(
      f'{path}, line 2: byte 0 is not UTF-8')):
    sources.list_file(str(path))
  fifo = tmp_path / 'fifo'
  os.mkfifo(fifo)
  with _deadline(10), pytest.raises(DataPrepError, match='not a regular'):
    sources.list_source(fifo)


def test_list_folder_survives_link_loops_and_reports_bad_names(tmp_path):
  _need_data()
  root = tmp_path / 'src'
  (root / 's1' / 'deeper').mkdir(parents=True)
  (root / 's1' / '1.pgm').symlink_to(ORL / 's1' / '1.pgm')
  (root / 's1' / 'deeper' / '2.pgm').symlink_to(ORL / 's1' / '2.pgm')
  # Two links back up: 2^40 paths for a walk that follows links blindly.
  (root / 's1' / 'deeper' / 'up').symlink_to('..')
  (root / 's1' / 'deeper' / 'top').symlink_to(root / 's1')
  for name in (b'bad\xff', b'new\nline'):
    os.makedirs(os.path.join(bytes(root), name))
    os.symlink(bytes(ORL / 's2' / '1.pgm'),
               os.path.join(bytes(root), name, b'1.pgm'))
  with _deadline(20):
    listing = sources.list_folder(str(root))
  assert [e.key for e in listing.entries] == ['s1/1.pgm', 's1/deeper/2.pgm']
  assert sorted(s['reason'] for s in listing.skipped) == [
      'bad identity name'] * 2
  assert all('rename it' in s['detail'] for s in listing.skipped)


# --- Images ------------------------------------------------------------------

def _rgb(data):
  return np.asarray(images.decode(data), np.float64)


def _chunk(kind, body):
  return (struct.pack('>I', len(body)) + kind + body
          + struct.pack('>I', zlib.crc32(kind + body)))


def _png(width, height, depth=8, colour=0, raw=None):
  """A PNG with valid CRCs; raw (filtered rows) defaults to four zero rows,
  far fewer than the header claims."""
  raw = bytes(width + 1) * 4 if raw is None else raw
  return (b'\x89PNG\r\n\x1a\n'
          + _chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, depth,
                                        colour, 0, 0, 0))
          + _chunk(b'IDAT', zlib.compress(raw)) + _chunk(b'IEND', b''))


def test_truncated_images_are_skipped_as_truncated():
  _need_data()
  face = _orl(1, 1)
  for data in (_encoded(face, 'JPEG'), _encoded(face, 'PNG'),
               (ORL / 's1' / '1.pgm').read_bytes(), _encoded(face, 'BMP')):
    with pytest.raises(images.BadImage) as e:
      images.decode(data[:len(data) // 2])
    assert e.value.reason == 'truncated image', e.value


_BOMB_CHILD = textwrap.dedent('''
    import json, resource, sys, time, warnings
    sys.path.insert(0, sys.argv[1])
    from data_prep import preprocess
    from npcface_jax.faces import images
    warnings.simplefilter('error')  # a DecompressionBombWarning would fail
    status = open('/proc/self/status').read().split('VmSize:')[1]
    used = int(status.split()[0]) * 1024
    limit = used + 48 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {}
    for path in sys.argv[2:]:
      start = time.perf_counter()
      try:
        images.decode(open(path, 'rb').read())
        skip = None
      except images.BadImage as e:
        skip = [e.reason, e.detail]
      run = preprocess._run(preprocess.Job(path), preprocess.Options())
      out[path] = dict(skip=skip, run=list(run) if isinstance(run, tuple)
                       else 'bytes', seconds=time.perf_counter() - start)
    print(json.dumps(out))
''')


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
  """Tiny PNGs (valid CRCs) whose headers claim 30,000 x 30,000 pixels
  (past Pillow's own refusal) and 12,000 x 12,000 (where Pillow only
  warns): 'too large' at once, in a process allowed 48 MB more than it uses
  (one 12,000 x 12,000 grey image is 144 MB), and without a warning (they
  are errors there). 10,000 x 10,000 is under the limit, over Pillow's
  warning: decoding it runs out of that memory, a skip, not a crash."""
  paths = {}
  for side in (30_000, 12_000, 10_000):
    paths[side] = tmp_path / f'bomb{side}.png'
    paths[side].write_bytes(_png(side, side))
    assert paths[side].stat().st_size < 200
  proc = subprocess.run(
      [sys.executable, '-c', _BOMB_CHILD, str(ROOT)]
      + [str(p) for p in paths.values()], capture_output=True, text=True,
      timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  for side in (30_000, 12_000):
    got = out[str(paths[side])]
    assert got['skip'][0] == got['run'][0] == 'too large', got
    assert got['seconds'] < 1.0, got
  assert '12000 x 12000' in out[str(paths[12_000])]['skip'][1]
  got = out[str(paths[10_000])]
  assert got['skip'] == got['run'] == ['too large', 'PNG of 10000 x 10000 '
                                       'pixels: out of memory'], got


def test_cmyk_jpeg_colours():
  """Pillow writes CMYK JPEGs Adobe-style (inverted, with the Adobe
  marker) and reads them back so; the colours must come out right."""
  inks = [(0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0),
          (255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 0), (64, 128, 0, 32)]
  image = Image.new('CMYK', (16 * len(inks), 16))
  for i, ink in enumerate(inks):
    image.paste(ink, (16 * i, 0, 16 * i + 16, 16))
  data = _encoded(image, 'JPEG', quality=100)
  assert b'Adobe' in data
  got = _rgb(data)
  for i, (c, m, y, k) in enumerate(inks):
    want = [(255 - v) * (255 - k) / 255 for v in (c, m, y)]
    np.testing.assert_allclose(got[4:12, 16 * i + 4:16 * i + 12],
                               np.broadcast_to(want, (8, 8, 3)), atol=4,
                               err_msg=f'ink {(c, m, y, k)}')


_GREY16 = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32768, 65278, 65279,
                                                  65534, 65535]], np.uint16)
# round(v / 257): what 8 bits of the same brightness are.
_GREY8 = np.array([[0, 0, 0, 1, 1, 4], [127, 128, 254, 254, 255, 255]])


def test_16_bit_grey_scales_to_8_bits():
  """Pillow opens it as 'I;16' (PNG) or 'I' (PGM); its convert('RGB')
  clipped every value over 255 to white."""
  pgm = b'P5\n6 2\n65535\n' + _GREY16.astype('>u2').tobytes()
  for data in (_png16(_GREY16), pgm):
    got = np.asarray(images.decode(data))
    assert got.shape == (2, 6, 3)
    np.testing.assert_array_equal(got, np.repeat(_GREY8[..., None], 3, 2))


def test_16_bit_rgb_png():
  pixels = np.array([[[65535, 0, 32896], [257, 51400, 1000]],
                     [[128, 65279, 40000], [12345, 54321, 32767]]], '>u2')
  raw = b''.join(b'\0' + row.tobytes() for row in pixels)
  got = _rgb(_png(2, 2, depth=16, colour=2, raw=raw))
  assert np.abs(got - pixels / 257).max() <= 1.0, got


def test_palette_images_with_and_without_transparency():
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (90, 80, 70)]
  image = Image.new('P', (4, 2))
  image.putpalette([v for c in colours for v in c])
  indices = np.array([0, 1, 2, 3, 3, 2, 1, 0])
  image.putdata(indices.tolist())
  want = np.array(colours, np.float64)[indices].reshape(2, 4, 3)
  np.testing.assert_array_equal(_rgb(_encoded(image, 'PNG')), want)
  np.testing.assert_array_equal(_rgb(_encoded(image, 'GIF')), want)
  # Index 1 transparent: black there, as --pad's canvas is.
  want[indices.reshape(2, 4) == 1] = 0
  for fmt in ('PNG', 'GIF'):
    np.testing.assert_array_equal(
        _rgb(_encoded(image, fmt, transparency=1)), want, err_msg=fmt)


def test_alpha_is_composited_on_black():
  alpha = np.array([[255, 128, 0]], np.uint8)
  la = np.stack([np.full((1, 3), 200, np.uint8), alpha], -1)
  rgba = np.concatenate([np.array([[[10, 100, 250]] * 3], np.uint8),
                         alpha[..., None]], -1)
  for array, mode, colour in ((la, 'LA', [200] * 3),
                              (rgba, 'RGBA', [10, 100, 250])):
    got = _rgb(_encoded(Image.fromarray(array, mode), 'PNG'))
    want = np.array(colour)[None, None] * alpha[..., None] / 255
    assert np.abs(got - want).max() <= 1, (mode, got)


def _pattern():
  """A 3 x 2 RGB image whose every pixel differs (PNG keeps it exact)."""
  values = np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * 14
  return Image.fromarray(values, 'RGB')


def test_exif_orientation_is_applied():
  """Each of the 8 orientations as Pillow's own ImageOps.exif_transpose
  shows it; 6 (the camera turned right) explicitly: 90 degrees clockwise."""
  image = _pattern()
  for orientation in range(1, 9):
    data = _encoded(image, 'PNG', exif=_exif(orientation))
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(_rgb(data), np.asarray(want),
                                  err_msg=f'orientation {orientation}')
  data = _encoded(image, 'PNG', exif=_exif(6))
  np.testing.assert_array_equal(_rgb(data), np.rot90(np.asarray(image), -1))
  _need_data()
  face = _orl(1, 1)
  got = _rgb(_exif_jpeg(face, 6, quality=100))
  want = np.rot90(np.asarray(face, np.float64), -1)
  assert got.shape == want.shape and np.abs(got - want).mean() < 1.0


def _with_app1(jpeg, payload):
  """jpeg with an APP1 segment (an EXIF block) holding payload."""
  return (jpeg[:2] + b'\xff\xe1' + struct.pack('>H', len(payload) + 2)
          + payload + jpeg[2:])


def test_damaged_exif_keeps_the_image_unrotated():
  _need_data()
  face = _orl(1, 1)
  plain = _encoded(face, 'JPEG', quality=95)
  want = _rgb(plain)
  good = _exif(6)
  entry = good.index(b'\x01\x12')  # the orientation entry (big-endian)
  damaged = {
      'garbage': b'Exif\0\0' + bytes(range(256)) * 2,
      'no tiff header': b'Exif\0\0' + b'\xff' * 50,
      'ifd offset out of range': b'Exif\0\0MM\0*\xff\xff\xff\xf0',
      'orientation type bogus': (good[:entry + 2] + b'\x00\x63'
                                 + good[entry + 4:]),
      'orientation count huge': (good[:entry + 4] + b'\x7f\xff\xff\xff'
                                 + good[entry + 8:]),
      'orientation 9': _exif(9),
      'orientation 65535': _exif(65535),
      'truncated': good[:len(good) // 2],
  }
  for why, payload in damaged.items():
    got = _rgb(_with_app1(plain, payload))
    assert got.shape == want.shape, why
    assert np.abs(got - want).max() <= 1.0, why
  # An IFD claiming 65535 entries, of which the first (the orientation) is
  # whole: that one is still read and applied.
  got = _rgb(_with_app1(plain, good[:entry - 2] + b'\xff\xff' + good[entry:]))
  np.testing.assert_array_equal(got, np.rot90(want, -1))


def test_orl_pgm_decodes_to_its_bytes():
  _need_data()
  data = (ORL / 's1' / '1.pgm').read_bytes()
  assert data.startswith(b'P5\n92 112\n255\n')
  grey = np.frombuffer(data[len(b'P5\n92 112\n255\n'):], np.uint8)
  got = np.asarray(images.decode(data))
  np.testing.assert_array_equal(got, np.repeat(grey.reshape(112, 92, 1), 3,
                                               2))


def test_run_turns_every_failure_into_a_skip(tmp_path):
  fifo = tmp_path / 'fifo.jpg'
  os.mkfifo(fifo)
  (tmp_path / 'dangling.jpg').symlink_to(tmp_path / 'nowhere')
  broken_crc = bytearray(_png(4, 4, raw=bytes(5) * 4))
  broken_crc[29] ^= 1  # IHDR's CRC: Pillow raises SyntaxError
  (tmp_path / 'crc.png').write_bytes(bytes(broken_crc))
  (tmp_path / 'ok.png').write_bytes(_png(4, 4, raw=bytes(5) * 4))
  jobs = {
      'nul': (preprocess.Job(f'{tmp_path}/a\0b.jpg'), 'unreadable file'),
      'fifo': (preprocess.Job(str(fifo)), 'unreadable file'),
      'folder': (preprocess.Job(str(tmp_path)), 'unreadable file'),
      'device': (preprocess.Job('/dev/zero'), 'unreadable file'),
      'missing': (preprocess.Job(str(tmp_path / 'no.jpg')), 'missing file'),
      'dangling': (preprocess.Job(str(tmp_path / 'dangling.jpg')),
                   'missing file'),
      'crc': (preprocess.Job(str(tmp_path / 'crc.png')), 'corrupt image'),
      'rec offset': (preprocess.Job(str(tmp_path / 'crc.png'), 10**20),
                     'unreadable record'),
  }
  with _deadline(20):
    # prepare_faces with one worker: _run over each job, then the .rec closed.
    results = list(preprocess.prepare_faces([j for j, _ in jobs.values()],
                                            OPTIONS))
    # A failure no reader foresaw (here a bad option) is still only a skip.
    result = preprocess._run(  # noqa: SLF001
        preprocess.Job(str(tmp_path / 'ok.png')),
        preprocess.Options(fit='stretch'))
  for (what, (_, reason)), got in zip(jobs.items(), results):
    assert isinstance(got, preprocess.Skip), what
    assert got.reason == reason and got.detail, (what, got)
  assert result.reason == 'failed' and 'ValueError' in result.detail


# --- A conversion over hostile files among good faces ------------------------

def test_conversion_skips_exactly_the_hostile_files(tmp_path):
  """`python -m data_prep train` (two worker processes) over 2 x 3 ORL faces,
  five unusual but valid images (kept) and seven hostile files (each
  skipped once, with its reason, in report.json)."""
  _need_data()
  src = tmp_path / 'src'
  for person in (1, 2):
    (src / f's{person}').mkdir(parents=True)
    for i in (1, 2, 3):
      (src / f's{person}' / f'{i}.pgm').symlink_to(
          ORL / f's{person}' / f'{i}.pgm')
  s1, s2 = src / 's1', src / 's2'
  valid = {
      's1/cmyk.jpg': _encoded(_orl(1, 4).convert('CMYK'), 'JPEG'),
      's1/grey16.png': _png16(np.asarray(_orl(1, 5, 'L'), np.uint16) * 257),
      's2/rotated.jpg': _exif_jpeg(_orl(2, 4), 6),
      's2/bad_exif.jpg': _with_app1(_encoded(_orl(2, 5), 'JPEG'),
                                    b'Exif\0\0MM\0*\xff\xff\xff\xf0'),
      's2/palette.png': _encoded(_orl(2, 6).convert('P'), 'PNG',
                                 transparency=0),
  }
  face_png = _encoded(_orl(1, 6), 'PNG')
  broken_crc = bytearray(face_png)
  broken_crc[29] ^= 1
  hostile = {
      's1/bomb.png': (_png(30_000, 30_000), 'too large'),
      's1/bomb12k.png': (_png(12_000, 12_000), 'too large'),
      's1/truncated.png': (face_png[:len(face_png) // 2], 'truncated image'),
      's2/notes.jpg': (b'not an image\n', 'not an image'),
      's2/empty.jpg': (b'', 'empty'),
      's2/crc.png': (bytes(broken_crc), 'corrupt image'),
  }
  for name, data in {**valid, **{k: v for k, (v, _) in hostile.items()}
                     }.items():
    (src / name).write_bytes(data)
  os.mkfifo(s2 / 'fifo.jpg')
  hostile['s2/fifo.jpg'] = (None, 'unreadable file')
  (s1 / 'loop').symlink_to(s1)  # listed once, not once per lap
  bad_name = os.path.join(bytes(src), b'caf\xe9')
  os.mkdir(bad_name)
  os.symlink(bytes(ORL / 's3' / '1.pgm'), os.path.join(bad_name, b'1.pgm'))
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'data_prep', 'train', str(src), str(out),
       '--workers', '2', '--quiet'], capture_output=True, text=True,
      timeout=300, cwd=ROOT, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / 'report.json').read_text())
  assert report['num_examples'] == 6 + len(valid), report
  assert report['num_classes'] == 2
  assert sorted(report['shard_lengths']) == [6 + len(valid)]
  skipped = {s['path']: s['reason'] for s in report['skipped']}
  want = {name: reason for name, (_, reason) in hostile.items()}
  want['caf\udce9/1.pgm'] = 'bad identity name'
  assert skipped == want
  assert report['num_skipped'] == len(want) == len(report['skipped'])
  assert report['num_listed'] == 6 + len(valid) + len(want)
  assert 'skipped 8' in proc.stderr
