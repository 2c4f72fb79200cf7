"""Command line: ``python -m npcface_jax.main --config=configs/x.py
--workdir=DIR``; without --config it runs configs/demo.py (synthetic
identities, no dataset). Any config field is overridable, e.g.
``--config.head=arcface --config.batch_size=256``.

Several processes (GPU hosts, a TPU pod, SLURM tasks) join JAX's distributed
runtime first: from the cluster's environment (SLURM, Open MPI, Cloud TPU),
or by hand with --coordinator_address, --num_processes and --process_id.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# The configs import `configs.default`: make the project root importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, 'configs')) and _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# Several CPU devices (tests, CPU-only hosts): XLA:CPU's concurrency-
# optimised scheduler can order one program's collectives differently per
# device and deadlock under load (tests/conftest.py); only the CPU compiler
# reads this flag.
_SCHEDULE = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
if _SCHEDULE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                             + _SCHEDULE).strip()

import jax  # noqa: E402

from npcface_jax import checkpoint, config_checks, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints, TensorBoard events, '
                    'logs and evaluation results go; rerun with the same '
                    'workdir to resume.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, '
                    'to launch several processes by hand.')
flags.DEFINE_integer('num_processes', None, 'Processes in all (by hand).')
flags.DEFINE_integer('process_id', None, 'This process (by hand).')
config_flags.DEFINE_config_file(
    'config', os.path.join(_ROOT, 'configs', 'demo.py'),
    'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['workdir'])

_CLUSTER_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')


def _initialize_distributed():
  """jax.distributed.initialize() when this run is one of several processes."""
  if FLAGS.coordinator_address:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif (any(int(os.environ.get(v, '1')) > 1 for v in _CLUSTER_ENV)
        or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0):
    jax.distributed.initialize()  # addresses from the cluster's environment


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_info()
  _initialize_distributed()
  logging.info('JAX process %d of %d, %d local devices of %d: %s',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    outcome = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except config_checks.ConfigError as e:
    raise app.UsageError(str(e)) from None
  except (train.NonFiniteLoss, checkpoint.CheckpointWriteError) as e:
    sys.exit(f'error: {e}')
  for name, result in outcome.verification.items():
    print(f'{name}: verification accuracy {100 * result["accuracy"]:.2f}% '
          f'+- {100 * result["accuracy_std"]:.2f}')


if __name__ == '__main__':
  app.run(main)
