"""insightface verification sets (``lfw.bin``, ``agedb_30.bin``, ...): a pickle
of ``(bins, issame_list)``, pair k being images bins[2k] and bins[2k + 1].

Why a pickle reader of our own. ``pickle.Unpickler`` with a list of allowed
globals is not enough: NumPy's array and dtype reconstruction (which the
files may use) apply state taken from the file, and NumPy trusts it. A dtype
state with forged flags makes an array's raw bytes be read as object
pointers, and a 200-byte file crashes the process (or worse). So nothing
here calls a function that the file names, nor hands its bytes to NumPy's
unpickling: ``_PickleReader`` runs the pickle opcodes itself over a small
vocabulary of plain values and recognises the few constructor calls that
such files contain as patterns, checked field by field:

- images: ``bytes`` (protocol 3+ opcodes, or ``_codecs.encode(text,
  'latin1')`` as Python 3 writes bytes at protocols 0-2, or ``bytes()``),
  Python 2 ``str`` (read as bytes), ``bytearray``, or a 1-D (or (N, 1), as
  ``cv2.imencode`` returns) NumPy uint8 array;
- labels: Python bools, the integers 0 and 1, NumPy bool scalars, or a 1-D
  NumPy bool array;
- NumPy arrays only as ``_reconstruct(ndarray, (0,), b'b')`` plus their
  state, or protocol 5's ``_frombuffer``, with dtypes ``uint8`` / ``bool``
  whose pickled state is exactly NumPy's own; both ``numpy.core`` and
  ``numpy._core`` module names.

Everything else (other globals, dicts, objects, persistent ids, out-of-band
buffers) is refused with a ValueError naming the file, the byte offset and
what was found. Memory stays bounded by the file's size: every length field
is checked against the bytes that remain before anything is allocated.
Images are decoded by ``npcface_jax.faces.images``, the one image layer of the
project (Pillow): no TensorFlow here.
"""

from __future__ import annotations

import codecs
import os
import pickle
import reprlib
from typing import Any, NamedTuple

import numpy as np

from npcface_jax.common import jsonfile
from npcface_jax.faces import images

_NOT_A_BIN = ('is not an insightface verification .bin (a pickle of '
              '(list of JPEG bytes, list of bools))')
_MAX_LINE = 256  # text-protocol lines other than string values (ints, names)


class _Refused(Exception):
  """The pickle holds something a verification .bin never does."""


