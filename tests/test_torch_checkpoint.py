"""The torch checkpoint reader (npcface_jax.foreign.torch_checkpoint): every
layout our writer (tests/torch_files.py, torch's format without torch)
makes loads to the arrays written; hostile files (code-running globals,
forged sizes, strides outside the storage, truncation, a zip bomb) are
refused naming the file and the offset, in a subprocess so that a crash
fails the test; mutations of real layouts are fuzzed (slow). With torch
importable, a cross-check shows the reader equal to torch.load on files
torch.save wrote, and torch.load equal to our writer's intent."""

import io
import pathlib
import re
import pickletools
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from npcface_jax.foreign import torch_checkpoint
from tests import fuzzing
from tests import torch_files as tf
from tests.torch_files import Call, Global, Tensor

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = 'tests.test_torch_checkpoint'


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
  """A small state dict: float32, float16, int64, a 2-D weight to store
  transposed, one to store as bfloat16 (bfloat16-exact values), two to
  share a storage."""
  rng = np.random.default_rng(seed)
  exact = (rng.standard_normal((3, 4)).astype(np.float32).view(np.uint32)
           & 0xffff0000).view(np.float32)
  return {
      'conv1.weight': rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
      'bn1.bias': rng.standard_normal(4).astype(np.float16),
      'bn1.num_batches_tracked': np.array(11, np.int64),
      'fc.weight': rng.standard_normal((5, 6)).astype(np.float32),
      'features.weight': exact,
      'prelu.weight': rng.standard_normal(6).astype(np.float32),
      'prelu.bias': rng.standard_normal((2, 3)).astype(np.float32)}


_OPTIONS = dict(transposed=('fc.weight',), bfloat16=('features.weight',),
                shared=('prelu.weight', 'prelu.bias'))


def _check(got: torch_checkpoint.TorchCheckpoint, p: tf.Plan, fmt: str):
  assert got.format == fmt
  assert sorted(got.tensors) == sorted(p.expected)
  for name, want in p.expected.items():
    have = got.tensors[name]
    assert have.dtype == want.dtype and have.shape == want.shape, name
    assert have.flags.c_contiguous and have.flags.writeable, name
    np.testing.assert_array_equal(have, want, err_msg=name)
  assert got.other == p.other


# --- What torch.save writes loads -------------------------------------------

@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
@pytest.mark.parametrize('wrapper', [None, 'facex', 'lightning'])
def test_every_layout_round_trips(tmp_path, fmt, wrapper):
  arrays = _arrays()
  if wrapper == 'lightning':  # AdaFace's keys
    arrays = {f'model.{k}': v for k, v in arrays.items()}
  options = {k: tuple(f'model.{n}' if wrapper == 'lightning' else n
                      for n in names) for k, names in _OPTIONS.items()}
  data, p = tf.checkpoint(arrays, fmt=fmt, wrapper=wrapper, **options)
  path = tmp_path / 'model.pth'
  path.write_bytes(data)
  got = torch_checkpoint.read_state_dict(path)
  _check(got, p, fmt)
  assert got.dtypes == {'float32', 'float16', 'int64', 'bfloat16'}
  prefix = '' if wrapper is None else 'state_dict.'
  assert got.tensors[f'{prefix}{"model." * (wrapper == "lightning")}'
                     'features.weight'].dtype == np.float32  # from bfloat16


@pytest.mark.parametrize('root', ['archive', 'backbone', 'model_best'])
def test_the_zip_root_varies_and_byteorder_may_be_absent(tmp_path, root):
  p = tf.plan(_arrays(1))
  path = tmp_path / f'{root}.pt'
  path.write_bytes(tf.zip_bytes(p, root=root, byteorder=root != 'archive'))
  _check(torch_checkpoint.read_state_dict(path), p, 'zip')


