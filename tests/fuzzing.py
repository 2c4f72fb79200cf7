"""Seeded mutation fuzzing of the parsers of files a user hands us.

``fuzz(...)`` writes a case folder holding the real input files, then runs a
child Python process that, for each of ``count`` mutations of one of those
files (bit flips, truncations, spliced tokens, duplicated or deleted chunks,
huge length fields), overwrites it and calls the parser on it. The child
counts what each input did: parsed, refused with one of the expected
exceptions (whose message must name the file), failed with anything else,
or hung (an input that ran past ``per_input_s``). A crash (a signal) or a
child that runs past ``timeout_s`` ends the child; the parent then names
the mutation that was running and keeps it for reproduction. Memory is
bounded by an address-space limit in the child.

Both the tests (small counts) and ``benchmarks/fuzz_parsers.py`` (large
counts) use it; each summary line says how many inputs were tried, with
the seed, so any failure can be replayed with ``fuzz(..., seed=S)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Values that a length or count field should never be trusted with.
HUGE = (2**31 - 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1, 2**29 - 1, 0)


def mutate(data: bytes, rng: random.Random, tokens: Sequence[bytes] = (),
           length_fields: Sequence[tuple[int, int]] = ()) -> tuple[str, bytes]:
  """(kind, mutated copy of data). ``tokens`` are spliced in (opcodes,
  keywords, separators); ``length_fields`` are (offset, width) of
  little-endian length fields to overwrite with huge values."""
  kinds = ['bitflip', 'truncate', 'splice', 'duplicate', 'delete', 'random']
  if length_fields:
    kinds += ['huge_length'] * 2
  kind = rng.choice(kinds)
  b = bytearray(data)
  n = len(b)
  if kind == 'bitflip' and n:
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
      i = rng.randrange(n)
      b[i] ^= 1 << rng.randrange(8)
  elif kind == 'truncate':
    del b[rng.randrange(n + 1):]
  elif kind == 'splice':
    for _ in range(rng.choice((1, 1, 2, 5))):
      token = (rng.choice(tokens) if tokens and rng.random() < 0.8 else
               bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9))))
      i = rng.randrange(n + 1)
      if rng.random() < 0.5:
        b[i:i] = token  # insert
      else:
        b[i:i + len(token)] = token  # overwrite
  elif kind == 'duplicate' and n:
    i = rng.randrange(n)
    chunk = b[i:i + rng.randrange(1, 4096)]
    j = rng.randrange(n + 1)
    b[j:j] = chunk
  elif kind == 'delete' and n:
    i = rng.randrange(n)
    del b[i:i + rng.randrange(1, 256)]
  elif kind == 'random' and n:
    i = rng.randrange(n)
    length = rng.randrange(1, 64)
    b[i:i + length] = bytes(rng.randrange(256) for _ in range(length))
  elif kind == 'huge_length':
    offset, width = rng.choice(list(length_fields))
    value = rng.choice(HUGE) % (1 << (8 * width))
    b[offset:offset + width] = value.to_bytes(width, 'little')
  return kind, bytes(b)


@dataclasses.dataclass
class Summary:
  name: str
  seed: int
  tried: int
  parsed: int
  refused: int
  failed: list[dict]  # unexpected exceptions: index, kind, type, message
  hangs: list[dict]   # inputs that ran past per_input_s
  signal: str | None  # the child died of this signal (or 'timeout')
  crashed_input: str | None  # the mutation that was running then, kept
  max_input_s: float
  max_rss_mb: float

  def line(self) -> str:
    signals = int(bool(self.signal) and self.signal.startswith('signal'))
    died = (f' (the child ended early: {self.signal.splitlines()[0][:80]})'
            if self.signal and not signals else '')
    return (f'fuzz {self.name}: {self.tried} mutated inputs, {self.parsed} '
            f'parsed, {self.refused} refused with a clear error, '
            f'{len(self.failed)} other errors, {signals} signals, '
            f'{len(self.hangs)} hangs{died}; slowest {self.max_input_s:.3f} '
            f's, peak RSS {self.max_rss_mb:.0f} MB; seed {self.seed}')

  def problems(self) -> str:
    """'' when every input parsed or was refused cleanly; else what not."""
    out = []
    if self.signal:
      out.append(f'the child died ({self.signal}) on the input kept at '
                 f'{self.crashed_input}')
    for f in self.failed[:5]:
      out.append(f"input {f['index']} ({f['kind']}): {f['type']}: "
                 f"{f['message']}\n{f.get('traceback', '')}")
    for h in self.hangs[:5]:
      out.append(f"input {h['index']} ({h['kind']}) ran {h['seconds']:.1f} s")
    return '\n'.join(out)


_CHILD = textwrap.dedent('''
    import importlib, json, os, random, resource, signal, sys, time, traceback
    sys.path.insert(0, {root!r})
    from tests import fuzzing
    spec = json.load(open(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_AS, (spec['mem_bytes'],) * 2)
    module, _, name = spec['target'].partition(':')
    target = getattr(importlib.import_module(module), name)
    expected = tuple(getattr(importlib.import_module(m), n) for m, n in
                     (e.split(':') for e in spec['expected']))
    case = spec['case']
    victim = os.path.join(case, spec['mutate'])
    original = open(victim, 'rb').read()
    tokens = [bytes.fromhex(t) for t in spec['tokens']]
    fields = [tuple(f) for f in spec['length_fields']]
    rng = random.Random(spec['seed'])
    class Hang(BaseException):
      pass
    def alarm(*_):
      raise Hang()
    signal.signal(signal.SIGALRM, alarm)
    call = os.path.join(case, spec['mutate']) if spec['call_file'] else case
    counts = dict(parsed=0, refused=0, failed=[], hangs=[], max_s=0.0)
    progress = open(spec['progress'], 'w')
    for i in range(spec['count']):
      kind, data = fuzzing.mutate(original, rng, tokens, fields)
      with open(victim, 'wb') as f:
        f.write(data)
      progress.seek(0)
      progress.write(f'{{i}} {{kind}}      ')
      progress.flush()
      start = time.perf_counter()
      signal.setitimer(signal.ITIMER_REAL, spec['per_input_s'])
      try:
        try:
          target(call)
          counts['parsed'] += 1
        finally:
          signal.setitimer(signal.ITIMER_REAL, 0)
      except Hang:
        counts['hangs'].append(dict(index=i, kind=kind,
                                    seconds=time.perf_counter() - start))
      except expected as e:
        if spec['must_name'] and spec['must_name'] not in str(e):
          counts['failed'].append(dict(
              index=i, kind=kind, type=type(e).__name__, message=str(e)[:500],
              traceback='the message does not name ' + spec['must_name']))
        else:
          counts['refused'] += 1
      except BaseException as e:
        counts['failed'].append(dict(
            index=i, kind=kind, type=type(e).__name__, message=str(e)[:500],
            traceback=traceback.format_exc()[-2000:]))
      counts['max_s'] = max(counts['max_s'], time.perf_counter() - start)
    # VmHWM: this process's own peak (ru_maxrss can carry the parent's
    # high-water mark across fork and exec).
    status = open('/proc/self/status').read().split('VmHWM:')
    counts['max_rss_mb'] = (int(status[1].split()[0]) / 1024 if len(status) > 1
                            else resource.getrusage(
                                resource.RUSAGE_SELF).ru_maxrss / 1024)
    print('FUZZ-RESULT ' + json.dumps(counts))
''')


def fuzz(name: str, target: str, files: dict[str, bytes], mutate_file: str,
         workdir: str | os.PathLike, *, count: int, seed: int | None = None,
         expected: Sequence[str] = ('builtins:ValueError',),
         tokens: Sequence[bytes] = (),
         length_fields: Sequence[tuple[int, int]] = (),
         call_file: bool = True, must_name: str | None = None,
         per_input_s: float = 10.0, timeout_s: float = 600.0,
         mem_mb: int = 3072, env: dict | None = None) -> Summary:
  """Runs ``count`` mutations of files[mutate_file] through ``target``
  ('module:function', called with the mutated file's path, or with the case
  folder when call_file is False) in a child process; see the module
  docstring. ``expected`` are 'module:Exception' names that count as a clean
  refusal; ``must_name`` (default: mutate_file) must appear in their
  message."""
  if seed is None:
    seed = random.SystemRandom().randrange(2**32)
  workdir = pathlib.Path(workdir)
  case = workdir / f'case_{name}'
  case.mkdir(parents=True, exist_ok=True)
  for file_name, data in files.items():
    (case / file_name).parent.mkdir(parents=True, exist_ok=True)
    (case / file_name).write_bytes(data)
  spec = dict(target=target, expected=list(expected), case=str(case),
              mutate=mutate_file, tokens=[t.hex() for t in tokens],
              length_fields=[list(f) for f in length_fields], seed=seed,
              count=count, call_file=call_file,
              must_name=mutate_file if must_name is None else must_name,
              per_input_s=per_input_s, mem_bytes=mem_mb * 2**20,
              progress=str(workdir / f'progress_{name}'))
  spec_path = workdir / f'spec_{name}.json'
  spec_path.write_text(json.dumps(spec))
  child_env = dict(os.environ, **(env or {}))
  child_env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    proc = subprocess.run(
        [sys.executable, '-c', _CHILD.format(root=str(ROOT)), str(spec_path)],
        capture_output=True, text=True, timeout=timeout_s, env=child_env,
        cwd=str(workdir), check=False)
    died = (f'signal {signal.Signals(-proc.returncode).name}'
            if proc.returncode < 0 else
            f'exit status {proc.returncode}: {proc.stderr[-3000:]}'
            if proc.returncode else None)
    out = proc.stdout
  except subprocess.TimeoutExpired as e:
    died, out = f'timeout after {timeout_s} s', (e.stdout or b'').decode()
  result = next((line for line in out.splitlines()
                 if line.startswith('FUZZ-RESULT ')), None)
  if died or result is None:
    progress_file = workdir / f'progress_{name}'
    progress = (progress_file.read_text().split() if progress_file.exists()
                else [])  # the child died before its first input
    kept = workdir / f'crash_{name}_{progress[0] if progress else "start"}'
    (case / mutate_file).replace(kept)
    return Summary(name, seed, int(progress[0]) + 1 if progress else 0, 0, 0,
                   [], [], died or 'no result printed', str(kept), 0.0, 0.0)
  counts = json.loads(result[len('FUZZ-RESULT '):])
  return Summary(name, seed, count, counts['parsed'], counts['refused'],
                 counts['failed'], counts['hangs'], None, None,
                 counts['max_s'], counts['max_rss_mb'])
