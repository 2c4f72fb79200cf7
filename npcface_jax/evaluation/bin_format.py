"""insightface verification sets (``lfw.bin``, ``agedb_30.bin``, ...): a pickle
of ``(bins, issame_list)``, pair k being images bins[2k] and bins[2k + 1].

Why a pickle reader of our own. ``pickle.Unpickler`` with a list of allowed
globals is not enough: NumPy's array and dtype reconstruction (which the
files may use) apply state taken from the file, and NumPy trusts it. A dtype
state with forged flags makes an array's raw bytes be read as object
pointers, and a 200-byte file crashes the process (or worse). So nothing
here calls a function that the file names, nor hands its bytes to NumPy's
unpickling: ``common.safe_pickle.Reader`` runs the pickle opcodes itself
over plain values, and ``_Vocabulary`` recognises the few constructor calls
that such files contain as patterns, checked field by field:

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

import os
import pickle
from typing import Any, NamedTuple

import numpy as np

from npcface_jax.common import jsonfile, safe_pickle
from npcface_jax.faces import images

_NOT_A_BIN = ('is not an insightface verification .bin (a pickle of '
              '(list of JPEG bytes, list of bools))')


_Refused = safe_pickle.Refused
_describe = safe_pickle.describe


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


class _Vocabulary(safe_pickle.Vocabulary):
  """The opcodes of pickle protocols 0-5 that verification .bin files use,
  and the few constructor calls they make, checked; see the module
  docstring."""

  what = 'a verification .bin'
  opcodes = safe_pickle.BASIC
  globals = _GLOBALS

  def refused_global(self, module: str, name: str) -> str:
    return (f'refused to load the global {module}.{name}: the file '
            f'{_NOT_A_BIN}, and loading it could run code')

  def call(self, func, args):
    if not isinstance(func, safe_pickle.Global):
      raise _Refused(f'a call of a {type(func).__name__}')
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
    if name == '_reconstruct' and n == 3 and isinstance(
        args[0], safe_pickle.Global) and (
        args[0].name == 'ndarray' and safe_pickle.same(args[1], (0,))
        and type(args[2]) is bytes and args[2] == b'b'):
      return _Array()
    if name == '_frombuffer' and n == 4:
      buffer, dtype, shape, order = args
      return _array_value(dtype, shape, buffer,
                          type(order) is str and order in ('C', 'F'))
    raise _Refused(f'refused the call {name}{_describe(args)}, which a '
                   'verification .bin never makes')

  def build(self, obj, state) -> None:
    if isinstance(obj, _Dtype) and safe_pickle.same(state, _DTYPE_STATE):
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
    obj = safe_pickle.Reader(data, _Vocabulary()).load()
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
