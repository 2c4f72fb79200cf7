"""The two array helpers that training, evaluation and serving all need and
that belong to none of them: the device mesh and L2 normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, Mesh

Array = jax.Array


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
  """The ('data', 'model') mesh over all devices (of all processes)."""
  n = len(devices) if devices is not None else jax.device_count()
  if model_parallel < 1 or n % model_parallel:
    raise ValueError(f'model_parallel {model_parallel} does not divide the '
                     f'{n} devices')
  return jax.make_mesh((n // model_parallel, model_parallel),
                       ('data', 'model'), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def row_norms(x: Array) -> Array:
  """The L2 norm of each row, float32 (N,): the square root of a sum of
  squares (primitives every export format translates). The embeddings'
  norms that heads (AdaFace, MagFace), the hard-sample records and the
  quality score read."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / ||x||, finite (value and gradient) for an all-zero row."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)