class _Global:
  """A global the file may name, by its canonical name in _GLOBALS."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self) -> str:
    return self.name


# (module, name) the files use -> a canonical name; nothing is imported.
_GLOBALS = {
    ('_codecs', 'encode'): 'encode',
    ('__builtin__', 'bytes'): 'bytes', ('builtins', 'bytes'): 'bytes',
    ('__builtin__', 'bytearray'): 'bytearray',
    ('builtins', 'bytearray'): 'bytearray',
    ('numpy', 'ndarray'): 'ndarray',
    ('numpy', 'dtype'): 'dtype',
    **{(f'numpy.{core}.multiarray', name): name
       for core in ('core', '_core') for name in ('_reconstruct', 'scalar')},
    **{(f'numpy.{core}.numeric', '_frombuffer'): '_frombuffer'
       for core in ('core', '_core')},
}

# NumPy's pickled state of the two dtypes a .bin can hold (dtype.__reduce__).
_DTYPE_STATE = (3, '|', None, None, None, -1, -1, 0)
_DTYPES = ('u1', 'b1')  # uint8 (image bytes) and bool (labels)


class _Dtype:
  """``numpy.dtype(code, False, True)`` before and after its BUILD."""

  def __init__(self, code: str):
    self.code = code

  def __repr__(self) -> str:
    return f'dtype({self.code!r})'


class _Array:
  """``_reconstruct(ndarray, (0,), b'b')``: an empty array whose BUILD gives
  shape, dtype and data; ``value`` is then bytes (uint8) or a list of bools."""

  value: Any = None

  def __repr__(self) -> str:
    return 'ndarray'


def _same(got, want) -> bool:
  """got == want with equal types throughout (True is not 1 here)."""
  if type(got) is not type(want):
    return False
  if isinstance(want, tuple):
    return len(got) == len(want) and all(map(_same, got, want))
  return got == want


def _array_value(dtype, shape, data, order_ok: bool):
  """bytes for a uint8 array, a list of bools for a bool array."""
  if not isinstance(dtype, _Dtype):
    raise _Refused(f'an array of {type(dtype).__name__} dtype')
  if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2
          and all(type(n) is int and n >= 0 for n in shape)
          and (len(shape) == 1 or shape[1] == 1)):
    raise _Refused(f'an array of shape {_describe(shape)}; only 1-D arrays '
                   '(or one column) are image bytes or labels')
  if not (order_ok and isinstance(data, (bytes, bytearray))):
    raise _Refused(f'array data of type {type(data).__name__}')
  if len(data) != shape[0]:
    raise _Refused(f'an array of shape {shape} with {len(data)} bytes of '
                   'data')
  if dtype.code == 'u1':
    return bytes(data)
  return [bool(x) for x in data]


class _PickleReader:
  """The opcodes of pickle protocols 0-5 that verification .bin files use,
  over plain values and the placeholders above; see the module docstring."""

  def __init__(self, data: bytes):
    self.data, self.pos = data, 0
    self.stack: list = []
    self.marks: list[list] = []
    self.memo: dict[int, Any] = {}

  # --- reading the byte stream ---
  def take(self, n: int) -> bytes:
    if n < 0 or n > len(self.data) - self.pos:
      raise _Refused(f'a length of {n} bytes runs past the end of the file '
                     f'({len(self.data) - self.pos} bytes remain): truncated '
                     'or corrupt')
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def uint(self, n: int) -> int:
    return int.from_bytes(self.take(n), 'little')

  def line(self, limit: int | None = _MAX_LINE) -> bytes:
    end = self.data.find(b'\n', self.pos,
                         None if limit is None else self.pos + limit + 1)
    if end < 0:
      raise _Refused('a text-protocol line without its end (truncated, or '
                     'longer than such a line can be)')
    return self.take(end + 1 - self.pos)[:-1]

  # --- the stack ---
  def pop(self):
    if not self.stack:
      raise _Refused('an opcode that needs a value on an empty stack')
    return self.stack.pop()

  def pop_mark(self) -> list:
    if not self.marks:
      raise _Refused('an opcode that needs a MARK without one')
    items, self.stack = self.stack, self.marks.pop()
    return items

  def memo_get(self, key: int):
    if key not in self.memo:
      raise _Refused(f'a memo reference {key} that was never stored')
    self.stack.append(self.memo[key])

  def memo_put(self, key: int) -> None:
    if not self.stack:
      raise _Refused('a memo store with an empty stack')
    self.memo[key] = self.stack[-1]

  def small_int(self, text: bytes) -> int:
    """INT / LONG / PUT / GET text arguments: at most 20 digits."""
    text = text.rstrip(b'L')
    if not (0 < len(text) <= 20 and text.lstrip(b'-').isdigit()
            and text.isascii()):
      raise _Refused(f'{text[:40]!r} where a (small) integer belongs')
    return int(text)

  def signed(self, n: int) -> int:
    if n > 8:
      raise _Refused(f'a {n}-byte integer; a .bin holds none that large')
    return int.from_bytes(self.take(n), 'little', signed=True)

  def append(self, items: list) -> None:
    target = self.stack[-1] if self.stack else None
    if type(target) is not list:
      raise _Refused(f'APPEND to a {type(target).__name__}')
    target.extend(items)

  # --- calls: the only constructors a .bin uses, checked ---
  def call(self, func, args):
    if not isinstance(func, _Global):
      raise _Refused(f'a call of a {type(func).__name__}')
    if type(args) is not tuple:
      raise _Refused(f'call arguments of type {type(args).__name__}')
    name, n = func.name, len(args)
    if name == 'encode' and n == 2 and type(args[0]) is str and (
        args[1] in ('latin1', 'latin-1') and type(args[1]) is str):
      try:  # how Python 3 pickles bytes at protocols 0-2
        return args[0].encode('latin-1')
      except UnicodeEncodeError:
        raise _Refused('_codecs.encode of text beyond latin-1') from None
    if name in ('bytes', 'bytearray') and n == 0:
      return b''
    if name == 'bytearray' and n == 1 and type(args[0]) is bytes:
      return args[0]
    if name == 'dtype' and n == 3 and type(args[0]) is str and (
        args[0] in _DTYPES) and (
        args[1:] == (False, True) and all(type(a) is bool for a in args[1:])):
      return _Dtype(args[0])
    if name == 'scalar' and n == 2 and isinstance(args[0], _Dtype) and (
        args[0].code == 'b1' and type(args[1]) is bytes and len(args[1]) == 1):
      return bool(args[1][0])
    if name == '_reconstruct' and n == 3 and isinstance(args[0], _Global) and (
        args[0].name == 'ndarray' and _same(args[1], (0,))
        and type(args[2]) is bytes and args[2] == b'b'):
      return _Array()
    if name == '_frombuffer' and n == 4:
      buffer, dtype, shape, order = args
      return _array_value(dtype, shape, buffer,
                          type(order) is str and order in ('C', 'F'))
    raise _Refused(f'refused the call {name}{_describe(args)}, which a '
                   'verification .bin never makes')

  def build(self, obj, state) -> None:
    if isinstance(obj, _Dtype) and _same(state, _DTYPE_STATE):
      return
    if isinstance(obj, _Array) and obj.value is None and type(state) is tuple:
      if len(state) == 5 and type(state[0]) is int and state[0] == 1:
        state = state[1:]  # (version, shape, dtype, is_fortran, data)
      if len(state) == 4:
        shape, dtype, fortran, data = state
        obj.value = _array_value(dtype, shape, data, type(fortran) is bool)
        return
    raise _Refused(f'refused the state {_describe(state)} for a '
                   f'{type(obj).__name__.strip("_")}: not NumPy\'s own for '
                   'uint8 or bool')

  # --- the loop ---
  def load(self):
    self.pos = 0
    while True:
      at = self.pos
      if at >= len(self.data):
        raise _Refused(f'the file ends at byte {at} before the pickle does '
                       '(truncated)')
      op = self.take(1)
      handler = _OPCODES.get(op)
      if handler is None:
        raise _Refused(f'opcode {op!r} ({_name(op)}) at byte {at}, which a '
                       'verification .bin never uses')
      try:
        if handler(self) is _STOP:
          break
      except _Refused as e:
        raise _Refused(f'at byte {at} ({_name(op)}): {e}') from None
      except Exception as e:  # noqa: BLE001 (plain values only: malformed)
        raise _Refused(f'at byte {at} ({_name(op)}): {type(e).__name__}: '
                       f'{e}') from None
    value = self.pop()
    if self.stack or self.marks:
      raise _Refused('values left on the stack after STOP')
    return value


_STOP = object()


def _describe(value) -> str:
  """A short repr for messages; bounded in depth and length, so a hostile
  nesting of lists cannot recurse deeply or print megabytes."""
  if isinstance(value, (bytes, bytearray, str)):
    return f'<{len(value)} {"chars" if isinstance(value, str) else "bytes"}>'
  return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxother, _REPR.maxstring = 3, 40, 40


def _name(op: bytes) -> str:
  """The opcode's name, for messages."""
  import pickletools  # noqa: PLC0415 (only to name an opcode)
  return next((o.name for o in pickletools.opcodes
               if o.code.encode('latin-1') == op), 'no pickle opcode')


