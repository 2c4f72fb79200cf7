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
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

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


# The most pixels an image may have (134 million: 13,400 x 10,000). Real
# photos stay under it (a 100-megapixel medium-format camera is the largest
# in use), while a decoded image stays under 512 MB (4 bytes a pixel at most,
# RGBA or 32-bit grey; its conversion to RGB a few times that at worst) in
# each worker. Checked from the header, before any pixel is decoded: a
# 100-byte PNG can claim 30,000 x 30,000. (Pillow's own guard warns from 89
# and refuses from 179 million.)
MAX_PIXELS = 2**27
# The largest file read: an uncompressed image of MAX_PIXELS at 8 bytes a
# pixel (16-bit RGBA); a larger file is not an image this could decode.
MAX_FILE_BYTES = 8 * MAX_PIXELS
# The image formats decoded (each with a magic number and a maintained
# decoder). Pillow recognises many more: some run outside programs (EPS
# runs Ghostscript), some have no magic number and would take random bytes
# for an image (TGA); a file handed to us as an image is one of these.
FORMATS = ('JPEG', 'PNG', 'PPM', 'BMP', 'TIFF', 'WEBP', 'GIF', 'AVIF',
           'JPEG2000')
# Magic numbers, to tell a damaged image from a file that is none.
_SIGNATURES = ((b'\x89PNG\r\n\x1a\n', 'PNG'), (b'\xff\xd8\xff', 'JPEG'),
               (b'GIF87a', 'GIF'), (b'GIF89a', 'GIF'), (b'II*\0', 'TIFF'),
               (b'MM\0*', 'TIFF'))
# EXIF orientation -> the transpose that shows the image as the camera
# meant it (the table of ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90}
# 16-bit grey to 8 bits, rounded: v * 255 / 65535 = v / 257.
_FROM_16_BITS = ((np.arange(65536) * 255 + 32767) // 65535).astype(np.uint8)


def decode(data: bytes) -> Image.Image:
  """The RGB image in data, fully decoded (so truncation shows here),
  rotated as its EXIF orientation says. Raises only BadImage."""
  if not data:
    raise BadImage('empty', '0 bytes')
  with warnings.catch_warnings():
    # Pillow warns from 89 MP (MAX_PIXELS is the limit here) and about
    # damaged EXIF blocks (the image is kept as stored): noise, per image.
    # (catch_warnings is not thread-safe: another thread may restore the
    # filters meanwhile; then a warning shows, or the filter stays.)
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    warnings.filterwarnings('ignore', category=UserWarning, module=r'PIL\.')
    return _decode(data)


def _decode(data: bytes) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data), formats=_formats())
  except UnidentifiedImageError:
    signature = next((name for magic, name in _SIGNATURES
                      if data.startswith(magic)), None)
    if signature:  # Pillow hides why its plugin gave up
      raise BadImage('corrupt image', f'{signature} whose header cannot be '
                     'read (damaged or cut short)') from None
    raise BadImage('not an image', 'Pillow recognises none of '
                   f'{", ".join(FORMATS)} in it') from None
  except Image.DecompressionBombError as e:
    raise BadImage('too large', f'more than the {MAX_PIXELS:,} pixels '
                   f'allowed ({e})') from None
  except MemoryError:
    raise BadImage('too large', 'out of memory reading the header') from None
  except Exception as e:  # noqa: BLE001 (any decoder failure is per-image)
    raise _bad(e, 'header') from None
  width, height = image.size
  if width * height > MAX_PIXELS:
    raise BadImage('too large', f'{image.format} of {width} x {height} '
                   f'pixels, more than the {MAX_PIXELS:,} allowed')
  if width < 1 or height < 1:
    raise BadImage('corrupt image', f'{image.format} of {width} x {height} '
                   'pixels')
  try:
    image.load()
    orientation = _orientation(image)
    rgb = _to_rgb(image)
    if orientation in _ORIENTATION:
      rgb = rgb.transpose(_ORIENTATION[orientation])
  except MemoryError:
    raise BadImage('too large', f'{image.format} of {width} x {height} '
                   'pixels: out of memory') from None
  except Exception as e:  # noqa: BLE001
    raise _bad(e, image.format) from None
  return rgb