def test_big_endian_storages_are_swapped(tmp_path):
  arrays = {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
            'n': np.array([1, -2], np.int64)}
  p = tf.plan(arrays)
  p = p._replace(storages={k: np.frombuffer(raw, tf_dtype).byteswap().tobytes()
                           for (k, raw), tf_dtype in zip(
                               p.storages.items(), ('<f4', '<i8'))})
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('archive/data.pkl', tf.Emitter().dumps(p.obj))
    z.writestr('archive/byteorder', 'big')
    for key, raw in p.storages.items():
      z.writestr(f'archive/data/{key}', raw)
  (tmp_path / 'big.pth').write_bytes(buf.getvalue())
  got = torch_checkpoint.read_state_dict(tmp_path / 'big.pth')
  np.testing.assert_array_equal(got.tensors['w'], arrays['w'])
  np.testing.assert_array_equal(got.tensors['n'], arrays['n'])


def test_inert_values_are_kept_as_plain_values(tmp_path):
  """torch.Size, a torch dtype, NumPy scalars, copyreg's reconstructor of a
  Namespace (protocols 0-1): plain values in ``other``."""
  def np_scalar(code, value):
    dtype = Call(Global('numpy', 'dtype'), (code, False, True),
                 (3, '<', None, None, None, -1, -1, 0))
    return Call(Global('numpy.core.multiarray', 'scalar'),
                (dtype, np.array(value, code).tobytes()))
  obj = {'size': Call(Global('torch', 'Size'), ((2, 3),)),
         'dtype': Global('torch', 'float16'),
         'best': np_scalar('f8', 0.25), 'step': np_scalar('i8', -3),
         'args': Call(Global('copyreg', '_reconstructor'),
                      (Global('argparse', 'Namespace'),
                       Global('builtins', 'object'), None), {'lr': 0.5})}
  path = tmp_path / 'values.pth'
  path.write_bytes(tf.zip_bytes(tf.Plan(obj, {}, {}, {}, {}, {})))
  got = torch_checkpoint.read_state_dict(path)
  assert got.tensors == {} and got.dtypes == set()
  assert got.other == {'size.0': 2, 'size.1': 3, 'dtype': 'torch.float16',
                       'best': 0.25, 'step': -3, 'args.lr': 0.5}


# --- What torch.save never writes is refused, without running or crashing --

def _read_in_child(paths, mem_mb=1024, timeout=120):
  """read_state_dict of each path in one child process with an address
  space limit: (exit status, its output), a line 'NAME loaded N' or
  'NAME refused: ...' per file."""
  code = textwrap.dedent(f'''
      import os, resource, sys
      sys.path.insert(0, {str(ROOT)!r})
      resource.setrlimit(resource.RLIMIT_AS, ({mem_mb} * 2**20,) * 2)
      from npcface_jax.foreign import torch_checkpoint
      for path in {[str(p) for p in paths]!r}:
        try:
          got = torch_checkpoint.read_state_dict(path)
          result = f'loaded {{len(got.tensors)}}'
        except torch_checkpoint.TorchFileError as e:
          result = 'refused: ' + str(e).replace(chr(10), ' ')
        print(os.path.basename(path), result, flush=True)
  ''')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def _zip(entries: dict[str, bytes], deflate=()) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    for name, raw in entries.items():
      z.writestr(name, raw, zipfile.ZIP_DEFLATED if name in deflate else
                 zipfile.ZIP_STORED)
  return buf.getvalue()


def _one_tensor(t: Tensor, raw: bytes) -> bytes:
  """A zip checkpoint of {'w': t} over storage '0' holding raw."""
  state = tf.ordered_dict({'w': t})
  return _zip({'archive/data.pkl': tf.Emitter().dumps(state),
               'archive/data/0': raw})


