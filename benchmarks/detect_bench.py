"""Face detection in data_prep: detect + align (MTCNN finds the landmarks,
the ArcFace warp, JPEG q95) beside the plain fit path (resize, JPEG), with
1 and 2 worker processes, through preprocess.prepare_faces as
``python -m data_prep train`` runs it.

    PYTHONPATH=. python benchmarks/detect_bench.py [--photos 80]
        [--rounds 3] [--fit-repeat 10]

The photos are the first ORL faces (92x112 grey PGM, s1/1 .. s8/10) from
../shared/data. With 1 worker the images are prepared in this process: its
detector (MTCNN, TensorFlow on all cores) is loaded once before the rounds
and that load is printed on its own. With 2 workers each round starts two
spawned processes, each importing TensorFlow and loading MTCNN and
detecting with one TensorFlow thread, as a conversion does: 'wall' counts
that start-up, 'steady' the images after the first two chunks (one per
worker) over the time after them. The fit path runs the photos
--fit-repeat times over (it is too fast to time on 80). Cases interleave
round by round; medians.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from data_prep import preprocess
from npcface_jax.faces import images

ORL = (pathlib.Path(__file__).resolve().parents[1].parent / 'shared'
       / 'data' / 'orl_faces')


def photo_jobs(n: int) -> list[preprocess.Job]:
  """Jobs of the first n ORL photos, person by person."""
  paths = sorted(ORL.glob('s*/*.pgm'),
                 key=lambda p: (int(p.parent.name[1:]), int(p.stem)))
  if len(paths) < n:
    raise SystemExit(f'{ORL} holds {len(paths)} photos, not {n}; the ORL '
                     'faces belong in ../shared/data')
  return [preprocess.Job(str(p)) for p in paths[:n]]


def timed(jobs, options, workers: int, settle: int) -> dict:
  """One prepare_faces pass: wall s, first result s, steady images/s over the
  results after the first ``settle``, and the skips."""
  stamps, skips = [], 0
  start = time.perf_counter()
  for result in preprocess.prepare_faces(jobs, options, workers):
    stamps.append(time.perf_counter() - start)
    skips += isinstance(result, preprocess.Skip)
  settle = min(settle, len(stamps) - 1)
  return {'wall': stamps[-1], 'first': stamps[0], 'skips': skips,
          'steady': (len(stamps) - 1 - settle) / max(
              stamps[-1] - stamps[settle], 1e-9)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--photos', type=int, default=80)
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--fit-repeat', type=int, default=10)
  args = p.parse_args()
  jobs = photo_jobs(args.photos)
  # Results before steady state: each worker's first chunk.
  settle = {'fit': 2 * preprocess._CHUNK,  # noqa: SLF001
            'detect': 2 * preprocess._DETECT_CHUNK}  # noqa: SLF001

  start = time.perf_counter()
  finder = preprocess.face_finder(workers=1)
  finder(images.decode(images.read_file(jobs[0].path)))
  load_s = time.perf_counter() - start
  cases = {
      ('fit', 1): (jobs * args.fit_repeat, preprocess.Options(), 1),
      ('fit', 2): (jobs * args.fit_repeat, preprocess.Options(), 2),
      ('detect', 1): (jobs, preprocess.Options(detector=finder), 1),
      ('detect', 2): (jobs, preprocess.Options(
          detector=preprocess.face_finder(workers=2)), 2),
  }
  runs = {case: [] for case in cases}
  for r in range(args.rounds):
    for case, (case_jobs, options, workers) in cases.items():
      runs[case].append(timed(case_jobs, options, workers, settle[case[0]]))
      print(f'round {r + 1} {case[0]} x{workers}: '
            f'{runs[case][-1]["wall"]:.2f} s', flush=True)

  versions = ', '.join(f'{name} {_version(name)}' for name in (
      'mtcnn', 'tensorflow-cpu', 'tensorflow', 'pillow'))
  print(f'\n{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, '
        f'Python {platform.python_version()}, {versions}; {args.photos} ORL '
        f'photos, {args.rounds} rounds, medians; in-process detector load '
        f'(import TensorFlow + MTCNN, first photo): {load_s:.1f} s\n')
  print('| path | workers | images | wall s | images/s (wall) | '
        'steady images/s | first result s | skipped |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for (path, workers), results in runs.items():
    n = len(cases[path, workers][0])
    wall = statistics.median(x['wall'] for x in results)
    steady = statistics.median(x['steady'] for x in results)
    first = statistics.median(x['first'] for x in results)
    print(f'| {path} | {workers} | {n} | {wall:.2f} | {n / wall:,.1f} | '
          f'{steady:,.1f} | {first:.2f} | {results[0]["skips"]} |')


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'absent'


if __name__ == '__main__':
  main()
