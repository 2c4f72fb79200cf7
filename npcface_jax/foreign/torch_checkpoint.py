"""PyTorch checkpoints (``.pth``, ``.pt``, ``.ckpt``) read as NumPy arrays,
without torch and without running anything the file holds.

``torch.load`` unpickles: a checkpoint can name any function and have it
called. Here ``common.safe_pickle`` runs the opcodes and ``_Vocabulary``
recognises what ``torch.save`` writes as patterns, never by calling what
the file names: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` /
``_rebuild_tensor_v3`` / ``_rebuild_parameter[_with_state]``, storages as
persistent ids ``('storage', torch.FloatStorage, key, location, numel)``,
``collections.OrderedDict`` / ``Counter``, and the inert containers seen in
real checkpoints (``argparse.Namespace``, Lightning's ``AttributeDict``,
``torch.Size``, ``torch.float16``-style dtypes, NumPy numeric scalars), all
as plain values. Any other global (a whole pickled model, ``os.system``)
is refused, naming the file, the byte offset and the global.

Both layouts torch writes: the zip archive (torch >= 1.6: ``<root>/data.pkl``
and one ``<root>/data/<key>`` entry per storage) and the legacy stream
(magic number, protocol and system-info pickles, the main pickle, the
storage keys, then per storage an int64 element count and its bytes).
Every size is checked before anything is allocated: storage bytes against
numel x itemsize, each tensor's offset and strides inside its storage,
zip entries' headers, sizes and CRCs, compressed entries' ratio, and the
total output against the file's size. Tensors come out as contiguous
copies; bfloat16 becomes float32 exactly, float16 stays float16.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from npcface_jax.common import safe_pickle

_Refused = safe_pickle.Refused
_describe = safe_pickle.describe

ACCEPTS = ('the reader accepts what torch.save writes for a state dict: '
           'tensors in dicts, lists and OrderedDicts with plain values '
           '(a FaceX-Zoo or Lightning wrapper included), zip or legacy '
           'format; re-save anything else with torch.save(model.state_dict(), '
           'path)')
_MAX_DEPTH = 64   # nesting of dicts and lists in a checkpoint
_MAX_DIMS = 32    # NumPy's limit before 2.0
_MAX_RATIO = 16   # uncompressed / compressed bytes of a zip entry
_OUTPUT_SLACK = 1 << 20


class TorchFileError(ValueError):
  """A file that is not a torch checkpoint this reader takes."""


class TorchCheckpoint(NamedTuple):
  tensors: dict[str, np.ndarray]  # dotted path in the pickle -> array
  format: str                     # 'zip' or 'legacy'
  dtypes: set[str]                # the tensors' dtypes in the file
  other: dict                     # plain values: epoch, versions, ...


# torch dtype name -> (NumPy dtype its bytes are read as, itemsize).
_READ_AS = {
    'float32': 'f4', 'float64': 'f8', 'float16': 'f2', 'bfloat16': 'u2',
    'int8': 'i1', 'int16': 'i2', 'int32': 'i4', 'int64': 'i8', 'uint8': 'u1',
    'bool': 'u1', 'complex64': 'c8', 'complex128': 'c16', 'uint16': 'u2',
    'uint32': 'u4', 'uint64': 'u8'}
_STORAGES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64',
    'HalfStorage': 'float16', 'BFloat16Storage': 'bfloat16',
    'LongStorage': 'int64', 'IntStorage': 'int32', 'ShortStorage': 'int16',
    'CharStorage': 'int8', 'ByteStorage': 'uint8', 'BoolStorage': 'bool',
    'ComplexFloatStorage': 'complex64', 'ComplexDoubleStorage': 'complex128',
    'UntypedStorage': 'uint8'}
# Dtypes that may appear as values (hyper-parameters), read or not.
_DTYPE_NAMES = (*_READ_AS, 'complex32', 'float8_e4m3fn', 'float8_e5m2',
                'float8_e4m3fnuz', 'float8_e5m2fnuz', 'qint8', 'quint8',
                'qint32', 'quint4x2')
_NUMPY_CODES = ('f2', 'f4', 'f8', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4',
                'u8', 'b1')
_ATTRIBUTE_DICTS = ('pytorch_lightning.utilities.parsing',
                    'lightning.pytorch.utilities.parsing',
                    'lightning_fabric.utilities.data',
                    'lightning.fabric.utilities.data')


def _globals() -> dict[tuple[str, str], str]:
  """(module, name) -> canonical name, for every global a checkpoint may
  name; nothing is imported."""
  rebuild = {'_rebuild_tensor': 'rebuild_v1', '_rebuild_tensor_v2':
             'rebuild_v2', '_rebuild_tensor_v3': 'rebuild_v3',
             '_rebuild_parameter': 'parameter',
             '_rebuild_parameter_with_state': 'parameter'}
  out = {('torch._utils', name): canonical
         for name, canonical in rebuild.items()}
  for module in ('torch', 'torch.cuda'):
    out.update({(module, name): f'storage:{dtype}'
                for name, dtype in _STORAGES.items()})
  # _rebuild_tensor_v3 (uint16, ...) names torch.storage.UntypedStorage.
  out[('torch.storage', 'UntypedStorage')] = 'storage:uint8'
  out.update({('torch', name): f'dtype:{name}' for name in _DTYPE_NAMES})
  out.update({(m, 'AttributeDict'): 'AttributeDict' for m in _ATTRIBUTE_DICTS})
  for builtins in ('builtins', '__builtin__'):
    out.update({(builtins, 'object'): 'object', (builtins, 'dict'): 'dict'})
  for core in ('core', '_core'):
    out[(f'numpy.{core}.multiarray', 'scalar')] = 'np_scalar'
  out.update({
      ('_codecs', 'encode'): 'encode',
      ('collections', 'OrderedDict'): 'OrderedDict',
      ('collections', 'Counter'): 'Counter', ('torch', 'Size'): 'Size',
      ('argparse', 'Namespace'): 'Namespace', ('numpy', 'dtype'): 'np_dtype',
      ('copyreg', '_reconstructor'): 'reconstructor',
      ('copy_reg', '_reconstructor'): 'reconstructor'})
  return out


_GLOBALS = _globals()


class _Storage(NamedTuple):
  """A persistent id: ``numel`` elements of ``dtype`` under ``key``; a
  legacy storage view is the elements [view_offset, +view_numel)."""
  key: str
  dtype: str
  numel: int
  view_offset: int
  view_numel: int


class _Tensor(NamedTuple):
  storage: _Storage
  dtype: str
  offset: int  # in elements of dtype, from the storage (view)'s start
  size: tuple
  stride: tuple


class _ODict(dict):
  """collections.OrderedDict; BUILD may give it attributes (a state dict's
  ``_metadata``), which are not its items and are left out."""


class _Record(dict):
  """An inert container (Namespace, AttributeDict) as its attributes."""

  def __init__(self, kind: str):
    super().__init__()
    self.kind = kind


class _NumpyDtype(NamedTuple):
  code: str


def _ints(value, what: str) -> tuple:
  if not (type(value) is tuple and len(value) <= _MAX_DIMS
          and all(type(n) is int and n >= 0 for n in value)):
    raise _Refused(f'{what} {_describe(value)}: not a tuple of at most '
                   f'{_MAX_DIMS} non-negative ints')
  return value


def _tensor(storage, offset, size, stride, dtype: str | None = None):
  """A tensor rebuild's fields, checked: the elements it reaches lie inside
  its storage (Python ints: no overflow)."""
  if not isinstance(storage, _Storage):
    raise _Refused(f'a tensor whose storage is {_describe(storage)}')
  dtype = storage.dtype if dtype is None else dtype
  if dtype not in _READ_AS:
    raise _Refused(f'a tensor of dtype {dtype}, which this reader does not '
                   f'convert (it reads {", ".join(_READ_AS)})')
  if type(offset) is not int or offset < 0:
    raise _Refused(f'a tensor storage offset {_describe(offset)}')
  size, stride = _ints(size, 'a tensor size'), _ints(stride, 'tensor strides')
  if len(size) != len(stride):
    raise _Refused(f'a tensor of size {size} with strides {stride}')
  scale = np.dtype(_READ_AS[storage.dtype]).itemsize
  capacity = storage.view_numel * scale // np.dtype(_READ_AS[dtype]).itemsize
  if 0 not in size:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= capacity:
      raise _Refused(f'a tensor (offset {offset}, size {size}, strides '
                     f'{stride}) reaching element {last} of a storage of '
                     f'{capacity}: forged or corrupt')
  return _Tensor(storage, dtype, offset, size, stride)


def _hooks_and_metadata(extra: tuple) -> None:
  """(requires_grad, backward_hooks[, metadata]) must be inert."""
  requires_grad, hooks, *metadata = extra
  if type(requires_grad) is not bool or not (
      isinstance(hooks, dict) and not hooks):
    raise _Refused(f'tensor flags {_describe(extra)}: requires_grad must be '
                   'a bool and the backward hooks empty')
  if metadata and not (isinstance(metadata[0], dict) and
                       not any(metadata[0].values())):
    raise _Refused(f'tensor metadata {_describe(metadata[0])} (conjugate or '
                   'negative bits), which this reader does not apply')


def _rebuild(name: str, args: tuple):
  """The tensor rebuild functions' argument lists, checked."""
  n = len(args)
  if name == 'rebuild_v1' and n == 4:
    return _tensor(*args)
  if name == 'rebuild_v2' and n in (6, 7):
    _hooks_and_metadata(args[4:])
    return _tensor(*args[:4])
  if name == 'rebuild_v3' and n in (7, 8):
    dtype = args[6]
    if not (isinstance(dtype, safe_pickle.Global)
            and dtype.name.startswith('dtype:')):
      raise _Refused(f'_rebuild_tensor_v3 with dtype {_describe(dtype)}')
    _hooks_and_metadata(args[4:6] + args[7:])
    return _tensor(*args[:4], dtype=dtype.name[len('dtype:'):])
  if name == 'parameter' and n in (3, 4) and isinstance(args[0], _Tensor):
    _hooks_and_metadata(args[1:3])
    return args[0]  # a Parameter's state (python attributes) is not kept
  raise _Refused(f'refused the call {name}{_describe(args)}: not the '
                 'arguments torch writes')


