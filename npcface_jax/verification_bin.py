"""insightface verification sets (``lfw.bin``, ``agedb_30.bin``, ...): a pickle
of ``(bins, issame_list)``, pair k being images bins[2k] and bins[2k + 1].

Unpickling runs whatever code the file names, so ``load_bin`` allows only the
globals such a file needs: ``_codecs.encode`` with the latin-1 codec (how
Python 3 pickles bytes at protocols 0-2) and NumPy's array reconstruction
(for files whose items are arrays). Python 2 files (the originals) hold
``str`` items, read back as bytes. Decoding uses Pillow: no TensorFlow here.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle

import numpy as np

_NOT_A_BIN = ('is not an insightface verification .bin (a pickle of '
              '(list of JPEG bytes, list of bools))')


def _latin1_encode(text, encoding='utf-8', errors='strict'):
  """``_codecs.encode`` for the one use a pickle of bytes makes of it."""
  if (not isinstance(text, str)
      or codecs.lookup(encoding).name != 'iso8859-1' or errors != 'strict'):
    raise ValueError(f'refused _codecs.encode(..., {encoding!r}): a '
                     'verification .bin only encodes bytes as latin-1')
  return text.encode('latin-1')


def _numpy_global(module: str, name: str):
  # numpy 2 renamed numpy.core to numpy._core; files name either.
  for candidate in (module.replace('numpy.core', 'numpy._core'),
                    module.replace('numpy._core', 'numpy.core')):
    try:
      return getattr(importlib.import_module(candidate), name)
    except (ImportError, AttributeError):
      continue
  raise ValueError(f'this NumPy has no {module}.{name}')


_ALLOWED = {
    ('_codecs', 'encode'): lambda: _latin1_encode,
    ('numpy', 'ndarray'): lambda: np.ndarray,
    ('numpy', 'dtype'): lambda: np.dtype,
    **{(m, n): (lambda m=m, n=n: _numpy_global(m, n))
       for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
       for n in ('_reconstruct', 'scalar')},
}


class _Unpickler(pickle.Unpickler):
  def find_class(self, module, name):
    make = _ALLOWED.get((module, name))
    if make is None:
      raise ValueError(
          f'refused to load the global {module}.{name}: the file {_NOT_A_BIN}, '
          'and loading it could run arbitrary code')
    return make()

  def persistent_load(self, pid):
    raise ValueError(f'refused a persistent id: the file {_NOT_A_BIN}')


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
  """(encoded images, issame (P,) bool) of a verification .bin, safely."""
  with open(path, 'rb') as f:
    try:
      obj = _Unpickler(f, encoding='bytes').load()
    except ValueError as e:
      raise ValueError(f'{os.fspath(path)}: {e}') from None
    except Exception as e:  # noqa: BLE001 (pickle raises many types)
      raise ValueError(f'{os.fspath(path)} {_NOT_A_BIN}: '
                       f'{type(e).__name__}: {e}') from None
  if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
    raise ValueError(f'{os.fspath(path)} {_NOT_A_BIN}: it holds a '
                     f'{type(obj).__name__}')
  bins = [_as_bytes(b, i, path) for i, b in enumerate(obj[0])]
  issame = np.asarray(obj[1]) if len(obj[1]) else np.zeros(0, bool)
  if issame.ndim != 1 or issame.dtype.kind not in 'biu':
    raise ValueError(f'{os.fspath(path)}: issame_list is not a list of bools')
  if len(bins) != 2 * len(issame):
    raise ValueError(f'{os.fspath(path)}: {len(bins)} images for '
                     f'{len(issame)} pairs; expected two per pair')
  return bins, issame.astype(bool)


def _as_bytes(item, i: int, path) -> bytes:
  if isinstance(item, (bytes, bytearray)):
    return bytes(item)
  if isinstance(item, str):  # A Python 2 str read without encoding='bytes'.
    return item.encode('latin-1')
  if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
    return item.tobytes()
  raise ValueError(f'{os.fspath(path)}: image {i} is a {type(item).__name__}, '
                   'not encoded image bytes')


def save_bin(path: str | os.PathLike, bins, issame) -> None:
  """Writes (list of bytes, list of bool) as insightface does, atomically."""
  bins = [bytes(b) for b in bins]
  issame = [bool(s) for s in issame]
  if len(bins) != 2 * len(issame):
    raise ValueError(f'{len(bins)} images for {len(issame)} pairs; expected '
                     'two per pair')
  tmp = f'{os.fspath(path)}.partial'
  with open(tmp, 'wb') as f:
    pickle.dump((bins, issame), f, protocol=4)
  os.replace(tmp, path)


def decode_pairs(bins, image_size: int) -> np.ndarray:
  """(N, S, S, 3) uint8 RGB images, resized (bilinear) where not S x S."""
  from PIL import Image  # noqa: PLC0415

  out = np.empty((len(bins), image_size, image_size, 3), np.uint8)
  for i, data in enumerate(bins):
    with Image.open(io.BytesIO(data)) as image:
      image = image.convert('RGB')
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size),
                             Image.Resampling.BILINEAR)
      out[i] = np.asarray(image)
  return out
