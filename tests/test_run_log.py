"""What a run prints: the config as the fields unlike the defaults with the
selected head's options, third-party INFO kept out unless --verbose, and
TensorFlow's C++ start-up lines kept out of every command and data_prep's
workers."""

import logging
import os
import pathlib
import subprocess
import sys

import pytest

from configs import default, demo
from npcface_jax.common import run_log
from npcface_jax.loss import registry
from tests.helpers import orl_people

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_config_lines_show_what_differs_and_the_selected_head():
  config = demo.get_config()
  config.head_options.arcface.margin = 0.45  # a head not selected
  head = registry.get_head('npcface', preset='paper', scale=32.0)
  lines = run_log.config_lines(config, default.get_config(), head.options)
  assert "  dataset = 'synthetic'" in lines
  assert '  head_options.npcface.scale = 32.0' in lines
  assert '  model_options.width = 0.25' in lines
  assert not [line for line in lines if 'arcface' in line or
              'criterion_options' in line or 'learning_rate' in line]
  assert lines[-1] == ('  head npcface: scale=32.0, m0=0.4, m1=0.2, t=1.1, '
                       'alpha=0.25, hard_margin=None, easy_margin=False')
  assert run_log.config_lines(default.get_config(), default.get_config(),
                              {'a': 1}) == ['  head npcface: a=1']


