"""What a run prints: its own lines (progress, ETA, verification, the config
once and readably) and everyone's warnings. Third-party INFO chatter
(TensorFlow, orbax, absl, JAX) shows only with ``--verbose``; the whole
config is in run.json and TensorBoard whatever is printed."""

from __future__ import annotations

import logging
import os

_PROGRESS = 'Setting work unit notes: '  # clu's ReportProgress, locally


class _OwnLines(logging.Filter):
  """Passes warnings and errors, INFO from this package (the root logger
  and npcface_jax.*), and clu's progress note, reworded."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    if record.name == 'absl' and str(record.msg).startswith(_PROGRESS):
      record.msg = 'progress: ' + str(record.msg)[len(_PROGRESS):]
      record.progress = True  # for the filters of the other handlers
    if getattr(record, 'progress', False):
      return True
    return record.name == 'root' or record.name.startswith('npcface_jax')


def quiet_tensorflow_startup(verbose: bool = False) -> None:
  """TensorFlow's C++ start-up lines (absl's 'All log messages before
  absl::InitializeLog()', 'oneDNN custom operations are on', 'To enable the
  following instructions: AVX2 ...') and its C++ warnings (the TFLite
  converter's 'Ignored output_format') kept off unless ``verbose``.

  They are printed by TensorFlow's C++, before or beside Python's logging:
  only the environment reaches them, set before TensorFlow loads (worker
  processes inherit it). TF_CPP_MIN_LOG_LEVEL=2 keeps errors only (XLA's
  C++ reads it too); importing JAX has set it to 1 if it was unset, so a
  level below 2 is raised, one of 2 or more kept; --verbose leaves it as
  it is. oneDNN's notice ignores the level: only TF_ENABLE_ONEDNN_OPTS=0
  removes it, set whatever ``verbose`` says (unless the user set it) so
  that --verbose changes no result. Our TensorFlow work (tf.data, MTCNN,
  the exports' run-back) loses nothing by it: MTCNN's landmarks moved by
  1.5e-5 px on 40 ORL photos, its time not at all."""
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', '').strip()
  if not verbose and not (level.isdigit() and int(level) >= 2):
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'


def quiet_third_party(verbose: bool = False) -> None:
  """Keeps third-party INFO lines out of the log (unless ``verbose``): a
  filter on the root logger's handlers (absl's, under app.run), and
  TensorFlow's C++ start-up lines (quiet_tensorflow_startup)."""
  quiet_tensorflow_startup(verbose)
  if verbose:
    return
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _OwnLines) for f in handler.filters):
      handler.addFilter(_OwnLines())


def config_lines(config, defaults, head_options: dict) -> list[str]:
  """The config as a reader wants it: each field that differs from
  ``defaults`` (another ConfigDict, e.g. configs/default.py's), one per
  line, the options of heads and criteria not selected left out; then the
  selected head with every option it trains with."""
  from flax import traverse_util  # noqa: PLC0415 (data_prep runs without JAX)
  got = traverse_util.flatten_dict(config.to_dict(), sep='.')
  base = traverse_util.flatten_dict(defaults.to_dict(), sep='.')
  unused = [f'head_options.{n}.' for n in config.head_options
            if n != config.head]
  unused += [f'criterion_options.{n}.' for n in config.criterion_options
             if n != config.criterion]
  lines = [f'  {k} = {v!r}' for k, v in sorted(got.items())
           if (k not in base or base[k] != v)
           and not k.startswith(tuple(unused))]
  options = ', '.join(f'{k}={v}' for k, v in head_options.items())
  return [*lines, f'  head {config.head}: {options}']
