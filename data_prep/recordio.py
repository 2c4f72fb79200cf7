"""MXNet RecordIO (``.rec`` + ``.idx``) read in pure Python, so that
converting an insightface dataset needs no mxnet (DESIGN.md section 6).

A record is u32 magic, u32 lrec (continuation flag in the top 3 bits, length
in the rest), then the payload padded to 4 bytes. The writer splits a payload
wherever it holds the magic word and drops that word, so the reader puts it
back between the chunks. The payload starts with the image header ``<IfQQ``
(flag, label, id, id2); flag > 0 means flag float32 labels follow it.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, NamedTuple

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_HEADER = struct.Struct('<IfQQ')
_WHOLE, _FIRST, _MIDDLE, _LAST = range(4)


class RecordError(ValueError):
  """A record that is not well-formed RecordIO."""


class Header(NamedTuple):
  flag: int
  labels: tuple[float, ...]  # the scalar label, or the flag labels after it
  id: int
  id2: int


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
  """``key\\toffset`` lines into {key: offset}."""
  index = {}
  with open(idx_path, encoding='ascii') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        key, offset = line.split()
        index[int(key)] = int(offset)
      except ValueError:
        raise RecordError(f'{idx_path}, line {n}: {line.strip()!r} is not '
                          '"key<TAB>offset"; is this an MXNet .idx?') from None
  return index


def read_record(f: BinaryIO, offset: int) -> bytes:
  """The payload of the record at ``offset``, split chunks rejoined."""
  f.seek(offset)
  chunks = []
  while True:
    head = f.read(8)
    if len(head) < 8:
      raise RecordError(f'record at offset {offset} ends early (truncated '
                        '.rec, or an .idx that belongs to another file)')
    magic, lrec = struct.unpack('<II', head)
    if magic != MAGIC:
      raise RecordError(f'no RecordIO magic word at offset {f.tell() - 8} '
                        '(the .idx does not match this .rec)')
    cflag, length = lrec >> 29, lrec & _LENGTH_MASK
    data = f.read(length)
    if len(data) < length:
      raise RecordError(f'record at offset {offset} ends early (truncated '
                        '.rec)')
    f.seek((-length) % 4, os.SEEK_CUR)
    expected = (_WHOLE, _FIRST) if not chunks else (_MIDDLE, _LAST)
    if cflag not in expected:
      raise RecordError(f'record at offset {offset} has continuation flag '
                        f'{cflag} where {expected} was expected')
    chunks.append(data)
    if cflag in (_WHOLE, _LAST):
      return _MAGIC_BYTES.join(chunks)


def unpack(payload: bytes) -> tuple[Header, bytes]:
  """(header, the bytes after the header and its labels: the image)."""
  if len(payload) < _HEADER.size:
    raise RecordError(f'payload of {len(payload)} bytes is shorter than the '
                      f'{_HEADER.size}-byte image header')
  flag, label, id_, id2 = _HEADER.unpack_from(payload)
  end = _HEADER.size + 4 * flag
  if flag > 0:
    if len(payload) < end:
      raise RecordError(f'header says {flag} labels follow, but the payload '
                        'ends first')
    labels = struct.unpack_from(f'<{flag}f', payload, _HEADER.size)
  else:
    labels = (label,)
  return Header(flag, tuple(labels), id_, id2), payload[end:]