class _Kept(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(f'{record.name}: {record.getMessage()}')


@pytest.mark.parametrize('verbose', [False, True])
def test_third_party_info_is_kept_out_unless_verbose(verbose):
  root, absl_logger = logging.getLogger(), logging.getLogger('absl')
  handler, level, absl_level = _Kept(), root.level, absl_logger.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  # Hermetic: a command run earlier in this process (absl's app.run and
  # its --verbosity) may have left absl's own logger at WARNING.
  absl_logger.setLevel(logging.NOTSET)
  try:
    run_log.quiet_third_party(verbose)
    logging.info('ours')
    logging.getLogger('npcface_jax.training.loop').info('ours too')
    logging.getLogger('absl').info('orbax: saving')
    logging.getLogger('tensorflow').info('TF chatter')
    logging.getLogger('absl').warning('a warning')
    logging.getLogger('absl').info('Setting work unit notes: %s', '1 steps/s')
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
    absl_logger.setLevel(absl_level)
  if verbose:
    assert len(handler.lines) == 6
  else:
    assert handler.lines == [
        'root: ours', 'npcface_jax.training.loop: ours too',
        'absl: a warning', 'absl: progress: 1 steps/s']


# --- TensorFlow's C++ start-up lines ----------------------------------------

# What TensorFlow 2.x's C++ prints as it loads, before Python's logging.
STARTUP = ('All log messages before absl::InitializeLog',
           'oneDNN custom operations are on',
           'To enable the following instructions')
COMMANDS = [f'npcface_jax.{m}' for m in (
    'main', 'evaluate', 'verify', 'embed', 'identify', 'export', 'report',
    'sweep')]


def startup_lines(text: str) -> list[str]:
  return [line for line in text.splitlines()
          if any(s in line for s in STARTUP)]


def bare_env(**extra) -> dict:
  """The environment without the settings conftest.py and users add, so
  that only the commands' own keep TensorFlow quiet."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  return dict(env, JAX_PLATFORMS='cpu', **extra)


def _run(*args, **env):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=bare_env(
      **env), capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize('verbose', [False, True])
def test_tensorflow_startup_environment(monkeypatch, verbose):
  """oneDNN off whatever --verbose says (results do not depend on it)
  unless the user set it; quiet, the C++ log level at least 2 (JAX's
  import sets 1 where it is unset); --verbose leaves it as it is."""
  for level, quiet in ((None, '2'), ('1', '2'), ('0', '2'), ('2', '2'),
                       ('3', '3'), ('x', '2')):
    monkeypatch.delenv('TF_ENABLE_ONEDNN_OPTS', raising=False)
    if level is None:
      monkeypatch.delenv('TF_CPP_MIN_LOG_LEVEL', raising=False)
    else:
      monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', level)
    run_log.quiet_tensorflow_startup(verbose)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'
    assert os.environ.get('TF_CPP_MIN_LOG_LEVEL') == (
        level if verbose else quiet), level
  monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', '1')
  run_log.quiet_third_party(verbose)
  assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1'


_CONVERT = """
import sys
import jax  # sets TF_CPP_MIN_LOG_LEVEL=1 where it is unset
from npcface_jax.common import run_log
run_log.quiet_third_party(sys.argv[1] == 'verbose')
jax.numpy.ones(1).block_until_ready()
import tensorflow as tf
f = tf.function(lambda x: tf.nn.relu(x) * 2.0,
                input_signature=[tf.TensorSpec([1, 4], tf.float32)])
tf.lite.TFLiteConverter.from_concrete_functions(
    [f.get_concrete_function()], f).convert()
print('converted')
"""


@pytest.mark.slow
def test_tensorflow_cxx_warnings_are_off_after_jax_unless_verbose():
  """As in a command (export's TFLite conversion): JAX imported first, then
  TensorFlow, whose converter warns in C++ ('Ignored output_format'),
  after absl's 'before InitializeLog' line. Quiet, neither shows;
  --verbose brings them back."""
  for mode in ('quiet', 'verbose'):
    proc = _run('-c', _CONVERT, mode)
    assert 'converted' in proc.stdout, proc.stderr[-3000:]
    lines = startup_lines(proc.stderr) + [
        line for line in proc.stderr.splitlines() if 'Ignored output_format'
        in line]
    assert bool(lines) == (mode == 'verbose'), (mode, proc.stderr[-3000:])


def test_no_command_loads_tensorflow_before_it_runs():
  """Each command sets the environment in its main (run_log), which only
  reaches TensorFlow if nothing imported it before: not the modules, nor
  their flags, nor --help, which prints none of its lines."""
  code = ('import importlib, sys\n'
          f'for m in {COMMANDS + ["data_prep.__main__"]!r}:\n'
          '  importlib.import_module(m)\n'
          'sys.exit("tensorflow" in sys.modules)')
  proc = _run('-c', code)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for command in [*COMMANDS, 'data_prep train', 'data_prep pairs']:
    proc = _run('-m', *command.split(), '--help')  # absl's exits 1
    assert 'python -m' in proc.stdout + proc.stderr, command
    assert not startup_lines(proc.stdout + proc.stderr), command


@pytest.mark.slow(minutes=1)
def test_training_and_data_prep_workers_print_no_tensorflow_lines(tmp_path):
  """Where TensorFlow does load: the training command (TensorBoard's
  writer) and data_prep's worker processes (MTCNN) and its shards. Their
  output holds none of TensorFlow's start-up lines, and data_prep
  --verbose brings them back. (embed and identify: test_commands.py.)"""
  proc = _run('-m', 'tests.tiny_backbone', f'--workdir={tmp_path / "run"}',
              '--config=configs/demo.py', '--config.num_train_steps=2',
              '--config.synthetic.heldout_identities=0',
              '--config.log_every_steps=1', JAX_NUM_CPU_DEVICES='1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 2/2' in proc.stderr, proc.stderr[-3000:]
  assert not startup_lines(proc.stdout + proc.stderr), proc.stderr[-3000:]
  src = orl_people(tmp_path, (1, 2))
  prep = ['-m', 'data_prep', 'train', str(src), str(tmp_path / 'prep'),
          '--detect', '--workers=2', '--image-size=48', '--quiet',
          '--overwrite']
  proc = _run(*prep)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'wrote 20 images' in proc.stderr, proc.stderr[-3000:]
  assert not startup_lines(proc.stdout + proc.stderr), proc.stderr[-3000:]
  proc = _run(*prep, '--verbose')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert startup_lines(proc.stderr), proc.stderr[-3000:]
