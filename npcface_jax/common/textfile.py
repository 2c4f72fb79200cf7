"""The line formats users hand us (landmarks, pairs, list and name files,
IJB meta files), read so that a bad byte or a binary file is refused with
its file and line instead of escaping as a UnicodeDecodeError."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

# Longer lines are not a text format of ours (a binary file, a lost
# newline); refusing them bounds memory on any input.
MAX_LINE = 1 << 20
_NOT_TEXT = re.compile('[\x00\udc80-\udcff]')  # NUL, undecodable bytes


def shown(line: str) -> str:
  """A line for an error message: repr'd, cut to 120 characters."""
  return repr(line) if len(line) <= 120 else repr(line[:120]) + '...'


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """(line number, line) of every line of a UTF-8 text file (a byte order
  mark is skipped; \\n, \\r\\n and \\r end lines). Raises ValueError
  naming the file and line of bytes that are not UTF-8, a NUL byte or a
  line of MAX_LINE characters or more: not the text it should be."""
  with open(path, encoding='utf-8-sig', errors='surrogateescape') as f:
    n = 0
    while line := f.readline(MAX_LINE):
      n += 1
      bad = _NOT_TEXT.search(line)
      if bad or (len(line) == MAX_LINE and not line.endswith('\n')):
        why = (f'is {MAX_LINE} characters or longer' if not bad else
               'holds a NUL byte' if bad.group() == '\x00' else
               f'holds the byte {ord(bad.group()) - 0xdc00:#04x}, which is '
               'not UTF-8')
        raise ValueError(f'{path}, line {n}: {why}: not a text file of this '
                         'format; save it as UTF-8 text')
      yield n, line
