"""Eight fake CPU devices, set before JAX starts its backend, so every test
run exercises the sharded paths (docs/architecture.md, "Sharding"); and
one compilation cache, so that a program compiled once (a train step that
a test runs, stops and resumes, also in a subprocess) is not compiled
again: kept between runs in pytest's cache folder (see _cache_dir)."""

import atexit
import hashlib
import os
import pathlib
import platform
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import jaxlib

from npcface_jax.common import xla_flags

xla_flags.use_in_order_cpu_schedule()  # subprocesses inherit them too
xla_flags.use_fast_cpu_compile()

NUM_DEVICES = 8
jax.config.update('jax_num_cpu_devices', NUM_DEVICES)

# The cache is cleared when it outgrows this (each run of a changed tree
# adds its new programs; a whole run's are ~20 MB).
CACHE_LIMIT_BYTES = 2 << 30


def _machine_key() -> str:
  """JAX's cache keys hold the program, the compiler's flags and JAX's
  version but not the host's instruction set; a folder per CPU (and JAX)
  keeps a checkout shared between machines from running code compiled
  for another one's instructions."""
  flags = ''
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line for line in f if line.startswith('flags')), '')
  except OSError:
    pass
  key = '|'.join((jax.__version__, jaxlib.__version__, platform.machine(),
                  platform.processor(), flags))
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def _size(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def _cache_dir(config) -> str:
  """JAX_COMPILATION_CACHE_DIR when set; a fresh folder removed at exit
  with NPCFACE_TESTS_FRESH_CACHE=1 (a cold run, as a new clone's) or
  without pytest's cache plugin; else
  .pytest_cache/d/xla_<machine> (``pytest --cache-clear`` empties it),
  so that a rerun compiles only what changed. Its keys hold the program,
  the compiler's flags and JAX's version; an entry left damaged (a
  process killed while writing it) is read as a miss: JAX warns and
  compiles."""
  if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  fresh = os.environ.get('NPCFACE_TESTS_FRESH_CACHE', '') not in ('', '0')
  cache = getattr(config, 'cache', None)  # absent with -p no:cacheprovider
  if fresh or cache is None:
    path = tempfile.mkdtemp(prefix='npcface_jax_tests_cache_')
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
  path = cache.mkdir(f'xla_{_machine_key()}')
  if _size(path) > CACHE_LIMIT_BYTES:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
  return str(path)


def pytest_configure(config):
  """Before any test compiles and before pytest-xdist starts its workers,
  which (with every subprocess a test starts) inherit the variables."""
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir(config)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'
  jax.config.update('jax_compilation_cache_dir',
                    os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def pytest_terminal_summary(terminalreporter):
  """The fuzz tests' counts (recorded as the 'fuzz' property, which
  pytest-xdist carries back from its workers): inputs tried per parser,
  signals and hangs."""
  lines = [value for report in terminalreporter.stats.get('passed', [])
           + terminalreporter.stats.get('failed', [])
           for key, value in getattr(report, 'user_properties', [])
           if key == 'fuzz']
  if lines:
    terminalreporter.section('parsers fuzzed')
    for line in sorted(lines):
      terminalreporter.write_line(line)


def pytest_collection_modifyitems(items):
  """The slow tests first, the longest (``slow(minutes=N)``) at the very
  front, so that under pytest-xdist they start at once and the quick ones
  fill the workers at the end (with --dist worksteal, setup.cfg) instead of
  a long test starting last on an otherwise idle machine."""
  def key(item):
    marker = item.get_closest_marker('slow')
    return (marker is None, -(marker.kwargs.get('minutes', 0)
                              if marker else 0))
  items.sort(key=key)
