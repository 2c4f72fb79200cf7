"""The inference step, apart from training: a backbone in inference mode
over any number of images, in fixed-size batches (a smaller last one
padded to a power of two, so a few compiled shapes serve any count and a
single pair of photos does not pay for a whole batch), sharded over every
device of the mesh,
optionally adding each image's mirror (flip test-time augmentation), to
L2-normalised float32 numpy embeddings, and on request each image's raw
embedding norm (the backbone's output before normalising: a quality score
for heads that train it, MagFace and AdaFace).

Images are uint8 RGB pixels (normalised on the device by the run's input
contract, so a verification set stays 4x smaller in host memory) or floats
already normalised as the input pipeline does (images.normalize).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from npcface_jax.evaluation import protocols
from npcface_jax.faces.images import InputContract, normalize
from npcface_jax.common.arrays import l2_normalize, row_norms

ALL_DEVICES = P(('data', 'model'))


class Embedder:
  """``embedder(variables, images) -> (N, D) float32``, L2-normalised;
  ``embedder(variables, images, with_norms=True)`` -> (those, (N,) float32
  raw norms).

  The raw norm is the norm of the backbone's output before normalising.
  With flip the embedding is the normalised sum of the image's and its
  mirror's raw embeddings (as before), and the norm is the mean of their
  two raw norms: the norm of the sum would shrink with the angle between
  them, mixing pose into the quality score. Both come from one compiled
  program; without with_norms its variant computes no norms.
  """

  def __init__(self, model, mesh: Mesh, batch_size: int, flip: bool = False,
               contract: InputContract | None = None):
    devices = mesh.size
    if batch_size <= 0 or batch_size % devices:
      raise ValueError(f'evaluation batch {batch_size} does not divide over '
                       f'{devices} devices: use a positive multiple of '
                       f'{devices}')
    self.mesh, self.batch_size, self.flip = mesh, batch_size, flip
    self._in = NamedSharding(mesh, ALL_DEVICES)
    out = NamedSharding(mesh, P())  # every process reads all embeddings

    def embed(variables, images, with_norms):
      x = images
      if x.dtype == jnp.uint8:
        x = normalize(x.astype(jnp.float32), contract)
      e = model.apply(variables, x, train=False)
      norms = row_norms(e) if with_norms else None
      if flip:
        mirror = model.apply(variables, x[:, :, ::-1], train=False)
        if with_norms:
          norms = 0.5 * (norms + row_norms(mirror))
        e = e + mirror
      unit = l2_normalize(e.astype(jnp.float32))
      return (unit, norms) if with_norms else unit

    self._embed = jax.jit(embed, out_shardings=out,
                          static_argnames='with_norms')

  def padded_size(self, n: int) -> int:
    """The batch that n images (n <= batch_size) are padded to: the device
    count times the next power of two, at most batch_size (so at most
    log2(batch_size / devices) + 2 shapes are ever compiled)."""
    devices = self.mesh.size
    per_device = -(-n // devices)
    return min(self.batch_size, devices * (1 << (per_device - 1).bit_length()))

  def __call__(self, variables: Any, images: np.ndarray,
               with_norms: bool = False):
    images = np.asarray(images)
    n, b = images.shape[0], self.batch_size
    out, norms = [], []
    for start in range(0, n, b):
      chunk = images[start:start + b]
      size = self.padded_size(chunk.shape[0])
      if chunk.shape[0] < size:  # pad the last batch to a compiled shape
        pad = np.zeros((size - chunk.shape[0],) + chunk.shape[1:],
                       chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      batch = jax.make_array_from_callback(chunk.shape, self._in,
                                           lambda index, c=chunk: c[index])
      got = self._embed(variables, batch, with_norms=bool(with_norms))
      if with_norms:
        got, norm = got
        norms.append(np.asarray(norm))
      out.append(np.asarray(got))
    if not out:
      empty = np.zeros((0, 0), np.float32)
      return (empty, np.zeros(0, np.float32)) if with_norms else empty
    if with_norms:
      return np.concatenate(out)[:n], np.concatenate(norms)[:n]
    return np.concatenate(out)[:n]


def verify(embedder: Embedder, variables: Any, images: np.ndarray,
           issame: np.ndarray, num_folds: int = 10) -> dict:
  """10-fold verification of pairs (images 2k, 2k + 1), as for LFW, on
  the folds the labels' layout gives (protocols.fold_assignment)."""
  embeddings = embedder(variables, images)
  return protocols.verification_accuracy(
      protocols.pair_similarities(embeddings), issame, num_folds)


def embed_batches(embedder: Embedder, variables: Any, batches,
                  with_norms: bool = False):
  """Embeddings of a stream of uint8 image batches (any sizes), in order;
  for sets too large to hold as images at once (IJB-C, MegaFace). With
  with_norms, (embeddings, raw norms) as Embedder gives them."""
  out = [embedder(variables, b, with_norms) for b in batches if len(b)]
  if not with_norms:
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
  if not out:
    return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
  return (np.concatenate([e for e, _ in out]),
          np.concatenate([n for _, n in out]))
