"""What a training SRC holds, as a flat list of images with identity names.

SRC is detected from what is on disk: a folder ``root/<identity>/<image>``
(or a folder holding ``train.rec`` and ``train.idx``), a ``.rec`` with its
``.idx`` next to it, or any other file as a ``path label`` list. Listing reads
no pixels (a .rec only its record headers), so that filters run before the
expensive decode.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from typing import NamedTuple

from data_prep import DataPrepError, recordio
from npcface_jax.faces import images


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
  directly in root (a README) belong to no identity and are left out.

  Links are followed, but each folder once per identity (a link back up
  would loop for ever). Folders that cannot be read, and the images of an
  identity whose folder name cannot be a class name, go to ``skipped``.
  """
  root = os.path.abspath(root)
  try:
    with os.scandir(root) as found:
      identities = sorted(e.name for e in found
                          if not _hidden(e.name) and _is_dir(e))
  except OSError as e:
    raise DataPrepError(f'cannot read the folder {root!r}: {e.strerror}; '
                        'pass a readable image folder') from None
  if not identities:
    raise DataPrepError(f'{root!r} has no identity folders; expected '
                        'root/<identity>/<image> (or pass a list file or '
                        'a .rec)')
  entries, skipped = [], []
  for identity in identities:
    problem = images.identity_problem(identity)
    for key, path, error in _walk(root, identity):
      if error:
        skipped.append({'path': key, 'reason': 'unreadable folder',
                        'detail': error})
      elif problem:
        skipped.append({'path': key, 'reason': 'bad identity name',
                        'detail': f'the folder name {identity!r} {problem}; '
                                  'rename it'})
      else:
        entries.append(Entry(key, identity, path, None))
  return Listing('folder', None, root, entries, skipped)


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # a link to nowhere, or no permission
    return False


def _walk(root: str, identity: str):
  """(key, path, None) for each file under root/identity, in sorted order,
  or (key, path, why) for a folder that cannot be read."""
  seen = set()
  errors = []
  top = os.path.join(root, identity)
  for folder, dirs, files in os.walk(top, onerror=errors.append,
                                     followlinks=True):
    while errors:
      e = errors.pop()
      path = e.filename or folder
      yield _key(root, path), path, f'{e.strerror or e}'
    try:
      info = os.stat(folder)
    except OSError as e:
      yield _key(root, folder), folder, f'{e.strerror or e}'
      dirs[:] = []
      continue
    if (info.st_dev, info.st_ino) in seen:  # reached again through a link
      dirs[:] = []
      continue
    seen.add((info.st_dev, info.st_ino))
    dirs[:] = sorted(d for d in dirs if not _hidden(d))
    for name in sorted(files):
      if not _hidden(name):
        path = os.path.join(folder, name)
        yield _key(root, path), path, None
  for e in errors:
    path = e.filename or top
    yield _key(root, path), path, f'{e.strerror or e}'


def _key(root: str, path: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, '/')


# A path longer than Linux's PATH_MAX names no file; a longer label is not
# an identity name but a damaged line.
_MAX_PATH = 4096
_MAX_LABEL = 255


def list_file(list_path: str) -> Listing:
  """``path label`` lines (the path may hold spaces; the label is the last
  field); paths relative to the list file's folder. Blank lines and lines
  starting with # are ignored. A line that cannot be used (not UTF-8, a NUL
  byte, no label, absurd lengths) goes to ``skipped`` naming the file and
  line, so one bad line costs only itself; a file with no usable line is an
  error naming its first bad line."""
  base = os.path.dirname(os.path.abspath(list_path))
  try:
    if not stat.S_ISREG(os.stat(list_path).st_mode):
      raise DataPrepError(f'{list_path!r} is not a regular file; pass an '
                          'image folder, a .rec, or a list of "path label" '
                          'lines')
    with open(list_path, 'rb') as f:
      lines = f.read().split(b'\n')
  except OSError as e:
    raise DataPrepError(f'cannot read the list file {list_path!r}: '
                        f'{e.strerror or e}') from None
  entries, skipped = [], []
  for n, raw in enumerate(lines, 1):
    entry = _list_line(raw, base)
    if isinstance(entry, Entry):
      entries.append(entry)
    elif entry:
      skipped.append({'key': f'line {n}', 'reason': 'bad list line',
                      'detail': f'{list_path}, line {n}: {entry}'})
  if not entries:
    first = (f'; {skipped[0]["detail"]}' if skipped else '')
    raise DataPrepError(f'{list_path!r} lists no images{first}; each line '
                        'must be "path label" (UTF-8 text)')
  return Listing('list', None, base, entries, skipped)


