"""Command line: ``python -m npcface_jax.main --config=configs/x.py
--workdir=DIR``; without --config it runs configs/demo.py (synthetic
identities, no dataset). Any config field is overridable, e.g.
``--config.head=arcface --config.batch_size=256``.

Several processes (GPU hosts, a TPU pod, SLURM tasks) join JAX's distributed
runtime first: from the cluster's environment (SLURM, Open MPI, Cloud TPU),
or by hand with all three of --coordinator_address, --num_processes and
--process_id (some of them without the others is a usage error, never
ignored).
"""

import logging
import os
import sys

import jax
from absl import app, flags

from npcface_jax.common import checkpoint, run_log, xla_flags
from npcface_jax.data import input_pipeline
from npcface_jax.training import config_checks, loop, run_flags

xla_flags.use_in_order_cpu_schedule()  # before JAX starts its backend

FLAGS = flags.FLAGS
run_flags.define('Where checkpoints, TensorBoard events, logs and evaluation '
                 'results go; rerun with the same workdir to resume.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, '
                    'to launch several processes by hand (with '
                    '--num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Processes in all (by hand, '
                     'with --coordinator_address and --process_id).')
flags.DEFINE_integer('process_id', None, 'This process, 0 to '
                     '--num_processes - 1 (by hand, with '
                     '--coordinator_address).')

_CLUSTER_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')
_BY_HAND = ('coordinator_address', 'num_processes', 'process_id')


def by_hand_processes(coordinator_address, num_processes, process_id):
  """(coordinator, count, index) when the flags launch processes by hand,
  None when none of them is given. Some without the others raise
  UsageError: silently running one process (or letting JAX guess the rest
  from the environment) would train the wrong job."""
  values = dict(zip(_BY_HAND, (coordinator_address or None, num_processes,
                               process_id)))
  given = [f'--{k}' for k, v in values.items() if v is not None]
  missing = [f'--{k}' for k, v in values.items() if v is None]
  if not given:
    return None
  if missing:
    raise app.UsageError(
        f'{" and ".join(given)} given without {" and ".join(missing)}: '
        'launching processes by hand takes all three, e.g. '
        '--coordinator_address=host0:1234 (process 0\'s host and a free '
        'port) --num_processes=2 --process_id=0 (this process: 0 to '
        'num_processes - 1). Give none of them for one process, or under '
        'SLURM, Open MPI or a Cloud TPU pod, which are detected from the '
        'environment.')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise app.UsageError(
        f'--coordinator_address={coordinator_address}: must be host:port '
        '(process 0\'s host and a free port, e.g. host0:1234)')
  if num_processes < 1:
    raise app.UsageError(f'--num_processes={num_processes}: must be >= 1')
  if not 0 <= process_id < num_processes:
    raise app.UsageError(
        f'--process_id={process_id}: must be in 0..{num_processes - 1} '
        f'(--num_processes={num_processes}), a different one per process')
  return coordinator_address, num_processes, process_id


def _initialize_distributed(by_hand):
  """jax.distributed.initialize() when this run is one of several processes."""
  if by_hand is not None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(*by_hand)
  elif (any(int(os.environ.get(v, '1')) > 1 for v in _CLUSTER_ENV)
        or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0):
    jax.distributed.initialize()  # addresses from the cluster's environment


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  by_hand = by_hand_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                              FLAGS.process_id)
  run_log.quiet_third_party(FLAGS.verbose)
  _initialize_distributed(by_hand)
  logging.info('JAX process %d of %d, %d local devices of %d: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    outcome = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                      defaults=run_flags.default_config())
  except config_checks.ConfigError as e:
    raise app.UsageError(str(e)) from None
  except (loop.NonFiniteLoss, checkpoint.CheckpointWriteError,
          input_pipeline.DamagedShard) as e:
    sys.exit(f'error: {e}')
  for name, result in outcome.verification.items():
    print(f'{name}: verification accuracy {100 * result["accuracy"]:.2f}% '
          f'+- {100 * result["accuracy_std"]:.2f}')


if __name__ == '__main__':
  app.run(main)
