"""From raw photos to a fine-tuned model, on ORL, with the commands a user
types (README, "Your own photos"), and fine-tuning measured against
training from scratch:

    python benchmarks/finetune_orl.py [--out DIR] [--freeze 20]
        [--finetune-lr 0.01] [--no-scratch]

  1. data_prep train --detect: people s1-s20 (set A) and s21-s30 (set B),
     each photo's face detected (MTCNN) and aligned; A's landmarks saved
  2. data_prep pairs --detect: 900 pairs of s31-s40 (all 450 same-person
     pairs and 450 different-person pairs, seeded), people neither set has
  3. train on A (the starting run), verified on the pairs before its first
     step and at the end
  4. fine-tune on B from A (--config.init_from, classifier rows from B's
     class means, backbone frozen for --freeze steps, learning rate
     --finetune-lr), verified likewise, then python -m npcface_jax.evaluate
  5. train on B from scratch for the same steps as 4 (learning rate 0.1),
     verified likewise
  6. verify --pairs on the fine-tuned run at evaluate's 10-fold threshold

The network is the demo's (MobileFaceNet at quarter width, 48 x 48 faces,
128-d, NPCFace). Prints each run's 10-fold accuracy on the pairs (with flip
TTA, as verification during training runs it), the untrained network's,
and evaluate's and verify's on the fine-tuned run (no flip; verify at
evaluate's 10-fold threshold); the numbers are in benchmarks/RESULTS.md.
tests/test_orl_workflow.py runs it without the from-scratch run and asserts
what is printed here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORL = ROOT.parent / 'shared' / 'data' / 'orl_faces'
SIZE = 48


def _env(extra: dict | None = None) -> dict:
  """The commands as a user runs them: the optimising compiler (the tests'
  fast-compile flag dropped) and one CPU device; ``extra`` on top (another
  CPU emulated by XLA_FLAGS: benchmarks/recipe_spread.py)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES='1')
  env.pop('XLA_FLAGS', None)
  return {**env, **(extra or {})}


def run(*args: str, env: dict | None = None) -> str:
  """A command's stdout; its stderr tail in the error when it fails."""
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT,
                        env=_env(env), capture_output=True, text=True,
                        timeout=1800)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(args)} failed:\n{proc.stderr[-4000:]}')
  return proc.stdout


def people(root: pathlib.Path, numbers, orl: pathlib.Path = ORL) -> str:
  """root/s<p> links to ORL's people (read where they are, in ``orl``):
  a photo folder per person."""
  root.mkdir(parents=True)
  for p in numbers:
    (root / f's{p}').symlink_to(orl / f's{p}')
  return str(root)


def write_pairs(path: pathlib.Path, numbers, seed: int = 0) -> None:
  """Every same-person pair of the people, as many different-person pairs
  drawn with a seed, shuffled (each 10-fold fold mixes both)."""
  rng = random.Random(seed)
  photos = [f's{p}/{i}.pgm' for p in numbers for i in range(1, 11)]
  same = [(f's{p}/{i}.pgm', f's{p}/{j}.pgm', 1) for p in numbers
          for i, j in itertools.combinations(range(1, 11), 2)]
  different = set()
  while len(different) < len(same):
    a, b = rng.sample(photos, 2)
    if a.split('/')[0] != b.split('/')[0]:
      different.add((min(a, b), max(a, b), 0))
  pairs = same + sorted(different)
  rng.shuffle(pairs)
  path.write_text(''.join(f'{a} {b} {s}\n' for a, b, s in pairs))


def train(workdir: str, dataset: str, pairs_bin: str, learning_rate: float,
          *extra: str, env: dict | None = None,
          config: str = 'configs/demo.py') -> dict:
  """Trains as the README says: 25 epochs of 32, the learning rate reached
  over 3 epochs of warm-up and divided by 10 after epochs 15 and 22
  (tests/test_orl_workflow.py says why the warm-up), verifying on the
  pairs before the first step and at the end (10 folds, flip TTA:
  config.eval_flip); returns verification.json."""
  run('npcface_jax.main', f'--config={config}', f'--workdir={workdir}',
      f'--config.dataset={dataset}', '--config.num_epochs=25',
      '--config.lr_boundaries=(15,22)', '--config.warmup_epochs=3',
      f'--config.learning_rate={learning_rate}',
      '--config.batch_size=32', f'--config.verification_targets={pairs_bin}',
      *extra, env=env)
  return json.loads(pathlib.Path(workdir, 'eval',
                                 'verification.json').read_text())