def _list_line(raw: bytes, base: str) -> Entry | str | None:
  """The Entry of one list line, None for a blank or comment line, or why
  the line cannot be used."""
  try:
    line = raw.decode('utf-8').strip()
  except UnicodeDecodeError as e:
    return (f'byte {e.start} is not UTF-8 ({raw[e.start:e.start + 1]!r}); '
            'save the list as UTF-8')
  if not line or line.startswith('#'):
    return None
  if '\0' in line:
    return 'holds a NUL byte, which no path or name can contain'
  fields = line.rsplit(maxsplit=1)
  if len(fields) != 2:
    return f'{line[:60]!r} has no label; each line must be "path label"'
  key, identity = fields
  if len(key.encode()) > _MAX_PATH:
    return (f'the path is {len(key.encode())} bytes long, more than any file '
            f'system allows ({_MAX_PATH})')
  if len(identity) > _MAX_LABEL:
    return (f'the label is {len(identity)} characters long (at most '
            f'{_MAX_LABEL}); is the line "path label"?')
  problem = images.identity_problem(identity)
  if problem:
    return f'the label {identity!r} {problem}'
  return Entry(key, identity, os.path.join(base, key), None)


def list_rec(rec_path: str) -> Listing:
  """Image records of a .rec, labelled by their header's (first) label.

  insightface puts a header record at key 0 (flag 2, labels [A, B]) and
  identity records at keys A..B-1: only keys 1..A-1 are images. im2rec
  files have no such header: every record is an image. A record that cannot
  be read or has no class label goes to ``skipped``; the listing goes on.
  """
  rec_path = os.path.abspath(rec_path)
  idx_path = rec_path[:-len('.rec')] + '.idx'
  if not os.path.isfile(rec_path):  # (a FIFO would block the open)
    raise DataPrepError(f'{rec_path!r} is not a regular file; pass a .rec '
                        'with its .idx next to it')
  if not os.path.isfile(idx_path):
    raise DataPrepError(f'{rec_path!r} has no index {idx_path!r} next to it; '
                        'RecordIO needs its .idx (im2rec writes both)')
  try:
    index = recordio.read_index(idx_path)
    f = open(rec_path, 'rb')  # noqa: SIM115 (closed below)
  except recordio.RecordError as e:
    raise DataPrepError(str(e)) from None
  except OSError as e:
    raise DataPrepError(f'cannot read {e.filename or rec_path!r}: '
                        f'{e.strerror or e}') from None
  entries, skipped = [], []
  layout = 'im2rec'
  with f:
    keys = sorted(index)
    first = _header(f, index[0]) if 0 in index else None
    # insightface's header: two labels [A, B] and no image bytes.
    if isinstance(first, tuple) and first[0].flag == 2 and first[1] == 0:
      layout = 'insightface'
      end = _images_end(first[0], rec_path, idx_path, index[0])
      keys = [k for k in keys if 1 <= k < end]
    for key in keys:
      header = _header(f, index[key])
      if isinstance(header, str):
        skipped.append({'key': str(key), 'reason': 'unreadable record',
                        'detail': header})
        continue
      label = header[0].labels[0] if header[0].labels else -1.0
      if not (math.isfinite(label) and label >= 0 and label.is_integer()):
        skipped.append({'key': str(key), 'reason': 'bad label',
                        'detail': f'{rec_path}, record at offset '
                                  f'{index[key]}: label {label} is not a '
                                  'class index'})
        continue
      entries.append(Entry(str(key), str(int(label)), rec_path, index[key]))
  if not entries and not skipped:
    raise DataPrepError(f'{rec_path!r} holds no image records (its index '
                        f'{idx_path!r} lists none)')
  return Listing('rec', layout, os.path.dirname(rec_path), entries, skipped)


def _images_end(header: recordio.Header, rec_path: str, idx_path: str,
                offset: int) -> int:
  """A, from the insightface header's labels [A, B] (images are keys 1..A-1,
  identities A..B-1); an error when they cannot be that."""
  a, b = header.labels
  if not (math.isfinite(a) and math.isfinite(b) and a.is_integer()
          and b.is_integer() and 1 <= a <= b):
    raise DataPrepError(
        f'{rec_path}: the insightface header (key 0, record at offset '
        f'{offset}) has labels [{a}, {b}], not [1 + images, 1 + images + '
        'identities]; the .rec is damaged: rewrite it, or remove the line of '
        f'key 0 from {idx_path} to read every record as an image')
  return int(a)


def _header(f, offset: int):
  """(Header, image byte count) of the record at offset, reading only its
  start when it is not split; the reason when it cannot be read."""
  where = f'{f.name}, record at offset {offset}'
  try:
    size = f.seek(0, os.SEEK_END)
    if 0 <= offset <= size - 8:
      f.seek(offset)
      head = f.read(64)
      if len(head) >= 8 + 24:
        magic, lrec = struct.unpack_from('<II', head)
        length = lrec & ((1 << 29) - 1)
        flag = struct.unpack_from('<I', head, 8)[0]
        end = 8 + 24 + 4 * flag
        if (magic == recordio.MAGIC and lrec >> 29 == 0 and end <= len(head)
            and end - 8 <= length <= size - offset - 8):
          header, _ = recordio.unpack(head[8:end], where)
          return header, length - (end - 8)
    header, image = recordio.unpack(recordio.read_record(f, offset), where)
    return header, len(image)
  except recordio.RecordError as e:
    return str(e)
  except OSError as e:
    return f'{where}: {e.strerror or e}'
