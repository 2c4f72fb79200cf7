"""Eight fake CPU devices, set before JAX starts its backend, so every test
run exercises the sharded paths (DESIGN.md section 5)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

NUM_DEVICES = 8
jax.config.update('jax_num_cpu_devices', NUM_DEVICES)
