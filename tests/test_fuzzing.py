"""The fuzz harness itself: a crash, a hang, an unexpected exception and a
refusal that does not name the file are each reported, never hidden."""

import os
import signal
import time

from tests import fuzzing


def _crash(path):
  os.kill(os.getpid(), signal.SIGSEGV)


def _hang(path):
  time.sleep(60)


def _unexpected(path):
  raise KeyError('not a clear error')


def _anonymous(path):
  raise ValueError('something is wrong')  # names no file


def _clean(path):
  with open(path, 'rb') as f:
    if b'x' in f.read():
      raise ValueError(f'{path}: holds an x')


def _run(tmp_path, target, **options):
  return fuzzing.fuzz(target.__name__, f'tests.test_fuzzing:{target.__name__}',
                      {'a.txt': b'xyz' * 10}, 'a.txt', tmp_path, count=20,
                      seed=3, **options)


def test_a_crash_is_reported_with_the_input_kept(tmp_path):
  summary = _run(tmp_path, _crash)
  assert summary.signal == 'signal SIGSEGV', summary
  assert '1 signals' in summary.line()
  assert os.path.isfile(summary.crashed_input)
  assert 'died (signal SIGSEGV)' in summary.problems()


def test_a_hang_is_reported(tmp_path):
  summary = _run(tmp_path, _hang, per_input_s=0.2, timeout_s=60)
  assert len(summary.hangs) == 20 and summary.signal is None
  assert 'ran 0.' in summary.problems()


def test_unexpected_and_anonymous_errors_are_reported(tmp_path):
  for target in (_unexpected, _anonymous):
    summary = _run(tmp_path, target)
    assert len(summary.failed) == 20, summary.line()
    assert summary.problems(), target
  clean = _run(tmp_path, _clean)
  assert clean.problems() == '' and clean.parsed + clean.refused == 20
  assert clean.refused > 0 and clean.line().startswith('fuzz _clean: 20 ')