def _numpy_call(name: str, args: tuple):
  """numpy.dtype(code, False, True) and numpy scalar(dtype, bytes)."""
  if name == 'np_dtype' and len(args) == 3 and args[0] in _NUMPY_CODES and (
      safe_pickle.same(args[1:], (False, True))):
    return _NumpyDtype(args[0])
  if name == 'np_scalar' and len(args) == 2 and isinstance(
      args[0], _NumpyDtype) and type(args[1]) is bytes and (
      len(args[1]) == np.dtype(args[0].code).itemsize):
    return np.frombuffer(args[1], args[0].code)[0].item()
  raise _Refused(f'refused the NumPy call {name}{_describe(args)}: only '
                 'numeric scalars are read')


def _container(name: str, args: tuple):
  """OrderedDict, Counter, Size, copyreg._reconstructor, and bytes as
  Python 3 writes them at protocol 2: plain values."""
  if name == 'encode' and len(args) == 2 and type(args[0]) is str and (
      args[1] in ('latin1', 'latin-1') and type(args[1]) is str):
    return args[0].encode('latin-1')  # UnicodeEncodeError: refused
  if name in ('OrderedDict', 'Counter') and not args:
    return _ODict()
  if name in ('OrderedDict', 'Counter') and len(args) == 1 and (
      type(args[0]) in (dict, list)):
    out = _ODict()
    items = args[0].items() if type(args[0]) is dict else args[0]
    for pair in items:
      if type(pair) is not tuple or len(pair) != 2:
        raise _Refused(f'{name} of {_describe(pair)}: not (key, value)')
      out[safe_pickle.flat_key(pair[0])] = pair[1]
    return out
  if name == 'Size' and len(args) == 1:
    return _ints(args[0], 'a torch.Size of')
  if name == 'reconstructor' and len(args) == 3 and args[2] is None:
    cls, base = args[:2]
    pairs = {('Namespace', 'object'), ('AttributeDict', 'dict')}
    if (getattr(cls, 'name', None), getattr(base, 'name', None)) in pairs:
      return _Record(cls.name)
  raise _Refused(f'refused the call {name}{_describe(args)}, which a torch '
                 'checkpoint never makes')


