"""XLA flags this package needs, set in one place before JAX starts its
backend (main.py, sweep.py, tests/conftest.py)."""

import os

# Several CPU devices (tests, CPU-only hosts): XLA:CPU's concurrency-
# optimised scheduler can start one program's collectives in different
# orders on different devices, and under load (two test processes on two
# cores) the train step's all-reduces deadlocked (rendezvous timeouts, then
# abort). The in-order schedule does not. Only the CPU compiler reads it.
IN_ORDER_CPU_SCHEDULE = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _add(flag: str) -> None:
  """Adds ``flag`` to XLA_FLAGS (inherited by subprocesses); takes effect
  if JAX has not yet created its CPU backend."""
  flags = os.environ.get('XLA_FLAGS', '')
  if flag not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()


def use_in_order_cpu_schedule() -> None:
  _add(IN_ORDER_CPU_SCHEDULE)


# Tests compile far more than they compute (hundreds of small programs, each
# run a few times): LLVM's optimisations cost a quarter of XLA:CPU's compile
# time and buy little at their sizes. Not for training.
FAST_CPU_COMPILE = '--xla_backend_optimization_level=0'


def use_fast_cpu_compile() -> None:
  """For tests/conftest.py only."""
  _add(FAST_CPU_COMPILE)
