"""The verification .bin reader: every pickle a real .bin can be (protocols
0-5, bytes / Python 2 str / NumPy uint8 items, bool / NumPy bool labels)
loads; hostile ones (forged NumPy dtypes, code-running globals, huge
lengths, a few thousand mutations of a real file) are refused with a
ValueError, in a subprocess so that a crash fails the test instead of
killing the run."""

import io
import os
import pathlib
import pickle
import pickletools
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from npcface_jax.evaluation import bin_format
from tests import fuzzing
from tests.helpers import SHARED_DATA

ORL_BIN = SHARED_DATA / 'orl_bin' / 'orl_test.bin'
ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGES = [b'\xff\xd8a', b'\xff\xd8bb', b'\xff\xd8c', b'']


def _orl_pairs(pairs=(0, 1, 142, 143)):
  """Those pairs of the ORL fixture (0-141 same, 142-283 different): real
  JPEG bytes and labels; all of them for pairs=None."""
  if not ORL_BIN.is_file():
    pytest.skip(f'{ORL_BIN} not found (shared test data absent)')
  bins, issame = bin_format.load_bin(ORL_BIN)
  if pairs is None:
    return bins, issame
  return [bins[i] for k in pairs for i in (2 * k, 2 * k + 1)], issame[
      list(pairs)]


def _load_in_child(paths, mem_mb=2048, timeout=60):
  """load_bin of each path in one child process with an address-space
  limit: (exit status, its output). Per file the child prints a line
  'NAME loaded P' or 'NAME refused: ...' ending in ' | MB', the growth of
  its peak RSS during that call."""
  code = textwrap.dedent(f'''
      import os, resource, sys
      sys.path.insert(0, {str(ROOT)!r})
      resource.setrlimit(resource.RLIMIT_AS, ({mem_mb} * 2**20,) * 2)
      from npcface_jax.evaluation import bin_format
      def peak():  # kB; VmHWM is this process's own (ru_maxrss can be the
        # parent's high-water mark, carried across fork and exec)
        return int(open('/proc/self/status').read().split('VmHWM:')[1]
                   .split()[0])
      for path in {[str(p) for p in paths]!r}:
        before = peak()
        try:
          _, issame = bin_format.load_bin(path)
          result = f'loaded {{len(issame)}}'
        except ValueError as e:
          result = f'refused: {{e}}'
        grew = (peak() - before) / 1024
        print(os.path.basename(path), result, '|', grew, flush=True)
  ''')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


# --- What real files hold loads ----------------------------------------------

@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize('items', ['bytes', 'uint8 arrays', 'imencode arrays',
                                   'bytearrays', 'tuple'])
@pytest.mark.parametrize('labels', ['bools', 'numpy bools', 'bool array',
                                    'ints'])
def test_every_real_layout_loads(tmp_path, protocol, items, labels):
  bins = {
      'bytes': IMAGES,
      'uint8 arrays': [np.frombuffer(b, np.uint8) for b in IMAGES],
      # cv2.imencode returns (N, 1) uint8 arrays.
      'imencode arrays': [np.frombuffer(b, np.uint8)[:, None] for b in IMAGES],
      'bytearrays': [bytearray(b) for b in IMAGES],
      'tuple': tuple(IMAGES),
  }[items]
  issame = {'bools': [True, False], 'numpy bools': [np.True_, np.False_],
            'bool array': np.array([True, False]), 'ints': [1, 0]}[labels]
  path = tmp_path / 'a.bin'
  path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
  got, same = bin_format.load_bin(path)
  assert got == IMAGES and same.dtype == bool
  assert same.tolist() == [True, False]


def _py2_pickle(images, labels, protocol):
  """What Python 2's pickle.dump((list of str, list of bool)) writes: str as
  STRING / SHORT_BINSTRING / BINSTRING, bools as INT 01 / NEWTRUE."""
  if protocol == 0:
    out = b'((lp0\n'
    for i, image in enumerate(images):
      out += b'S' + repr(image)[1:].encode('latin-1') + b'\n' + b'a'
    out += b'(lp1\n' + b''.join(b'I01\na' if x else b'I00\na' for x in labels)
    return out + b'tp2\n.'
  out = b'\x80\x02]q\x00(' if protocol == 2 else b'(]q\x00('
  for image in images:
    out += (b'U' + bytes([len(image)]) if len(image) < 256 else
            b'T' + len(image).to_bytes(4, 'little')) + image
  out += b'e]q\x01('
  out += b''.join((b'\x88' if x else b'\x89') if protocol == 2 else
                  (b'K\x01' if x else b'K\x00') for x in labels)
  return out + b'e\x86q\x02.' if protocol == 2 else out + b'et.'