def prepare(out: pathlib.Path, workers: int | None = None,
            orl: pathlib.Path = ORL) -> None:
  """Steps 1 and 2: the photos in ``orl`` detected, aligned and written
  (``workers``: data_prep's --workers, default all cores)."""
  common = ['--detect', '--image-size', str(SIZE), '--quiet']
  if workers:
    common += ['--workers', str(workers)]
  run('data_prep', 'train', people(out / 'people_a', range(1, 21), orl),
      str(out / 'set_a'), *common,
      '--save-landmarks', str(out / 'landmarks_a.txt'))
  run('data_prep', 'train', people(out / 'people_b', range(21, 31), orl),
      str(out / 'set_b'), *common)
  write_pairs(out / 'pairs.txt', range(31, 41))
  run('data_prep', 'pairs', str(out / 'pairs.txt'),
      people(out / 'test_people', range(31, 41), orl), str(out / 'pairs.bin'),
      *common)


def workflow(out: pathlib.Path, freeze: int = 20, finetune_lr: float = 0.01,
             scratch: bool = True, workers: int | None = None,
             orl: pathlib.Path = ORL) -> dict:
  """Runs the steps of the module docstring in ``out``; returns the
  accuracies (verification before and after each run, and evaluate's and
  verify's on the fine-tuned run, without flip) and the seconds taken."""
  timings, numbers = {}, {}
  start = time.perf_counter()
  prepare(out, workers, orl)
  timings['data_prep'] = time.perf_counter() - start
  pairs_bin = str(out / 'pairs.bin')
  runs = [('run_a', 'set_a', 0.1, ()),
          ('run_b', 'set_b', finetune_lr, (
              f'--config.init_from={out / "run_a"}',
              f'--config.freeze_backbone_steps={freeze}'))]
  if scratch:
    runs.append(('run_b_from_scratch', 'set_b', 0.1, ()))
  for name, dataset, lr, extra in runs:
    start = time.perf_counter()
    record = train(str(out / name), str(out / dataset), pairs_bin, lr, *extra)
    timings[name] = time.perf_counter() - start
    numbers[f'{name} at step 0'] = record['history'][0]['pairs']
    numbers[name] = record['history'][-1]['pairs']
  tuned = str(out / 'run_b')
  run('npcface_jax.evaluate', f'--workdir={tuned}', f'--targets={pairs_bin}')
  evaluated = json.loads(pathlib.Path(tuned, 'eval',
                                      'results.json').read_text())
  numbers['run_b evaluate'] = evaluated['targets']['pairs']['accuracy']
  verified = json.loads(run(
      'npcface_jax.verify', f'--workdir={tuned}', f'--pairs={out}/pairs.txt',
      f'--images={out}/test_people', '--json'))
  numbers['run_b verify'] = verified['accuracy']
  return {'accuracy': numbers, 'seconds': timings, 'verified': verified,
          'evaluated': evaluated['targets']['pairs']}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out')
  p.add_argument('--freeze', type=int, default=20)
  p.add_argument('--finetune-lr', type=float, default=0.01)
  p.add_argument('--no-scratch', action='store_true')
  args = p.parse_args()
  if not ORL.is_dir():
    sys.exit(f'ORL photos not found at {ORL}')
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(args.out or tmp)
    result = workflow(out, args.freeze, args.finetune_lr,
                      not args.no_scratch)
  for name, acc in result['accuracy'].items():
    seconds = result['seconds'].get(name)
    took = f'  ({seconds:.0f} s)' if seconds else ''
    print(f'{name:28}{100 * acc:6.2f}%{took}')
  print(f'data_prep (detect + align 400 photos): '
        f'{result["seconds"]["data_prep"]:.0f} s; verify skipped '
        f'{len(result["verified"]["skipped"])} photo(s)')


if __name__ == '__main__':
  main()
