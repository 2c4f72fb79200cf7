"""The small JSON files of a run and of a dataset (run.json, results.json,
tfds metadata): read so that a damaged one is refused naming the file,
within bounds of size and depth, instead of a traceback that names none;
written atomically, so that a crash leaves the old file or the new one,
never half of one."""

from __future__ import annotations

import json
import math
import os


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
