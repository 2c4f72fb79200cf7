"""MXNet RecordIO (``.rec`` + ``.idx``) read in pure Python, so that
converting an insightface dataset needs no mxnet.

A record is u32 magic, u32 lrec (continuation flag in the top 3 bits, length
in the rest), then the payload padded to 4 bytes. The writer splits a payload
wherever it holds the magic word and drops that word, so the reader puts it
back between the chunks. The payload starts with the image header ``<IfQQ``
(flag, label, id, id2); flag > 0 means flag float32 labels follow it.

The files come from users, so every length and offset is checked against the
file's size before anything is read with it (a damaged lrec can claim up to
512 MB), and every error is a ``RecordError`` naming the file and the line or
offset.
"""

from __future__ import annotations

import os
import re
import struct
from typing import BinaryIO, NamedTuple

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_HEADER = struct.Struct('<IfQQ')
_WHOLE, _FIRST, _MIDDLE, _LAST = range(4)
# Two unsigned integers of at most 20 digits (MXNet writes size_t keys and
# offsets); anything else on a line is damage.
_INDEX_LINE = re.compile(rb'[ \t]*([0-9]{1,20})[ \t]+([0-9]{1,20})[ \t]*\r?\n?')


class RecordError(ValueError):
  """A record that is not well-formed RecordIO."""


class Header(NamedTuple):
  flag: int
  labels: tuple[float, ...]  # the scalar label, or the flag labels after it
  id: int
  id2: int


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
  """``key\\toffset`` lines into {key: offset}. A damaged line is an error,
  not skipped: the .idx is the only way to the records, and a guess would
  silently lose or mislabel them."""
  index = {}
  with open(idx_path, 'rb') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      match = _INDEX_LINE.fullmatch(line)
      if match is None:
        raise RecordError(f'{os.fspath(idx_path)}, line {n}: {_show(line)} is '
                          'not "key<TAB>offset" (two unsigned integers); is '
                          'this the MXNet .idx of the .rec? Rewrite it with '
                          'im2rec or MXIndexedRecordIO')
      index[int(match[1])] = int(match[2])
  return index


def _show(line: bytes, limit: int = 60) -> str:
  """A damaged line, short enough for an error message."""
  shown = repr(line[:limit].rstrip(b'\r\n'))
  return shown + (f' (+{len(line) - limit} bytes)' if len(line) > limit else '')


def _name(f: BinaryIO) -> str:
  name = getattr(f, 'name', None)
  return os.fspath(name) if isinstance(name, (str, os.PathLike)) else 'the .rec'


def read_record(f: BinaryIO, offset: int) -> bytes:
  """The payload of the record at ``offset``, split chunks rejoined."""
  size = f.seek(0, os.SEEK_END)
  where = f'{_name(f)}, record at offset {offset}'
  if not 0 <= offset <= size - 8:
    raise RecordError(f'{where}: the offset is outside the file ({size} '
                      'bytes); the .idx is damaged or belongs to another .rec')
  chunks, position = [], offset
  while True:
    f.seek(position)
    head = f.read(8)
    if len(head) < 8:
      raise RecordError(f'{where}: ends early at offset {position} (the .rec '
                        'is truncated)')
    magic, lrec = struct.unpack('<II', head)
    if magic != MAGIC:
      raise RecordError(f'{where}: no RecordIO magic word at offset '
                        f'{position} (the .idx does not match this .rec, or '
                        'the .rec is damaged)')
    cflag, length = lrec >> 29, lrec & _LENGTH_MASK
    if length > size - position - 8:
      raise RecordError(f'{where}: the length {length} at offset '
                        f'{position + 4} runs past the end of the file '
                        f'({size} bytes; the .rec is truncated or damaged)')
    expected = (_WHOLE, _FIRST) if not chunks else (_MIDDLE, _LAST)
    if cflag not in expected:
      raise RecordError(f'{where}: continuation flag {cflag} at offset '
                        f'{position + 4} where one of {expected} was expected '
                        '(the .rec is damaged)')
    data = f.read(length)
    if len(data) < length:  # the file shrank while being read
      raise RecordError(f'{where}: ends early at offset {position + 8} (the '
                        '.rec is truncated)')
    chunks.append(data)
    if cflag in (_WHOLE, _LAST):
      return _MAGIC_BYTES.join(chunks)
    position += 8 + length + (-length) % 4


def unpack(payload: bytes, where: str = 'record') -> tuple[Header, bytes]:
  """(header, the bytes after the header and its labels: the image).
  ``where`` names the record in errors (the file and offset)."""
  if len(payload) < _HEADER.size:
    raise RecordError(f'{where}: payload of {len(payload)} bytes is shorter '
                      f'than the {_HEADER.size}-byte image header')
  flag, label, id_, id2 = _HEADER.unpack_from(payload)
  end = _HEADER.size + 4 * flag
  if flag > 0:
    if len(payload) < end:
      raise RecordError(f'{where}: the header says {flag} labels follow, but '
                        f'the payload ends after {len(payload)} bytes')
    labels = struct.unpack_from(f'<{flag}f', payload, _HEADER.size)
  else:
    labels = (label,)
  return Header(flag, tuple(labels), id_, id2), payload[end:]