def _hostile_files(marker: pathlib.Path) -> dict[str, tuple[bytes, str]]:
  """name -> (file bytes, a pattern the refusal must hold)."""
  touch = f'touch {marker}'
  run = {'os_system': Call(Global('os', 'system'), (touch,)),
         'posix_system': Call(Global('posix', 'system'), (touch,)),
         'eval': Call(Global('builtins', 'eval'),
                      (f'open({str(marker)!r}, "w")',)),
         'model': tf.NewObj(Global('backbones.iresnet', 'IResNet'), {})}
  out = {}
  for name, evil in run.items():
    p = tf.plan({'w': np.ones(2, np.float32)})
    p = p._replace(obj={'state_dict': p.obj, 'x': evil})
    out[f'{name}_zip'] = (tf.zip_bytes(p), 'at byte')
    out[f'{name}_legacy'] = (tf.legacy_bytes(p), 'at byte')
  f4 = np.arange(4, dtype=np.float32).tobytes()
  out['forged_numel'] = (_one_tensor(Tensor('0', 'float32', 10**12, 0,
                                            (10**12,), (1,)), f4),
                         r'entry archive/data/0 \(at byte \d+\) holds 16 '
                         'bytes where its storage declares')
  out['past_storage'] = (_one_tensor(Tensor('0', 'float32', 4, 2, (2, 2),
                                            (1, 1)), f4),
                         'at byte .*reaching element 4 of a storage of 4')
  out['negative_stride'] = (_one_tensor(Tensor('0', 'float32', 4, 3, (4,),
                                               (-1,)), f4),
                            'at byte .*non-negative')
  out['huge_size'] = (_one_tensor(Tensor('0', 'float32', 4, 0,
                                         (2**40, 2**40), (0, 0)), f4),
                      'would take')
  good, _ = tf.checkpoint(_arrays(2))
  out['truncated_zip'] = (good[:len(good) // 2], 'not a readable zip')
  state = tf.ordered_dict({'w': Tensor('0', 'float32', 5 * 2**20, 0,
                                       (5 * 2**20,), (1,))})
  out['zip_bomb'] = (_zip({'archive/data.pkl': tf.Emitter().dumps(state),
                           'archive/data/0': bytes(20 * 2**20)},
                          deflate=('archive/data/0',)), 'zip bomb')
  legacy, _ = tf.checkpoint(_arrays(3), fmt='legacy')
  out['legacy_cut_storage'] = (legacy[:-7], 'at byte .*truncated')
  out['legacy_cut_pickle'] = (legacy[:300], 'at byte .*truncated')
  # Storage keys of mixed types (found by the fuzzer: sorting them raised).
  p = tf.plan(_arrays(2))
  info = {'protocol_version': 1001, 'little_endian': True,
          'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
  out['legacy_mixed_keys'] = (
      b''.join(tf.Emitter().dumps(v) for v in (tf.MAGIC, 1001, info))
      + tf.Emitter(legacy=True).dumps(p.obj) + tf.Emitter().dumps([0, 'x']),
      'storage keys')
  out['torchscript'] = (_zip({'archive/data.pkl': b'\x80\x02.',
                              'archive/constants.pkl': b'\x80\x02).'}),
                        'TorchScript')
  deep = b'\x80\x02}(X\x01\x00\x00\x00a' + b']' * 10**5 + b'a' * (10**5 - 1)
  out['deep'] = (_zip({'archive/data.pkl': deep + b'u.'}), 'nested deeper')
  # One list referenced twice per level, 60 levels: 2^60 paths to walk.
  shared = (b'\x80\x02}(X\x01\x00\x00\x00a]q\x000'
            + b'(h\x00h\x00lq\x000' * 60 + b'h\x00u.')
  out['shared'] = (_zip({'archive/data.pkl': shared}), 'or more than')
  out['tuple_key'] = (_zip({'archive/data.pkl': b'\x80\x02}()K\x01u.'}),
                      r'at byte 7 \(SETITEMS\): a dict key of type tuple')
  return out


def test_hostile_files_are_refused_naming_file_and_offset(tmp_path):
  marker = tmp_path / 'ran'
  files = _hostile_files(marker)
  paths = []
  for name, (data, _) in files.items():
    paths.append(tmp_path / f'{name}.pth')
    paths[-1].write_bytes(data)
  status, out = _read_in_child(paths)
  assert status == 0, f'the reader died (status {status}): {out}'
  lines = dict(line.split(' ', 1) for line in out.splitlines())
  assert sorted(lines) == sorted(f'{n}.pth' for n in files), out
  for name, (_, pattern) in files.items():
    line = lines[f'{name}.pth']
    assert line.startswith(f'refused: {tmp_path / name}.pth: '), line
    assert re.search(pattern, line), (name, line)
    assert 'the reader accepts' in line, line
  for name, module in [('os_system', 'os.system'), ('eval', 'builtins.eval'),
                       ('posix_system', 'posix.system'),
                       ('model', 'backbones.iresnet.IResNet')]:
    for fmt in ('zip', 'legacy'):
      assert f'refused to load the global {module}' in lines[
          f'{name}_{fmt}.pth'], lines[f'{name}_{fmt}.pth']
  assert not marker.exists()


def test_offsets_in_messages_are_where_the_opcode_is(tmp_path):
  p = tf.plan({'w': np.ones(2, np.float32)})
  p = p._replace(obj={'a': 1, 'x': Call(Global('os', 'system'), ('true',))})
  pkl = tf.Emitter().dumps(p.obj)
  at = pkl.index(b'cos\nsystem')
  (tmp_path / 'a.pth').write_bytes(tf.zip_bytes(p))
  with pytest.raises(torch_checkpoint.TorchFileError,
                     match=rf'a\.pth: archive/data\.pkl: at byte {at} '
                           r'\(GLOBAL\): refused to load the global '
                           'os.system'):
    torch_checkpoint.read_state_dict(tmp_path / 'a.pth')
  legacy = tf.legacy_bytes(p)
  (tmp_path / 'b.pth').write_bytes(legacy)
  with pytest.raises(torch_checkpoint.TorchFileError,
                     match=rf'b\.pth: legacy format: at byte '
                           rf'{legacy.index(b"cos")} \(GLOBAL\)'):
    torch_checkpoint.read_state_dict(tmp_path / 'b.pth')


def test_not_a_checkpoint_is_named(tmp_path):
  for name, data, pattern in [
      ('empty', b'', 'an empty file'),
      ('text', b'hello world', 'neither a zip archive nor a pickle'),
      ('pickle', b'\x80\x02K\x05.', "not torch's magic number"),
      ('list', tf.zip_bytes(tf.Plan([1], {}, {}, {}, {}, {})),
       'not a dict of tensors')]:
    path = tmp_path / f'{name}.pth'
    path.write_bytes(data)
    with pytest.raises(torch_checkpoint.TorchFileError,
                       match=rf'{name}\.pth: .*{pattern}'):
      torch_checkpoint.read_state_dict(path)


# --- torch itself, where it is installed ------------------------------------

_TORCH_CHECK = textwrap.dedent('''
    import argparse, collections, sys, types
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    from npcface_jax.foreign import torch_checkpoint
    from tests import torch_files as tf
    from tests.test_torch_checkpoint import _arrays, _OPTIONS
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.PReLU(8), torch.nn.Flatten(),
                              torch.nn.Linear(8, 4))
    net(torch.randn(2, 3, 3, 3))  # running statistics move
    lightning = lambda sd: {'epoch': 3, 'global_step': 99,
        'pytorch-lightning_version': '1.8.6', 'state_dict': sd,
        'hyper_parameters': argparse.Namespace(lr=0.1, arch='ir_50'),
        'optimizer_states': [torch.optim.SGD(net.parameters(), 0.1,
                                             momentum=0.9).state_dict()],
        'lr_schedulers': [{'milestones': collections.Counter({8: 1})}]}
    base = torch.arange(12, dtype=torch.float32)
    views = {'param': torch.nn.Parameter(torch.randn(3, 4)),
             'transposed': torch.randn(4, 5).t(), 'head': base[2:5],
             'tail': base[5:].view(7, 1), 'uint16': torch.arange(4).to(
                 torch.uint16)}
    for zip_format in (True, False):
      for name, obj in [('plain', net.state_dict()),
                        ('half', net.half().state_dict()),
                        ('bf16', net.bfloat16().state_dict()),
                        ('lightning', lightning(net.float().state_dict())),
                        ('views', views)]:
        path = f'{DIR}/{name}_{zip_format}.pth'
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
        got = torch_checkpoint.read_state_dict(path)
        sd = obj['state_dict'] if name == 'lightning' else obj
        prefix = 'state_dict.' * (name == 'lightning')
        assert sorted(got.tensors) == sorted(prefix + k for k in sd), got
        for k, v in sd.items():
          v = v.detach()
          want = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          have = got.tensors[prefix + k]
          assert have.dtype == want.dtype and np.array_equal(have, want), k
        assert got.format == ('zip' if zip_format else 'legacy')
        print('reader ok', name, zip_format, sorted(got.dtypes))
    # Our writer's files, read by torch, hold what we wrote.
    mods = ['pytorch_lightning', 'pytorch_lightning.utilities',
            'pytorch_lightning.utilities.parsing']
    for m in mods:
      sys.modules.setdefault(m, types.ModuleType(m))
    class AttributeDict(dict):
      pass
    AttributeDict.__module__ = mods[-1]
    sys.modules[mods[-1]].AttributeDict = AttributeDict
    for fmt in ('zip', 'legacy'):
      for wrapper in (None, 'facex', 'lightning'):
        data, p = tf.checkpoint(_arrays(), fmt=fmt, wrapper=wrapper,
                                **_OPTIONS)
        path = f'{DIR}/ours_{fmt}_{wrapper}.pth'
        open(path, 'wb').write(data)
        obj = torch.load(path, weights_only=wrapper != 'lightning')
        sd = obj if wrapper is None else obj['state_dict']
        prefix = '' if wrapper is None else 'state_dict.'
        for k, v in sd.items():
          have = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          assert np.array_equal(have, p.expected[prefix + k]), k
        assert len(sd) == len(_arrays())
        if wrapper == 'lightning':
          assert obj['hyper_parameters']['arch'] == 'ir_101'
          assert obj['namespace'].batch_size == 512
        print('torch ok', fmt, wrapper)
''')


def test_torch_agrees(tmp_path):
  """torch.save of real modules' state dicts (zip and legacy, float16,
  bfloat16, a Lightning-like dict) read equal to torch's tensors; torch.load
  of our writer's files equal to the arrays written. Runs in a child
  process, only where torch imports (it is no dependency of this
  project)."""
  probe = subprocess.run([sys.executable, '-c', 'import torch'],
                         capture_output=True, check=False, timeout=120)
  if probe.returncode:
    pytest.skip('torch is not importable (not a dependency): the cross-check '
                'against torch.save / torch.load needs it on PYTHONPATH')
  code = f'ROOT, DIR = {str(ROOT)!r}, {str(tmp_path)!r}\n' + _TORCH_CHECK
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.count('reader ok') == 10, proc.stdout
  assert proc.stdout.count('torch ok') == 6, proc.stdout


# --- Fuzzing ---------------------------------------------------------------

def _read(path):
  """The reader, then every array touched."""
  got = torch_checkpoint.read_state_dict(path)
  return sum(float(np.asarray(a, np.float64).sum()) for a in
             got.tensors.values())


def _pickle_fields(data: bytes, base: int) -> list[tuple[int, int]]:
  """(offset, width) of the length prefixes of the pickles (one or several
  in a row) in ``data``, from ``base``."""
  widths = {-2: 1, -3: 4, -4: 4, -5: 8}
  out, stream = [], io.BytesIO(data)
  while stream.tell() < len(data):
    try:
      for op, _, pos in pickletools.genops(stream):
        if op.arg is not None and op.arg.n in widths:
          out.append((base + pos + 1, widths[op.arg.n]))
    except ValueError:
      break
  return out


def _zip_fields(data: bytes) -> list[tuple[int, int]]:
  """Sizes and offsets of the zip's headers, and data.pkl's lengths."""
  out = []
  at = data.find(b'PK\x01\x02')
  while at >= 0:
    out += [(at + 20, 4), (at + 24, 4), (at + 42, 4), (at + 28, 2)]
    at = data.find(b'PK\x01\x02', at + 1)
  at = data.find(b'PK\x03\x04')
  while at >= 0:
    out += [(at + 18, 4), (at + 22, 4), (at + 26, 2), (at + 28, 2)]
    at = data.find(b'PK\x03\x04', at + 1)
  info = zipfile.ZipFile(io.BytesIO(data)).getinfo('archive/data.pkl')
  start = info.header_offset + 30 + struct.unpack(
      '<HH', data[info.header_offset + 26:info.header_offset + 30])[0] + sum(
      struct.unpack('<HH', data[info.header_offset + 26:
                                info.header_offset + 30])[1:])
  return out + _pickle_fields(data[start:start + info.file_size], start)


def _legacy_fields(data: bytes, p: tf.Plan) -> list[tuple[int, int]]:
  """The pickles' length prefixes and the storages' element counts."""
  tail = sum(8 + len(raw) for raw in p.storages.values())
  out, pos = _pickle_fields(data[:len(data) - tail], 0), len(data) - tail
  for key in sorted(p.storages):
    out.append((pos, 8))
    pos += 8 + len(p.storages[key])
  return out


def fuzz_cases() -> list[dict]:
  """A Lightning-style zip checkpoint and a FaceX-style legacy one, with
  every writer option (float16, bfloat16, strides, a shared storage)."""
  zipped, _ = tf.checkpoint(_arrays(4), wrapper='lightning', **_OPTIONS)
  legacy, p = tf.checkpoint(_arrays(5), fmt='legacy', wrapper='facex',
                            **_OPTIONS)
  opcodes = [op.code.encode('latin-1') for op in pickletools.opcodes]
  tokens = opcodes + [b'cos\nsystem\n', b'ctorch\nFloatStorage\n',
                      b'ctorch._utils\n_rebuild_tensor_v2\n', b'PK\x03\x04',
                      b'PK\x01\x02', b'PK\x05\x06', b'\xff\xff\xff\xff',
                      b'\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f']
  common = dict(target=f'{HERE}:_read', expected=[
      'npcface_jax.foreign.torch_checkpoint:TorchFileError'], tokens=tokens,
      count=1000, mem_mb=2048)
  return [dict(name='torch_zip', files={'model.ckpt': zipped},
               mutate_file='model.ckpt', length_fields=_zip_fields(zipped),
               **common),
          dict(name='torch_legacy', files={'model.pth': legacy},
               mutate_file='model.pth',
               length_fields=_legacy_fields(legacy, p), **common)]


@pytest.mark.slow
@pytest.mark.parametrize('index', [0, 1])
def test_fuzz(index, tmp_path, record_property):
  case = dict(fuzz_cases()[index])
  count = case.pop('count')
  summary = fuzzing.fuzz(workdir=tmp_path, count=count, **case)
  record_property('fuzz', summary.line())
  print(summary.line())
  assert summary.problems() == '', summary.line() + '\n' + summary.problems()
  assert summary.refused > count // 4, summary.line()  # mutations do bite


def test_fuzz_seeds_load(tmp_path):
  """The fuzz seeds themselves load (else every mutation is a refusal)."""
  for case in fuzz_cases():
    assert len(case['length_fields']) > 10, case['name']
    path = tmp_path / case['mutate_file']
    path.write_bytes(case['files'][case['mutate_file']])
    assert np.isfinite(_read(path))
