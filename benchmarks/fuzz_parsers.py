"""Every parser of user files, fuzzed at length: the tests' fuzz cases
(``fuzz_cases()`` of the test modules below) with more mutations each.

  python benchmarks/fuzz_parsers.py [--scale 10] [--seed S] [--only NAME]

Prints one line per case (inputs tried, parsed, refused with a clear error,
other errors, signals, hangs, the slowest input, the child's peak RSS, the
seed) and a total; exits 1 if any input crashed, hung or raised anything
but the parser's own clear error. Needs the shared ORL data beside the
project (cases that need it are skipped, saying so, without it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import fuzzing  # noqa: E402

MODULES = ('tests.test_verification_bin', 'tests.test_hostile_inputs',
           'tests.test_hostile_text', 'tests.test_damaged_records',
           'tests.test_mxnet_files', 'tests.test_torch_checkpoint',
           'tests.test_onnx_import')


def cases() -> list[dict]:
  import pytest  # noqa: PLC0415 (fuzz_cases may call pytest.skip)
  out = []
  for name in MODULES:
    try:
      out += importlib.import_module(name).fuzz_cases()
    except pytest.skip.Exception as e:
      print(f'{name}: skipped ({e})')
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--scale', type=float, default=10.0,
                      help="mutations per case: the test's count times this")
  parser.add_argument('--seed', type=int, default=None,
                      help='the seed of every case (default: fresh)')
  parser.add_argument('--only', default=None,
                      help='run the cases whose name contains this')
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  total = dict(tried=0, parsed=0, refused=0, other=0, signals=0, hangs=0)
  start = time.perf_counter()
  failed = False
  with tempfile.TemporaryDirectory(prefix='fuzz_parsers_') as work:
    for case in cases():
      case = dict(case)
      count = max(1, round(case.pop('count') * args.scale))
      if args.only and args.only not in case['name']:
        continue
      summary = fuzzing.fuzz(workdir=work, count=count, seed=args.seed,
                             timeout_s=max(600.0, count * 0.5), **case)
      print(summary.line(), flush=True)
      problems = summary.problems()
      if problems:
        failed = True
        print('  ' + problems.replace('\n', '\n  ')[:4000], flush=True)
      total['tried'] += summary.tried
      total['parsed'] += summary.parsed
      total['refused'] += summary.refused
      total['other'] += len(summary.failed)
      total['signals'] += summary.signal is not None
      total['hangs'] += len(summary.hangs)
  print(f"all parsers: {total['tried']} mutated inputs, {total['parsed']} "
        f"parsed, {total['refused']} refused with a clear error, "
        f"{total['other']} other errors, {total['signals']} signals, "
        f"{total['hangs']} hangs in {time.perf_counter() - start:.0f} s")
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