def _text_string(r: _PickleReader) -> bytes:
  """STRING: Python 2's repr of a str, quoted."""
  text = r.line(None)
  if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b'"', b"'"):
    raise _Refused('a STRING that is not quoted')
  try:
    return codecs.escape_decode(text[1:-1])[0]
  except ValueError as e:
    raise _Refused(f'a STRING with a bad escape: {e}') from None


def _unicode(raw: bytes, how: str = 'utf-8') -> str:
  try:
    return str(raw, how, 'surrogatepass' if how == 'utf-8' else 'strict')
  except UnicodeDecodeError as e:
    raise _Refused(f'a text value that does not decode: {e}') from None


def _int_line(r: _PickleReader):
  text = r.line()
  if text in (b'00', b'01'):  # protocols 0-1 write bools as INT 00 / 01
    return text == b'01'
  return r.small_int(text)


def _global(r: _PickleReader, module: str, name: str) -> _Global:
  canonical = _GLOBALS.get((module, name))
  if canonical is None:
    raise _Refused(f'refused to load the global {module[:60]}.{name[:60]}: '
                   f'the file {_NOT_A_BIN}, and loading it could run code')
  return _Global(canonical)


def _stack_global(r: _PickleReader):
  name, module = r.pop(), r.pop()
  if type(module) is not str or type(name) is not str:
    raise _Refused('STACK_GLOBAL of non-text names')
  return _global(r, module, name)


