"""Evaluation protocols at full scale on synthetic features: IJB-C 1:1 pair
scoring with TAR at FAR, and 1:N identification / MegaFace against a
million distractors.

    python benchmarks/eval_bench.py [--quick] [--probes 3530]
        [--distractors 1000000] [--chunk-size 4096] [--reps 1]

(a) IJB-C 1:1: 23,124 templates x 512, 19,557 genuine + 15,658,489
    impostor pairs (IJB-C's counts over 3,531 subjects):
      ijb/score_pairs   npcface_jax.evaluation.ijb.score_pairs, every pair
      ijb/tar_at_far    protocols.tar_at_far on those scores
(b) 1:N: P probe images of 80 identities (MegaFace's FaceScrub set: 3,530
    of 80) against N distractors x 512 float32 (2 GB at 1M), in chunks:
      floor             the chunked float32 matmul alone, nothing kept: the
                        least any scan of the distractors costs
      identify          ranking.identify, gallery = the first image
                        of each identity, probes = the rest, ranks 1 and 10
      megaface          ranking.megaface on all P probes
Features: unit rows, identity centre plus Gaussian noise of a per-image
scale (so some images are easy, some hard and rank-1 and TAR lie strictly
between 0 and 1); distractors are unit rows of no identity.

Steps run interleaved, round after round (--reps), each reported as its
median. 'wall s' is perf_counter, 'cpu s' process CPU time (both cores;
other processes may share them). 'extra MB' is tracemalloc's peak during
the step over the arrays the step was given: NumPy reports its buffers to
tracemalloc, BLAS's own small workspace is not included. 'rss MB' is
ru_maxrss after the step: the process's peak resident set so far, every
input included (all are made before the first step, the distractors too)
and never going down, so later rows include earlier peaks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from npcface_jax.evaluation import protocols, ranking

# IJB-C 1:1 (insightface's ijbc_template_pair_label.txt).
IJBC_TEMPLATES, IJBC_SUBJECTS = 23_124, 3_531
IJBC_GENUINE, IJBC_IMPOSTORS = 19_557, 15_658_489
# MegaFace challenge 1: FaceScrub probes and the 1M distractor set.
FACESCRUB_IMAGES, FACESCRUB_IDENTITIES = 3_530, 80
MEGAFACE_DISTRACTORS = 1_000_000
NOISE = (0.8, 2.5)  # per-image noise scale, relative to a unit centre


def unit_rows(x: np.ndarray) -> np.ndarray:
  """x with unit rows, in place."""
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def faces(rng, identities: np.ndarray, dim: int) -> np.ndarray:
  """Unit float32 rows: each identity's random centre plus noise of a scale
  drawn per row from NOISE (about that norm, as the noise is N(0, I / D))."""
  centres = unit_rows(rng.standard_normal(
      (int(identities.max()) + 1, dim), dtype=np.float32))
  scale = rng.uniform(*NOISE, (identities.size, 1)).astype(np.float32)
  noise = rng.standard_normal((identities.size, dim), dtype=np.float32)
  return unit_rows(centres[identities] + noise * (scale / math.sqrt(dim)))


def distractor_rows(rng, n: int, dim: int, block: int = 1 << 16):
  """(n, dim) float32 unit rows of no identity, filled block by block so
  that making them needs no second copy."""
  out = np.empty((n, dim), np.float32)
  for start in range(0, n, block):
    part = out[start:start + block]
    rng.standard_normal(dtype=np.float32, out=part)
    unit_rows(part)
  return out


def ijbc_pairs(rng, num_templates, num_subjects, num_genuine,
               num_impostors):
  """(index1, index2, issame): template t belongs to subject t % S; genuine
  pairs are two distinct templates of a random subject, impostor pairs two
  random templates of different subjects (drawn again where they match)."""
  sizes = np.bincount(np.arange(num_templates) % num_subjects)
  subject = rng.integers(0, num_subjects, num_genuine)
  a = rng.integers(0, sizes[subject])
  b = (a + rng.integers(1, sizes[subject])) % sizes[subject]  # b != a
  g1, g2 = subject + a * num_subjects, subject + b * num_subjects
  i1 = rng.integers(0, num_templates, num_impostors)
  i2 = rng.integers(0, num_templates, num_impostors)
  while True:
    same = np.flatnonzero(i1 % num_subjects == i2 % num_subjects)
    if not same.size:
      break
    i2[same] = rng.integers(0, num_templates, same.size)
  issame = np.zeros(num_genuine + num_impostors, bool)
  issame[:num_genuine] = True
  return np.concatenate([g1, i1]), np.concatenate([g2, i2]), issame


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def measure(fn):
  """(result, wall s, cpu s, tracemalloc peak MB) of one call."""
  tracemalloc.start()
  try:
    c0, t0 = _cpu_seconds(), time.perf_counter()
    result = fn()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
  finally:
    tracemalloc.stop()
  return result, wall, cpu, peak


def floor_scan(probes: np.ndarray, rows: np.ndarray, chunk_size: int):
  """The chunked float32 matmul of identification's scan (probe-major,
  into one reused buffer), nothing kept."""
  num_probes = probes.shape[0]
  buf = np.empty(num_probes * min(chunk_size, rows.shape[0]), np.float32)
  for start in range(0, rows.shape[0], chunk_size):
    chunk = rows[start:start + chunk_size]
    n = chunk.shape[0]
    np.matmul(probes, chunk.T, out=buf[:num_probes * n].reshape(num_probes, n))
  return None


def ijb_cases(args, rng):
  from npcface_jax.evaluation import ijb  # noqa: PLC0415 (written alongside this)
  templates = faces(rng, np.arange(args.templates) % args.subjects, args.dim)
  index1, index2, issame = ijbc_pairs(rng, args.templates, args.subjects,
                                      args.genuine, args.impostors)
  state = {}

  def score():
    state['scores'] = ijb.score_pairs(templates, index1, index2,
                                      args.pair_chunk)
    return None

  def tar():
    return protocols.tar_at_far(state['scores'], issame, args.ijb_fars)

  size = f'{args.templates}x{args.dim}, {args.genuine}+{args.impostors}'
  return [('ijb/score_pairs', size, score, lambda r: ''),
          ('ijb/tar_at_far', size, tar,
           lambda r: ' '.join(f'TAR@{x["far"]:g}={x["tar"]:.4f}'
                              for x in r))]


def megaface_cases(args, rng):
  labels = np.arange(args.probes) % FACESCRUB_IDENTITIES
  probes = faces(rng, labels, args.dim)
  t0 = time.perf_counter()
  distractors = distractor_rows(rng, args.distractors, args.dim)
  print(f'# {args.distractors} x {args.dim} distractors made in '
        f'{time.perf_counter() - t0:.1f} s '
        f'({distractors.nbytes / 2**30:.2f} GiB)', flush=True)
  first = np.zeros(args.probes, bool)
  first[:FACESCRUB_IDENTITIES] = True  # row c is identity c's first image
  gallery, gallery_labels = probes[first], labels[first]
  search, search_labels = probes[~first], labels[~first]
  chunk = args.chunk_size

  def identify():
    return ranking.identify(search, search_labels, gallery,
                            gallery_labels, distractors,
                            ranks=(1, 10), chunk_size=chunk)

  def megaface():
    return ranking.megaface(probes, labels, distractors,
                            fars=args.megaface_fars, chunk_size=chunk)

  size = f'{args.probes}x{args.distractors}'
  return [
      ('floor', size, lambda: floor_scan(probes, distractors, chunk),
       lambda r: ''),
      ('identify', f'{search.shape[0]}x({gallery.shape[0]}+'
       f'{args.distractors})', identify,
       lambda r: ' '.join(f'rank{x["rank"]}={x["rate"]:.4f}'
                          for x in r['cmc'])),
      ('megaface', size, megaface,
       lambda r: f'rank1={r["rank1"]:.4f} ({r["trials"]} trials) ' + ' '.join(
           f'TAR@{x["far"]:g}={x["tar"]:.4f}' for x in r['tar_at_far'])),
  ]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='a small smoke run (seconds): 2,000 templates '
                           'of 300 subjects, 202k pairs, 20k distractors, '
                           '500 probes')
  parser.add_argument('--only', choices=('ijb', 'megaface'),
                      help='run one part only')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--templates', type=int, default=IJBC_TEMPLATES)
  parser.add_argument('--subjects', type=int, default=IJBC_SUBJECTS)
  parser.add_argument('--genuine', type=int, default=IJBC_GENUINE)
  parser.add_argument('--impostors', type=int, default=IJBC_IMPOSTORS)
  parser.add_argument('--pair-chunk', type=int, default=1 << 10,
                      help="pairs per chunk of ijb.score_pairs (its default)")
  parser.add_argument('--probes', type=int, default=FACESCRUB_IMAGES)
  parser.add_argument('--distractors', type=int,
                      default=MEGAFACE_DISTRACTORS)
  parser.add_argument('--chunk-size', type=int,
                      default=ranking.CHUNK_SIZE,
                      help='distractor rows per chunk of the 1:N scan')
  parser.add_argument('--ijb-fars', type=float, nargs='+',
                      default=[1e-6, 1e-5, 1e-4, 1e-3])
  parser.add_argument('--megaface-fars', type=float, nargs='+',
                      default=[1e-6, 1e-5, 1e-4])
  parser.add_argument('--reps', type=int, default=1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', help='also write the rows to this file')
  args = parser.parse_args()
  if args.quick:
    args.templates, args.subjects = 2_000, 300
    args.genuine, args.impostors = 2_000, 200_000
    args.probes, args.distractors = 500, 20_000
  if args.templates < 2 * args.subjects:
    parser.error('--templates must be at least twice --subjects (genuine '
                 'pairs need two templates of a subject)')
  if args.probes < 2 * FACESCRUB_IDENTITIES:
    parser.error(f'--probes must be at least {2 * FACESCRUB_IDENTITIES} '
                 f'(two images of each of {FACESCRUB_IDENTITIES} identities)')
  print(f'# {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, numpy {np.__version__}, '
        f'D={args.dim} float32, chunk {args.chunk_size} rows, '
        f'{args.reps} round(s), seed {args.seed}', flush=True)
  rng = np.random.default_rng(args.seed)
  cases = []
  if args.only in (None, 'ijb'):
    cases += ijb_cases(args, rng)
  if args.only in (None, 'megaface'):
    cases += megaface_cases(args, rng)

  times = {name: [] for name, *_ in cases}
  rows = {}
  for _ in range(args.reps):
    for name, size, fn, describe in cases:
      result, wall, cpu, extra = measure(fn)
      times[name].append((wall, cpu, extra))
      rows[name] = {'step': name, 'size': size,
                    'result': describe(result), 'rss_mb': _rss_mb()}
      print(f'# {name}: {wall:.2f} s, {rows[name]["result"]}', flush=True)
  for name, r in rows.items():
    t = np.array(times[name])
    r.update(wall_s=float(np.median(t[:, 0])), cpu_s=float(np.median(t[:, 1])),
             extra_mb=float(np.max(t[:, 2])))
  floor = rows.get('floor', {}).get('wall_s')
  print(f'{"step":<17}{"size":>30}{"wall s":>9}{"cpu s":>9}{"x floor":>9}'
        f'{"extra MB":>10}{"rss MB":>9}  result')
  for r in rows.values():
    ratio = (f'{r["wall_s"] / floor:.2f}' if floor and r['step'] in (
        'floor', 'identify', 'megaface') else '')
    print(f'{r["step"]:<17}{r["size"]:>30}{r["wall_s"]:>9.2f}'
          f'{r["cpu_s"]:>9.2f}{ratio:>9}{r["extra_mb"]:>10.0f}'
          f'{r["rss_mb"]:>9.0f}  {r["result"]}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(list(rows.values()), f, indent=1)


if __name__ == '__main__':
  main()
