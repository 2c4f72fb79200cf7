"""Eight fake CPU devices, set before JAX starts its backend, so every test
run exercises the sharded paths (docs/architecture.md, "Sharding"); and
one compilation cache for the session, so that a program compiled once (a
train step that a test runs, stops and resumes, also in a subprocess) is
not compiled again."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='npcface_jax_tests_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache  # subprocesses too
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'

import jax

from npcface_jax.common import xla_flags

xla_flags.use_in_order_cpu_schedule()  # subprocesses inherit them too
xla_flags.use_fast_cpu_compile()

NUM_DEVICES = 8
jax.config.update('jax_num_cpu_devices', NUM_DEVICES)
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