class _Vocabulary(safe_pickle.Vocabulary):
  """What torch.save writes; ``storages`` collects the persistent ids."""

  what = 'a torch checkpoint'
  opcodes = (safe_pickle.BASIC | safe_pickle.DICTS | safe_pickle.FLOATS
             | safe_pickle.OBJECTS | safe_pickle.PERSISTENT)
  globals = _GLOBALS
  max_int_bytes = 16  # the legacy magic number is 10 bytes

  def __init__(self, legacy: bool):
    self.legacy = legacy
    self.storages: dict[str, _Storage] = {}

  def refused_global(self, module: str, name: str) -> str:
    return (f'refused to load the global {module}.{name}: a checkpoint of '
            'tensors never needs it, and loading it could run code (a whole '
            'pickled model or a custom class?)')

  def call(self, func, args):
    name = func.name if isinstance(func, safe_pickle.Global) else None
    if name in ('rebuild_v1', 'rebuild_v2', 'rebuild_v3', 'parameter'):
      return _rebuild(name, args)
    if name in ('np_dtype', 'np_scalar'):
      return _numpy_call(name, args)
    if name is not None:
      return _container(name, args)
    raise _Refused(f'a call of {_describe(func)}')

  def new_object(self, cls, args):
    name = getattr(cls, 'name', None)
    if args == () and name in ('Namespace', 'AttributeDict'):
      return _Record(name)
    if args == () and name == 'OrderedDict':
      return _ODict()
    raise _Refused(f'refused to create a {_describe(cls)} object: only '
                   'Namespace, AttributeDict and OrderedDict')

  def build(self, obj, state):
    if isinstance(obj, _NumpyDtype) and state in (
        (3, c, None, None, None, -1, -1, 0) for c in '<|'):
      return
    if isinstance(obj, (_ODict, _Record)) and (
        state is None or type(state) is dict):
      if isinstance(obj, _Record):
        for key, value in (state or {}).items():
          obj[safe_pickle.flat_key(key)] = value
      return
    raise _Refused(f'refused the state {_describe(state)} for a '
                   f'{type(obj).__name__.strip("_")}')

  def persistent(self, pid):
    return _storage(self.storages, pid, self.legacy)