@functools.cache
def _formats() -> tuple[str, ...]:
  """FORMATS that this Pillow has (AVIF came with 11.2): open() fails on a
  format it does not know."""
  Image.init()
  return tuple(f for f in FORMATS if f in Image.OPEN)


def _bad(error: Exception, what: str) -> BadImage:
  """A decoder's exception (OSError, SyntaxError, struct.error, ...) as the
  reason to skip the image."""
  text = f'{type(error).__name__}: {error}'
  if 'truncated' in text.lower() or isinstance(error, EOFError):
    return BadImage('truncated image', f'{what}: {text}')
  return BadImage('corrupt image', f'{what}: {text}')


def _orientation(image: Image.Image) -> int:
  """The EXIF orientation, 1 (as stored) when there is none or the EXIF
  block cannot be read: a damaged EXIF block must not cost the image."""
  try:
    value = image.getexif().get(0x0112, 1)
  except Exception:  # noqa: BLE001 (Pillow's EXIF parser on damaged bytes)
    return 1
  return value if isinstance(value, int) else 1


def _to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB. 16-bit grey is scaled (Pillow's convert would clip every
  value over 255 to white); transparent areas become black, as --pad's
  canvas is; CMYK (Pillow reads JPEG's as Adobe-inverted) and the rest
  through Pillow's convert."""
  if image.mode.startswith('I'):  # 'I;16*' (16-bit PNG, TIFF) or 'I' (PGM)
    grey = np.asarray(image)
    if grey.dtype != np.uint16:
      grey = np.clip(grey, 0, 65535)
    return Image.fromarray(_FROM_16_BITS[grey]).convert('RGB')
  if image.mode == 'RGB':
    return image
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      'transparency' in image.info):  # (has_transparency_data: Pillow 10.1)
    rgba = image.convert('RGBA')
    black = Image.new('RGBA', image.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert('RGB')
  return image.convert('RGB')


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
  """The image bytes of a job: a regular file of at most MAX_FILE_BYTES
  (not a folder, FIFO or device, which could block or never end), or the
  image of a record."""
  if '\0' in job.path:
    raise BadImage('unreadable file', f'{job.path!r} holds a NUL byte, which '
                   'no path can')
  if job.offset is None:
    # Non-blocking, so that opening a FIFO returns (to be refused) at once.
    fd = os.open(job.path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    try:
      info = os.fstat(fd)
      if not stat.S_ISREG(info.st_mode):
        raise BadImage('unreadable file', 'not a regular file (a folder, '
                       'FIFO or device)')
      if info.st_size > MAX_FILE_BYTES:
        raise BadImage('too large', f'a file of {info.st_size:,} bytes, more '
                       f'than the {MAX_FILE_BYTES:,} an image may have')
      if not info.st_size:
        raise BadImage('empty', 'zero-byte file')
      with open(fd, 'rb', closefd=False) as f:
        return f.read(info.st_size)  # (read(n) allocates n bytes at once)
    finally:
      os.close(fd)
  f = _recs.get(job.path)
  if f is None:
    f = _recs[job.path] = open(job.path, 'rb')  # noqa: SIM115 (kept open)
  where = f'{job.path}, record at offset {job.offset}'
  try:
    _, image = recordio.unpack(recordio.read_record(f, job.offset), where)
  except recordio.RecordError as e:
    raise BadImage('unreadable record', str(e)) from None
  if not image:
    raise BadImage('empty', f'{where} holds no image bytes')
  return image


def _run(job: Job, options: Options) -> bytes | Skip:
  """prepare() of one job, or the Skip saying why not: whatever one image
  does, it never stops a conversion or kills a worker."""
  try:
    return prepare(_read(job), options, job.landmarks)
  except BadImage as e:
    return e.skip
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
