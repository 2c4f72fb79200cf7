"""What a run prints: the config as the fields unlike the defaults with the
selected head's options, and third-party INFO kept out unless --verbose."""

import logging

import pytest

from configs import default, demo
from npcface_jax.common import run_log
from npcface_jax.loss import registry


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
  root = logging.getLogger()
  handler, level = _Kept(), root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
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
  if verbose:
    assert len(handler.lines) == 6
  else:
    assert handler.lines == [
        'root: ours', 'npcface_jax.training.loop: ours too',
        'absl: a warning', 'absl: progress: 1 steps/s']