def _storage(storages: dict, pid, legacy: bool) -> _Storage:
  """A persistent id ('storage', type, key, location, numel[, view]),
  checked, and consistent with earlier ids of the same key."""
  if not (type(pid) is tuple and len(pid) == 5 + legacy
          and pid[0] == 'storage'):
    raise _Refused(f'a persistent id {_describe(pid)}: not (\'storage\', '
                   f'type, key, location, numel{", view" * legacy})')
  kind, key, location, numel = pid[1:5]
  if not (isinstance(kind, safe_pickle.Global)
          and kind.name.startswith('storage:')):
    raise _Refused(f'a storage of type {_describe(kind)}')
  if not (type(key) is str and 0 < len(key) <= 64 and type(location) is str
          and type(numel) is int and numel >= 0):
    raise _Refused(f'a persistent id {_describe(pid)} with a malformed key, '
                   'location or element count')
  root = _Storage(key, kind.name[len('storage:'):], numel, 0, numel)
  if storages.setdefault(key, root) != root:
    raise _Refused(f'storage {key!r} given as {root.dtype} x {numel} after '
                   f'{storages[key].dtype} x {storages[key].numel}')
  view = pid[5] if legacy else None
  if view is None:
    return root
  if not (type(view) is tuple and len(view) == 3 and type(view[1]) is int
          and type(view[2]) is int and 0 <= view[1]
          and 0 <= view[2] <= numel - view[1]):
    raise _Refused(f'a storage view {_describe(view)} outside storage {key!r} '
                   f'of {numel} elements')
  return root._replace(view_offset=view[1], view_numel=view[2])


