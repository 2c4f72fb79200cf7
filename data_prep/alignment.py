"""5-point face alignment: the least-squares similarity transform (Umeyama,
1991) that takes a face's landmarks onto the ArcFace template, and the warp
that applies it with Pillow.

Coordinates are pixel indices, as face detectors (and OpenCV's warpAffine)
use them: pixel (0, 0) is centred at (0, 0).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Eyes, nose tip, mouth corners in a 112x112 crop (insightface's template).
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]])


def template(image_size: int) -> np.ndarray:
  """The template scaled to an image_size x image_size crop."""
  return ARCFACE_TEMPLATE * (image_size / 112.0)


def similarity_transform(src, dst) -> np.ndarray:
  """(2, 3) matrix [sR | t] minimising sum |dst - (sR src + t)|^2 over
  rotations R (no reflection), scales s and shifts t."""
  src = np.asarray(src, np.float64).reshape(-1, 2)
  dst = np.asarray(dst, np.float64).reshape(-1, 2)
  src_mean, dst_mean = src.mean(0), dst.mean(0)
  src_c, dst_c = src - src_mean, dst - dst_mean
  src_var = (src_c ** 2).sum() / len(src)
  if src_var < 1e-12:
    raise ValueError('landmarks are all at one point')
  u, d, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
  sign = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
  rotation = (u * sign) @ vt
  scale = (d * sign).sum() / src_var
  shift = dst_mean - scale * rotation @ src_mean
  return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def apply(matrix: np.ndarray, points) -> np.ndarray:
  points = np.asarray(points, np.float64).reshape(-1, 2)
  return points @ matrix[:, :2].T + matrix[:, 2]


def align(image: Image.Image, landmarks, image_size: int) -> Image.Image:
  """The image_size x image_size crop whose landmarks sit on the template."""
  matrix = similarity_transform(landmarks, template(image_size))
  # Pillow wants the inverse map, from output to input, in coordinates where
  # pixel i spans [i, i + 1): shift by half a pixel on both sides.
  inverse = np.linalg.inv(matrix[:, :2])
  shift = 0.5 - inverse @ (matrix[:, 2] + 0.5)
  coeffs = (*inverse[0], shift[0], *inverse[1], shift[1])
  return image.transform((image_size, image_size), Image.Transform.AFFINE,
                         coeffs, resample=Image.Resampling.BILINEAR)


def read_landmarks(path: str | os.PathLike) -> dict[str, tuple[float, ...]]:
  """``name x1 y1 ... x5 y5`` lines into {name: 10 floats}; the name may hold
  spaces (the last 10 fields are the coordinates)."""
  landmarks = {}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      fields = line.rsplit(maxsplit=10)
      try:
        if len(fields) != 11:
          raise ValueError
        landmarks[fields[0]] = tuple(float(x) for x in fields[1:])
      except ValueError:
        raise ValueError(
            f'{path}, line {n}: expected "path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5" '
            '(left eye, right eye, nose, left and right mouth corner), got '
            f'{line!r}') from None
  return landmarks
