"""The one preprocessing both commands apply: each image read, decoded and
aligned (5-point landmarks, given or found by
``npcface_jax.faces.detection``) or fitted to a square by
``npcface_jax.faces.images.read_face``, the image layer evaluation reads
through too, then encoded as JPEG. Bad inputs come back as a ``Skip`` with a
reason instead of raising, so one broken file never stops a conversion; a
photo in which the detector finds no face is one ('no face').

``prepare_faces`` runs it over many images in worker processes started with
'spawn': forking a process that already runs TensorFlow or JAX threads is
unsafe, and the workers need only Pillow and NumPy (``npcface_jax.faces.images``
imports no JAX), plus TensorFlow through mtcnn when they detect faces.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib.util
import io
import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from PIL import Image

from data_prep import DataPrepError, recordio
from npcface_jax.faces import alignment, detection, images


@dataclasses.dataclass(frozen=True)
class Options:
  image_size: int = 112
  fit: str = 'resize'  # without landmarks: one of images.FITS
  # Every image needs landmarks, given or found; those without are skipped.
  align: bool = False
  jpeg_quality: int = 95
  # Finds the landmarks of an image that has none given (face_finder's
  # detection.FaceFinder, sent to each worker); None: no detection.
  detector: Callable | None = None


class Skip(NamedTuple):
  reason: str  # short, for counting: 'not an image', 'truncated image', ...
  detail: str


class Job(NamedTuple):
  path: str  # an image file, or the .rec holding the image
  offset: int | None = None  # the record's offset in the .rec
  landmarks: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared image and the 10 landmark coordinates it was aligned on
  (None when fitted), which --save-landmarks writes."""
  jpeg: bytes
  landmarks: tuple[float, ...] | None = None


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=quality)
  return out.getvalue()


def prepare_face(data: bytes, options: Options, landmarks=None) -> Prepared:
  """The preprocessed image, through images.read_face (aligned on the
  landmarks given, else on those options.detector finds, else fitted unless
  options.align); raises images.BadImage ('no face' from the detector)."""
  if landmarks is None and options.align and options.detector is None:
    images.decode(data)  # a damaged file is reported as such
    raise images.BadImage('no landmarks',
                          'the --landmarks file has no line for it')
  if not options.align and options.detector is None:
    landmarks = None  # (landmarks align only with align or a detector set)
  face, used = images.read_face(data, options.image_size, fit=options.fit,
                                landmarks=landmarks, detector=options.detector)
  return Prepared(encode_jpeg(face, options.jpeg_quality),
                  None if used is None else tuple(map(float, used.flat)))


def face_finder(min_score: float = detection.MIN_SCORE,
                workers: int = 1) -> detection.FaceFinder:
  """The detector of --detect, checked in the parent before any work (a
  worker would find the extra missing only after the listing). Worker
  processes run one TensorFlow thread each; one process alone, all."""
  missing = [m for m in ('mtcnn', 'tensorflow')
             if importlib.util.find_spec(m) is None]
  if missing:
    raise DataPrepError(f'--detect needs {" and ".join(missing)}, which '
                        f'{"is" if len(missing) == 1 else "are"} not '
                        f'installed; install it: {detection.INSTALL}')
  if not 0 <= min_score <= 1:
    raise DataPrepError(f'--min-face-score {min_score} is not a score; pass '
                        f'one from 0 to 1 (default {detection.MIN_SCORE})')
  return detection.FaceFinder(min_score, threads=1 if workers > 1 else 0)


def check_landmarks_out(path: str, *, aligning: bool, overwrite: bool,
                        out: str | None = None) -> None:
  """--save-landmarks' checks, before any work: something to save, and a
  file that can be written without losing another (OUT may be its folder:
  the conversion makes it)."""
  if not aligning:
    raise DataPrepError('--save-landmarks writes the landmarks images were '
                        'aligned on; add --detect (or --landmarks FILE)')
  if os.path.isdir(path):
    raise DataPrepError(f'--save-landmarks {path!r} is a folder; pass a file '
                        'name')
  if os.path.exists(path) and not overwrite:
    raise DataPrepError(f'--save-landmarks file {path!r} exists; pass '
                        '--overwrite to replace it or choose another name')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder) and not (
      out and folder == os.path.abspath(out)):
    raise DataPrepError(f'the folder of --save-landmarks {path!r} does not '
                        'exist; create it or choose another file')


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


def _run(job: Job, options: Options) -> Prepared | Skip:
  """prepare_face() of one job, or the Skip saying why not: whatever one
  image does, it never stops a conversion or kills a worker (a missing
  detection extra, which every image would meet, does stop it)."""
  try:
    return prepare_face(_read(job), options, job.landmarks)
  except detection.MissingExtra:
    raise
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


def prepare_faces(jobs: Iterable[Job], options: Options,
                  workers: int = 1) -> Iterator[Prepared | Skip]:
  """A Prepared (JPEG bytes and the landmarks used) or a Skip for each job,
  in the jobs' order; DataPrepError naming the install line when the
  detector cannot be made (face_finder checks for it first)."""
  try:
    yield from _prepare_faces(jobs, options, workers)
  except detection.MissingExtra as e:
    raise DataPrepError(str(e)) from None


def _prepare_faces(jobs: Iterable[Job], options: Options,
                   workers: int) -> Iterator[Prepared | Skip]:
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
  chunks = _chunks(jobs, _CHUNK if options.detector is None else
                   _DETECT_CHUNK)
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


# Images a worker prepares per task: enough to amortise the task's pickling
# (a fitted image takes a millisecond or two); detection takes ~0.1 s an
# image, so that fewer keep the workers evenly loaded on small sets.
_CHUNK = 64
_DETECT_CHUNK = 8


def _chunks(jobs: Iterable[Job], size: int) -> Iterator[list[Job]]:
  it = iter(jobs)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def _run_chunk(jobs: list[Job], options: Options) -> list[Prepared | Skip]:
  return [_run(job, options) for job in jobs]


# --- --save-landmarks ---------------------------------------------------------

def write_landmarks(path: str, points: dict[str, tuple[float, ...]]) -> int:
  """alignment.write_landmarks, saying on stderr which names it left out;
  returns the number of lines written."""
  written, left_out = alignment.write_landmarks(path, points)
  if left_out:
    print(f'data_prep: --save-landmarks left out {len(left_out)} image(s) '
          f'whose names a landmarks line cannot hold, e.g. {left_out[0]!r}; '
          'rename them to keep their landmarks', file=sys.stderr)
  return written
