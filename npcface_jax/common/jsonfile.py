"""The small JSON files of a run and of a dataset (run.json, results.json,
tfds metadata): read so that a damaged one is refused naming the file,
within bounds of size and depth, instead of a traceback that names none;
written atomically, so that a crash leaves the old file or the new one,
never half of one."""

from __future__ import annotations

import json
import math
import os

from npcface_jax.common import textfile


# JSON files of ours are kilobytes, a few levels deep; anything beyond these
# is not one (and deeper values would overflow the stack of the recursive
# code that reads and writes them back).
_MAX_JSON_BYTES = 64 << 20
_MAX_JSON_DEPTH = 64


def _json_depth(value) -> int:
  """Nesting depth of a parsed JSON value (iterative: no recursion limit)."""
  deepest, stack = 0, [(value, 1)]
  while stack:
    value, depth = stack.pop()
    deepest = max(deepest, depth)
    children = (value.values() if isinstance(value, dict) else
                value if isinstance(value, list) else ())
    stack.extend((v, depth + 1) for v in children)
  return deepest


def read_object(path: str | os.PathLike) -> dict:
  """The JSON object in path; ValueError starting with the file's name and
  saying what is wrong with it (not JSON: not UTF-8, cut short, ...; too
  big or deep; not an object)."""
  too_deep = f'{path} nests JSON deeper than {_MAX_JSON_DEPTH} levels'
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read(_MAX_JSON_BYTES + 1)
    if len(text) > _MAX_JSON_BYTES:
      raise ValueError(f'it is over {_MAX_JSON_BYTES >> 20} MiB')
    value = json.loads(text)
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: it is not UTF-8 text (byte '
                     f'{e.start})') from None
  except RecursionError:  # json's own limit, far beyond ours
    raise ValueError(too_deep) from None
  except ValueError as e:  # JSONDecodeError: line and column
    raise ValueError(f'{path} is not valid JSON: {e}') from None
  if _json_depth(value) > _MAX_JSON_DEPTH:
    raise ValueError(too_deep)
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not an '
                     'object')
  return value


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to a temporary file beside ``path`` and renames it over
  ``path`` (an atomic replace on POSIX)."""
  tmp = f'{os.fspath(path)}.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _finite(value):
  """JSON has no infinity or NaN: such a float (a threshold of -inf accepts
  every pair) is written as null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def write_object(path: str | os.PathLike, value: dict) -> None:
  """``value`` as indented JSON in ``path``, atomically; non-finite floats
  become null."""
  text = json.dumps(_finite(value), indent=1, allow_nan=False)
  atomic_write(path, text.encode('utf-8'))


def append_line(path: str | os.PathLike, value: dict) -> None:
  """``value`` as one compact JSON line appended to ``path`` (JSON Lines),
  non-finite floats as null; the file and its folder are made if needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(_finite(value), allow_nan=False, separators=(',', ':'))
  with open(path, 'a', encoding='utf-8') as f:
    f.write(text + '\n')


def read_lines(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
  """(the JSON objects of a JSON Lines file, what was left out and why).
  A line that is not an object (one cut short by a crash while it was
  written, a damaged one) is left out and named, never fatal: the records
  around it are kept."""
  records, left_out = [], []
  for n, line in textfile.text_lines(path):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except (ValueError, RecursionError) as e:
      value = e
    if isinstance(value, dict) and _json_depth(value) <= _MAX_JSON_DEPTH:
      records.append(value)
    else:
      left_out.append(f'{path}, line {n}: not a JSON object '
                      f'({textfile.shown(line.strip())})')
  return records, left_out
