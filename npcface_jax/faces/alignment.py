"""5-point face alignment: the least-squares similarity transform (Umeyama,
1991) that takes a face's landmarks onto the ArcFace template, and the warp
that applies it with Pillow.

Coordinates are pixel indices, as face detectors (and OpenCV's warpAffine)
use them: pixel (0, 0) is centred at (0, 0). Points that give no usable
transform (not finite, all at one point) raise ValueError, which callers
turn into a skipped face.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from npcface_jax.common import jsonfile
from npcface_jax.common.textfile import shown, text_lines

# Pixel coordinates beyond this are garbage, not a face in an image (no
# image is a million pixels wide); refused where files are read.
MAX_COORDINATE = 1e6

# Eyes, nose tip, mouth corners in a 112x112 crop (insightface's template).
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]])


def template(image_size: int) -> np.ndarray:
  """The template scaled to an image_size x image_size crop."""
  return ARCFACE_TEMPLATE * (image_size / 112.0)


def _points(points, what: str) -> np.ndarray:
  """(N, 2) float64 finite points, N >= 2; ValueError saying what is wrong."""
  try:
    p = np.asarray(points, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f'{what} are not numbers: {points!r:.200}') from None
  if p.size < 4 or p.size % 2:
    raise ValueError(f'{what}: expected (x, y) pairs, at least two, got '
                     f'{p.size} numbers')
  p = p.reshape(-1, 2)
  if not np.all(np.isfinite(p)):
    raise ValueError(f'{what} must be finite numbers, got {p.tolist()}')
  return p


def _normalize(points: np.ndarray, what: str):
  """(mean, RMS size, centred points of unit RMS). Divided by their largest
  magnitude first, so that coordinates near the float maximum do not
  overflow; points within 1e-6 px (or float rounding) of each other are
  one point, which no transform can map onto a template."""
  size = np.abs(points).max()
  x = points / size if size > 0 else points
  mean = x.mean(0)
  centred = x - mean
  rms = np.sqrt((centred ** 2).sum() / len(x))
  with np.errstate(over='ignore'):  # an infinite spread gives scale 0
    spread = rms * size
  if rms < 1e-12 or spread < 1e-6:
    raise ValueError(f'{what} are all at one point')
  return mean * size, spread, centred / rms


def similarity_transform(src, dst) -> np.ndarray:
  """(2, 3) matrix [sR | t] minimising sum |dst - (sR src + t)|^2 over
  rotations R (no reflection), scales s and shifts t. Raises ValueError for
  points that give no invertible finite transform."""
  src, dst = _points(src, 'landmarks'), _points(dst, 'template points')
  if src.shape != dst.shape:
    raise ValueError(f'{len(src)} landmarks for {len(dst)} template points')
  src_mean, src_size, src_n = _normalize(src, 'landmarks')
  dst_mean, dst_size, dst_n = _normalize(dst, 'template points')
  u, d, vt = np.linalg.svd(dst_n.T @ src_n / len(src))
  sign = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = (u * sign) @ vt
  with np.errstate(over='ignore', invalid='ignore'):  # checked below
    scale = (d * sign).sum() * (dst_size / src_size)  # src_n has unit RMS
    shift = dst_mean - scale * rotation @ src_mean
    matrix = np.concatenate([scale * rotation, shift[:, None]], axis=1)
  if not (scale > 0 and np.all(np.isfinite(matrix))):
    raise ValueError(f'landmarks {src.tolist()} give no usable similarity '
                     f'transform (scale {scale:g})')
  return matrix


def apply(matrix: np.ndarray, points) -> np.ndarray:
  points = np.asarray(points, np.float64).reshape(-1, 2)
  return points @ matrix[:, :2].T + matrix[:, 2]


def align(image: Image.Image, landmarks, image_size: int) -> Image.Image:
  """The image_size x image_size crop whose landmarks sit on the template."""
  matrix = similarity_transform(landmarks, template(image_size))
  # Pillow wants the inverse map, from output to input, in coordinates where
  # pixel i spans [i, i + 1): shift by half a pixel on both sides. sR is
  # inverted as R^T / s, without a determinant (s^2) to underflow.
  scale = math.hypot(*matrix[:, 0])
  with np.errstate(over='ignore', invalid='ignore'):  # checked below
    inverse = matrix[:, :2].T / scale / scale
    shift = 0.5 - inverse @ (matrix[:, 2] + 0.5)
  coeffs = (*inverse[0], shift[0], *inverse[1], shift[1])
  if not all(map(math.isfinite, coeffs)):
    raise ValueError(f'landmarks {np.ravel(landmarks).tolist()} give no '
                     f'usable warp (scale {scale:g})')
  return image.transform((image_size, image_size), Image.Transform.AFFINE,
                         coeffs, resample=Image.Resampling.BILINEAR)


def read_landmarks(path: str | os.PathLike) -> dict[str, tuple[float, ...]]:
  """``name x1 y1 ... x5 y5`` lines into {name: 10 floats}; the name may hold
  spaces (the last 10 fields are the coordinates). Raises ValueError naming
  the file and line of anything else, of coordinates that are not finite
  pixels, and of a name given other landmarks twice."""
  landmarks, lines = {}, {}
  fmt = ('expected "path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5" (left eye, right '
         'eye, nose, left and right mouth corner)')
  for n, line in text_lines(path):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    fields = line.rsplit(maxsplit=10)
    try:
      if len(fields) != 11:
        raise ValueError
      values = tuple(float(x) for x in fields[1:])
    except ValueError:
      raise ValueError(f'{path}, line {n}: {fmt}, got {shown(line)}') from None
    if not all(abs(v) <= MAX_COORDINATE for v in values):  # NaN too
      raise ValueError(
          f'{path}, line {n}: landmarks must be finite pixel coordinates '
          f'(at most {MAX_COORDINATE:g} in magnitude), got {shown(line)}; '
          'fix or drop the line')
    name = fields[0]
    if landmarks.get(name, values) != values:
      raise ValueError(f'{path}, line {n}: {name!r} already has other '
                       f'landmarks on line {lines[name]}; keep one of them')
    landmarks[name], lines[name] = values, n
  return landmarks


def write_landmarks(path: str | os.PathLike, points: dict
                    ) -> tuple[int, list[str]]:
  """Writes read_landmarks' format, ``name x1 y1 ... x5 y5`` lines, for
  {name: 10 numbers or (5, 2)}, sorted by name (record keys numerically),
  each float as its repr so that it reads back to the same float (and so
  the same pixels); atomically. Returns (lines written, the names no line
  can hold: line breaks, trailing spaces, not UTF-8), those left out."""
  lines, left_out = [], []
  for name in sorted(points, key=_name_order):
    written = _landmark_name(name)
    if written is None:
      left_out.append(name)
    else:
      values = ' '.join(repr(float(v)) for v in np.ravel(points[name]))
      lines.append(f'{written} {values}\n')
  jsonfile.atomic_write(path, ''.join(lines).encode('utf-8'))
  return len(lines), left_out


def _name_order(name: str):
  """Record keys in numeric order, paths in string order."""
  return (0, int(name), '') if name.isascii() and name.isdigit() else (
      1, 0, name)


def _landmark_name(name: str) -> str | None:
  """name as a landmarks line can hold it: './' before a name that would
  read as a comment or lose its leading space or byte order mark (the same
  file either way); None when no line can hold it."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return None
  if not name or any(c in name for c in '\n\r\0') or name != name.rstrip():
    return None
  if name[0] in '#\ufeff' or name[0].isspace():
    return f'./{name}'
  return name