def _push(make):
  def handler(r):
    value = make(r)  # first: make may pop a MARK, replacing r.stack
    r.stack.append(value)
  return handler


def _tuple(n):
  def handler(r):
    items = [r.pop() for _ in range(n)][::-1]
    r.stack.append(tuple(items))
  return handler


def _reduce(r):
  args = r.pop()
  r.stack.append(r.call(r.pop(), args))


def _build(r):
  state = r.pop()
  if not r.stack:
    raise _Refused('BUILD on an empty stack')
  r.build(r.stack[-1], state)


def _append(r):
  item = r.pop()
  r.append([item])


def _appends(r):
  items = r.pop_mark()
  r.append(items)


def _mark(r):
  r.marks.append(r.stack)
  r.stack = []


def _proto(r):
  version = r.uint(1)
  if version > pickle.HIGHEST_PROTOCOL:
    raise _Refused(f'pickle protocol {version}')


def _frame(r):
  """FRAME only announces how many bytes follow: check, then read on."""
  size = r.uint(8)
  if size > len(r.data) - r.pos:
    raise _Refused(f'a frame of {size} bytes runs past the end of the file')


def _dup(r):
  if not r.stack:
    raise _Refused('DUP on an empty stack')
  r.stack.append(r.stack[-1])


_OPCODES = {
    b'\x80': _proto, b'\x95': _frame, b'.': lambda r: _STOP,
    b'(': _mark, b'0': lambda r: r.pop(), b'1': lambda r: r.pop_mark(),
    b'2': _dup,
    b'N': _push(lambda r: None), b'\x88': _push(lambda r: True),
    b'\x89': _push(lambda r: False),
    b'I': _push(_int_line), b'L': _push(lambda r: r.small_int(r.line())),
    b'J': _push(lambda r: r.signed(4)), b'K': _push(lambda r: r.uint(1)),
    b'M': _push(lambda r: r.uint(2)),
    b'\x8a': _push(lambda r: r.signed(r.uint(1))),
    b'\x8b': _push(lambda r: r.signed(r.uint(4))),
    # Python 2 str (read as bytes), bytes, bytearray.
    b'S': _push(_text_string),
    b'T': _push(lambda r: r.take(r.signed(4))),
    b'U': _push(lambda r: r.take(r.uint(1))),
    b'B': _push(lambda r: r.take(r.uint(4))),
    b'C': _push(lambda r: r.take(r.uint(1))),
    b'\x8e': _push(lambda r: r.take(r.uint(8))),
    b'\x96': _push(lambda r: r.take(r.uint(8))),
    # str: names of globals, codec names, text that _codecs.encode turns
    # into bytes.
    b'V': _push(lambda r: _unicode(r.line(None), 'raw-unicode-escape')),
    b'X': _push(lambda r: _unicode(r.take(r.uint(4)))),
    b'\x8c': _push(lambda r: _unicode(r.take(r.uint(1)))),
    b'\x8d': _push(lambda r: _unicode(r.take(r.uint(8)))),
    b')': _push(lambda r: ()), b't': _push(lambda r: tuple(r.pop_mark())),
    b'\x85': _tuple(1), b'\x86': _tuple(2), b'\x87': _tuple(3),
    b']': _push(lambda r: []), b'l': _push(lambda r: list(r.pop_mark())),
    b'a': _append, b'e': _appends,
    b'c': _push(lambda r: _global(r, _unicode(r.line(), 'ascii'),
                                  _unicode(r.line(), 'ascii'))),
    b'\x93': _push(_stack_global),
    b'R': _reduce, b'b': _build,
    b'p': lambda r: r.memo_put(r.small_int(r.line())),
    b'q': lambda r: r.memo_put(r.uint(1)),
    b'r': lambda r: r.memo_put(r.uint(4)),
    b'\x94': lambda r: r.memo_put(len(r.memo)),
    b'g': lambda r: r.memo_get(r.small_int(r.line())),
    b'h': lambda r: r.memo_get(r.uint(1)),
    b'j': lambda r: r.memo_get(r.uint(4)),
}


