"""The one image layer: every image the project reads, to write a training
set (data_prep) or to evaluate (image folders, IJB, verification .bin
pairs), goes through it, so training and evaluation see the same pixels.

``read_image`` takes a file (``read_file``: regular files of bounded size
only) or encoded bytes, decodes it (``decode``: Pillow, whole images only,
EXIF rotation applied, grey, 16-bit, CMYK and transparency made 8-bit RGB,
header-checked size and format limits), aligns it on its 5 landmarks or fits
it to the square (``crop``), and returns uint8 (S, S, 3). ``normalize`` is
where pixels become network inputs.

Bad images, one rule for every reader: any failure to read an image
(missing or unreadable file, not an image, damaged, too large, unusable
landmarks) raises ``BadImage`` naming the reason. ``ImageBatches`` leaves a
bad image out of its batches and reports it in ``skipped`` as
``Skipped(index, name, reason)``; ``kept`` holds the indices of the images
the batches do hold, in order, for callers that must know whose each row
is. One bad file among millions costs only itself.

Imports Pillow and NumPy only (no JAX, no TensorFlow): data_prep's worker
processes use it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import os
import stat
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from npcface_jax.faces import alignment

# insightface's input normalisation: the 0..255 range centred on 0 and
# divided by 128 (not 127.5), so inputs lie just inside (-1, 1).
PIXEL_CENTER = 127.5
PIXEL_SCALE = 128.0


class InputContract(NamedTuple):
  """How a network wants its pixels: RGB or BGR, then (x - center) /
  scale. This project's runs are RGB, 127.5, 128 (insightface's); a model
  trained elsewhere brings its own (arcface_torch: RGB, 127.5, 127.5;
  AdaFace: BGR, 127.5, 127.5). A run records it in its config
  (``config.input``) and every path that feeds the network applies it."""

  channels: str = 'RGB'
  center: float = PIXEL_CENTER
  scale: float = PIXEL_SCALE

  def check(self, where: str = 'config.input') -> InputContract:
    if self.channels not in ('RGB', 'BGR'):
      raise ValueError(f"{where}.channels must be 'RGB' or 'BGR', got "
                       f'{self.channels!r}')
    if not (isinstance(self.scale, (int, float)) and self.scale > 0 and
            isinstance(self.center, (int, float))):
      raise ValueError(f'{where}: center must be a number and scale a '
                       f'positive one, got center={self.center!r}, '
                       f'scale={self.scale!r}')
    return self

  def describe(self) -> str:
    return f'{self.channels}, (x - {self.center:g}) / {self.scale:g}'


def input_contract(config) -> InputContract:
  """A run's contract from its config; runs from before config.input
  existed were fed RGB, (x - 127.5) / 128."""
  fields = config.get('input') if hasattr(config, 'get') else None
  if not fields:
    return InputContract()
  fields = dict(fields)
  return InputContract(str(fields.get('channels', 'RGB')),
                       fields.get('center', PIXEL_CENTER),
                       fields.get('scale', PIXEL_SCALE)).check()


def normalize(pixels, contract: InputContract | None = None):
  """Pixels in 0..255 (RGB, as this layer decodes them) as network
  inputs: the channels reordered if the contract says BGR, then (x -
  center) / scale; the default is this project's RGB, 127.5, 128.

  Plain arithmetic and slicing on the argument, so the same formula serves
  float NumPy, JAX and TensorFlow arrays (each in its own float dtype).
  Cast integer pixels to a float dtype first: TensorFlow does not promote
  uint8.
  """
  c = contract or InputContract()
  if c.channels == 'BGR':
    pixels = pixels[..., ::-1]
  return (pixels - c.center) / c.scale


def denormalize(inputs, contract: InputContract | None = None):
  """normalize's inverse: network inputs back to RGB pixels 0..255."""
  c = contract or InputContract()
  pixels = inputs * c.scale + c.center
  return pixels[..., ::-1] if c.channels == 'BGR' else pixels


