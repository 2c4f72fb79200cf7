"""TFRecord shards read without TensorFlow, to find and name their damage.

A record is framed as its length (uint64, little-endian), the masked CRC32C
of those 8 bytes, the data, and the masked CRC32C of the data. TensorFlow's
reader stops at the first failed checksum ("corrupted record at N") without
naming the file or a way past it. Here ``scan`` walks a shard frame by frame
and returns its intact records and its damaged spans with their byte
offsets: a record whose data fails its checksum costs itself alone (its
length was checked); after a damaged length field, reading resumes at the
next position that holds an intact record (a header and data whose two
checksums hold, which random bytes do once in 2^64), or the rest of the
shard is lost. ``shards_at`` tells which of many shards a TensorFlow error
means, from its offset, reading a few bytes of each.

CRC32C runs in NumPy over many records at once (four bytes a step, 16-bit
tables; long records in lanes folded together), so that checking a shard
costs about what reading it does. NumPy only: data_prep's workers use it.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

HEADER = 12  # the length and its checksum
FRAME = 16  # HEADER and the data's checksum
_POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
_MASK_DELTA = 0xA282EAD8
_LANE = 256  # bytes a long record is cut into, hashed side by side
_BATCH = 32 << 20  # bytes hashed at once
_BLOCK = 64 << 20  # bytes read at once while walking a shard
_WINDOW = 1 << 20  # positions searched at once for the next intact record


# --- CRC32C ------------------------------------------------------------------

@functools.cache
def _byte_table() -> np.ndarray:
  t = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
  return t


@functools.cache
def _word_tables() -> tuple[np.ndarray, np.ndarray]:
  """The register after four more bytes, as a function of its low and its
  high 16 bits (the step is linear, so the two halves add up by XOR)."""
  t = _byte_table()

  def four(x):
    for _ in range(4):
      x = t[x & 0xFF] ^ (x >> 8)
    return x
  i = np.arange(1 << 16, dtype=np.uint32)
  return four(i), four(i << 16)


def _step(tables, reg):
  low, high = tables
  return low[reg & 0xFFFF] ^ high[reg >> 16]


@functools.cache
def _shift_tables(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
  """The register after ``nbytes`` zero bytes (a multiple of 4), by
  squaring the four-byte step."""
  i = np.arange(1 << 16, dtype=np.uint32)
  tables, done = _word_tables(), 4
  while done < nbytes:
    tables, done = (_step(tables, _step(tables, i)),
                    _step(tables, _step(tables, i << 16))), 2 * done
  assert done == nbytes, nbytes
  return tables


@functools.cache
def _byte_list() -> list[int]:
  return _byte_table().tolist()


def crc32c_py(data: bytes) -> int:
  """CRC32C of a few bytes, in Python (the reference of the NumPy one)."""
  t, crc = _byte_list(), 0xFFFFFFFF
  for b in data:
    crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def mask(crc):
  """TFRecord's masked CRC (an int, or a uint32 array)."""
  if isinstance(crc, np.ndarray):
    return ((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)
  crc = int(crc)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _lanes_crc(flat: np.ndarray, lane: int) -> np.ndarray:
  """The raw CRC (register from 0) of each ``lane`` bytes of ``flat``."""
  words = np.ascontiguousarray(flat.view('<u4').reshape(-1, lane // 4).T)
  tables = _word_tables()
  reg = np.zeros(words.shape[1], np.uint32)
  for w in words:
    reg = _step(tables, reg ^ w)
  return reg


def crc32c(buf, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """CRC32C of buf[s:s + n] for each (s, n), as uint32 (buf: bytes-like)."""
  arr = np.frombuffer(buf, np.uint8)
  starts = np.asarray(starts, np.int64)
  lengths = np.asarray(lengths, np.int64)
  out = np.empty(len(starts), np.uint32)
  small = np.flatnonzero(lengths < 4)
  for i in small:
    out[i] = crc32c_py(bytes(arr[starts[i]:starts[i] + lengths[i]]))
  big = np.flatnonzero(lengths >= 4)
  total = np.cumsum(lengths[big])
  first = 0
  while first < len(big):
    done = int(total[first - 1]) if first else 0
    last = max(first + 1, int(np.searchsorted(total, done + _BATCH, 'right')))
    rows = big[first:last]
    out[rows] = _batch_crc(arr, starts[rows], lengths[rows])
    first = last
  return out


def _batch_crc(arr, starts, lengths) -> np.ndarray:
  """CRC32C of records of 4 bytes or more: each laid right-aligned in whole
  lanes (zeros before a record leave a register at 0 as it is), its first
  4 bytes inverted (the register's initial 0xFFFFFFFF), lanes hashed side
  by side and folded per record."""
  longest = int(lengths.max())
  lane = _LANE if longest > _LANE else -(-longest // 4) * 4
  count = -(-lengths // lane)
  first = np.concatenate([[0], np.cumsum(count)[:-1]])
  flat = np.zeros(int(count.sum()) * lane, np.uint8)
  dst = (first + count) * lane - lengths
  for d, s, n in zip(dst.tolist(), starts.tolist(), lengths.tolist()):
    flat[d:d + n] = arr[s:s + n]
  flat[dst[:, None] + np.arange(4)] ^= 0xFF
  reg = _lanes_crc(flat, lane)
  out = reg[first]
  if count.max() > 1:
    shift = _shift_tables(lane)
    for i in range(1, int(count.max())):
      more = count > i
      out[more] = _step(shift, out[more]) ^ reg[first[more] + i]
  return out ^ np.uint32(0xFFFFFFFF)


# --- Frames ------------------------------------------------------------------

def _u32(arr: np.ndarray, at: np.ndarray) -> np.ndarray:
  b = arr[at[:, None] + np.arange(4)].astype(np.uint32)
  return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24


def _headers_ok(arr: np.ndarray, at: np.ndarray) -> np.ndarray:
  """Whether the 8 length bytes at each offset match their checksum."""
  if not len(at):
    return np.zeros(0, bool)
  rows = arr[at[:, None] + np.arange(8)]
  rows[:, :4] ^= 0xFF  # the register's initial 0xFFFFFFFF
  crc = _lanes_crc(rows.reshape(-1), 8) ^ np.uint32(0xFFFFFFFF)
  return mask(crc) == _u32(arr, at + 8)


def _data_ok(arr: np.ndarray, at: np.ndarray, lengths: np.ndarray):
  """Whether the data of the records at ``at`` match their checksum."""
  if not len(at):
    return np.zeros(0, bool)
  return mask(crc32c(arr, at + HEADER, lengths)) == _u32(
      arr, at + HEADER + lengths)


def _read(f, offset: int, n: int) -> bytes:
  f.seek(offset)
  return f.read(n)


def _frames(block: bytes, end: int) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, lengths) of the frames from the start of block, each taken
  at its length's word, as long as one fits wholly before ``end``."""
  offsets, lengths, p = [], [], 0
  while p + HEADER <= end:
    (n,) = struct.unpack_from('<Q', block, p)
    if n > end - p - FRAME:
      break
    offsets.append(p)
    lengths.append(n)
    p += FRAME + n
  return np.array(offsets, np.int64), np.array(lengths, np.int64)


def resync(f, start: int, size: int) -> int:
  """The first offset from ``start`` where an intact record begins (header
  and data checksums hold), or ``size``: the bytes between are lost."""
  while start + FRAME <= size:
    block = _read(f, start, _WINDOW + HEADER - 1)
    arr = np.frombuffer(block, np.uint8)
    m = len(arr) - HEADER + 1
    lengths = np.zeros(m, np.uint64)
    for k in range(8):
      lengths |= arr[k:k + m].astype(np.uint64) << np.uint64(8 * k)
    room = size - (start + np.arange(m, dtype=np.int64)) - FRAME
    fits = (room >= 0) & (lengths <= np.maximum(room, 0).astype(np.uint64))
    at = np.flatnonzero(fits)
    at = at[_headers_ok(arr, at)]
    for p in at.tolist():
      if _intact(f, start + p, size):
        return start + p
    start += m
  return size


# --- A shard's records and damage --------------------------------------------

class Damage(NamedTuple):
  """A damaged span of a shard: ``offset`` where it starts (a record's),
  ``end`` where reading resumed (the next intact record, or the file's
  end), ``kind`` ('data', 'shifted', 'length', 'truncated' or 'trailing'),
  ``record`` the index among the shard's intact records of the next one."""
  offset: int
  end: int
  kind: str
  record: int

  def describe(self, size: int) -> str:
    """What happened and what was skipped, for a warning or a report."""
    lost = self.end - self.offset
    after = (f'reading resumed at the next intact record, byte {self.end} '
             f'({lost} bytes skipped)' if self.end < size else
             f'no intact record follows: the rest of the shard ({lost} bytes)'
             ' is lost')
    return {
        'data': 'the data fails its checksum; this record alone is skipped',
        'shifted': ('the data fails its checksum and no intact record '
                    'starts where its length ends (the damage reaches the '
                    'next header, or bytes were inserted or deleted); '
                    f'{after}'),
        'length': ('its length fails its checksum, so the framing is lost; '
                   f'{after}'),
        'truncated': ('the record runs past the end of the file (the shard '
                      f'is cut short, or bytes are missing); {after}'),
        'trailing': (f'{lost} bytes after the last intact record are too '
                     'few for a record (the shard is cut short, or bytes '
                     'were added)'),
    }[self.kind]


class Scan(NamedTuple):
  path: str
  size: int
  offsets: np.ndarray  # the intact records' starts (int64)
  lengths: np.ndarray  # their data's lengths (int64)
  damage: list[Damage]


Visit = Callable[[int, int, memoryview], None]  # (index, offset, data)


class _Walk:
  """The state of one scan: the file, the intact records, the damage."""

  def __init__(self, f, visit: Visit | None):
    self.f, self.visit = f, visit
    self.size = os.fstat(f.fileno()).st_size
    self.offsets, self.lengths, self.damage = [], [], []

  def lost(self, offset: int, end: int, kind: str) -> int:
    self.damage.append(Damage(offset, end, kind, len(self.offsets)))
    return end

  def keep(self, offset: int, data: memoryview) -> None:
    if self.visit is not None:
      self.visit(len(self.offsets), offset, data)
    self.offsets.append(offset)
    self.lengths.append(len(data))


def scan(path: str, visit: Visit | None = None) -> Scan:
  """Every frame of the shard at ``path`` checked; ``visit`` is called with
  each intact record, in order. OSError if it cannot be read."""
  with open(path, 'rb') as f:
    walk = _Walk(f, visit)
    pos, want = 0, _BLOCK
    while pos < walk.size:
      block = _read(f, pos, min(want, walk.size - pos))
      at, n = _frames(block, len(block))
      if len(at):
        pos, want = _check_block(walk, block, pos, at, n), _BLOCK
      else:  # the frame at pos is not whole in the block read
        pos, want = _lone_frame(walk, pos)
  return Scan(path, walk.size, np.array(walk.offsets, np.int64),
              np.array(walk.lengths, np.int64), walk.damage)


def _check_block(walk: _Walk, block: bytes, base: int, at, n) -> int:
  """The walked frames of one block checked in order, up to the first bad
  length; returns the offset to go on from."""
  arr = np.frombuffer(block, np.uint8)
  ok = _headers_ok(arr, at)
  good = int(np.argmin(ok)) if not ok.all() else len(at)
  data_ok = _data_ok(arr, at[:good], n[:good])
  view = memoryview(block)
  for i, (p, m) in enumerate(zip(at[:good].tolist(), n[:good].tolist())):
    end = base + p + FRAME + m
    if data_ok[i]:
      walk.keep(base + p, view[p + HEADER:p + HEADER + m])
      continue
    # The length held, so the next record should start at end; where none
    # does, bytes were inserted or deleted inside this one.
    aligned = ok[i + 1] if i + 1 < len(at) else (
        end == walk.size or _intact_header(_read(walk.f, end, HEADER)))
    if not aligned:
      return walk.lost(base + p, resync(walk.f, base + p + HEADER, walk.size),
                       'shifted')
    walk.lost(base + p, end, 'data')
  if good < len(at):
    bad = base + int(at[good])
    return walk.lost(bad, resync(walk.f, bad + 1, walk.size), 'length')
  return base + int(at[-1] + FRAME + n[-1])


def _lone_frame(walk: _Walk, pos: int) -> tuple[int, int]:
  """The frame at pos, when it did not fit the block read: a long record
  (read it in a block of its own), or damage: a bad length, a record cut
  short, bytes too few for a header. Returns (next offset, block size)."""
  head = _read(walk.f, pos, HEADER)
  if len(head) < HEADER:
    return walk.lost(pos, walk.size, 'trailing'), _BLOCK
  if not _intact_header(head):
    return walk.lost(pos, resync(walk.f, pos + 1, walk.size), 'length'), _BLOCK
  (n,) = struct.unpack_from('<Q', head)
  if n > walk.size - pos - FRAME:
    return walk.lost(pos, resync(walk.f, pos + HEADER, walk.size),
                     'truncated'), _BLOCK
  return pos, max(_BLOCK, FRAME + n)


def examples_lost(damage: Sequence[Damage], intact: int,
                  expected: int) -> list[int]:
  """The examples each damaged span cost, for a shard that should hold
  ``expected`` and holds ``intact``: one per bad data checksum; the spans
  where the framing was lost share the rest by their bytes."""
  count = [1 if d.kind == 'data' else 0 for d in damage]
  rest = max(0, expected - intact - sum(count))
  lost = [i for i, d in enumerate(damage) if d.kind != 'data']
  total = sum(damage[i].end - damage[i].offset for i in lost)
  if not lost or not rest:
    return count
  shares = [rest * (damage[i].end - damage[i].offset) / max(total, 1)
            for i in lost]
  whole = [int(s) for s in shares]
  order = sorted(range(len(lost)), key=lambda k: whole[k] - shares[k])
  for k in order[:rest - sum(whole)]:
    whole[k] += 1
  for i, w in zip(lost, whole):
    count[i] = w
  return count


# --- Which shard a TensorFlow error means ------------------------------------

_TF_OFFSET = re.compile(r'(?:corrupted|truncated) record at (\d+)')


def shards_at(message: str, paths: Sequence[str]) -> list[str] | None:
  """The shards among ``paths`` that a TensorFlow DataLossError's message
  ('corrupted record at N': a record's start, or its data's) can mean;
  None when it names no offset. A few bytes of each are read: the header
  before N, and in widening windows, whether a record ends at N."""
  found = _TF_OFFSET.search(message)
  if not found:
    return None
  offset = int(found.group(1))
  for window in (1 << 16, 1 << 20, 1 << 24):
    hits = [p for p in paths if _damaged_at(p, offset, window)]
    if hits:
      return hits
  return []


def _damaged_at(path: str, offset: int, window: int) -> bool:
  try:
    with open(path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      if offset > size:
        return False
      if offset >= HEADER and _intact_header(_read(f, offset - HEADER,
                                                   HEADER)):
        return not _intact(f, offset - HEADER, size)  # its data is damaged
      return not _intact(f, offset, size) and (
          offset == 0 or _record_ends_at(f, offset, window))
  except OSError:
    return False


def _intact_header(head: bytes) -> bool:
  return len(head) == HEADER and mask(crc32c_py(head[:8])) == (
      int.from_bytes(head[8:], 'little'))


def _intact(f, offset: int, size: int) -> bool:
  head = _read(f, offset, HEADER)
  if not _intact_header(head):
    return False
  (n,) = struct.unpack_from('<Q', head)
  if n > size - offset - FRAME:
    return False
  data = _read(f, offset + HEADER, n + 4)
  return mask(crc32c(data, [0], [n])[0]) == int.from_bytes(data[n:],
                                                             'little')


def _record_ends_at(f, offset: int, window: int) -> bool:
  """Whether an intact record ends exactly at ``offset`` and starts at most
  ``window`` bytes before it."""
  start = max(0, offset - window)
  arr = np.frombuffer(_read(f, start, offset - start), np.uint8)
  m = len(arr) - FRAME + 1
  if m <= 0:
    return False
  lengths = np.zeros(m, np.uint64)
  for k in range(8):
    lengths |= arr[k:k + m].astype(np.uint64) << np.uint64(8 * k)
  need = (offset - start - FRAME - np.arange(m)).astype(np.uint64)
  at = np.flatnonzero(lengths == need)
  at = at[_headers_ok(arr, at)]
  return bool(len(at)) and bool(_data_ok(arr, at, lengths[at].astype(
      np.int64)).any())


# --- tf.train.Example, without TensorFlow ------------------------------------

def _varint(buf: bytes, p: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if p >= len(buf):
      raise ValueError('a varint runs past the end')
    b = buf[p]
    p += 1
    value |= (b & 0x7F) << shift
    if not b & 0x80:
      return value, p
    shift += 7
    if shift >= 70:
      raise ValueError('a varint is longer than 10 bytes')


def _fields(buf: bytes) -> list[tuple[int, int, bytes | int | None]]:
  """(field number, wire type, value) of a protobuf message: varints as
  ints, length-delimited fields as bytes; ValueError if malformed."""
  out, p = [], 0
  while p < len(buf):
    key, p = _varint(buf, p)
    field, wire = key >> 3, key & 7
    value = None
    if wire == 0:
      value, p = _varint(buf, p)
    elif wire == 2:
      size, p = _varint(buf, p)
      if size > len(buf) - p:
        raise ValueError(f'field {field} runs past the end')
      value, p = buf[p:p + size], p + size
    elif wire in (1, 5):
      p += 8 if wire == 1 else 4
      if p > len(buf):
        raise ValueError(f'field {field} runs past the end')
    else:
      raise ValueError(f'field {field} has wire type {wire}')
    out.append((field, wire, value))
  return out


def _feature(buf: bytes) -> tuple[str, list]:
  """('bytes', values), ('int64', values), ('float', []) or ('none', [])."""
  for field, wire, value in _fields(buf):
    if field == 1 and wire == 2:
      return 'bytes', [v for f, w, v in _fields(value) if f == 1 and w == 2]
    if field == 3 and wire == 2:
      ints = []
      for f, w, v in _fields(value):
        if f == 1 and w == 0:
          ints.append(v)
        elif f == 1 and w == 2:  # packed
          p = 0
          while p < len(v):
            x, p = _varint(v, p)
            ints.append(x)
      return 'int64', [x - (1 << 64) if x >= 1 << 63 else x for x in ints]
    if field == 2:
      return 'float', []
  return 'none', []


def parse_example(buf: bytes) -> dict[str, tuple[str, list]]:
  """{feature name: (kind, values)} of a serialized tf.train.Example;
  ValueError if it is none."""
  features = {}
  for field, wire, value in _fields(buf):
    if field != 1 or wire != 2:
      continue
    for f, w, entry in _fields(value):
      if f != 1 or w != 2:
        continue
      key, feature = None, b''
      for f3, w3, v in _fields(entry):
        if f3 == 1 and w3 == 2:
          key = v.decode('utf-8')
        elif f3 == 2 and w3 == 2:
          feature = v
      if key is None:
        raise ValueError('a feature has no name')
      features[key] = _feature(feature)
  return features
