"""Our side of every import, whatever the source format: the backbone an
import names (model, options, embedding size), its variables' shapes to
lay the weights onto, our float32 embedding of normalised faces, and the
per-face cosine that parity reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from npcface_jax import models


def module(imported):
  """The Flax backbone of any import (its model, options, embedding_dim)."""
  return models.create(imported.model, embedding_dim=imported.embedding_dim,
                       **imported.options)


def variable_shapes(imported, side: int) -> dict:
  """The backbone's variables as shapes only, for side x side faces."""
  net = module(imported)
  return jax.eval_shape(lambda: net.init(
      jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False))


def embed(imported, inputs: np.ndarray) -> np.ndarray:
  """Our backbone (float32) on normalised NHWC inputs, as float64."""
  net = module(imported)
  apply = jax.jit(lambda v, x: net.apply(v, x, train=False))
  return np.concatenate([np.asarray(apply(imported.variables,
                                          inputs[i:i + 32]), np.float64)
                         for i in range(0, len(inputs), 32)])


def cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
  return (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) *
                                   np.linalg.norm(theirs, axis=1))