# --- the pickle's values as dotted names ---

def _children(value):
  """A container's (key, value) pairs; None for anything else (the
  placeholders are NamedTuples, and leaves)."""
  if isinstance(value, dict):
    return value.items()
  if type(value) in (list, tuple):
    return enumerate(value)
  return None


def _flatten(root, budget: int) -> tuple[dict, dict]:
  """({dotted name: _Tensor}, {dotted name: plain value}) of the pickle's
  value; depth and the number of values visited bounded (shared lists
  nested in each other would otherwise be walked exponentially often)."""
  if not isinstance(root, dict):
    raise _Refused(f'the checkpoint holds {_describe(root)}, not a dict of '
                   'tensors')
  tensors, other, todo, seen = {}, {}, [('', root, 0)], 0
  while todo:
    name, value, depth = todo.pop()
    seen += 1
    if depth > _MAX_DEPTH or seen > budget:
      raise _Refused(f'values nested deeper than {_MAX_DEPTH} or more than '
                     f'{budget} of them (at {name[:80]!r}): not a checkpoint')
    children = _children(value)
    if children is not None:
      todo += [(f'{name}.{k}' if name else str(k), v, depth + 1)
               for k, v in reversed(list(children))]
      continue
    if isinstance(value, _Storage):  # a storage saved on its own
      value = _tensor(value, 0, (value.view_numel,), (1,))
    if isinstance(value, safe_pickle.Global):
      value = f'torch.{value.name.split(":")[-1]}'
    if isinstance(value, _NumpyDtype):
      value = f'numpy.{np.dtype(value.code).name}'
    if name in tensors or name in other:
      raise _Refused(f'two values under the one name {name[:80]!r}')
    if isinstance(value, _Tensor):
      tensors[name] = value
    elif value is None or type(value) in (bool, int, float, str, bytes):
      other[name] = value
    else:
      raise _Refused(f'{name[:80]!r} is {_describe(value)}')
  return tensors, other


# --- storages to arrays ---

def _array(t: _Tensor, raw, byteorder: str) -> np.ndarray:
  """The tensor as a contiguous copy of its elements of ``raw``, the bytes
  of its whole storage; _tensor checked that they lie inside (and NumPy's
  own check of a strided view of a buffer stands behind it)."""
  read = np.dtype(_READ_AS[t.dtype]).newbyteorder(
      '>' if byteorder == 'big' else '<')
  if 0 in t.size:
    out = np.zeros(t.size, read.newbyteorder('='))
  else:
    first = (t.storage.view_offset * np.dtype(
        _READ_AS[t.storage.dtype]).itemsize + t.offset * read.itemsize)
    view = np.ndarray(t.size, read, buffer=raw, offset=first,
                      strides=tuple(s * read.itemsize for s in t.stride))
    out = np.array(view, dtype=read.newbyteorder('='), order='C')
  if t.dtype == 'bfloat16':
    return (out.astype(np.uint32) << 16).view(np.float32)
  if t.dtype == 'bool':
    return out != 0
  return out


def _out_bytes(t: _Tensor) -> int:
  """Bytes of the array a tensor becomes (bfloat16 comes out float32)."""
  itemsize = np.dtype(_READ_AS[t.dtype]).itemsize
  return math.prod(t.size) * itemsize * (2 if t.dtype == 'bfloat16' else 1)


