"""Face detection: the faces in a photo, the one face a photo stands for,
and its 5 landmarks, which images.py aligns to the ArcFace template.

The detector is MTCNN (the ``mtcnn`` package, MIT, TensorFlow; its three
networks' weights ship inside the wheel, nothing is downloaded). It is an
optional extra: ``pip install "npcface_jax[detect]"``; without it,
``MissingExtra`` names that line. Any callable ``rgb (H, W, 3) uint8 ->
list[Face]`` can stand in for it (``FaceFinder(detector=...)``).

The rule for picking the face (``pick``): among the faces scoring at least
``min_score`` (0.9 by default; MTCNN's last stage keeps 0.8 and above),
the largest box by area; between boxes of equal area, the one whose centre
is nearest the image's. None left: the photo has no face, and it is
skipped and counted as 'no face' like any bad image.

Photos larger than ``MAX_DETECT_SIDE`` on their long side are detected on
a copy scaled down to it (the landmarks scaled back), and aligned from the
full-resolution photo: a 24-megapixel photo's pyramid would cost seconds,
and a face too small to find at 1280 pixels is too small to recognise.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from npcface_jax.faces.images import BadImage

INSTALL = 'pip install "npcface_jax[detect]"  (or: pip install "mtcnn==1.0.*")'
MIN_SCORE = 0.9
MAX_DETECT_SIDE = 1280


class MissingExtra(RuntimeError):
  """An optional dependency is not installed; the message names the line
  that installs it."""


class Face(NamedTuple):
  box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
  score: float
  # (5, 2) pixel coordinates: left eye, right eye, nose tip, left and right
  # mouth corner, 'left' meaning the image's left (the template's order).
  landmarks: np.ndarray


class Mtcnn:
  """MTCNN on the CPU through TensorFlow: ``detector(rgb) -> [Face]``.

  ``threads`` > 0 caps TensorFlow's threads (data_prep's worker processes
  run one each); it takes effect only before TensorFlow's first operation
  in the process. Deterministic: the same pixels give the same faces.
  """

  def __init__(self, threads: int = 0):
    try:
      import mtcnn  # noqa: PLC0415 (optional extra, imports TensorFlow)
    except ImportError as e:
      raise MissingExtra(f'face detection needs the mtcnn package ({e}); '
                         f'install it: {INSTALL}') from None
    if threads > 0:
      import tensorflow as tf  # noqa: PLC0415 (with mtcnn only)
      try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
      except RuntimeError:  # TensorFlow already started: its threads stay
        pass
    self._mtcnn = mtcnn.MTCNN(device='CPU:0')

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    if min(rgb.shape[:2]) < 12:
      return []
    # MTCNN's own smallest face (20 pixels): its pyramid is built for it
    # (mtcnn 1.0 runs out of pyramid on small photos with larger ones).
    rows = self._mtcnn.detect_faces(
        np.ascontiguousarray(rgb), output_type='numpy', box_format='xyxy')
    # Each row: image index, x1, y1, x2, y2, score, the 5 x, the 5 y.
    return [Face(tuple(map(float, r[1:5])), float(r[5]),
                 np.stack([r[6:11], r[11:16]], axis=1).astype(np.float64))
            for r in np.asarray(rows, np.float64).reshape(-1, 16)]


def pick(faces: list[Face], width: int, height: int,
         min_score: float = MIN_SCORE) -> Face | None:
  """The face a photo stands for (the rule in the module docstring)."""
  centre = np.array([width / 2, height / 2])

  def key(face: Face):
    x1, y1, x2, y2 = face.box
    middle = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    return (-(x2 - x1) * (y2 - y1), float(np.linalg.norm(middle - centre)))

  sure = [f for f in faces if f.score >= min_score]
  return min(sure, key=key) if sure else None


class FaceFinder:
  """``finder(image) -> (5, 2) landmarks`` of the face a PIL RGB image
  stands for, or BadImage('no face'); the detector is made on first use
  (so a finder can be sent to worker processes before it runs)."""

  def __init__(self, min_score: float = MIN_SCORE, threads: int = 0,
               detector: Callable[[np.ndarray], list[Face]] | None = None):
    if not 0 <= min_score <= 1:
      raise ValueError(f'min_score {min_score} is not a probability')
    self.min_score = min_score
    self.threads, self._detector = threads, detector

  def __getstate__(self):  # a worker process makes its own detector
    return {**self.__dict__, '_detector': None}

  @property
  def detector(self) -> Callable[[np.ndarray], list[Face]]:
    if self._detector is None:
      self._detector = _mtcnn(self.threads)
    return self._detector

  def __call__(self, image: Image.Image) -> np.ndarray:
    width, height = image.size
    scale = min(1.0, MAX_DETECT_SIDE / max(width, height))
    small = image
    if scale < 1:
      small = image.resize((max(1, round(width * scale)),
                            max(1, round(height * scale))),
                           Image.Resampling.BILINEAR)
    try:
      faces = self.detector(np.asarray(small, np.uint8))
    except MissingExtra:
      raise
    except Exception as e:  # noqa: BLE001 (the detector on one photo)
      raise BadImage('detector failed', f'{type(e).__name__}: '
                     f'{str(e)[:300]}') from None
    face = pick(faces, *small.size, self.min_score)
    if face is None:
      found = (f'{len(faces)} below the score floor {self.min_score}'
               if faces else 'none found')
      raise BadImage('no face', f'no face in the {width} x {height} photo '
                     f'({found})')
    # Pixel centres: x + 0.5 scales with the image.
    return (face.landmarks + 0.5) / scale - 0.5


@functools.cache
def _mtcnn(threads: int) -> Mtcnn:
  """One MTCNN per process (its networks load in seconds)."""
  return Mtcnn(threads)