class BadImage(Exception):
  """An image that cannot be read; ``reason`` is short, for counting
  ('not an image', 'truncated image', 'missing file', ...)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f'{reason}: {detail}')
    self.reason, self.detail = reason, detail


# --- Decoding -----------------------------------------------------------------

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


# --- Cropping -----------------------------------------------------------------

# Without landmarks: 'resize' (stretch to the square), 'crop' (centre square
# crop, then resize) or 'pad' (fit inside, centred on black).
FITS = ('resize', 'crop', 'pad')


def fit_square(image: Image.Image, size: int, how: str) -> Image.Image:
  """image as a size x size square, without landmarks (how: FITS)."""
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


def crop(image: Image.Image, size: int, landmarks=None,
         fit: str = 'resize') -> Image.Image:
  """The size x size face: aligned on its 5 landmarks when given, else
  fit_square(image, size, fit). Landmarks that give no usable transform
  raise BadImage('bad landmarks'); an unknown fit, ValueError (a caller's
  mistake, not the image's)."""
  if landmarks is None:
    return fit_square(image, size, fit)
  try:
    return alignment.align(image, landmarks, size)
  except (ValueError, ArithmeticError) as e:
    raise BadImage('bad landmarks', str(e)) from None


# --- Reading ------------------------------------------------------------------

def read_file(path: str | os.PathLike) -> bytes:
  """The bytes of an image file: a regular file of at most MAX_FILE_BYTES
  (not a folder, FIFO or device, which could block or never end). Raises
  only BadImage: 'missing file', 'unreadable file', 'too large', 'empty'."""
  path = os.fspath(path)
  if '\0' in path:
    raise BadImage('unreadable file', f'{path!r} holds a NUL byte, which no '
                   'path can')
  try:
    # Non-blocking, so that opening a FIFO returns (to be refused) at once.
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
  except FileNotFoundError as e:
    raise BadImage('missing file', str(e)) from None
  except OSError as e:
    raise BadImage('unreadable file', f'{type(e).__name__}: {e}') from None
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
  except OSError as e:
    raise BadImage('unreadable file', f'{type(e).__name__}: {e}') from None
  finally:
    os.close(fd)


def read_face(source: str | os.PathLike | bytes, size: int, *,
              landmarks=None, fit: str = 'resize', detector=None
              ) -> tuple[Image.Image, np.ndarray | None]:
  """(the size x size RGB face, the landmarks it was aligned on or None) of
  an image file (a path) or of encoded bytes: read_file, decode, then crop:
  aligned on ``landmarks`` when given, else on those ``detector(image)``
  finds when a detector (detection.FaceFinder) is given, else fitted.
  Raises BadImage naming the reason for anything wrong with the image ('no
  face' from the detector)."""
  data = source if isinstance(source, bytes) else read_file(source)
  image = decode(data)
  if landmarks is None and detector is not None:
    landmarks = detector(image)
  return crop(image, size, landmarks, fit), (
      None if landmarks is None else np.asarray(landmarks, np.float64))


def read_image(source: str | os.PathLike | bytes, size: int, *,
               landmarks=None, fit: str = 'resize',
               detector=None) -> np.ndarray:
  """uint8 (size, size, 3) RGB: read_face's image as an array."""
  face, _ = read_face(source, size, landmarks=landmarks, fit=fit,
                      detector=detector)
  return np.asarray(face, np.uint8)


# --- Listing ------------------------------------------------------------------

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.pgm', '.ppm', '.webp')


def image_files(root: str | os.PathLike,
                unreadable: list | None = None) -> list[str]:
  """Every image file (by extension) under root, at any depth, in a fixed
  (sorted) order; hidden files and folders are left out. Links are
  followed, but each folder is walked once (a link back up would loop for
  ever). A folder that cannot be read is appended to ``unreadable`` as
  (path, why) when a list is given, else passed over."""
  def error(e: OSError) -> None:
    if unreadable is not None:
      unreadable.append((e.filename or os.fspath(root), e.strerror or str(e)))

  paths, seen = [], set()
  for folder, dirs, files in os.walk(root, onerror=error, followlinks=True):
    try:
      info = os.stat(folder)
    except OSError as e:
      error(e)
      info = None
    if info is None or (info.st_dev, info.st_ino) in seen:
      dirs[:] = []
      continue
    seen.add((info.st_dev, info.st_ino))
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    paths += [os.path.join(folder, f) for f in sorted(files)
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
  return paths


def identity_problem(name: str) -> str | None:
  """Why a folder name cannot be an identity (class) name, or None.
  data_prep writes class names one a line to UTF-8 label files (a newline
  would add a class, a name that is not UTF-8 stops the write after every
  image was converted); evaluation refuses the same names, so that both
  read a folder of identities alike."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return 'is not valid UTF-8'
  if any(unicodedata.category(c) in ('Cc', 'Zl', 'Zp') for c in name):
    return 'holds a control character or line break'
  return None


def identity_files(root: str | os.PathLike
                   ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """([(path, identity)], [(key, reason)]) of a folder of identities,
  root/<identity>/<images, any depth>: the image_files of each non-hidden
  identity folder, identities sorted; files directly in root belong to none
  and are left out. Folders that cannot be read, and the images of a folder
  whose name cannot be an identity name, are the second list, keyed by
  their path under root. ValueError for a root that cannot be read or holds
  no identity folder."""
  root = os.path.abspath(root)
  try:
    with os.scandir(root) as found:
      identities = sorted(e.name for e in found
                          if not e.name.startswith('.') and _is_dir(e))
  except OSError as e:
    raise ValueError(f'cannot read the folder {root!r}: {e.strerror}; pass '
                     'a readable image folder') from None
  if not identities:
    raise ValueError(f'{root!r} has no identity folders; expected '
                     'root/<identity>/<image>')
  key = lambda p: os.path.relpath(p, root).replace(os.sep, '/')  # noqa: E731
  files, skipped = [], []
  for identity in identities:
    unreadable = []
    paths = image_files(os.path.join(root, identity), unreadable)
    skipped += [(key(p), f'unreadable folder: {why}') for p, why in unreadable]
    problem = identity_problem(identity)
    if problem:
      skipped += [(key(p), f'bad identity name: the folder name {identity!r} '
                   f'{problem}; rename it') for p in paths]
    else:
      files += [(p, identity) for p in paths]
  return files, skipped


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()
  except OSError:  # a link to nowhere, or no permission
    return False


# --- Batches ------------------------------------------------------------------

class Skipped(NamedTuple):
  index: int   # the image's position among the sources
  name: str    # the path or name given, or 'image i' for bytes
  reason: str  # str(BadImage): 'reason: detail'


class ImageBatches:
  """uint8 (b, S, S, 3) batches of the readable images among ``sources``
  (file paths, names under ``root``, or encoded bytes), in their order: one
  batch per ``batch_size`` sources, holding those of them that could be
  read (fewer, or none, where some could not). Each image is aligned on
  ``landmarks[i]`` when landmarks are given (an entry may be None), else on
  the landmarks ``detector`` finds when one is given (detection.FaceFinder;
  found in ``found``: source index -> (5, 2)), else fitted as ``fit`` says.

  Re-iterable; each iteration fills ``skipped`` (Skipped records, the bad
  images left out) and ``kept`` (the source index of each batch row, in
  order). Threads read ahead while the caller embeds a batch: Pillow
  releases the GIL while decoding and warping.
  """

  def __init__(self, sources: Sequence, image_size: int, batch_size: int, *,
               root: str | os.PathLike | None = None, landmarks=None,
               fit: str = 'resize', detector=None,
               workers: int | None = None):
    if image_size <= 0 or batch_size <= 0:
      raise ValueError(f'image_size and batch_size must be positive, got '
                       f'{image_size} and {batch_size}')
    if landmarks is not None and len(landmarks) != len(sources):
      raise ValueError(f'{len(sources)} images but {len(landmarks)} '
                       'landmarks')
    self.sources, self.root, self.landmarks = sources, root, landmarks
    self.image_size, self.batch_size, self.fit = image_size, batch_size, fit
    self.detector = detector
    self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
    self.skipped: list[Skipped] = []
    self.kept: list[int] = []
    self.found: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    """The number of batches an iteration yields (some may be empty)."""
    return -(-len(self.sources) // self.batch_size)

  def _read(self, i: int) -> np.ndarray | Skipped:
    source = self.sources[i]
    if self.root is not None:
      source = os.path.join(self.root, source)
    try:
      face, points = read_face(
          source, self.image_size, fit=self.fit, detector=self.detector,
          landmarks=None if self.landmarks is None else self.landmarks[i])
    except BadImage as e:
      name = (f'image {i}' if isinstance(self.sources[i], bytes)
              else os.fspath(self.sources[i]))
      return Skipped(i, name, str(e))
    if self.detector is not None and points is not None:
      self.found[i] = points
    return np.asarray(face, np.uint8)

  def _batch(self, rows: range, results: list) -> np.ndarray:
    s = self.image_size
    images = []
    for i, result in zip(rows, results, strict=True):
      if isinstance(result, Skipped):
        self.skipped.append(result)
      else:
        self.kept.append(i)
        images.append(result)
    return np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)

  def __iter__(self) -> Iterator[np.ndarray]:
    self.skipped, self.kept, self.found = [], [], {}
    n, b = len(self.sources), self.batch_size
    windows = [range(start, min(start + b, n)) for start in range(0, n, b)]
    if self.workers <= 1:
      for rows in windows:
        yield self._batch(rows, [self._read(i) for i in rows])
      return
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      pending = collections.deque()
      try:
        for rows in windows:  # two batches in flight while one is used
          pending.append((rows, [pool.submit(self._read, i) for i in rows]))
          if len(pending) > 2:
            rows, futures = pending.popleft()
            yield self._batch(rows, [f.result() for f in futures])
        while pending:
          rows, futures = pending.popleft()
          yield self._batch(rows, [f.result() for f in futures])
      finally:
        for _, futures in pending:  # the caller stopped early
          for f in futures:
            f.cancel()
