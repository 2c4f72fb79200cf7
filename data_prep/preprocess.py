"""The one preprocessing both commands apply: decode with Pillow, check the
image is whole, make it RGB, align it (5-point landmarks) or fit it to a
square, encode JPEG. Bad inputs come back as a ``Skip`` with a reason instead
of raising, so one broken file never stops a conversion.

``prepare_all`` runs it over many images in worker processes started with
'spawn': forking a process that already runs TensorFlow or JAX threads is
unsafe, and the workers need only Pillow and NumPy.
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

from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep import alignment, recordio

FITS = ('resize', 'crop', 'pad')


@dataclasses.dataclass(frozen=True)
class Options:
  image_size: int = 112
  # Without landmarks: 'resize' (stretch to the square), 'crop' (centre square
  # crop, then resize) or 'pad' (fit inside, centred on black).
  fit: str = 'resize'
  align: bool = False  # every image needs landmarks; those without are skipped
  jpeg_quality: int = 95


class Skip(NamedTuple):
  reason: str  # short, for counting: 'not an image', 'truncated image', ...
  detail: str


class Job(NamedTuple):
  path: str  # an image file, or the .rec holding the image
  offset: int | None = None  # the record's offset in the .rec
  landmarks: tuple[float, ...] | None = None


class BadImage(Exception):
  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.skip = Skip(reason, detail)


def decode(data: bytes) -> Image.Image:
  """The RGB image in data, fully decoded (so truncation shows here)."""
  if not data:
    raise BadImage('empty', '0 bytes')
  try:
    image = Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    raise BadImage('not an image', 'Pillow recognises no image format in '
                   'it') from None
  except Exception as e:  # noqa: BLE001 (any decoder failure is per-image)
    raise BadImage('corrupt image', f'{type(e).__name__}: {e}') from None
  try:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)  # as the camera meant it
    return image if image.mode == 'RGB' else image.convert('RGB')
  except Exception as e:  # noqa: BLE001
    reason = 'truncated image' if 'truncated' in str(e) else 'corrupt image'
    raise BadImage(reason, f'{image.format}: {e}') from None


def fit(image: Image.Image, size: int, how: str) -> Image.Image:
  """image as a size x size square, without landmarks."""
  resample = Image.Resampling.BILINEAR
  w, h = image.size
  if how == 'crop':
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
  elif how == 'pad':
    scale = size / max(w, h)
    fitted = (max(1, round(w * scale)), max(1, round(h * scale)))
    if fitted != image.size:
      image = image.resize(fitted, resample)
    canvas = Image.new('RGB', (size, size))
    canvas.paste(image, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
    return canvas
  elif how != 'resize':
    raise ValueError(f'fit must be one of {FITS}, got {how!r}')
  if image.size != (size, size):
    image = image.resize((size, size), resample)
  return image


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=quality)
  return out.getvalue()


def prepare(data: bytes, options: Options, landmarks=None) -> bytes:
  """JPEG bytes of the preprocessed image; raises BadImage."""
  image = decode(data)
  if options.align:
    if landmarks is None:
      raise BadImage('no landmarks', 'the --landmarks file has no line for it')
    try:
      image = alignment.align(image, landmarks, options.image_size)
    except (ValueError, ArithmeticError) as e:
      raise BadImage('bad landmarks', str(e)) from None
  else:
    image = fit(image, options.image_size, options.fit)
  return encode_jpeg(image, options.jpeg_quality)


# --- Many images, in parallel -------------------------------------------------

_recs: dict[str, object] = {}  # this process's open .rec files


def _read(job: Job) -> bytes:
  if job.offset is None:
    with open(job.path, 'rb') as f:
      data = f.read()
    if not data:
      raise BadImage('empty', 'zero-byte file')
    return data
  f = _recs.get(job.path)
  if f is None:
    f = _recs[job.path] = open(job.path, 'rb')  # noqa: SIM115 (kept open)
  try:
    _, image = recordio.unpack(recordio.read_record(f, job.offset))
  except recordio.RecordError as e:
    raise BadImage('unreadable record', str(e)) from None
  if not image:
    raise BadImage('empty', 'the record holds no image bytes')
  return image


def _run(job: Job, options: Options) -> bytes | Skip:
  try:
    return prepare(_read(job), options, job.landmarks)
  except BadImage as e:
    return e.skip
  except FileNotFoundError as e:
    return Skip('missing file', str(e))
  except OSError as e:
    return Skip('unreadable file', f'{type(e).__name__}: {e}')


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
