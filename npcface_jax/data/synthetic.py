"""Synthetic identities in memory: learnable batches without files or
TensorFlow (the demo, tests, benchmarks), and held-out identities' pairs
for verification.

Each identity is a fixed smooth random face drawn from (seed, class); each
sample is that face shifted, brightened and noised, normalised as the input
pipeline normalises real images. Everything derives from the seed, so a
stream resumed from ``state()`` repeats exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from npcface_jax.data import input_pipeline
from npcface_jax.faces import images

# Stream tags keep the seeds of different uses of one user seed apart
# (input_pipeline.py uses 1 to 3).
_PROTO, _STREAM, _HELDOUT = 4, 5, 6

_PROTO_RES = 8


def _upsample_matrix(n: int, size: int) -> np.ndarray:
  """(size, n) bilinear interpolation weights from n samples to size."""
  pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = pos - lo
  m = np.zeros((size, n))
  m[np.arange(size), lo] += 1 - w
  m[np.arange(size), hi] += w
  return m


def prototypes(classes: Sequence[int], image_size: int = 112,
               seed: int = 0) -> np.ndarray:
  """Each identity's fixed face, a smooth random RGB image in pixel units
  (N, S, S, 3) float32, drawn from (seed, class) alone."""
  low = np.stack([np.random.default_rng([seed, _PROTO, int(c)]).normal(
      size=(_PROTO_RES, _PROTO_RES, 3)) for c in classes])
  up = _upsample_matrix(_PROTO_RES, image_size)
  img = np.einsum('hi,nijc,wj->nhwc', up, low, up)
  return (127.5 + 70.0 * img).astype(np.float32)


def _render(labels, rng, image_size, seed, noise, max_shift, dtype,
            contract=None):
  """Samples of the given identities: prototype shifted by up to max_shift
  pixels, with a brightness offset and pixel noise, then normalised by the
  run's input contract."""
  uniq, inverse = np.unique(labels, return_inverse=True)
  protos = prototypes(uniq, image_size, seed)
  n = len(labels)
  shifts = rng.integers(-max_shift, max_shift + 1, (n, 2))
  out = np.empty((n, image_size, image_size, 3), np.float32)
  for k in range(n):
    out[k] = np.roll(protos[inverse[k]], tuple(shifts[k]), axis=(0, 1))
  out += rng.normal(0.0, 10.0, (n, 1, 1, 1)).astype(np.float32)
  out += noise * rng.standard_normal(out.shape, np.float32)
  np.clip(out, 0.0, 255.0, out=out)
  out = images.normalize(out, contract)
  dtype = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}[
      input_pipeline.dtype_name(dtype)]
  return out.astype(dtype, copy=False), np.asarray(labels, np.int32)


def synthetic_examples(classes: Sequence[int], samples_per_class: int,
                       image_size: int = 112, seed: int = 0, *,
                       noise: float = 24.0, max_shift: int = 4,
                       dtype: Any = np.float32,
                       contract: images.InputContract | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, S, S, 3), labels (N,) int32) of the given identities,
  samples_per_class each, grouped by class; for verification, pass classes
  the stream never draws (>= its num_classes)."""
  classes = [int(c) for c in classes]
  labels = np.repeat(np.asarray(classes, np.int64), samples_per_class)
  rng = np.random.default_rng([_HELDOUT, seed, samples_per_class, *classes])
  return _render(labels, rng, image_size, seed, noise, max_shift, dtype,
                 contract)


class SyntheticIterator(input_pipeline.Stream):
  """Endless batches of random identities; ``state()`` is {'step'}."""

  def __init__(self, num_classes, global_batch_size, mesh, *, image_size, seed,
               start, noise, max_shift, dtype, process_index, process_count,
               contract=None):
    super().__init__(mesh, process_count)
    self.batch_size = input_pipeline.local_batch_size(global_batch_size,
                                                      mesh, process_count)
    if num_classes < 1:
      raise ValueError(f'num_classes must be positive, got {num_classes}')
    self.num_classes, self.image_size, self.seed = num_classes, image_size, seed
    self.noise, self.max_shift, self.dtype = noise, max_shift, dtype
    self.process_index, self.contract = process_index, contract
    if isinstance(start, Mapping) and set(start) != {'step'}:
      raise ValueError(f'start {start!r} is not a state() of a synthetic '
                       "stream: it needs exactly the key 'step'")
    step = start['step'] if isinstance(start, Mapping) else (start or 0)
    if int(step) < 0:
      raise ValueError(f'start step must be >= 0, got {step}')
    self._step = int(step)

  def state(self) -> dict[str, int]:
    return {'step': self._step}

  def next_local(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(
        [_STREAM, self.seed, self._step, self.process_index])
    labels = rng.integers(0, self.num_classes, self.batch_size)
    images, labels = _render(labels, rng, self.image_size, self.seed,
                             self.noise, self.max_shift, self.dtype,
                             self.contract)
    self._step += 1
    return {'image': images, 'label': labels}


def synthetic_stream(num_classes: int, batch_size: int, mesh: Mesh,
                     image_size: int = 112, seed: int = 0, *,
                     start: Mapping[str, int] | int | None = None,
                     noise: float = 24.0, max_shift: int = 4,
                     dtype: Any = np.float32,
                     process_index: int | None = None,
                     process_count: int | None = None,
                     contract: images.InputContract | None = None
                     ) -> SyntheticIterator:
  """Learnable batches without files or TensorFlow: each of num_classes
  identities is a fixed prototype from (seed, class), each sample that
  prototype shifted and noised; batch (global) k is drawn from (seed, k,
  process), so ``start`` (a state() or a step) resumes exactly."""
  index, count = input_pipeline.processes(process_index, process_count)
  return SyntheticIterator(num_classes, batch_size, mesh,
                           image_size=image_size, seed=seed, start=start,
                           noise=noise, max_shift=max_shift, dtype=dtype,
                           process_index=index, process_count=count,
                           contract=contract)


def synthetic_pairs(classes, samples_per_class: int, num_pairs: int,
                    image_size: int, seed: int, noise: float,
                    contract: images.InputContract | None = None):
  """(images (2N, S, S, 3), issame (N,)): half matched, half mismatched
  pairs of the given (held-out) identities, drawn from the seed."""
  classes = list(classes)
  faces, _ = synthetic_examples(classes, samples_per_class, image_size, seed,
                                noise=noise, contract=contract)
  rng = np.random.default_rng([seed, len(classes), num_pairs])
  k, n = samples_per_class, len(classes)
  index, issame = [], []
  for i in range(num_pairs):
    same = i % 2 == 0
    a = rng.integers(n)
    b = a if same else (a + rng.integers(1, n)) % n
    sa, sb = (rng.choice(k, 2, replace=False) if same
              else rng.integers(k, size=2))
    index += [a * k + sa, b * k + sb]
    issame.append(same)
  return faces[np.asarray(index)], np.asarray(issame)
