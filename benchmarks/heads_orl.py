"""Every head trained on ORL through the command line, on the trainer's
three loss paths (README, "The heads after the paper"):

    python benchmarks/heads_orl.py [--heads adaface,magface,...]
        [--epochs 25] [--short-epochs 5] [--paths chunked,full,sharded]
        [--out DIR] [--set config.field=value ...] [--quick]

  1. the README's "Your own photos", step 1, on ORL's photos read in place
     (../shared/data/orl_faces; skipped with a message when absent):
     data_prep train --detect on people s1-s20 (set A, as
     benchmarks/finetune_orl.py's run_a) and data_prep pairs --detect on
     900 pairs of s31-s40, people set A does not hold (finetune_orl.py's
     pairs, seed 0). Reused from --out when there.
  2. 'chunked': every head of --heads (default: the heads after the paper
     and, as reference, npcface and arcface) with the README's step 2 as
     typed (configs/demo.py: quarter-width MobileFaceNet, 48 x 48, 128-d;
     --epochs 25, 3 of warm-up, lr 0.1 divided by 10 after epochs 15 and
     22, batch 32, one CPU device), the trainer's default loss path
     (config.chunk_size=-1: the chunked loss), verified on the pairs before
     the first step and at the end (10 folds, flip TTA).
  3. 'full' (--config.chunk_size=0: the full logits, one device) and
     'sharded' (JAX_NUM_CPU_DEVICES=2, --config.model_parallel=2: the
     classifier's rows split over two devices, each shard chunked) for the
     heads after the paper, the same command stopped after --short-epochs
     (the schedule does not depend on num_epochs, so these steps are the
     first steps of step 2's run: same batches, same learning rates).

Every run logs every step (--config.log_every_steps=1), so a run's curve is
analysis/metrics.jsonl; 'last epoch' columns are the mean of the last
epoch's steps, which is what one log line per epoch would print. The short
runs are held against the chunked run's same steps (the same commands'
first steps, bit for bit: checked by hand): |d loss| at steps 2 and 3
(after one and two updates from the same state: the paths' rounding) and
the largest over the short run (float32 runs part chaotically within a
few steps: RESULTS.md, "How far the ORL recipe moves"). Heads whose step
depends on how the batch is laid out are marked: on the class-sharded path
a head that draws at random and keeps no whole-batch statistic
(elasticface_arc, elasticface_cos) draws from the step's key folded with
the batch shard's index, so its margins differ from the one-device runs'
(each a valid draw).

Prints the tables and writes OUT/heads_orl.json. --quick: 3 and 1 epochs
(a smoke run of the script; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NEW_HEADS = ['adaface', 'magface', 'elasticface_arc', 'elasticface_cos',
             'elasticface_arc_plus', 'elasticface_cos_plus', 'sphereface2',
             'uniface']
REFERENCE = ['npcface', 'arcface']
PATHS = {'chunked': ((), {}),
         'full': (('--config.chunk_size=0',), {}),
         'sharded': (('--config.model_parallel=2',),
                     {'JAX_NUM_CPU_DEVICES': '2'})}
# Heads whose draws follow the batch's layout on the class-sharded path
# (classifier.sharded_classifier_loss folds the data shard's index into the
# key of a head that draws, unless it keeps whole-batch statistics).
LAYOUT_DEPENDENT = {'sharded': {'elasticface_arc', 'elasticface_cos'}}


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / 'benchmarks' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


orl = _load('finetune_orl')


def prepare(out: pathlib.Path) -> None:
  """Set A (s1-s20) and the s31-s40 pairs, as finetune_orl.prepare makes
  them (set B is not needed here); kept in ``out`` for a rerun."""
  if (out / 'pairs.bin').is_file() and (out / 'set_a').is_dir():
    return
  common = ['--detect', '--image-size', str(orl.SIZE), '--quiet']
  if not (out / 'set_a').is_dir():
    if (out / 'people_a').exists():
      (out / 'people_a').rename(out / f'people_a.{time.time_ns()}')
    orl.run('data_prep', 'train', orl.people(out / 'people_a', range(1, 21)),
            str(out / 'set_a'), *common)
  if (out / 'test_people').exists():
    (out / 'test_people').rename(out / f'test_people.{time.time_ns()}')
  orl.write_pairs(out / 'pairs.txt', range(31, 41))
  orl.run('data_prep', 'pairs', str(out / 'pairs.txt'),
          orl.people(out / 'test_people', range(31, 41)),
          str(out / 'pairs.bin'), *common)


def train(out: pathlib.Path, head: str, path: str, epochs: int,
          extra: tuple = ()) -> dict:
  """The README's step 2 with ``head`` on ``path`` for ``epochs`` (and
  ``extra`` flags); what it logged and verified, or the error of a run
  that failed."""
  flags, env = PATHS[path]
  workdir = out / 'runs' / f'{head}_{path}_{epochs}ep'
  if workdir.exists():  # a fresh run, never a resumed one
    workdir.rename(workdir.with_name(f'{workdir.name}.{time.time_ns()}'))
  command = [
      sys.executable, '-m', 'npcface_jax.main', '--config=configs/demo.py',
      f'--workdir={workdir}', f'--config.dataset={out / "set_a"}',
      f'--config.num_epochs={epochs}', '--config.warmup_epochs=3',
      '--config.lr_boundaries=(15,22)', '--config.learning_rate=0.1',
      '--config.batch_size=32',
      f'--config.verification_targets={out / "pairs.bin"}',
      f'--config.head={head}', '--config.log_every_steps=1', *flags, *extra]
  start = time.perf_counter()
  env = orl._env(env)  # noqa: SLF001 (finetune_orl's user environment)
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=3600)
  result = {'head': head, 'path': path, 'epochs': epochs,
            'seconds': time.perf_counter() - start, 'workdir': str(workdir),
            'returncode': proc.returncode}
  metrics = workdir / 'analysis' / 'metrics.jsonl'
  result['curve'] = ([json.loads(line) for line in
                      metrics.read_text().splitlines()]
                     if metrics.is_file() else [])
  if proc.returncode:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    result['error'] = '\n'.join(lines[-5:]) or f'exit {proc.returncode}'
    return result
  verified = re.findall(r'step (\d+) verification pairs: ([\d.]+)% \+- '
                        r'([\d.]+)', proc.stderr)
  history = json.loads((workdir / 'eval' / 'verification.json').read_text(
      ))['history']  # the accuracies unrounded; their std from the log
  std = {int(s): float(d) / 100 for s, _, d in verified}
  result['verification'] = [
      {'step': h['step'], 'accuracy': h['pairs'], 'std': std.get(h['step'])}
      for h in history]
  lines = [line for line in proc.stderr.splitlines()
           if re.search(r'step \d+/\d+  loss', line)]
  result['last_log_line'] = lines[-1].split('] ')[-1] if lines else ''
  return result


def summary(result: dict) -> dict:
  """First and last loss, the last epoch's means, finiteness."""
  curve = result['curve']
  if not curve:
    return {}
  per_epoch = round(curve[-1]['step'] / curve[-1]['epoch'])
  last = [r for r in curve if r['step'] > curve[-1]['step'] - per_epoch]
  keys = [k for k in curve[-1] if '/' in k]
  losses = [r['loss'] for r in curve]
  return {
      'steps': curve[-1]['step'], 'steps_per_epoch': per_epoch,
      'first_loss': losses[0], 'last_step_loss': losses[-1],
      'loss': _mean(r['loss'] for r in last),
      'accuracy': _mean(r['accuracy'] for r in last),
      'first_epoch_loss': _mean(r['loss'] for r in curve[:per_epoch]),
      'diagnostics': {k: _mean(r[k] for r in last) for k in keys},
      'finite': all(math.isfinite(v) for r in curve for v in r.values()
                    if isinstance(v, float))}


