"""The one preprocessing both commands apply: each image read, decoded and
aligned (5-point landmarks) or fitted to a square by ``npcface_jax.images``,
the image layer evaluation reads through too, then encoded as JPEG. Bad
inputs come back as a ``Skip`` with a reason instead of raising, so one
broken file never stops a conversion.

``prepare_all`` runs it over many images in worker processes started with
'spawn': forking a process that already runs TensorFlow or JAX threads is
unsafe, and the workers need only Pillow and NumPy (``npcface_jax.images``
imports no JAX).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import itertools
import multiprocessing
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from PIL import Image

from data_prep import recordio
from npcface_jax import images


@dataclasses.dataclass(frozen=True)
class Options:
  image_size: int = 112
  fit: str = 'resize'  # without landmarks: one of images.FITS
  align: bool = False  # every image needs landmarks; those without are skipped
  jpeg_quality: int = 95


class Skip(NamedTuple):
  reason: str  # short, for counting: 'not an image', 'truncated image', ...
  detail: str


class Job(NamedTuple):
  path: str  # an image file, or the .rec holding the image
  offset: int | None = None  # the record's offset in the .rec
  landmarks: tuple[float, ...] | None = None


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=quality)
  return out.getvalue()


def prepare(data: bytes, options: Options, landmarks=None) -> bytes:
  """JPEG bytes of the preprocessed image; raises images.BadImage."""
  image = images.decode(data)
  if options.align and landmarks is None:
    raise images.BadImage('no landmarks',
                          'the --landmarks file has no line for it')
  image = images.crop(image, options.image_size,
                      landmarks if options.align else None, options.fit)
  return encode_jpeg(image, options.jpeg_quality)


# --- Many images, in parallel -------------------------------------------------

_recs: dict[str, object] = {}  # this process's open .rec files


def _read(job: Job) -> bytes:
  """The image bytes of a job: images.read_file's, or the image of a
  record."""
  if job.offset is None:
    return images.read_file(job.path)
  if '\0' in job.path:
    raise images.BadImage('unreadable file', f'{job.path!r} holds a NUL '
                          'byte, which no path can')
  f = _recs.get(job.path)
  if f is None:
    f = _recs[job.path] = open(job.path, 'rb')  # noqa: SIM115 (kept open)
  where = f'{job.path}, record at offset {job.offset}'
  try:
    _, image = recordio.unpack(recordio.read_record(f, job.offset), where)
  except recordio.RecordError as e:
    raise images.BadImage('unreadable record', str(e)) from None
  if not image:
    raise images.BadImage('empty', f'{where} holds no image bytes')
  return image


def _run(job: Job, options: Options) -> bytes | Skip:
  """prepare() of one job, or the Skip saying why not: whatever one image
  does, it never stops a conversion or kills a worker."""
  try:
    return prepare(_read(job), options, job.landmarks)
  except images.BadImage as e:
    return Skip(e.reason, e.detail)
  except FileNotFoundError as e:
    return Skip('missing file', str(e))
  except OSError as e:
    return Skip('unreadable file', f'{type(e).__name__}: {e}')
  except MemoryError:
    return Skip('too large', 'out of memory')
  except Exception as e:  # noqa: BLE001 (a bug for one image costs only it)
    return Skip('failed', f'{type(e).__name__}: {e}')


def prepare_all(jobs: Iterable[Job], options: Options,
                workers: int = 1) -> Iterator[bytes | Skip]:
  """JPEG bytes or a Skip for each job, in the jobs' order."""
  run = functools.partial(_run, options=options)
  if workers <= 1:
    try:
      yield from map(run, jobs)
    finally:
      while _recs:
        _recs.popitem()[1].close()
    return
  # A bounded window of chunks in flight (Executor.map would submit every
  # job at once and could hold a whole dataset's JPEGs in memory when the
  # writer falls behind).
  chunks = _chunks(jobs, _CHUNK)
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    pending = collections.deque(
        pool.submit(_run_chunk, chunk, options)
        for chunk in itertools.islice(chunks, 4 * workers))
    while pending:
      results = pending.popleft().result()
      chunk = next(chunks, None)
      if chunk is not None:
        pending.append(pool.submit(_run_chunk, chunk, options))
      yield from results


_CHUNK = 64


def _chunks(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
  it = iter(jobs)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def _run_chunk(jobs: list[Job], options: Options) -> list[bytes | Skip]:
  return [_run(job, options) for job in jobs]
