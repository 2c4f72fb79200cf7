"""The flags of the commands that train runs (main, sweep): --config (a
config file, configs/demo.py by default; any field overridable), --workdir
and --verbose, with the project's configs/ made importable (the configs
import ``configs.default``)."""

import os
import sys

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
if os.path.isdir(os.path.join(ROOT, 'configs')) and ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def define(workdir_help: str) -> None:
  """Defines --config, --workdir (required) and --verbose."""
  flags.DEFINE_string('workdir', None, workdir_help)
  config_flags.DEFINE_config_file(
      'config', os.path.join(ROOT, 'configs', 'demo.py'),
      'Training configuration file.', lock_config=True)
  flags.DEFINE_bool('verbose', False, 'Also log the INFO lines of '
                    'TensorFlow, orbax, absl and JAX.')
  flags.mark_flags_as_required(['workdir'])


def default_config():
  """configs/default.py's config, what the log compares a run's with."""
  from configs import default  # noqa: PLC0415 (found through ROOT)
  return default.get_config()