def _mean(values) -> float:
  values = list(values)
  return sum(values) / len(values)


def closeness(short: dict, reference: dict) -> dict:
  """|d loss| between a short run and the chunked run at the same steps:
  at steps 2 and 3 (the first losses after updates that the paths'
  rounding may have made differ; step 1's loss is of the same initial
  state) and the largest."""
  ref = {r['step']: r['loss'] for r in reference['curve']}
  diffs = {r['step']: abs(r['loss'] - ref[r['step']])
           for r in short['curve'] if r['step'] in ref}
  if not diffs:
    return {}
  return {'step2': diffs.get(2), 'step3': diffs.get(3),
          'max': max(diffs.values()), 'steps': len(diffs)}


def _diag(diagnostics: dict) -> str:
  return ', '.join(f'{k.split("/", 1)[1]} {v:.3g}'
                   for k, v in sorted(diagnostics.items())) or '-'


def _pct(x) -> str:
  return '-' if x is None else f'{100 * x:.2f}'


def long_table(results: list[dict], epochs: int) -> list[str]:
  lines = [f'chunked (the default), {epochs} epochs: 10-fold accuracy on '
           'the s31-s40 pairs (flip TTA); training loss and accuracy, the '
           'last epoch\'s mean',
           '| head | pairs % | +- | gain | loss first epoch -> last | '
           'train acc | diagnostics (last epoch) | s |',
           '|---|---:|---:|---:|---|---:|---|---:|']
  for r in results:
    s = summary(r)
    if 'error' in r:
      lines.append(f'| {r["head"]} | failed | | | '
                   f'{_losses(s)} | | {r["error"].splitlines()[-1][:80]} | '
                   f'{r["seconds"]:.0f} |')
      continue
    start, end = r['verification'][0], r['verification'][-1]
    lines.append(
        f'| {r["head"]} | {_pct(end["accuracy"])} | {_pct(end["std"])} | '
        f'{100 * (end["accuracy"] - start["accuracy"]):+.2f} | '
        f'{_losses(s)} | {s["accuracy"]:.3f} | {_diag(s["diagnostics"])} | '
        f'{r["seconds"]:.0f} |')
  return lines