def _arrays(tensors: dict, raws: dict, byteorder: str, budget: int) -> dict:
  """name -> array, the total output bounded by ``budget`` bytes (a tensor
  may view a storage another already viewed, or broadcast it)."""
  total = sum(_out_bytes(t) for t in tensors.values())
  if total > budget:
    raise _Refused(f'its tensors would take {total} bytes from a file of '
                   f'{budget - _OUTPUT_SLACK >> 2} bytes (views of one '
                   'storage repeated or broadcast): forged')
  return {name: _array(t, raws[t.storage.key], byteorder)
          for name, t in tensors.items()}


def _storage_bytes(storage: _Storage) -> int:
  return storage.numel * np.dtype(_READ_AS[storage.dtype]).itemsize


@contextlib.contextmanager
def _naming(path: str, where: str):
  """Refusals inside become a TorchFileError naming the file and part."""
  try:
    yield
  except _Refused as e:
    raise TorchFileError(f'{path}: {where}: {e}; {ACCEPTS}') from None


def _dtypes(tensors: dict) -> set[str]:
  return {t.dtype for t in tensors.values()}


# --- the zip layout (torch >= 1.6) ---

def _zip_names(path: str, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
  names = {}
  for info in zf.infolist():
    if info.filename in names:
      raise TorchFileError(f'{path}: the archive holds two entries named '
                           f'{info.filename[:100]!r}: ambiguous; {ACCEPTS}')
    names[info.filename] = info
  return names


def _zip_root(path: str, names: dict) -> str:
  """'<root>/' of the single '<root>/data.pkl' (torch names the root after
  the file, or 'archive'); a TorchScript archive is named as such."""
  pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(pickles) != 1:
    raise TorchFileError(f'{path}: a zip archive with {len(pickles)} '
                         '<root>/data.pkl entries where torch.save writes one '
                         f'({", ".join(list(names)[:5])[:200]}); {ACCEPTS}')
  root = pickles[0][:-len('data.pkl')]
  if f'{root}constants.pkl' in names or any(
      n.startswith(f'{root}code/') for n in names):
    raise TorchFileError(f'{path}: a TorchScript archive (torch.jit.save): '
                         'its data.pkl pickles compiled modules; load it with '
                         'torch.jit.load and torch.save(model.state_dict(), '
                         f'path) instead; {ACCEPTS}')
  return root


def _entry_start(data, info: zipfile.ZipInfo) -> int:
  """Where an entry's bytes begin: after its local header, checked."""
  at = info.header_offset
  if not 0 <= at <= len(data) - 30 or data[at:at + 4] != b'PK\x03\x04':
    raise _Refused(f'no local header at byte {at} (truncated or corrupt)')
  n = int.from_bytes(data[at + 26:at + 28], 'little')
  extra = int.from_bytes(data[at + 28:at + 30], 'little')
  encoding = 'utf-8' if info.flag_bits & 0x800 else 'cp437'
  try:
    local = bytes(data[at + 30:at + 30 + n]).decode(encoding)
  except UnicodeDecodeError:
    local = None
  if local != info.orig_filename:
    raise _Refused(f'the local header at byte {at} names {local!r:.100}, the '
                   'central directory another entry')
  return at + 30 + n + extra


def _entry(data, zf: zipfile.ZipFile, info: zipfile.ZipInfo):
  """An entry's bytes: a view of the file when STORED (as torch writes),
  else decompressed within a bounded ratio (a zip bomb is refused)."""
  start = _entry_start(data, info)
  size, packed = info.file_size, info.compress_size
  if start + packed > len(data):
    raise _Refused(f'{packed} bytes declared from byte {start}, past the end '
                   f'of the file ({len(data)} bytes): truncated')
  if info.compress_type == zipfile.ZIP_STORED:
    if packed != size:
      raise _Refused(f'a stored entry of {packed} bytes that declares {size} '
                     'uncompressed')
    view = memoryview(data)[start:start + size]
  else:
    if size > _MAX_RATIO * packed + 4096:
      raise _Refused(f'a compressed entry of {packed} bytes that declares '
                     f'{size} bytes: more than {_MAX_RATIO} times (a zip bomb, '
                     'or not weights)')
    try:
      with zf.open(info) as f:
        view = f.read(size + 1)
    except Exception as e:  # noqa: BLE001 (zipfile's errors vary)
      raise _Refused(f'does not decompress: {type(e).__name__}: {e}') from None
    if len(view) != size:
      raise _Refused(f'decompresses to {len(view)} bytes, not {size}')
  if zlib.crc32(view) != info.CRC:
    raise _Refused(f'its bytes from byte {start} fail the CRC: corrupt')
  return view


def _zip_part(path, data, zf, names, name: str):
  if name not in names:
    raise TorchFileError(f'{path}: the archive has no entry {name!r}; '
                         f'{ACCEPTS}')
  with _naming(path, f'entry {name} (at byte {names[name].header_offset})'):
    return _entry(data, zf, names[name])


def _byteorder(path, data, zf, names, root: str) -> str:
  if f'{root}byteorder' not in names:
    return 'little'  # before torch 1.10, which wrote none
  order = bytes(_zip_part(path, data, zf, names, f'{root}byteorder'))
  if order not in (b'little', b'big'):
    raise TorchFileError(f'{path}: entry {root}byteorder holds {order[:20]!r},'
                         f' not little or big; {ACCEPTS}')
  return order.decode()


def _read_zip(path: str, data, file) -> TorchCheckpoint:
  try:
    zf = zipfile.ZipFile(file)
  except Exception as e:  # noqa: BLE001 (zipfile's errors vary)
    raise TorchFileError(f'{path}: not a readable zip archive '
                         f'({type(e).__name__}: {str(e)[:200]}): truncated '
                         'or corrupt; '
                         f'{ACCEPTS}') from None
  with zf:
    names = _zip_names(path, zf)
    root = _zip_root(path, names)
    byteorder = _byteorder(path, data, zf, names, root)
    pkl = bytes(_zip_part(path, data, zf, names, f'{root}data.pkl'))
    vocab = _Vocabulary(legacy=False)
    with _naming(path, f'{root}data.pkl'):
      tensors, other = _flatten(safe_pickle.Reader(pkl, vocab).load(),
                                2 * len(pkl) + 1024)
    raws = {}
    for key, storage in vocab.storages.items():
      name = f'{root}data/{key}'
      raws[key] = _zip_part(path, data, zf, names, name)
      if len(raws[key]) != _storage_bytes(storage):
        raise TorchFileError(
            f'{path}: entry {name} (at byte {names[name].header_offset}) '
            f'holds {len(raws[key])} bytes where its storage declares '
            f'{storage.numel} x {storage.dtype} = {_storage_bytes(storage)}'
            f' (forged or corrupt); {ACCEPTS}')
    with _naming(path, 'its tensors'):
      arrays = _arrays(tensors, raws, byteorder, 4 * len(data) + _OUTPUT_SLACK)
  return TorchCheckpoint(arrays, 'zip', _dtypes(tensors), other)


# --- the legacy layout (torch < 1.6, or _use_new_zipfile_serialization=False)

_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _Plain(safe_pickle.Vocabulary):
  """The legacy stream's small pickles: plain values only."""

  what = 'the header of a legacy torch checkpoint'
  opcodes = safe_pickle.BASIC | safe_pickle.DICTS | safe_pickle.FLOATS
  max_int_bytes = 16


def _legacy_header(data) -> int:
  """Checks the magic number, protocol and system info pickles (each
  before reading on); returns where the main pickle starts."""
  checks = [
      (lambda v: v == _MAGIC and type(v) is int, "not torch's magic number: "
       'a pickle, but not a torch checkpoint'),
      (lambda v: v == _LEGACY_PROTOCOL and type(v) is int,
       f'not legacy protocol version {_LEGACY_PROTOCOL}'),
      (lambda v: type(v) is dict and v.get('little_endian') is True,
       "not a little-endian machine's system info")]
  pos = 0
  for ok, why in checks:
    reader = safe_pickle.Reader(data, _Plain(), pos)
    value = reader.load()
    if not ok(value):
      raise _Refused(f'the pickle at byte {pos} holds {_describe(value)}, '
                     f'{why}')
    pos = reader.pos
  return pos


def _legacy_storages(data, pos: int, keys, storages: dict) -> dict:
  """key -> view of its bytes; each is an int64 element count (checked
  against the persistent id) and the elements, in the keys' order."""
  if not (type(keys) is list and all(type(k) is str for k in keys)
          and len(set(keys)) == len(keys) and set(keys) == set(storages)):
    # (compared as sets of strings: a forged list may mix types, which
    # sorting would not survive)
    raise _Refused(f'storage keys {_describe(keys)} where the pickle used '
                   f'{_describe(list(storages))}')
  raws = {}
  for key in keys:
    storage = storages[key]
    count = int.from_bytes(data[pos:pos + 8], 'little', signed=True)
    need = _storage_bytes(storage)
    if pos + 8 > len(data) or count != storage.numel:
      raise _Refused(f'storage {key!r} at byte {pos} declares '
                     f'{count if pos + 8 <= len(data) else "no"} elements, '
                     f'its persistent id {storage.numel}: truncated or forged')
    if need > len(data) - pos - 8:
      raise _Refused(f'storage {key!r} needs {need} bytes from byte {pos + 8}'
                     f'; the file ends at byte {len(data)}: truncated')
    raws[key] = memoryview(data)[pos + 8:pos + 8 + need]
    pos += 8 + need
  if pos != len(data):
    raise _Refused(f'{len(data) - pos} bytes after the last storage, from '
                   f'byte {pos}')
  return raws


def _read_legacy(path: str, data) -> TorchCheckpoint:
  vocab = _Vocabulary(legacy=True)
  with _naming(path, 'legacy format'):
    reader = safe_pickle.Reader(data, vocab, _legacy_header(data))
    value = reader.load()
    keys_reader = safe_pickle.Reader(data, _Plain(), reader.pos)
    keys = keys_reader.load()
    raws = _legacy_storages(data, keys_reader.pos, keys, vocab.storages)
    tensors, other = _flatten(value, 2 * reader.pos + 1024)
    arrays = _arrays(tensors, raws, 'little', 4 * len(data) + _OUTPUT_SLACK)
  return TorchCheckpoint(arrays, 'legacy', _dtypes(tensors), other)


def _read(path: str, data, file) -> TorchCheckpoint:
  if data[:2] == b'PK':
    return _read_zip(path, data, file)
  if data[:1] == b'\x80':
    return _read_legacy(path, data)
  if data[257:262] == b'ustar':
    raise TorchFileError(f'{path}: a tar archive: the checkpoint format of '
                         'PyTorch before 0.4, which this reader does not '
                         f'take; {ACCEPTS}')
  raise TorchFileError(f'{path}: begins with {bytes(data[:8])!r}, neither a '
                       f'zip archive nor a pickle; {ACCEPTS}')


def read_state_dict(path: str | os.PathLike) -> TorchCheckpoint:
  """Every tensor of a torch checkpoint by its dotted path in the pickled
  object (``state_dict.conv1.weight``, or ``conv1.weight`` for a bare
  state dict), with the plain values beside them; nothing in the file is
  run. TorchFileError (a ValueError) names the file, the byte offset and
  what was refused."""
  path = os.fspath(path)
  with open(path, 'rb') as f:
    if os.fstat(f.fileno()).st_size == 0:
      raise TorchFileError(f'{path}: an empty file; {ACCEPTS}')
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
      return _read(path, data, f)
    finally:
      with contextlib.suppress(BufferError):  # views of it may outlive us
        data.close()
