"""The trainer's command line refuses incomplete or impossible by-hand
multi-process flags at once, naming them and the fix, before anything
trains (JAX would otherwise ignore them and run the job as one process)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_ALL_THREE = 'launching processes by hand takes all three'


@pytest.mark.parametrize('flags, messages', [
    (['--num_processes=2'],
     ['--num_processes given without --coordinator_address and '
      '--process_id', _ALL_THREE]),
    (['--process_id=1'],
     ['--process_id given without --coordinator_address and '
      '--num_processes', _ALL_THREE]),
    (['--coordinator_address=127.0.0.1:1234'],
     ['--coordinator_address given without --num_processes and '
      '--process_id', _ALL_THREE]),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2',
      '--process_id=2'], ['--process_id=2: must be in 0..1']),
    (['--coordinator_address=127.0.0.1', '--num_processes=2',
      '--process_id=0'], ['--coordinator_address=127.0.0.1: must be '
                          'host:port']),
], ids=['count-alone', 'index-alone', 'coordinator-alone', 'index-too-big',
        'no-port'])
def test_by_hand_process_flags_all_or_none(tmp_path, flags, messages):
  workdir = tmp_path / 'work'
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  proc = subprocess.run(
      [sys.executable, '-m', 'npcface_jax.main', f'--workdir={workdir}',
       *flags], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=60)
  assert proc.returncode != 0, proc.stdout + proc.stderr
  for message in messages:
    assert message in proc.stderr, proc.stderr[-3000:]
  assert not workdir.exists()  # stopped before training began