def _losses(s: dict) -> str:
  if not s:
    return '-'
  return f'{s["first_epoch_loss"]:.3g} -> {s["loss"]:.3g}'


def short_table(results: list[dict], chunked: dict, epochs: int
                ) -> list[str]:
  lines = [f'full logits and class-sharded, {epochs} epochs; |d loss| '
           'against the chunked run at the same steps (steps 2, 3, largest)',
           '| head | path | trains | loss first epoch -> last | train acc | '
           'pairs % | d loss step 2 | step 3 | max | s |',
           '|---|---|---|---|---:|---:|---:|---:|---:|---:|']
  for r in results:
    s = summary(r)
    ref = chunked.get(r['head'])
    close = closeness(r, ref) if ref and s else {}
    dependent = r['head'] in LAYOUT_DEPENDENT.get(r['path'], ())
    if 'error' in r:
      trains = 'failed'
    else:  # the last epoch against the first (the first step in 1 epoch)
      first = (s['first_epoch_loss'] if s['steps'] > s['steps_per_epoch']
               else s['first_loss'])
      trains = ('yes' if s['finite'] and s['loss'] < first
                else 'no' if s['finite'] else 'non-finite')
    verified = r.get('verification') or [{}]
    note = ' (layout: other draws)' if dependent else ''
    lines.append(
        f'| {r["head"]} | {r["path"]} | {trains} | {_losses(s)} | '
        f'{s.get("accuracy", float("nan")):.3f} | '
        f'{_pct(verified[-1].get("accuracy"))} | '
        f'{_sci(close.get("step2"))}{note} | {_sci(close.get("step3"))} | '
        f'{_sci(close.get("max"))} | '
        f'{r["seconds"]:.0f} |')
    if 'error' in r:
      lines.append(f'|  | error: {r["error"].splitlines()[-1][:100]} |'
                   + ' |' * 8)
  return lines


def _sci(x) -> str:
  return '-' if x is None else f'{x:.1e}'


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--heads', default=','.join(NEW_HEADS + REFERENCE),
                 help='comma-separated; the reference heads (npcface, '
                 'arcface) run on the chunked path only')
  p.add_argument('--epochs', type=int, default=25)
  p.add_argument('--short-epochs', type=int, default=5)
  p.add_argument('--paths', default='chunked,full,sharded')
  p.add_argument('--out', help='data, runs and heads_orl.json kept here '
                 '(default: a new temporary folder, kept)')
  p.add_argument('--set', action='append', default=[],
                 help='config.field=value, for every run (another recipe)')
  p.add_argument('--quick', action='store_true',
                 help='3 and 1 epochs: a smoke run')
  args = p.parse_args()
  if args.quick:
    args.epochs, args.short_epochs = 3, 1
  if not orl.ORL.is_dir():
    sys.exit(f'ORL photos not found at {orl.ORL}: nothing to run (the '
             'benchmark reads them in place)')
  heads, paths = args.heads.split(','), args.paths.split(',')
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    sys.exit(f'unknown path(s) {unknown}: {sorted(PATHS)}')
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='heads_orl_'))
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  prepare(out)
  prep_seconds = time.perf_counter() - start
  print(f'data_prep: {prep_seconds:.0f} s', flush=True)
  chunked, short, extra = {}, [], tuple(f'--{s}' for s in args.set)
  if 'chunked' in paths:
    for head in heads:
      chunked[head] = train(out, head, 'chunked', args.epochs, extra)
      r = chunked[head]
      print(f'{head} chunked: {r.get("error") or r["last_log_line"]} '
            f'({r["seconds"]:.0f} s)', flush=True)
  for path in (p for p in paths if p != 'chunked'):
    for head in (h for h in heads if h not in REFERENCE):
      short.append(train(out, head, path, args.short_epochs, extra))
      r = short[-1]
      print(f'{head} {path}: {r.get("error") or r["last_log_line"]} '
            f'({r["seconds"]:.0f} s)', flush=True)
  record = {'epochs': args.epochs, 'short_epochs': args.short_epochs,
            'set': args.set,
            'data_prep_seconds': prep_seconds,
            'chunked': list(chunked.values()), 'short': short}
  starts = sorted({r['verification'][0]['accuracy']
                   for r in chunked.values() if r.get('verification')})
  record['untrained'] = starts
  (out / 'heads_orl.json').write_text(json.dumps(record, indent=1))
  print()
  print('untrained (step 0, every chunked run): '
        + ', '.join(f'{100 * a:.2f}%' for a in starts))
  if chunked:
    print('\n'.join(long_table(list(chunked.values()), args.epochs)))
  if short:
    print()
    print('\n'.join(short_table(short, chunked, args.short_epochs)))
  print(f'\nwritten: {out / "heads_orl.json"}; '
        f'{time.perf_counter() - start:.0f} s in all')


if __name__ == '__main__':
  main()