@pytest.mark.parametrize('protocol', [0, 1, 2])
def test_python2_files_load(tmp_path, protocol):
  images = [b"\xff\xd8'\\\n\x00" + bytes(range(256)), b'\xff\xd8x' * 100,
            b'\xff\xd8\r"', b'\xff\xd8']
  path = tmp_path / 'py2.bin'
  path.write_bytes(_py2_pickle(images, [True, False], protocol))
  bins, issame = bin_format.load_bin(path)
  assert bins == images and issame.tolist() == [True, False]
  # The same bytes as the standard unpickler reads them.
  want = pickle.loads(path.read_bytes(), encoding='bytes')
  assert [bytes(b) for b in want[0]] == bins


def test_orl_fixture_and_our_own_files_load(tmp_path):
  bins, issame = _orl_pairs(None)
  assert len(bins) == 568 and issame.sum() == 142 and not issame[142:].any()
  bin_format.save_bin(tmp_path / 'ours.bin', bins, issame)
  again, same = bin_format.load_bin(tmp_path / 'ours.bin')
  assert again == bins and (same == issame).all()
  pairs = bin_format.load_pairs(tmp_path / 'ours.bin', 112)
  assert pairs.images.shape == (568, 112, 112, 3) and not pairs.skipped


def test_a_pair_with_a_corrupt_image_is_skipped_and_named(tmp_path):
  bins, issame = _orl_pairs()
  bins[3] = bins[3][:len(bins[3]) // 3]  # truncated JPEG in pair 1
  bins[6] = b''                          # empty image in pair 3
  bin_format.save_bin(tmp_path / 'a.bin', bins, issame)
  pairs = bin_format.load_pairs(tmp_path / 'a.bin', 112)
  assert pairs.issame.tolist() == [issame[0], issame[2]]
  assert [s.split(':')[0] for s in pairs.skipped] == ['pair 1', 'pair 3']
  assert 'image 3' in pairs.skipped[0] and 'image 6' in pairs.skipped[1]
  whole = bin_format.load_pairs(tmp_path / 'a.bin', 112).images
  clean = bin_format.decode_pairs([bins[i] for i in (0, 1, 4, 5)], 112)
  np.testing.assert_array_equal(whole, clean)
  with pytest.raises(ValueError, match=r'image 3 \(pair 1\) does not decode'):
    bin_format.decode_pairs(bins, 112)


# --- What they never hold is refused, without running or crashing -----------

def forged_dtype_bin() -> bytes:
  """The 197-byte .bin that crashed the old reader (SIGSEGV): an array whose
  void dtype claims an object field with flags that make NumPy read its raw
  bytes ('AAAAAAAA') as a PyObject pointer, freed when the array is."""
  def glob(module, name):
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'
  def text(s):
    return b'X' + len(s).to_bytes(4, 'little') + s.encode()
  def dtype(code):
    return glob('numpy', 'dtype') + text(code) + b'\x89\x88\x87R'
  return (b'\x80\x03(](' + glob('numpy.core.multiarray', '_reconstruct')
          + glob('numpy', 'ndarray') + b'K\x00\x85C\x01b\x87R'
          + b'(K\x01K\x01\x85' + dtype('V8')
          + b'(K\x03' + text('|') + b'N' + text('f') + b'\x85}' + text('f')
          + dtype('O8') + b'(K\x03' + text('|') + b'NNNJ\xff\xff\xff\xffJ'
          + b'\xff\xff\xff\xffK?tbK\x00\x86s' + b'K\x08K\x08K=tb'
          + b'\x89C\x08AAAAAAAAtb' + b'e]t.')


def test_forged_dtype_is_refused_without_a_crash(tmp_path):
  path = tmp_path / 'forged.bin'
  path.write_bytes(forged_dtype_bin())
  assert len(path.read_bytes()) == 197
  status, out = _load_in_child([path])
  assert status == 0, f'the reader died (status {status}): {out}'
  assert out.startswith(f'forged.bin refused: {path}'), out
  assert "dtype('V8', False, True)" in out, out


class _Evil:
  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _evil_files(marker):
  """name -> pickle bytes that would touch ``marker`` if anything ran."""
  touch = f'open({str(marker)!r}, "w")'
  out = {}
  for protocol in (0, 2, 4, 5):
    for name, evil in {'os.system': _Evil(os.system, f'touch {marker}'),
                       'eval': _Evil(eval, touch),
                       'exec': _Evil(exec, touch)}.items():
      out[f'{name}-p{protocol}'] = pickle.dumps(([evil, b'x'], [True]),
                                                protocol=protocol)
  # Opcodes that build objects another way: INST, OBJ, NEWOBJ, dict state.
  out['INST'] = b'(S"touch ' + str(marker).encode() + b'"\nios\nsystem\n.'
  out['OBJ'] = (b'\x80\x02(cos\nsystem\nS"touch ' + str(marker).encode()
                + b'"\no.')
  out['NEWOBJ'] = b'\x80\x02cbuiltins\nobject\n)\x81.'
  out['dtype-dict-state'] = pickle.dumps(
      ([np.zeros(2, dtype=[('a', 'u1')]).view('V2')], []), protocol=2)
  out['object-array'] = pickle.dumps(([np.array([b'x', b'y'], object)], []),
                                     protocol=4)
  out['persistent-id'] = b'\x80\x02Pabc\n.'
  out['not-latin1-codec'] = pickle.dumps(([_Evil(__import__('codecs').encode,
                                                 'x', 'rot13')], []), 2)
  return out


def test_code_running_pickles_are_refused(tmp_path):
  marker = tmp_path / 'ran'
  files = _evil_files(marker)
  for name, data in files.items():
    (tmp_path / f'{name}.bin').write_bytes(data)
  code = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {str(ROOT)!r})
      from npcface_jax.evaluation import bin_format
      for name in {sorted(files)!r}:
        try:
          bin_format.load_bin({str(tmp_path)!r} + '/' + name + '.bin')
          print(name, 'LOADED')
        except ValueError as e:
          print(name, 'refused:', e)
  ''')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = dict(line.split(' ', 1) for line in proc.stdout.splitlines())
  assert sorted(lines) == sorted(files)
  for name, line in lines.items():
    assert line.startswith('refused:') and f'{name}.bin' in line, (name, line)
  for name in ('os.system-p2', 'eval-p4', 'exec-p0'):
    assert 'refused to load the global' in lines[name], lines[name]
  assert not marker.exists()


def test_huge_lengths_are_refused_in_bounded_memory(tmp_path):
  """Every length prefix (and FRAME's size) set to its largest value, deep
  nesting and a large memo: refused, in bounded memory, without a crash."""
  fields = {b'B': 4, b'\x8e': 8, b'\x96': 8, b'T': 4, b'X': 4, b'\x8d': 8,
            b'\x95': 8, b'\x8b': 4, b'C': 1, b'U': 1}
  paths = []
  for opcode, width in fields.items():
    largest = 2 ** (8 * width - (opcode in b'T\x8b')) - 1
    paths.append(tmp_path / f'huge_{opcode.hex()}.bin')
    paths[-1].write_bytes(b'\x80\x04' + opcode
                          + largest.to_bytes(width, 'little') + b'x' * 64)
  # Lists nested 10^5 deep (a recursive repr or check would overflow the
  # C stack), and a million memo entries of one list.
  paths.append(tmp_path / 'deep.bin')
  paths[-1].write_bytes(b'\x80\x02' + b']' * 10**5 + b'a' * (10**5 - 1)
                        + b']\x86.')
  paths.append(tmp_path / 'memo.bin')
  paths[-1].write_bytes(b'\x80\x04]' + b'\x94' * 10**6 + b']\x86.')
  status, out = _load_in_child(paths)
  assert status == 0, f'the reader died (status {status}): {out}'
  lines = out.splitlines()
  assert len(lines) == len(paths), out
  for path, line in zip(paths, lines):
    assert line.startswith(f'{path.name} refused: {path}'), line
    assert 'at byte 2' in line or path.stem in ('deep', 'memo'), line
    assert float(line.split()[-1]) < 200, line  # MB: nothing of that size


def test_refusals_name_the_offset(tmp_path):
  path = tmp_path / 'cut.bin'
  path.write_bytes(pickle.dumps((IMAGES, [True, False]), protocol=4)[:40])
  with pytest.raises(ValueError, match=r'cut\.bin .*(truncated|past the end)'):
    bin_format.load_bin(path)
  path.write_bytes(pickle.dumps(({'a': 1}, [True]), protocol=2))
  with pytest.raises(ValueError, match=r'opcode .* \(EMPTY_DICT\) at byte 2'):
    bin_format.load_bin(path)
  path.write_bytes(pickle.dumps((IMAGES, [True, 2]), protocol=2))
  with pytest.raises(ValueError, match=r'issame_list\[1\] is 2'):
    bin_format.load_bin(path)
  path.write_bytes(pickle.dumps((IMAGES, [True]), protocol=2))
  with pytest.raises(ValueError, match='4 images for 1 pairs'):
    bin_format.load_bin(path)


# --- Fuzzing -----------------------------------------------------------------

def _load_and_decode(path):
  """What evaluation does with a .bin: load it and decode every pair."""
  return bin_format.load_pairs(path, 112)


def _length_fields(data: bytes) -> list[tuple[int, int]]:
  """(offset, width) of every length prefix and frame size in a pickle."""
  widths = {-2: 1, -3: 4, -4: 4, -5: 8}
  out = []
  for op, _, pos in pickletools.genops(io.BytesIO(data)):
    if op.name == 'FRAME':
      out.append((pos + 1, 8))
    elif op.arg is not None and op.arg.n in widths:
      out.append((pos + 1, widths[op.arg.n]))
  return out


def fuzz_cases() -> list[dict]:
  """Real .bin files (four ORL pairs) as insightface's Python 3 scripts and
  data_prep write them (protocol 4), and as protocol 2 with NumPy bools and
  uint8 arrays (the _codecs / numpy reconstruction paths)."""
  bins, issame = _orl_pairs()
  seeds = {
      'p4': pickle.dumps((list(bins), [bool(x) for x in issame]), protocol=4),
      'p2_numpy': pickle.dumps(
          ([np.frombuffer(b, np.uint8) for b in bins],
           [np.bool_(x) for x in issame]), protocol=2),
  }
  opcodes = [op.code.encode('latin-1') for op in pickletools.opcodes]
  tokens = opcodes + [b'\x8e\xff\xff\xff\xff\xff\xff\xff\x7f',
                      b'cos\nsystem\n', b'cnumpy\ndtype\n', b'(', b't', b'b']
  return [dict(name=f'verification_bin_{name}',
               target='tests.test_verification_bin:_load_and_decode',
               files={'set.bin': data}, mutate_file='set.bin',
               expected=['builtins:ValueError'], tokens=tokens,
               length_fields=_length_fields(data), count=1500)
          for name, data in seeds.items()]


@pytest.mark.slow
@pytest.mark.parametrize('index', [0, 1])
def test_fuzz(index, tmp_path, record_property):
  case = dict(fuzz_cases()[index])
  count = case.pop('count')
  summary = fuzzing.fuzz(workdir=tmp_path, count=count, **case)
  record_property('fuzz', summary.line())
  assert summary.problems() == '', summary.line() + '\n' + summary.problems()
  assert summary.refused > count // 4, summary.line()  # mutations do bite


def test_the_trainer_refuses_a_hostile_verification_target(tmp_path):
  """A config naming the forged .bin stops before training with a config
  error (the command line turns it into a usage error), not a crash."""
  from configs import demo  # noqa: PLC0415
  from npcface_jax.training import (  # noqa: PLC0415
      config_checks, periodic_eval)
  forged = tmp_path / 'forged.bin'
  forged.write_bytes(forged_dtype_bin())
  config = demo.get_config()
  config.verification_targets = str(forged)
  with pytest.raises(config_checks.ConfigError,
                     match=r'config\.verification_targets: .*forged\.bin is '
                           'not an insightface verification'):
    periodic_eval.Verifier(config, str(tmp_path), None, 112, None)
