"""What a training SRC holds, as a flat list of images with identity names.

SRC is detected from what is on disk: a folder ``root/<identity>/<image>``
(or a folder holding ``train.rec`` and ``train.idx``), a ``.rec`` with its
``.idx`` next to it, or any other file as a ``path label`` list. Listing reads
no pixels (a .rec only its record headers), so that filters run before the
expensive decode.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

from data_prep import DataPrepError, recordio


class Entry(NamedTuple):
  key: str  # how report.json and --landmarks name it
  identity: str
  path: str  # the image file, or the .rec holding it
  offset: int | None  # the record's offset in the .rec; None for files


class Listing(NamedTuple):
  format: str  # 'folder', 'list' or 'rec'
  layout: str | None  # for 'rec': 'insightface' or 'im2rec'
  base: str  # relative paths in --landmarks are relative to this
  entries: list[Entry]
  skipped: list[dict]  # found unusable while listing: {'key', 'reason'}


def list_source(src: str | os.PathLike) -> Listing:
  src = os.fspath(src)
  if os.path.isdir(src):
    rec = os.path.join(src, 'train.rec')
    if os.path.isfile(rec) and os.path.isfile(os.path.join(src, 'train.idx')):
      return list_rec(rec)
    return list_folder(src)
  if not os.path.exists(src):
    raise DataPrepError(f'SRC {src!r} does not exist; pass an image folder, '
                        'a "path label" list file or a .rec file')
  if src.endswith('.rec'):
    return list_rec(src)
  return list_file(src)


def sort_names(names) -> list[str]:
  """Numeric order when every name is an integer (so label i stays i for
  integer-labelled data), else string order."""
  names = set(names)
  if all(n.isdigit() for n in names):
    return sorted(names, key=lambda n: (int(n), n))
  return sorted(names)


def _hidden(name: str) -> bool:
  return name.startswith('.')


def list_folder(root: str) -> Listing:
  """Every non-hidden file under each identity folder, at any depth; files
  directly in root (a README) belong to no identity and are left out."""
  root = os.path.abspath(root)
  identities = sorted(e.name for e in os.scandir(root)
                      if e.is_dir() and not _hidden(e.name))
  if not identities:
    raise DataPrepError(f'{root!r} has no identity folders; expected '
                        'root/<identity>/<image> (or pass a list file or '
                        'a .rec)')
  entries = []
  for identity in identities:
    top = os.path.join(root, identity)
    for folder, dirs, files in os.walk(top, followlinks=True):
      dirs[:] = sorted(d for d in dirs if not _hidden(d))
      for name in sorted(files):
        if not _hidden(name):
          path = os.path.join(folder, name)
          key = os.path.relpath(path, root).replace(os.sep, '/')
          entries.append(Entry(key, identity, path, None))
  return Listing('folder', None, root, entries, [])


def list_file(list_path: str) -> Listing:
  """``path label`` lines (the path may hold spaces; the label is the last
  field); paths relative to the list file's folder. Blank lines and lines
  starting with # are ignored."""
  base = os.path.dirname(os.path.abspath(list_path))
  entries = []
  try:
    with open(list_path, encoding='utf-8') as f:
      lines = list(f)
  except UnicodeDecodeError:
    raise DataPrepError(f'{list_path!r} is not a text list file; pass an '
                        'image folder, a .rec, or a list of "path label" '
                        'lines') from None
  for n, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    fields = line.rsplit(maxsplit=1)
    if len(fields) != 2:
      raise DataPrepError(f'{list_path}, line {n}: {line!r} has no label; '
                          'each line must be "path label"')
    key, identity = fields
    entries.append(Entry(key, identity, os.path.join(base, key), None))
  if not entries:
    raise DataPrepError(f'{list_path!r} lists no images; each line must be '
                        '"path label"')
  return Listing('list', None, base, entries, [])


def list_rec(rec_path: str) -> Listing:
  """Image records of a .rec, labelled by their header's (first) label.

  insightface puts a header record at key 0 (flag 2, labels [A, B]) and
  identity records at keys A..B-1: only keys 1..A-1 are images. im2rec
  files have no such header: every record is an image.
  """
  rec_path = os.path.abspath(rec_path)
  idx_path = rec_path[:-len('.rec')] + '.idx'
  if not os.path.isfile(idx_path):
    raise DataPrepError(f'{rec_path!r} has no index {idx_path!r} next to it; '
                        'RecordIO needs its .idx (im2rec writes both)')
  try:
    index = recordio.read_index(idx_path)
  except recordio.RecordError as e:
    raise DataPrepError(str(e)) from None
  entries, skipped = [], []
  layout = 'im2rec'
  with open(rec_path, 'rb') as f:
    keys = sorted(index)
    first = _header(f, index[0]) if 0 in index else None
    # insightface's header: two labels [A, B] and no image bytes.
    if isinstance(first, tuple) and first[0].flag == 2 and first[1] == 0:
      layout = 'insightface'
      keys = [k for k in keys if 1 <= k < int(first[0].labels[0])]
    for key in keys:
      header = _header(f, index[key])
      if isinstance(header, str):
        skipped.append({'key': str(key), 'reason': 'unreadable record',
                        'detail': header})
        continue
      label = header[0].labels[0] if header[0].labels else -1.0
      if not (label >= 0 and label == int(label)):
        skipped.append({'key': str(key), 'reason': 'bad label',
                        'detail': f'label {label} is not a class index'})
        continue
      entries.append(Entry(str(key), str(int(label)), rec_path, index[key]))
  if not entries and not skipped:
    raise DataPrepError(f'{rec_path!r} holds no image records')
  return Listing('rec', layout, os.path.dirname(rec_path), entries, skipped)


def _header(f, offset: int):
  """(Header, image byte count) of the record at offset, reading only its
  start when it is not split; the reason when it cannot be read."""
  try:
    f.seek(offset)
    head = f.read(64)
    if len(head) >= 8 + 24:
      magic, lrec = struct.unpack_from('<II', head)
      length = lrec & ((1 << 29) - 1)
      flag = struct.unpack_from('<I', head, 8)[0]
      end = 8 + 24 + 4 * flag
      if (magic == recordio.MAGIC and lrec >> 29 == 0 and end <= len(head)
          and end - 8 <= length):
        header, _ = recordio.unpack(head[8:end])
        return header, length - (end - 8)
    header, image = recordio.unpack(recordio.read_record(f, offset))
    return header, len(image)
  except recordio.RecordError as e:
    return str(e)
