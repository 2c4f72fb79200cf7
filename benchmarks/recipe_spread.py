"""How far a recipe's result moves when what differs between two CPUs
differs: the ORL workflow's runs (benchmarks/finetune_orl.py) or the
README's demo (configs/demo.py), each under perturbations that emulate
"another machine" on this one:

    python benchmarks/recipe_spread.py orl [--out DIR] [--variants a,b]
        [--no-finetune] [--eval-every N] [--set config.field=value ...]
    python benchmarks/recipe_spread.py demo [--out DIR] [--variants a,b]

Variants: 'base' (the recipe as the test runs it); XLA's code generation
changed (float32 sums in another order, as another instruction set or
vector width gives them: 'avx2', 'vec512', 'vec128', 'llvm_o0',
'fast_math'); the CPU formulations swapped for autodiff of the native
ones ('native'); and other seeds ('seed1'...'seed4': another initial
state and data order, a much larger perturbation). ``--set`` changes the
recipe for every variant (a candidate fix). Prints each variant's
verification accuracies (10 folds, flip TTA), and the min, max and spread.
ORL's photos are detected and aligned once into --out (reused when there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


orl = _load('finetune_orl')

_XLA = {'avx2': '--xla_cpu_max_isa=AVX2',
        'vec512': '--xla_cpu_prefer_vector_width=512',
        'vec128': '--xla_cpu_prefer_vector_width=128',
        'llvm_o0': '--xla_backend_optimization_level=0',
        'fast_math': '--xla_cpu_enable_fast_math=true'}
VARIANTS = ['base', *_XLA, 'native', 'seed1', 'seed2', 'seed3', 'seed4']
_NATIVE = '''from configs import {base}


def get_config():
  c = {base}.get_config()
  c.model_options.impl = 'native'
  return c
'''


def variant(name: str, out: pathlib.Path, base: str = 'demo'):
  """(env, extra config flags, config file) of a variant."""
  if name in _XLA:
    return {'XLA_FLAGS': _XLA[name]}, (), f'configs/{base}.py'
  if name == 'native':
    path = out / f'native_{base}.py'
    path.write_text(_NATIVE.format(base=base))
    return {}, (), str(path)
  if name.startswith('seed'):
    return {}, (f'--config.seed={int(name[4:])}',), f'configs/{base}.py'
  if name != 'base':
    raise SystemExit(f'unknown variant {name!r}: one of {VARIANTS}')
  return {}, (), f'configs/{base}.py'


def _curve(workdir: pathlib.Path) -> list:
  """(step, loss) of each logged step."""
  path = workdir / 'analysis' / 'metrics.jsonl'
  return [(r['step'], round(r['loss'], 3)) for r in map(
      json.loads, path.read_text().splitlines())]


def orl_variant(out: pathlib.Path, name: str, finetune: bool,
                extra: tuple, lr: float = 0.1, tag: str = '') -> dict:
  """run_a (learning rate ``lr``; and run_b fine-tuned from it) under
  variant ``name``, in out/tag/name."""
  env, flags, config = variant(name, out)
  pairs, runs_dir = str(out / 'pairs.bin'), out / tag / name
  result, start = {}, time.perf_counter()
  runs = [('run_a', 'set_a', lr, ())]
  if finetune:
    runs.append(('run_b', 'set_b', 0.01, (
        f'--config.init_from={runs_dir / "run_a"}',
        '--config.freeze_backbone_steps=20')))
  for run, data, lr, more in runs:
    workdir = runs_dir / run
    record = orl.train(str(workdir), str(out / data), pairs, lr, *more,
                       *flags, *extra, env=env, config=config)
    history = record['history']
    result[f'{run} at step 0'] = history[0]['pairs']
    result[run] = history[-1]['pairs']
    result[f'{run} history'] = [(h['step'], round(h['pairs'], 4))
                                for h in history]
    result[f'{run} loss'] = _curve(workdir)
  result['seconds'] = round(time.perf_counter() - start)
  return result


def demo_variant(out: pathlib.Path, name: str, extra: tuple) -> dict:
  """The README's demo command under variant ``name``."""
  env, flags, config = variant(name, out)
  workdir = out / name / 'demo'
  start = time.perf_counter()
  orl.run('npcface_jax.main', f'--config={config}', f'--workdir={workdir}',
          *flags, *extra, env=env)
  history = json.loads((workdir / 'eval' / 'verification.json').read_text()
                       )['history']
  key = 'synthetic_heldout'
  return {'demo at step 0': history[0][key], 'demo': history[-1][key],
          'demo history': [(h['step'], round(h[key], 4)) for h in history],
          'demo loss': _curve(workdir),
          'seconds': round(time.perf_counter() - start)}


def _summary(results: dict, keys) -> None:
  for key in keys:
    values = [r[key] for r in results.values() if key in r]
    if values:
      print(f'{key:16} min {100 * min(values):6.2f}%  max '
            f'{100 * max(values):6.2f}%  spread '
            f'{100 * (max(values) - min(values)):5.2f} points')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('what', choices=('orl', 'demo'))
  p.add_argument('--out')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--no-finetune', action='store_true')
  p.add_argument('--eval-every', type=int, default=0,
                 help='verify every N steps too (the numbers do not change)')
  p.add_argument('--lr', type=float, default=0.1, help="run_a's")
  p.add_argument('--tag', default='', help='a name for this recipe')
  p.add_argument('--set', action='append', default=[],
                 help='config.field=value, for every variant')
  args = p.parse_args()
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='recipe_spread_'))
  out.mkdir(parents=True, exist_ok=True)
  extra = tuple(f'--{s}' for s in args.set)
  if args.eval_every:
    extra += (f'--config.eval_every_steps={args.eval_every}',)
  if args.what == 'orl' and not (out / 'pairs.bin').is_file():
    if not orl.ORL.is_dir():
      sys.exit(f'ORL photos not found at {orl.ORL}')
    orl.prepare(out, workers=1)
  results = {}
  for name in args.variants.split(','):
    if args.what == 'orl':
      results[name] = orl_variant(out, name, not args.no_finetune, extra,
                                  args.lr, args.tag)
    else:
      results[name] = demo_variant(out, name, extra)
    shown = {k: v for k, v in results[name].items()
             if not k.endswith(('history', 'loss'))}
    print(name, json.dumps(shown), flush=True)
    with open(out / 'spread.jsonl', 'a') as f:
      f.write(json.dumps({'variant': name, 'tag': args.tag, 'set': args.set,
                          **results[name]}) + '\n')
  _summary(results, [k for k in next(iter(results.values()))
                     if not k.endswith(('history', 'loss', 'seconds'))])


if __name__ == '__main__':
  main()