def _image_bytes(item, i: int) -> bytes:
  if isinstance(item, _Array):
    if type(item.value) is bytes:
      return item.value
    raise _Refused(f'image {i} is a NumPy array of '
                   f'{"bools" if item.value else "no data"}, not encoded '
                   'image bytes')
  if type(item) is bytes:  # an empty one is skipped when decoding
    return item
  raise _Refused(f'image {i} is {_describe(item)}, not encoded image bytes')


def _labels(value) -> list[bool]:
  if isinstance(value, _Array):
    value = value.value
  if not isinstance(value, (list, tuple)):
    raise _Refused(f'issame_list is a {type(value).__name__.strip("_")}, '
                   'not a list of bools')
  out = []
  for i, x in enumerate(value):
    if type(x) is bool:
      out.append(x)
    elif type(x) is int and x in (0, 1):
      out.append(bool(x))
    else:
      raise _Refused(f'issame_list[{i}] is {_describe(x)}, not a bool')
  return out


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """(encoded images, issame (P,) bool) of a verification .bin; never runs
  code from the file and refuses what such a file never holds (see the
  module docstring) with a ValueError naming the file."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    data = f.read()
  try:
    obj = _PickleReader(data).load()
    if isinstance(obj, _Array):
      obj = obj.value
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
      raise _Refused(f'it holds {_describe(obj)}, not (bins, issame_list)')
    items, issame = obj
    if not isinstance(items, (list, tuple)):
      raise _Refused(f'bins is a {type(items).__name__.strip("_")}, not a '
                     'list of encoded images')
    bins = [_image_bytes(b, i) for i, b in enumerate(items)]
    labels = _labels(issame)
  except _Refused as e:
    raise ValueError(f'{path} {_NOT_A_BIN}: {e}') from None
  if not labels:
    raise ValueError(f'{path} holds no pairs')
  if len(bins) != 2 * len(labels):
    raise ValueError(f'{path}: {len(bins)} images for {len(labels)} pairs; '
                     'expected two per pair')
  return bins, np.array(labels, bool)


def save_bin(path: str | os.PathLike, bins, issame) -> None:
  """Writes (list of bytes, list of bool) as insightface does, atomically."""
  bins = [bytes(b) for b in bins]
  issame = [bool(s) for s in issame]
  if len(bins) != 2 * len(issame):
    raise ValueError(f'{len(bins)} images for {len(issame)} pairs; expected '
                     'two per pair')
  jsonfile.atomic_write(path, pickle.dumps((bins, issame), protocol=4))


class Pairs(NamedTuple):
  images: np.ndarray   # (2P, S, S, 3) uint8 RGB, pair k = rows 2k, 2k + 1
  issame: np.ndarray   # (P,) bool
  skipped: list[str]   # pairs left out: 'pair k: image i: reason'


def decode_pairs(bins, image_size: int) -> np.ndarray:
  """(N, S, S, 3) uint8 RGB images, resized (bilinear) where not S x S;
  ValueError naming the first image that does not decode."""
  decoded, _, bad = _decode_all(bins, image_size)
  if bad:
    i, why = min(bad.items())
    raise ValueError(f'image {i} (pair {i // 2}) does not decode: {why}')
  return decoded


def _decode_all(bins, image_size: int
                ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
  """(the images that decode, their indices in bins, {index: why} of the
  others), through images.ImageBatches (threads)."""
  batches = images.ImageBatches(bins, image_size, batch_size=256)
  empty = np.zeros((0, image_size, image_size, 3), np.uint8)
  decoded = np.concatenate([*batches, empty])
  return (decoded, np.array(batches.kept, np.int64),
          {s.index: s.reason for s in batches.skipped})


def load_pairs(path: str | os.PathLike, image_size: int) -> Pairs:
  """A .bin's pairs decoded; a pair with an image that does not decode is
  left out and named in ``skipped`` (the others still count)."""
  bins, issame = load_bin(path)
  decoded, kept, bad = _decode_all(bins, image_size)
  keep = np.ones(len(issame), bool)
  skipped = []
  for i, why in sorted(bad.items()):
    if keep[i // 2]:
      skipped.append(f'pair {i // 2}: image {i}: {why}')
    keep[i // 2] = False
  if not keep.any():
    raise ValueError(f'{os.fspath(path)}: no pair has two images that '
                     f'decode (e.g. {skipped[0]})')
  rows = np.repeat(keep, 2)[kept]  # the decoded images of kept pairs
  return Pairs(decoded[rows], issame[keep], skipped)
